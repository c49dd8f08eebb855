"""benchmarks/gpu_check.sh --dry-run: the GPU script's own logic (phases, budget, per-test timeout,
sanitizer filter choice, files under $OUT, the table) on the CUDA-on-CPU runtime, so its mistakes
show up before a device is lent. ~30 s on a quiet 2-core machine.

A fake `compute-sanitizer` on PATH prints a --help with the documented key=value kernel filter, so
the preflight's filter choice is exercised too (the sanitizer run itself is skipped in the dry run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_devices import HAS_CUDA_ON_CPU, REQUIRE_CUDA_ON_CPU

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(
    not HAS_CUDA_ON_CPU and not REQUIRE_CUDA_ON_CPU, reason="needs the CUDA-on-CPU library (LESIONCOUNT_CUDA_ON_CPU=ON)"
)

FAKE_HELP = """#!/bin/sh
case "$1" in
  --version) echo "NVIDIA (R) Compute Sanitizer (fake for the dry-run test)";;
  --help) cat <<'EOF'
  --kernel-name arg     Filter the kernels to check: {key1=val1}[{,key2=val2}]
                        kernel_name (kne): the mangled name; kernel_substring (kns): a part of it
EOF
;;
esac
"""


def _run(tmp_path: Path, budget: int) -> tuple[subprocess.CompletedProcess, Path]:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils timeout")
    out = tmp_path / "out"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    san = fake_bin / "compute-sanitizer"
    san.write_text(FAKE_HELP)
    san.chmod(0o755)
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, LC_GPU_BUDGET_S=str(budget),
               PATH=f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("LC_GPU_DRY_RUN", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=budget + 60)
    return proc, out


def test_gpu_check_dry_run(tmp_path):
    proc, out = _run(tmp_path, budget=300)
    text = proc.stdout
    assert proc.returncode == 0, text[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    assert {"preflight.txt", "smoke.log", "bench_gpu_label.json", "bench_gpu_count.json", "table.txt"} <= set(files)
    # the table is printed last: its summary lines follow every phase's own output
    tail = text[text.rindex("summary (DRY RUN"):]
    for phase in ("build", "smoke", "bench_gpu_label", "bench_gpu_count", "tests", "memcheck"):
        assert f"\n  {phase} " in tail, (phase, tail)
    assert "smoke                  ok" in tail and "tests                  ok" in tail
    assert "gpu_check: status=0" in tail.splitlines()[-1]
    assert "lesioncount-cuda-static" in text and "device: cuda-on-cpu (dry run)" in text
    table = (out / "table.txt").read_text()
    assert table.startswith("device: cuda-on-cpu (dry run)") and table.rstrip().endswith(tail.strip())
    # the memcheck filter was chosen from the (fake) --help's documented key=value syntax
    assert "memcheck kernel filter: --kernel-name kns=lesioncount" in (out / "preflight.txt").read_text()
    assert "parity smoke (cuda-on-cpu (dry run)): 0 mismatches" in (out / "smoke.log").read_text()


def test_gpu_check_budget_skips_but_keeps_the_table(tmp_path):
    """A budget too small for anything after the preflight: every phase says SKIPPED, the table
    still comes last, and the run does not fail for what it skipped."""
    proc, out = _run(tmp_path, budget=20)
    text = proc.stdout
    assert proc.returncode == 0, text[-4000:] + proc.stderr[-2000:]
    tail = text[text.rindex("summary (DRY RUN"):]
    assert "bench_gpu_count        skipped (budget spent" in tail
    assert "tests                  skipped (budget spent" in tail
    assert "gpu_check: status=0" in tail.splitlines()[-1]
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8
