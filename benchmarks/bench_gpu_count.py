"""GPU benchmarks: count_distribution forward+backward and poisson_binomial alone (CUDA).

Skipped without CUDA (with LC_GPU_DRY_RUN=1 they run on the CUDA-on-CPU runtime at tiny sizes instead,
see gpu_device.py). Every timed call synchronizes the device before returning; correctness is
checked outside the timed calls against CPU references computed once per module.

1. ``test_gpu_count_fwd_bwd``: B=8 realistic 64x192x192 float32 maps
   (``lesioncount.synthetic.realistic_probability_maps``), threshold 0.1, 18-connectivity,
   max_count=4, loss ``-sum_b log P(C_b = c_b)``, forward + backward:
   - ``lesioncount-cuda``: ``count_distribution`` on CUDA tensors (one host sync: the number of
     lesions), ``lesioncount-cuda-static``: with a static ``max_lesions`` (no host sync) of at least
     64 and at least the largest number of candidates of an item (so nothing is truncated: checked);
   - ``torch-pipeline``: cupyx.scipy.ndimage.label per item, ``torch.scatter_reduce(amax)`` per
     region, a vectorised torch float64 DP (loop over the candidates), autograd;
   - CPU-bound ones, only with ``LC_GPU_BENCH_CPU_BOUND=1`` (seconds per call; gpu_check.sh leaves
     them out): ``lesioncount-cpu`` (the same call on CPU tensors) and ``published-gpu`` (the
     paper's approach: SciPy labels per item on the host, dense per-lesion masks (B, 20, D, H, W)
     on the GPU, masked max, Python loop for the recursion, autograd).
2. ``test_gpu_poisson_binomial``: B=1024, K in {20, 2000, 100000}, M in {5, K}, forward+backward;
   a combination is skipped when one call takes more than 10 s (M=K=100000 is skipped outright:
   O(B K M) = 1e13 cell updates).
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import pytest
import torch

import os

import baselines
import gpu_device
from conftest import THRESHOLD, record_throughput
from gpu_device import DEVICE, DRY_RUN

_AVAILABLE, _WHY = gpu_device.available()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=_WHY)

B = gpu_device.size(8, 2)
SHAPE = gpu_device.size((64, 192, 192), (8, 24, 24))
MAX_COUNT = 4
MAX_LESIONS = 64  # the static bound's floor; raised to the largest candidate count found
CPU_BOUND = os.environ.get("LC_GPU_BENCH_CPU_BOUND", "") == "1"


def _sync():
    gpu_device.sync()


@pytest.fixture(scope="module")
def gpu_inputs():
    synthetic = baselines.load_synthetic()
    probs, _, counts = synthetic.realistic_probability_maps(B, SHAPE, seed=0, return_masks=True)
    return probs, counts.clamp(max=MAX_COUNT)


@pytest.fixture(scope="module")
def cpu_reference(gpu_inputs):
    """The exact loss of the CPU count_distribution and the largest candidate count, computed once."""
    import lesioncount

    probs, targets = gpu_inputs
    r = lesioncount.count_distribution(probs, threshold=THRESHOLD, connectivity=18, max_count=MAX_COUNT)
    loss = -r.log_pmf.gather(1, targets.view(-1, 1)).sum()
    return loss.double(), int(r.num_lesions.max())


def _torch_dp(p: torch.Tensor, M: int) -> torch.Tensor:
    """(B, K) -> (B, M+1) float64 pmf with tail bin on p's device (the shared baseline DP)."""
    return baselines.torch_poisson_binomial(p.to(torch.float64), M)


def published_gpu(probs: torch.Tensor, max_count: int = MAX_COUNT, max_lesions: int = 20):
    """The published function's approach with the dense work on the GPU (labels on the host)."""
    pmf, _, _ = baselines.published_count_distribution(probs, threshold=THRESHOLD, max_lesions=max_lesions,
                                                       max_count=max_count)
    return pmf


def torch_pipeline(probs: torch.Tensor, max_count: int = MAX_COUNT):
    """cupyx labels per item + scatter_reduce(amax) + torch DP; returns the (B, M+1) pmf."""
    import cupy
    from cupyx.scipy import ndimage as cndi

    Bn = probs.shape[0]
    structure = cupy.asarray(np.asarray(baselines.scipy_structure(3, 18)))
    labels, nums = [], []
    for b in range(Bn):
        fg = cupy.from_dlpack((probs[b].detach() > THRESHOLD))
        lab, n = cndi.label(fg, structure=structure)
        labels.append(torch.from_dlpack(lab).to(torch.int64))
        nums.append(int(n))
    K = max(nums) if nums else 0
    flat = probs.reshape(Bn, -1)
    lab = torch.stack(labels).reshape(Bn, -1)
    vals = torch.zeros(Bn, K + 1, dtype=probs.dtype, device=probs.device)
    vals = vals.scatter_reduce(1, lab, flat, reduce="amax", include_self=False)
    return _torch_dp(vals[:, 1:], max_count)


def _has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
        from cupyx.scipy import ndimage  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


IMPLS = ["lesioncount-cuda", "lesioncount-cuda-static", "lesioncount-cpu", "published-gpu", "torch-pipeline"]


