#!/usr/bin/env bash
# One-call GPU check for the lent device machine (torch 2.11+cu130, Python 3.12, nvcc 13.0,
# compute-sanitizer, no network). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh              # on the GPU: outputs under $OUT (or ./out/gpu_check)
#     bash benchmarks/gpu_check.sh --dry-run    # here, no GPU: the same steps on the CUDA-on-CPU runtime
#
# Phases, in this order (numbers first: device time is rare), each under its own timeout and all
# inside one global budget LC_GPU_BUDGET_S (default 360 s = 6 minutes, the build included); a phase
# that no longer fits prints "== NAME: SKIPPED (budget ...)" and the run goes on to the table:
#   0. preflight: GPU, driver, torch, nvcc, pytest plugins, and compute-sanitizer's own --help lines
#      for kernel filtering (the memcheck filter syntax is chosen from them, see 5.)
#   1. install: the wheel carried from the development machine (dist/lesioncount-*.whl, from
#      `make wheel`; run the device tool with carry ["dist"]) when the device's torch is >= 2.10,
#      the wheel's stable-ABI floor (seconds, no compile); else build + install with the CUDA
#      kernels for sm_90 against the device's own torch (<= 240 s)
#   2. CUDA-vs-CPU parity smoke, seconds (benchmarks/gpu_sanitize_case.py); benchmarks are only
#      trusted when it passes
#   3. GPU benchmarks: bench_gpu_label.py, bench_gpu_count.py (pytest-benchmark JSON); their CPU
#      references are computed once per module, CPU-bound implementations are left out
#      (LC_GPU_BENCH_CPU_BOUND=1 adds them); then bench_train.py --device cuda if budget is left
#   4. CUDA tests from explicit files (-m cuda, not slow, not the CUDA-on-CPU variants), every test
#      with a per-test timeout (pytest-timeout when installed, else benchmarks/pytest_alarm.py, a
#      SIGALRM plugin) and the whole pytest call under `timeout`
#   5. compute-sanitizer memcheck on the smoke workload, only lesioncount's kernels checked:
#      `--kernel-name kns=lesioncount` when --help documents that key=value filter, else no filter
#   6. summary table, printed last (also on failure or SIGTERM: an EXIT trap prints it)
# Files under $OUT, at most 8 (the device tool returns 8): preflight.txt build.log smoke.log
# bench.log bench_gpu_label.json bench_gpu_count.json checks.log table.txt.
#
# --dry-run (LC_GPU_DRY_RUN=1): no build (needs nvcc for the device's torch; the CUDA-on-CPU
# library _C_cuda_cpu of the current install must exist: LESIONCOUNT_CUDA_ON_CPU=ON), the smoke
# and the benchmarks on the CUDA-on-CPU runtime at tiny sizes (timings meaningless), a few CUDA-on-CPU
# tests through the same per-test-timeout path, no sanitizer (needs a device), bench_train skipped;
# python defaults to .venv/bin/python. tests/test_gpu_check_dry_run.py runs it.
# Exit status: 0 only if build, smoke, benchmarks, tests and memcheck passed (skipped = not failed).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (expected --dry-run)" >&2; exit 2 ;;
  esac
done

START=$(date +%s)
# the device machine may get the tree without .git: pass LC_COMMIT=$(git rev-parse --short HEAD)
COMMIT=${LC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export LC_COMMIT=$COMMIT
BUDGET=${LC_GPU_BUDGET_S:-360}
RESERVE=10  # seconds kept for the table
OUTDIR=${OUT:-out/gpu_check}
mkdir -p "$OUTDIR"
if (( DRY_RUN )); then
  export LC_GPU_DRY_RUN=1
  PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
else
  unset LC_GPU_DRY_RUN
  PY=${PYTHON:-python3}
fi
export PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/lc_inductor}
TEST_TIMEOUT=${LC_GPU_TEST_TIMEOUT_S:-60}  # per test
STATUS=0
declare -a SUMMARY=()
PREFLIGHT="$OUTDIR/preflight.txt" BUILD_LOG="$OUTDIR/build.log" SMOKE_LOG="$OUTDIR/smoke.log"
BENCH_LOG="$OUTDIR/bench.log" CHECK_LOG="$OUTDIR/checks.log" TABLE="$OUTDIR/table.txt"
: >"$PREFLIGHT"; : >"$BUILD_LOG"; : >"$SMOKE_LOG"; : >"$BENCH_LOG"; : >"$CHECK_LOG"
rm -f "$OUTDIR"/bench_gpu_*.json "$TABLE"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
note() { SUMMARY+=("$(printf '%-22s %s' "$1" "$2")"); }
skip() {  # skip NAME WHY LOG
  echo "== $1: SKIPPED ($2)" | tee -a "$3"
  note "$1" "skipped ($2)"
}
# run_step NAME MAX_SECONDS LOGFILE CMD...: CMD under timeout min(MAX, budget left - reserve);
# skipped (rc 99) when less than 15 s would be left for it
run_step() {
  local name=$1 max=$2 log=$3; shift 3
  local t; t=$(( $(left) - RESERVE ))
  (( t > max )) && t=$max
  if (( t < 15 )); then
    skip "$name" "budget spent: $(elapsed)s of ${BUDGET}s used, $(left)s left, a phase needs 15 s + ${RESERVE} s for the table" "$log"
    return 99
  fi
  echo "== $name (timeout ${t}s, $(left)s of budget left)" | tee -a "$log"
  local s; s=$(date +%s)
  timeout --kill-after=5 "$t" "$@" >>"$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - s ))
  tail -n 15 "$log"
  local what="ok"
  (( rc != 0 )) && what="FAILED rc=$rc"
  (( rc == 124 || rc == 137 )) && what="TIMED OUT after ${t}s"
  echo "== $name: $what in ${dt}s"
  note "$name" "$what (${dt}s)"
  return $rc
}

