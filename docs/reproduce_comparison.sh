#!/usr/bin/env bash
# Reruns the count-method comparison of docs/REPRODUCTION.md (the paper's Table 1 and Table C.2):
# for each data source and seed, trains the five models on the same UNet with the same schedule
#   post_hoc (segmentation only, counted post hoc), multitask (this method's count loss),
#   bottleneck, multihead, downstream (the parametric count heads, cross-entropy)
# on the full training set (configs/comparison_cpu.yaml) and in the low-data regime
# (configs/comparison_cpu_lowdata.yaml), then scores each group with evaluate-model: Table 1 with the
# attack (SR / AD) and MC-dropout cc_count (uncertainty curves, entropy histograms); Table C.2 for the
# low-data runs on the same test cases as the full-data runs (the paper's Table C.2 has no attack or
# MC-dropout columns, so these are skipped there); paired statistics against multitask.
#
#   bash docs/reproduce_comparison.sh [OUT_ROOT]        (default runs/comparison)
#
# Environment (all optional):
#   SOURCES="phantom anatomy"   data sources (default: phantom, plus anatomy when nilearn is installed)
#   SEEDS="0 1"                 full-data seeds (default 0 1)
#   LOW_SEEDS="0 1"             low-data seeds (default 0 1)
#   JOBS=2                      trainings / evaluations run at once, one CPU thread each (default 2)
#   CONFIG, LOW_CONFIG          training configs (GPU: configs/comparison_gpu.yaml, comparison_gpu_lowdata.yaml)
#   FULL_TRAIN                  the low-data runs are scored on the test split of a run with this many
#                               training cases (default: num_train of CONFIG)
#   ATTACK_STEPS=10 MC_SAMPLES=50 THREADS=1 NICE=19 EVAL_DEVICE=cpu (auto on a GPU)
# A model whose OUT_DIR already holds best.pt and a finished last.pt is not retrained (an interrupted
# run is resumed), so the script can be rerun after an interruption. Logs: OUT_ROOT/logs/.
# Time on the project's loaded 2-core CPU: see docs/REPRODUCTION.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/comparison}
LC=${LESIONCOUNT:-.venv/bin/lesioncount}
PY=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-configs/comparison_cpu.yaml}
LOW_CONFIG=${LOW_CONFIG:-configs/comparison_cpu_lowdata.yaml}
SEEDS=${SEEDS:-"0 1"}
LOW_SEEDS=${LOW_SEEDS:-"0 1"}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
NICE=${NICE:-19}
ATTACK_STEPS=${ATTACK_STEPS:-10}
EVAL_DEVICE=${EVAL_DEVICE:-cpu}
MC_SAMPLES=${MC_SAMPLES:-50}
if [ -z "${SOURCES:-}" ]; then
  SOURCES="phantom"
  if $PY -c "import nilearn" 2>/dev/null; then SOURCES="phantom anatomy"; fi
fi
if [ -z "${FULL_TRAIN:-}" ]; then
  FULL_TRAIN=$($PY -c "import sys; from lesioncount.train.config import TrainConfig, load_config_file as f; print(TrainConfig(**f(sys.argv[1])).num_train)" "$CONFIG")
fi
MODELS="post_hoc multitask bottleneck multihead downstream"
mkdir -p "$OUT/logs"

model_flags() {
  case "$1" in
    post_hoc) echo "--post-hoc-only" ;;
    multitask) echo "" ;;
    *) echo "--model $1" ;;
  esac
}

finished() {  # OUT_DIR holds best.pt and a last.pt of every configured epoch
  [ -f "$1/best.pt" ] && [ -f "$1/last.pt" ] && $PY - "$1" <<'PY'
import sys, torch
c = torch.load(sys.argv[1] + "/last.pt", map_location="cpu", weights_only=True)
sys.exit(0 if c["epoch"] >= c["config"]["epochs"] else 1)
PY
}

train_one() {  # config source seed model out_dir
  local config=$1 src=$2 seed=$3 model=$4 dir=$5 resume=""
  if finished "$dir"; then echo "skip $dir (finished)"; return 0; fi
  [ -f "$dir/last.pt" ] && resume="--resume"
  echo "train $dir"
  # shellcheck disable=SC2046
  OMP_NUM_THREADS=$THREADS nice -n "$NICE" $LC train --config "$config" --data "$src" --seed "$seed" \
    $(model_flags "$model") -o "$dir" --no-progress $resume > "$OUT/logs/$(echo "$dir" | tr / _).log" 2>&1
}

evaluate() {  # group_dir table extra-flags...
  local group=$1 table=$2; shift 2
  local args=()
  for m in $MODELS; do args+=(--checkpoint "$m=$group/$m/best.pt"); done
  echo "evaluate $group"
  OMP_NUM_THREADS=$THREADS nice -n "$NICE" $LC evaluate-model "${args[@]}" --device "$EVAL_DEVICE" \
    --paper-table "$table" "$@" -o "${group}_eval" > "$OUT/logs/$(echo "${group}_eval" | tr / _).log" 2>&1
}

pool() {  # run "$@" in the background, at most JOBS at once
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  "$@" &
}

# 1. training: seed 0 (full, then low data) first, so that a cut-short run has one complete comparison
for src in $SOURCES; do
  first=1
  for seed in $SEEDS; do
    for m in $MODELS; do pool train_one "$CONFIG" "$src" "$seed" "$m" "$OUT/${src}_s${seed}/$m"; done
    if [ $first = 1 ]; then
      for lseed in $LOW_SEEDS; do
        for m in $MODELS; do pool train_one "$LOW_CONFIG" "$src" "$lseed" "$m" "$OUT/${src}_low_s${lseed}/$m"; done
      done
      first=0
    fi
  done
done
wait
# 2. evaluation (Table 1 per full-data group, Table C.2 per low-data group on the full runs' test cases)
for src in $SOURCES; do
  for seed in $SEEDS; do
    pool evaluate "$OUT/${src}_s${seed}" 1 --attack --attack-steps "$ATTACK_STEPS" --mc-samples "$MC_SAMPLES"
  done
  for lseed in $LOW_SEEDS; do pool evaluate "$OUT/${src}_low_s${lseed}" C.2 --num-train "$FULL_TRAIN"; done
done
wait
for f in "$OUT"/*_eval/report.md; do echo "== $f"; sed -n '/^## Table 1/,/^## Table C.1/p' "$f" | head -20; done
