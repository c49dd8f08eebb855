#!/usr/bin/env bash
# Reruns the CPU reproduction of docs/REPRODUCTION.md: for each data source (the embedded phantom,
# then phantoms on MNI152 anatomy when nilearn is installed), trains the post hoc (segmentation only)
# and the multi-task UNet side by side, one CPU thread each, then scores both on the test split.
#   bash docs/reproduce_cpu.sh [OUT_ROOT]          (default runs/; about 30 minutes per source on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs}
LC=${LESIONCOUNT:-.venv/bin/lesioncount}
mkdir -p "$OUT"
SOURCES="phantom"
if .venv/bin/python -c "import nilearn" 2>/dev/null; then SOURCES="phantom anatomy"; fi
for src in $SOURCES; do
  tag=cpu_${src}
  OMP_NUM_THREADS=1 $LC train --config configs/reproduce_cpu.yaml --data "$src" --post-hoc-only \
    -o "$OUT/${tag}_post_hoc" --no-progress > "$OUT/${tag}_post_hoc.log" 2>&1 &
  OMP_NUM_THREADS=1 $LC train --config configs/reproduce_cpu.yaml --data "$src" \
    -o "$OUT/${tag}_multitask" --no-progress > "$OUT/${tag}_multitask.log" 2>&1 &
  wait
  $LC evaluate-model --checkpoint post_hoc="$OUT/${tag}_post_hoc/best.pt" \
    --checkpoint multitask="$OUT/${tag}_multitask/best.pt" -o "$OUT/${tag}_eval"
done
