"""Where the GPU benchmarks and the parity smoke run their CUDA kernels.

Normally the real CUDA device (``torch.ops.lesioncount`` on CUDA tensors). With ``LC_GPU_DRY_RUN=1``
(set by ``bash benchmarks/gpu_check.sh --dry-run``) the same csrc/cuda kernels run on the CUDA-on-CPU
test runtime (``_C_cuda_cpu``, see tests/kernel_devices.py) on CPU tensors, at tiny sizes: it checks
the benchmarks' own logic (fixtures, correctness checks, JSON, the table) without a GPU; its timings
mean nothing.

    from gpu_device import DRY_RUN, DEVICE, available, active, sync, device_name
    ok, why = available()           # (False, reason) -> pytest.skip(why)
    x = x.to(DEVICE)
    with active():                  # the emulated CUDA kernels replace the CPU ones (dry run only)
        out = lesioncount.label(x, 0.1, 18)
    sync()
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

DRY_RUN = os.environ.get("LC_GPU_DRY_RUN", "") == "1"
DEVICE = torch.device("cpu") if DRY_RUN else torch.device("cuda")
_OPS = ("label", "region_max", "poisson_binomial", "_poisson_binomial_backward")


def _kernel_devices():
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import kernel_devices

    return kernel_devices


def available() -> tuple[bool, str]:
    """(True, "") when the CUDA kernels can run here; else (False, why)."""
    if DRY_RUN:
        kd = _kernel_devices()
        return (True, "") if kd.HAS_CUDA_ON_CPU else (False, f"dry run: {kd._CUDA_ON_CPU_PROBLEM}")
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    import lesioncount

    if not lesioncount.has_ops():
        return False, "the compiled lesioncount library is not loaded"
    missing = [op for op in _OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lesioncount::{op}", "CUDA")]
    if missing:
        return False, f"lesioncount was built without the CUDA kernels of {missing}"
    return True, ""


def active():
    """Context in which torch.ops.lesioncount (and the public API) runs the CUDA kernels on DEVICE."""
    if DRY_RUN:
        kd = _kernel_devices()
        return kd.CUDA_ON_CPU.active()
    return contextlib.nullcontext()


def label_op():
    """The label op whose kernel is the CUDA one (schema of torch.ops.lesioncount.label)."""
    return torch.ops.lesioncount_cuda_cpu.label if DRY_RUN else torch.ops.lesioncount.label


def sync() -> None:
    if not DRY_RUN:
        torch.cuda.synchronize()


def device_name() -> str:
    return "cuda-on-cpu (dry run)" if DRY_RUN else torch.cuda.get_device_name()


def size(real, tiny):
    """`real` on the device, `tiny` in the dry run."""
    return tiny if DRY_RUN else real