@pytest.mark.parametrize("impl", IMPLS)
def test_gpu_count_fwd_bwd(benchmark, request, gpu_inputs, cpu_reference, impl):
    probs, targets = gpu_inputs
    exact, max_candidates = cpu_reference
    benchmark.group = f"GPU count fwd+bwd {B}x{'x'.join(map(str, SHAPE))} c18 M={MAX_COUNT}"
    if impl in ("lesioncount-cpu", "published-gpu") and not CPU_BOUND:
        pytest.skip(f"{impl} is CPU-bound (seconds per call): set LC_GPU_BENCH_CPU_BOUND=1 to time it")
    if impl in ("published-gpu", "torch-pipeline") and DRY_RUN:
        pytest.skip(f"{impl} needs a real GPU (dry run)")
    if impl == "torch-pipeline" and not _has_cupy():
        pytest.skip("cupy (cupyx.scipy.ndimage) is not installed")
    on_cpu = impl == "lesioncount-cpu"
    device = torch.device("cpu") if on_cpu else DEVICE
    x = probs.to(device).clone().requires_grad_(True)
    t = targets.to(device).view(-1, 1)
    lc = request.getfixturevalue("lesioncount") if impl.startswith("lesioncount") else None
    static_bound = max(MAX_LESIONS, max_candidates)
    kernels = contextlib.nullcontext if on_cpu else gpu_device.active  # a fresh context per `with`

    def fn():
        x.grad = None
        if impl.startswith("lesioncount"):
            ml = static_bound if impl == "lesioncount-cuda-static" else None
            r = lc.count_distribution(x, threshold=THRESHOLD, connectivity=18, max_count=MAX_COUNT, max_lesions=ml)
            loss = -r.log_pmf.gather(1, t).sum()
        else:
            pmf = published_gpu(x) if impl == "published-gpu" else torch_pipeline(x)
            loss = -torch.log(pmf.gather(1, t)).sum()
        loss.backward()
        if not on_cpu:
            _sync()
        return loss.detach()

    with kernels():
        loss = fn()  # warm-up + correctness (outside the timed calls)
        if impl == "lesioncount-cuda-static":
            r = lc.count_distribution(x.detach(), threshold=THRESHOLD, connectivity=18, max_count=MAX_COUNT,
                                      max_lesions=static_bound)
            assert not bool(r.truncated.any()), f"max_lesions={static_bound} truncated an item"
    if impl != "published-gpu":  # ours and the torch pipeline use every candidate (not just 20)
        torch.testing.assert_close(loss.cpu().double(), exact, rtol=1e-4, atol=1e-4)
    else:  # the paper's approach keeps 20 candidates: its own CPU reference (only computed here)
        ref = baselines.published_count_distribution(probs.clone(), max_count=MAX_COUNT)[0]
        ref_loss = -torch.log(ref.gather(1, targets.view(-1, 1))).sum()
        torch.testing.assert_close(loss.cpu().double(), ref_loss.double(), rtol=1e-4, atol=1e-4)

    with kernels():
        if impl in ("published-gpu", "lesioncount-cpu") or DRY_RUN:
            benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
        else:
            benchmark.pedantic(fn, rounds=50, iterations=1, warmup_rounds=3)
    record_throughput(benchmark, probs.numel(), impl=impl, batch=B, max_count=MAX_COUNT,
                      device="cpu" if on_cpu else gpu_device.device_name(),
                      max_lesions=static_bound if impl == "lesioncount-cuda-static" else None,
                      max_candidates=max_candidates)


PB_CASES = [(K, M) for K in gpu_device.size((20, 2000, 100000), (20,)) for M in (5, K) if not (K == M == 100000)]


@pytest.mark.parametrize("K,M", PB_CASES, ids=[f"K{k}-M{m}" for k, m in PB_CASES])
@pytest.mark.parametrize("impl", ["lesioncount-cuda", "torch-dp-cuda"])
def test_gpu_poisson_binomial(benchmark, request, impl, K, M):
    Bn = gpu_device.size(1024, 16)
    g = torch.Generator().manual_seed(K * 10007 + M)
    probs = torch.rand(Bn, K, generator=g, dtype=torch.float32)
    probs = torch.where(torch.rand(Bn, K, generator=g) < 0.8, probs * 0.1, probs).to(DEVICE).requires_grad_(True)
    w = torch.rand(Bn, M + 1, generator=g, dtype=torch.float32).to(DEVICE)
    benchmark.group = f"GPU poisson_binomial B={Bn} K={K} M={M} fwd+bwd"
    kernels = contextlib.nullcontext
    if impl == "torch-dp-cuda":
        if K * M > 2000 * 5 * 10 or K > 2000:
            pytest.skip("torch DP: K steps of autograd-recorded ops (and K saved (B, M+1) tensors); too slow/large")

        def fn():
            probs.grad = None
            pmf = _torch_dp(probs, M)
            (pmf * w).sum().backward()
            _sync()
            return pmf
    else:
        lc = request.getfixturevalue("lesioncount")
        kernels = gpu_device.active

        def fn():
            probs.grad = None
            pmf = lc.poisson_binomial(probs, max_count=M)
            (pmf * w).sum().backward()
            _sync()
            return pmf

    t0 = time.perf_counter()
    with kernels():
        pmf = fn()
    elapsed = time.perf_counter() - t0
    if elapsed > 10.0:
        pytest.skip(f"one call took {elapsed:.1f} s > 10 s")
    pmf = pmf.detach().double().cpu()
    torch.testing.assert_close(pmf.sum(1), torch.ones(Bn, dtype=torch.float64), rtol=0, atol=1e-4)
    if K <= 2000:
        ref = baselines.torch_poisson_binomial(probs.detach().double().cpu()[:16], M)
        torch.testing.assert_close(pmf[:16], ref, rtol=1e-4, atol=1e-6)
    rounds = 3 if elapsed > 1.0 or DRY_RUN else 20
    with kernels():
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    record_throughput(benchmark, Bn * K, impl=impl, K=K, M=M, batch=Bn, device=gpu_device.device_name())
    benchmark.extra_info["unit"] = "candidates"
