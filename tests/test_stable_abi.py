"""The compiled libraries use only the LibTorch stable ABI, so one build loads on every torch >= 2.10.

What is checked, on the libraries the running lesioncount loaded (and the CUDA-on-CPU test library):
  - every undefined dynamic symbol is a C function of torch's stable shim (aoti_torch_* / torch_*), of
    the CUDA runtime (_C_cuda only) or of the C/C++ runtime (versioned GLIBC / GLIBCXX / CXXABI / GCC);
    no C++ symbol of ATen, c10 or torch (what breaks as "undefined symbol" after a torch upgrade);
  - the libraries need libtorch_cpu (and for _C_cuda libtorch_cuda and libcudart) by soname only:
    not libc10, libtorch, libtorch_python or libpython, and no RPATH that pins one torch install;
  - build_info() and has_cuda_ops() describe what was built and loaded.
`make wheel-test` runs this file with the same wheel under torch 2.13 (CPU) and torch 2.14 (CUDA).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess

import pytest
import torch

import lesioncount

NM = shutil.which("nm")
READELF = shutil.which("readelf")

# Undefined symbols a stable-ABI library may import. Versioned C/C++ runtime symbols are matched by
# their version tag (nm -D prints "name@VERSION").
_ALLOWED_UNDEFINED = re.compile(
    r"^(aoti_torch_\w+|torch_\w+"                      # torch's stable C shim
    r"|(cuda\w+|__cuda\w+)(@libcudart\.so\.\d+)?"       # CUDA runtime (_C_cuda)
    r"|_ITM_\w+|__gmon_start__|_Jv_RegisterClasses"     # weak toolchain hooks
    r"|_ZTH\w+"                                        # weak thread_local init hooks (the test runtime)
    r"|[\w.]+@(GLIBC|GLIBCXX|CXXABI|GCC)_[\w.]+)$"      # libc, libstdc++, libgcc
)
_FORBIDDEN_NEEDED = ("libc10.so", "libtorch.so", "libtorch_python.so", "libc10_cuda.so", "libpython")


def _library_paths() -> list[str]:
    paths = []
    for name in ("lesioncount._C", "lesioncount._C_cuda", "lesioncount._C_cuda_cpu"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            paths.append(spec.origin)
    override = os.environ.get("LESIONCOUNT_CUDA_ON_CPU_LIBRARY", "")
    if override and os.path.isfile(override):
        paths.append(override)
    return paths


LIBRARIES = _library_paths()


def _undefined_symbols(path: str) -> list[str]:
    out = subprocess.run([NM, "-D", "--undefined-only", path], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


def _dynamic_section(path: str) -> str:
    return subprocess.run([READELF, "-d", path], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(NM is None, reason="needs nm (binutils)")
@pytest.mark.skipif(not lesioncount.has_ops(), reason="needs the compiled library")
@pytest.mark.parametrize("path", LIBRARIES, ids=[os.path.basename(p) for p in LIBRARIES])
def test_only_stable_abi_symbols_are_imported(path):
    undefined = _undefined_symbols(path)
    assert any(s.startswith("torch_library_impl") for s in undefined), "not a stable-ABI registration?"
    bad = [s for s in undefined if not _ALLOWED_UNDEFINED.match(s)]
    assert not bad, f"{os.path.basename(path)} imports symbols outside the stable ABI: {bad[:20]}"
    demangled = subprocess.run(["c++filt"], input="\n".join(undefined), capture_output=True, text=True).stdout
    cxx_torch = [s for s in demangled.splitlines() if re.search(r"\b(c10|at|torch|caffe2)::", s)]
    assert not cxx_torch, f"{os.path.basename(path)} imports C++ symbols of torch: {cxx_torch[:20]}"


@pytest.mark.skipif(READELF is None, reason="needs readelf (binutils)")
@pytest.mark.skipif(not lesioncount.has_ops(), reason="needs the compiled library")
@pytest.mark.parametrize("path", LIBRARIES, ids=[os.path.basename(p) for p in LIBRARIES])
def test_needs_torch_by_soname_only(path):
    dynamic = _dynamic_section(path)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert "libtorch_cpu.so" in needed, needed
    assert not [n for n in needed if n.startswith(_FORBIDDEN_NEEDED)], needed
    if os.path.basename(path).startswith("_C_cuda."):
        assert "libtorch_cuda.so" in needed and any(n.startswith("libcudart.so") for n in needed), needed
    assert "RPATH" not in dynamic and "RUNPATH" not in dynamic, "an RPATH would pin one torch installation"


def test_build_info_describes_the_loaded_libraries():
    info = lesioncount.build_info()
    assert info["torch"] == torch.__version__
    assert info["ops"] is lesioncount.has_ops()
    assert info["cuda_ops"] is lesioncount.has_cuda_ops()
    if not info["ops"]:
        assert info["ops_error"] and not info["cuda_ops"]
        return
    assert info["stable_abi_target"] == "2.10"
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["built_against_torch"]), info
    if torch.version.cuda is None:
        assert not info["cuda_ops"] and info["cuda_ops_error"] == "this torch is a CPU-only build"
    elif info["cuda_version"] and info["cuda_version"].split(".")[0] != torch.version.cuda.split(".")[0]:
        # kernels built for another CUDA major version (e.g. CUDA 13 kernels under a cu128 torch): the CPU
        # ops still load, the CUDA ones are refused with both versions named
        assert not info["cuda_ops"], info
        assert info["cuda_version"] in info["cuda_ops_error"] and torch.version.cuda in info["cuda_ops_error"], info
    elif info["cuda_version"]:
        # A build with CUDA kernels under a CUDA torch: they load even without a GPU, and every op has one.
        assert info["cuda_ops"], info["cuda_ops_error"]
        for op in ("label", "region_max", "_region_topk", "_region_max_backward", "poisson_binomial",
                   "_poisson_binomial_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lesioncount::{op}", "CUDA"), op
    else:
        assert not info["cuda_ops"] and "no CUDA kernels" in info["cuda_ops_error"]