TABLE_DONE=0
finish() {
  (( TABLE_DONE )) && return
  TABLE_DONE=1
  {
    $PY - "$OUTDIR" <<'EOF'
import glob, json, os, sys
outdir = sys.argv[1]
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
print(f"device: {device}  commit: {os.environ.get('LC_COMMIT', 'unknown')}")
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
    if grep -qE '^\|' "$BENCH_LOG" 2>/dev/null; then
      echo; echo "training step (bench_train.py):"; grep -E '^\|' "$BENCH_LOG" | tail -n 3
    fi
    echo
    echo "summary ($([[ $DRY_RUN == 1 ]] && echo 'DRY RUN on the CUDA-on-CPU runtime' || echo 'GPU run')):"
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
    local nfiles; nfiles=$(find "$OUTDIR" -type f ! -name table.txt | wc -l)
    (( nfiles + 1 > 8 )) && echo "  WARNING: $((nfiles + 1)) files under $OUTDIR (the device tool returns 8)"
    echo "gpu_check: status=$STATUS, $(elapsed)s of ${BUDGET}s budget, $((nfiles + 1)) files in $OUTDIR"
  } 2>&1 | tee "$TABLE"
}
trap finish EXIT
trap 'STATUS=1; note interrupted "SIGTERM/SIGINT at $(elapsed)s"; exit 1' TERM INT

# ---- 0. preflight ----
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
SAN_FILTER=()
{
  echo "date: $(date -u +%FT%TZ)  dry_run: $DRY_RUN  budget: ${BUDGET}s"
  echo "commit: $COMMIT$(git diff --quiet 2>/dev/null || echo ' (+uncommitted changes, or no .git)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  $PY -m pip list 2>/dev/null | grep -iE '^(scikit-build-core|ninja|cmake|cupy|pytest|pytest-benchmark|pytest-timeout|hypothesis|pybind11) ' || true
  echo "compute-sanitizer: ${SAN:-not found}"
  if [[ -n "$SAN" ]]; then
    "$SAN" --version 2>&1 | tail -n 2
    # the kernel filter's documented syntax, as this version prints it
    "$SAN" --help 2>&1 | grep -n -i -A6 -E -- '--kernel-name|--filter|kernel_substring|kns' | head -n 40
  fi
} >>"$PREFLIGHT" 2>&1
cat "$PREFLIGHT"
if [[ -n "$SAN" ]]; then
  SAN_HELP=$("$SAN" --help 2>&1)
  if grep -q -- '--kernel-name' <<<"$SAN_HELP" && grep -qiE 'kns|kernel_substring' <<<"$SAN_HELP"; then
    SAN_FILTER=(--kernel-name kns=lesioncount)
  elif grep -q -- '--filter' <<<"$SAN_HELP" && grep -qiE 'kns|kernel_substring' <<<"$SAN_HELP"; then
    SAN_FILTER=(--filter kns=lesioncount)
  fi
  echo "memcheck kernel filter: ${SAN_FILTER[*]:-none (not in --help: every kernel is checked)}" | tee -a "$PREFLIGHT"
fi
if $PY -c "import pytest_timeout" 2>/dev/null; then
  PER_TEST=(--timeout="$TEST_TIMEOUT")
  PER_TEST_VIA=pytest-timeout
else
  PER_TEST=(-p pytest_alarm --alarm-timeout="$TEST_TIMEOUT")  # benchmarks/pytest_alarm.py
  PER_TEST_VIA="benchmarks/pytest_alarm.py (pytest-timeout is not installed)"
fi
echo "per-test timeout: ${TEST_TIMEOUT}s via $PER_TEST_VIA" | tee -a "$PREFLIGHT"

# ---- 1. build ----
BUILD_OK=0
if (( DRY_RUN )); then
  skip build "dry run: needs nvcc and the device's torch; uses the installed CUDA-on-CPU library" "$BUILD_LOG"
  if $PY -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_device; ok, why = gpu_device.available(); print('CUDA-on-CPU runtime:', ok, why); sys.exit(0 if ok else 1)" >>"$BUILD_LOG" 2>&1; then
    BUILD_OK=1
  else
    STATUS=1; note runtime "FAILED: $(tail -n 1 "$BUILD_LOG")"
  fi
