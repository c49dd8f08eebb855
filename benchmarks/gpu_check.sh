#!/usr/bin/env bash
# One-call GPU check for the lent device machine (torch 2.11+cu130, Python 3.12, nvcc 13.0, no
# network). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # logs and JSON under $OUT (or ./out/gpu_check)
#
# Steps (each with its own timeout, all inside a global budget of LC_GPU_BUDGET_S, default 510 s,
# so the whole call ends well inside a 10-minute device command):
#   1. environment: GPU, driver, torch, nvcc, scikit-build-core, cupy
#   2. build + install with the CUDA kernels for sm_90 against the device's own torch
#   3. CUDA tests (tests selected by -k cuda, not marked slow; the CUDA-on-CPU variants, which CI
#      runs, are left out)
#   4. compute-sanitizer memcheck and racecheck on a small label workload
#   5. GPU benchmarks: benchmarks/bench_gpu_*.py (pytest-benchmark JSON), then the UNet training
#      step with and without the count loss (benchmarks/bench_train.py --device cuda)
#      then, if budget is left: slow CUDA tests (2^31-voxel item), synccheck, initcheck
#   6. a short table, printed last
# Later GPU work extends this same script. Exit status: 0 only if build, tests and sanitizers passed.
set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
# the device machine may get the tree without .git: pass LC_COMMIT=$(git rev-parse --short HEAD)
COMMIT=${LC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export LC_COMMIT=$COMMIT
BUDGET=${LC_GPU_BUDGET_S:-510}
OUTDIR=${OUT:-out/gpu_check}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/lc_inductor}
STATUS=0
declare -a SUMMARY=()

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# run_step NAME MAX_SECONDS LOGFILE CMD...: runs CMD with timeout min(MAX, budget left - 15 s)
run_step() {
  local name=$1 max=$2 log=$3; shift 3
  local t; t=$(left); t=$(( t - 15 ))
  (( t > max )) && t=$max
  if (( t < 20 )); then
    echo "== $name: SKIPPED (budget exhausted)" | tee -a "$log"
    SUMMARY+=("$name: skipped (budget)")
    return 99
  fi
  echo "== $name (timeout ${t}s, $(left)s of budget left)" | tee -a "$log"
  local s; s=$(date +%s)
  timeout --kill-after=10 "$t" "$@" >>"$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - s ))
  tail -n 25 "$log"
  echo "== $name: rc=$rc in ${dt}s"
  SUMMARY+=("$name: rc=$rc (${dt}s)")
  return $rc
}

# ---- 1. environment ----
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $COMMIT$(git diff --quiet 2>/dev/null || echo ' (+uncommitted changes, or no .git)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  $PY -m pip show scikit-build-core ninja cmake cupy-cuda13x pytest-benchmark hypothesis 2>/dev/null | grep -E '^(Name|Version)' | paste - - || true
  which compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null || true
} 2>&1 | tee "$OUTDIR/env.txt"
SKB=$($PY -c "import importlib.metadata as m; print(m.version('scikit-build-core'))" 2>/dev/null || echo none)
echo "scikit-build-core: $SKB (pyproject needs >= 0.10)"

# ---- 2. build ----
BUILD_LOG="$OUTDIR/build.log"
: >"$BUILD_LOG"
run_step build 300 "$BUILD_LOG" env LESIONCOUNT_CUDA=ON \
  $PY -m pip install -v --no-build-isolation --no-index --no-deps . \
  -Cbuild-dir=build/gpu-check -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90
BUILD_RC=$?
if (( BUILD_RC != 0 )); then
  STATUS=1
  echo "BUILD FAILED: see $BUILD_LOG"
else
  $PY - <<'EOF' 2>&1 | tee -a "$BUILD_LOG"
import torch, lesioncount
print("has_ops", lesioncount.has_ops())
for op in ("label", "region_max", "poisson_binomial", "_poisson_binomial_backward"):
    print(op, "CUDA kernel:", torch._C._dispatch_has_kernel_for_dispatch_key(f"lesioncount::{op}", "CUDA"))
EOF
fi
# run tests and benchmarks from outside the source tree's python/ so the installed package is used
export PYTHONPATH=

