"""Where the CUDA tests run their kernels: a real GPU, or the CUDA-on-CPU test runtime.

The `kernel_device` fixture is parametrised over
  - "cuda": torch.ops.lesioncount on CUDA tensors (skipped without a GPU and the CUDA build);
  - "cuda-on-cpu": the very same csrc/cuda/*.cu kernels and *_cuda.cpp launchers compiled against
    tests/cuda_cpu (the `_C_cuda_cpu` library built with LESIONCOUNT_CUDA_ON_CPU=ON, as `make test`
    does), exposed as torch.ops.lesioncount_cuda_cpu on CPU tensors.
With LESIONCOUNT_REQUIRE_CUDA_ON_CPU=1 (set by `make test`, hence in CI) a missing `_C_cuda_cpu`
fails the tests instead of skipping them, so the CUDA code cannot silently stop being tested.
LESIONCOUNT_CUDA_ON_CPU_LIBRARY=/path/_C_cuda_cpu.so loads that file instead of the installed one:
`make wheel-test` runs one build of it (like the wheel, on the stable ABI) under two torch versions.

Tests write `kd.to(x)` for "x on the kernel device", `kd.ops.<op>` for the op namespace whose kernels
are the CUDA ones, and `with kd.active():` around calls of the public API (count_distribution,
autograd, opcheck), which then dispatch CPU tensors to the emulated CUDA kernels (compute CPU
references outside that block).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from dataclasses import dataclass

import pytest
import torch

_EMULATED_OPS = ("label", "region_max", "_region_topk", "_region_max_backward", "poisson_binomial",
                 "_poisson_binomial_backward")


def _load_emulation() -> tuple[bool, str]:
    path = os.environ.get("LESIONCOUNT_CUDA_ON_CPU_LIBRARY", "")
    if not path:
        try:
            spec = importlib.util.find_spec("lesioncount._C_cuda_cpu")
        except ImportError as exc:
            return False, f"lesioncount is not importable: {exc}"
        if spec is None or spec.origin is None:
            return False, "lesioncount was built without the CUDA-on-CPU test library (LESIONCOUNT_CUDA_ON_CPU=ON)"
        path = spec.origin
    elif not os.path.isfile(path):
        return False, f"LESIONCOUNT_CUDA_ON_CPU_LIBRARY={path} does not exist"
    import lesioncount  # noqa: F401  (the main library first, as in every user process)

    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as exc:
        return False, f"cannot load {path}: {exc}"
    return True, ""


HAS_CUDA_ON_CPU, _CUDA_ON_CPU_PROBLEM = _load_emulation()
REQUIRE_CUDA_ON_CPU = os.environ.get("LESIONCOUNT_REQUIRE_CUDA_ON_CPU", "") == "1"


def _has_real_cuda_kernels() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"lesioncount::{op}", "CUDA") for op in _EMULATED_OPS)
    except Exception:  # noqa: BLE001
        return False


HAS_REAL_CUDA_KERNELS = _has_real_cuda_kernels()


@dataclass(frozen=True)
class KernelDevice:
    name: str  # "cuda" or "cuda-on-cpu"
    device: torch.device

    @property
    def emulated(self) -> bool:
        return self.name == "cuda-on-cpu"

    @property
    def ops(self):
        return torch.ops.lesioncount_cuda_cpu if self.emulated else torch.ops.lesioncount

    def to(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the kernel device (a copy for the emulation, so no test aliases its reference)."""
        return t.clone() if self.emulated else t.to(self.device)

    def is_on(self, t: torch.Tensor) -> bool:
        return t.device.type == self.device.type

    def sync(self) -> None:
        if not self.emulated:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def active(self):
        """Within the block, torch.ops.lesioncount (and so the public API) runs the CUDA kernels on
        this device: for the emulation, lesioncount's CPU kernels of every op are replaced by the
        emulated CUDA ones."""
        if not self.emulated:
            yield
            return
        lib = torch.library.Library("lesioncount", "IMPL")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
                for op in _EMULATED_OPS:
                    emulated = getattr(torch.ops.lesioncount_cuda_cpu, op).default
                    lib.impl(op, lambda *args, _op=emulated: _op(*args), "CPU")
            yield
        finally:
            lib._destroy()

    @staticmethod
    def stats() -> dict:
        """Counters of the CUDA-on-CPU runtime (launches, blocks, threads, context switches)."""
        v = torch.ops.lesioncount_cuda_cpu._stats().tolist()
        return dict(zip(("launches", "blocks", "threads", "switches", "workers", "seed"), v))


CUDA = KernelDevice("cuda", torch.device("cuda"))
CUDA_ON_CPU = KernelDevice("cuda-on-cpu", torch.device("cpu"))


def _skip_reason(kd: KernelDevice) -> str | None:
    if kd.emulated:
        if HAS_CUDA_ON_CPU:
            return None
        if REQUIRE_CUDA_ON_CPU:
            pytest.fail(
                f"LESIONCOUNT_REQUIRE_CUDA_ON_CPU=1 but the CUDA-on-CPU library is unusable ({_CUDA_ON_CPU_PROBLEM}); "
                "build with LESIONCOUNT_CUDA_ON_CPU=ON pip install --no-build-isolation -e . (make test does)"
            )
        return _CUDA_ON_CPU_PROBLEM
    if not HAS_REAL_CUDA_KERNELS:
        return "needs a CUDA device and the compiled CUDA kernels of lesioncount"
    return None


@pytest.fixture(params=[pytest.param(CUDA, marks=pytest.mark.cuda, id="cuda"), pytest.param(CUDA_ON_CPU, id="cuda-on-cpu")])
def kernel_device(request) -> KernelDevice:
    kd = request.param
    reason = _skip_reason(kd)
    if reason:
        pytest.skip(reason)
    return kd


@pytest.fixture
def cuda_on_cpu() -> KernelDevice:
    """Only the emulation (tests of the runtime itself, or of what only it can check)."""
    reason = _skip_reason(CUDA_ON_CPU)
    if reason:
        pytest.skip(reason)
    return CUDA_ON_CPU


@pytest.fixture
def emulation_settings(cuda_on_cpu):
    """lesioncount_cuda_cpu._configure(workers, seed, yield_probability, large_item_paths) for one
    test; the runtime's settings are restored afterwards."""
    before = cuda_on_cpu.stats()
    yield torch.ops.lesioncount_cuda_cpu._configure
    torch.ops.lesioncount_cuda_cpu._configure(before["workers"], before["seed"], _DEFAULT_YIELD, 0)


_DEFAULT_YIELD = float(os.environ.get("LESIONCOUNT_CUDA_CPU_YIELD_PERCENT", "10")) / 100