else
  WHEEL=$(ls dist/lesioncount-*-py3-none-linux_x86_64.whl 2>/dev/null | head -n 1)
  TORCH_OK_FOR_WHEEL=$($PY -c "import torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); print(int(v >= (2, 10) and torch.version.cuda is not None and torch.version.cuda.split('.')[0] == '13'))" 2>/dev/null || echo 0)
  if [[ -n "$WHEEL" && "$TORCH_OK_FOR_WHEEL" == 1 ]]; then
    echo "install: carried wheel $WHEEL (stable ABI, torch >= 2.10, CUDA 13)" | tee -a "$BUILD_LOG"
    INSTALL_CMD=($PY -m pip install -v --no-index --no-deps --force-reinstall "$WHEEL")
  else
    echo "install: building from source (wheel: ${WHEEL:-none}; torch suitable for it: $TORCH_OK_FOR_WHEEL)" | tee -a "$BUILD_LOG"
    INSTALL_CMD=(env LESIONCOUNT_CUDA=ON $PY -m pip install -v --no-build-isolation --no-index --no-deps .
                 -Cbuild-dir=build/gpu-check -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90)
  fi
  if run_step build 240 "$BUILD_LOG" "${INSTALL_CMD[@]}"; then
    BUILD_OK=1
    $PY - <<'EOF' 2>&1 | tee -a "$BUILD_LOG"
import torch, lesioncount
print("has_ops", lesioncount.has_ops(), "has_cuda_ops", lesioncount.has_cuda_ops())
print("build_info", lesioncount.build_info())
for op in ("label", "region_max", "_region_topk", "_region_max_backward", "poisson_binomial", "_poisson_binomial_backward"):
    print(op, "CUDA kernel:", torch._C._dispatch_has_kernel_for_dispatch_key(f"lesioncount::{op}", "CUDA"))
EOF
  else
    STATUS=1
    echo "BUILD FAILED: see $BUILD_LOG"
  fi
  # run everything else from the installed package, not the source tree's python/
  export PYTHONPATH=
fi

if (( BUILD_OK )); then
  # ---- 2. parity smoke ----
  run_step smoke 60 "$SMOKE_LOG" $PY benchmarks/gpu_sanitize_case.py || { rc=$?; (( rc != 99 )) && STATUS=1; }

  # ---- 3. benchmarks ----
  for name in bench_gpu_label bench_gpu_count; do
    run_step "$name" 90 "$BENCH_LOG" $PY -m pytest -q -p no:cacheprovider "benchmarks/$name.py" -o addopts="" \
      -rs --benchmark-json="$OUTDIR/$name.json" --benchmark-columns=median,iqr,rounds --benchmark-sort=name \
      || { rc=$?; (( rc != 99 )) && STATUS=1; }
  done

  # ---- 4. CUDA tests (explicit files, per-test timeout) ----
  TEST_FILES=(tests/test_cuda_label.py tests/test_cuda_ops.py tests/test_label.py tests/test_region_max.py
              tests/test_poisson_binomial.py tests/test_count_distribution.py tests/test_autodiff.py)
  if (( DRY_RUN )); then  # the same path on a few CUDA-on-CPU tests (seconds)
    TEST_SEL=(-m "not slow" -k "cuda-on-cpu and (public_wrapper or region_max_parity_bitwise or bad_inputs_flag_without_sync)")
  else
    TEST_SEL=(-m "cuda and not slow" -k "not cuda-on-cpu and not cuda_cpu and not torch_compile")
  fi
  run_step tests 120 "$CHECK_LOG" env PYTHONPATH=benchmarks $PY -m pytest -q -p no:cacheprovider -o addopts="" \
    "${PER_TEST[@]}" -ra --durations=5 "${TEST_SEL[@]}" "${TEST_FILES[@]}" \
    || { rc=$?; (( rc != 99 )) && STATUS=1; }

  # ---- 5. memcheck ----
  if (( DRY_RUN )); then
    skip memcheck "dry run: compute-sanitizer needs a device" "$CHECK_LOG"
  elif [[ -z "$SAN" ]]; then
    skip memcheck "compute-sanitizer not found" "$CHECK_LOG"
  else
    run_step memcheck 75 "$CHECK_LOG" "$SAN" --tool memcheck --error-exitcode 98 "${SAN_FILTER[@]}" \
      $PY benchmarks/gpu_sanitize_case.py || { rc=$?; (( rc != 99 )) && STATUS=1; }
  fi

  # ---- extras while budget is left (no extra files) ----
  if (( DRY_RUN )); then
    skip bench_train "dry run: needs a device" "$BENCH_LOG"
  else
    run_step bench_train 90 "$BENCH_LOG" $PY benchmarks/bench_train.py --device cuda || { rc=$?; (( rc != 99 )) && STATUS=1; }
    run_step tests-compile 90 "$CHECK_LOG" env PYTHONPATH=benchmarks $PY -m pytest -q -p no:cacheprovider -o addopts="" \
      -p pytest_alarm --alarm-timeout=80 -ra -k "torch_compile and not cuda-on-cpu" tests/test_cuda_ops.py \
      || { rc=$?; (( rc != 99 && rc != 5 )) && STATUS=1; }
  fi
fi
exit $STATUS
