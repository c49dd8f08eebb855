"""Every csrc/cuda/*.cu compiles standalone with nvcc (no GPU needed; skipped without nvcc).

The .cu files hold pure CUDA (no torch headers); each is compiled to PTX for compute_90:
``nvcc -c -std=c++17 -gencode arch=compute_90,code=compute_90 -Xcompiler -fPIC file.cu -I csrc -o /dev/null``.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT

NVCC = shutil.which("nvcc")
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def _compile(path):
    # PTX only (compute_90): the whole CUDA front end and NVVM run, ptxas does not, which keeps the
    # check to seconds per file (SASS for every kernel instantiation took minutes here).
    cmd = [NVCC, "-c", "-std=c++17", "-gencode", "arch=compute_90,code=compute_90", "-Xcompiler", "-fPIC", str(path),
           "-I", str(ROOT / "csrc"), "-o", "/dev/null"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results():
    # compile all files concurrently once (the machine may have few cores; nvcc is mostly serial)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CU_FILES, pool.map(_compile, CU_FILES)))


def test_there_are_cuda_sources():
    assert any(p.name == "label.cu" for p in CU_FILES)


@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_standalone(path, results):
    r = results[path]
    assert r.returncode == 0, f"nvcc failed on {path.name}:\n{r.stderr[-4000:]}"
    # Warnings in our own sources are reported, not failed: the CMake build adds
    # --expt-relaxed-constexpr, which silences some that this plain command shows.
    own = [line for line in r.stderr.splitlines() if "warning" in line and "csrc/" in line]
    if own:
        warnings.warn(f"nvcc warnings in {path.name}:\n" + "\n".join(own), stacklevel=1)


def test_cu_files_include_no_torch_headers():
    for path in CU_FILES:
        text = path.read_text()
        for bad in ("<torch/", "<ATen/", "<c10/"):
            assert bad not in text, f"{path.name} includes {bad} (keep torch headers in the .cpp launcher)"