if (( BUILD_RC == 0 )); then
  # ---- 3. CUDA tests (slow ones at the end, if the budget allows) ----
  TEST_LOG="$OUTDIR/tests.log"
  : >"$TEST_LOG"
  run_step tests 180 "$TEST_LOG" $PY -m pytest -q -p no:cacheprovider tests -k "cuda and not cuda_cpu and not cuda-on-cpu" -m "not slow" \
    -o addopts="" -ra --durations=10 || STATUS=1

  # ---- 4. compute-sanitizer on a small case (memcheck, racecheck here; synccheck/initcheck last) ----
  SAN_LOG="$OUTDIR/sanitize.log"
  : >"$SAN_LOG"
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  sanitize() {
    if [[ -z "$SAN" ]]; then
      echo "compute-sanitizer not found" | tee -a "$SAN_LOG"; SUMMARY+=("sanitizer-$1: not found"); return 0
    fi
    run_step "sanitizer-$1" 75 "$SAN_LOG" "$SAN" --tool "$1" --error-exitcode 98 \
      --kernel-name regex:lesioncount $PY benchmarks/gpu_sanitize_case.py
  }
  sanitize memcheck || STATUS=1
  sanitize racecheck || STATUS=1

  # ---- 5. benchmarks ----
  BENCH_LOG="$OUTDIR/bench.log"
  : >"$BENCH_LOG"
  for f in benchmarks/bench_gpu_*.py; do
    name=$(basename "$f" .py)
    run_step "$name" 150 "$BENCH_LOG" $PY -m pytest -q -p no:cacheprovider "$f" -o addopts="" \
      --benchmark-json="$OUTDIR/$name.json" --benchmark-columns=median,iqr,rounds --benchmark-sort=name
  done

  # training step with and without the count loss (issue 6 target: <= 5 % at 2 x 5 x 64x192x192)
  run_step bench_train 120 "$BENCH_LOG" $PY benchmarks/bench_train.py --device cuda
  grep -E '^\|' "$BENCH_LOG" | tail -n 3 > "$OUTDIR/train_overhead.txt" || true

  # ---- extras while budget is left ----
  run_step tests-slow 90 "$TEST_LOG" $PY -m pytest -q -p no:cacheprovider tests -k "cuda and not cuda_cpu and not cuda-on-cpu" -m "slow" \
    -o addopts="" -ra || { rc=$?; (( rc != 5 && rc != 99 )) && STATUS=1; }
  sanitize synccheck || { rc=$?; (( rc != 99 )) && STATUS=1; }
  sanitize initcheck || { rc=$?; (( rc != 99 )) && STATUS=1; }
fi

# ---- 6. table (printed last) ----
$PY - "$OUTDIR" <<'EOF' 2>&1 | tee "$OUTDIR/table.txt"
import glob, json, os, sys
outdir = sys.argv[1]
commit = os.environ.get("LC_COMMIT", "unknown")
device = None
rows = []
for path in sorted(glob.glob(os.path.join(outdir, "bench_gpu_*.json"))):
    try:
        data = json.load(open(path))
    except Exception as exc:
        print(f"{os.path.basename(path)}: unreadable ({exc})")
        continue
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        device = device or info.get("device")
        rows.append((b.get("group") or "", info.get("impl", b["name"]), b["stats"]["median"], info))
print(f"device: {device}  commit: {commit}")
if not rows:
    print("no benchmark results")
cur = None
for group, impl, med, info in rows:
    if group != cur:
        cur = group
        print(f"\n{group}")
        print(f"  {'impl':28s} {'median':>11s} {'GVx/s':>8s} {'x floor':>8s} {'comps':>8s}")
    gv = info.get("GVx_per_s")
    fl = info.get("median_over_floor")
    comps = info.get("components")
    print(f"  {impl:28s} {med * 1e3:9.3f}ms {gv if gv is None else round(gv, 2)!s:>8s} "
          f"{fl if fl is None else round(fl, 1)!s:>8s} {comps if comps is not None else '':>8}")
EOF
[[ -s "$OUTDIR/train_overhead.txt" ]] && { echo; echo "training step (bench_train.py):"; cat "$OUTDIR/train_overhead.txt"; }
echo
echo "summary:"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "gpu_check: status=$STATUS, $(( $(date +%s) - START ))s, outputs in $OUTDIR"
exit $STATUS
