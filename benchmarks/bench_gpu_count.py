"""GPU benchmarks: count_distribution forward+backward and poisson_binomial alone (CUDA).

Skipped without CUDA. Every timed call synchronizes the device before returning; correctness is
checked outside the timed calls.

1. ``test_gpu_count_fwd_bwd``: B=8 realistic 64x192x192 float32 maps
   (``lesioncount.synthetic.realistic_probability_maps``), threshold 0.1, 18-connectivity,
   max_count=4, loss ``-sum_b log P(C_b = c_b)``, forward + backward:
   - ``lesioncount-cuda``: ``count_distribution`` on CUDA tensors (one host sync: the number of
     lesions), ``lesioncount-cuda-static``: with ``max_lesions=64`` (no host sync);
   - ``lesioncount-cpu``: the same call on CPU tensors;
   - ``published-gpu``: the paper's approach with tensors on the GPU where it can: SciPy labels per
     item on the host, dense per-lesion masks (B, 20, D, H, W) on the GPU, masked max, Python loop
     for the recursion, autograd;
   - ``torch-pipeline``: cupyx.scipy.ndimage.label per item, ``torch.scatter_reduce(amax)`` per
     region, a vectorised torch float64 DP (loop over the candidates), autograd.
2. ``test_gpu_poisson_binomial``: B=1024, K in {20, 2000, 100000}, M in {5, K}, forward+backward;
   a combination is skipped when one call takes more than 10 s (M=K=100000 is skipped outright:
   O(B K M) = 1e13 cell updates).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

import baselines
from conftest import THRESHOLD, record_throughput

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

B = 8
SHAPE = (64, 192, 192)
MAX_COUNT = 4
MAX_LESIONS = 64


def _sync():
    torch.cuda.synchronize()


@pytest.fixture(scope="module")
def gpu_inputs():
    synthetic = baselines.load_synthetic()
    probs, _, counts = synthetic.realistic_probability_maps(B, SHAPE, seed=0, return_masks=True)
    return probs, counts.clamp(max=MAX_COUNT)


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
def test_gpu_count_fwd_bwd(benchmark, request, gpu_inputs, impl):
    probs, targets = gpu_inputs
    benchmark.group = f"GPU count fwd+bwd {B}x64x192x192 c18 M={MAX_COUNT}"
    device = "cpu" if impl == "lesioncount-cpu" else "cuda"
    x = probs.to(device).clone().requires_grad_(True)
    t = targets.to(device).view(-1, 1)
    lc = None
    if impl.startswith("lesioncount"):
        lc = request.getfixturevalue("lesioncount")
        if device == "cuda" and not lc._ops.has_kernel("region_max", torch.device("cuda")):
            pytest.skip("lesioncount was built without CUDA kernels")
    if impl == "torch-pipeline" and not _has_cupy():
        pytest.skip("cupy (cupyx.scipy.ndimage) is not installed")

    def fn():
        x.grad = None
        if impl.startswith("lesioncount"):
            ml = MAX_LESIONS if impl == "lesioncount-cuda-static" else None
            r = lc.count_distribution(x, threshold=THRESHOLD, connectivity=18, max_count=MAX_COUNT, max_lesions=ml)
            loss = -r.log_pmf.gather(1, t).sum()
        else:
            pmf = published_gpu(x) if impl == "published-gpu" else torch_pipeline(x)
            loss = -torch.log(pmf.gather(1, t)).sum()
        loss.backward()
        if device == "cuda":
            _sync()
        return loss.detach()

    loss = fn()  # warm-up + correctness (outside the timed calls)
    ref = baselines.published_count_distribution(probs.clone(), max_count=MAX_COUNT)[0]
    ref_loss = -torch.log(ref.gather(1, targets.view(-1, 1))).sum()
    if impl != "published-gpu":  # ours and the torch pipeline use every candidate (not just 20)
        exact = None
        if lc is not None or impl == "torch-pipeline":
            import lesioncount

            r = lesioncount.count_distribution(probs, threshold=THRESHOLD, connectivity=18, max_count=MAX_COUNT)
            exact = -r.log_pmf.gather(1, targets.view(-1, 1)).sum()
        if exact is not None:
            torch.testing.assert_close(loss.cpu().double(), exact.double(), rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(loss.cpu().double(), ref_loss.double(), rtol=1e-4, atol=1e-4)

    if impl in ("published-gpu", "lesioncount-cpu"):
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(fn, rounds=50, iterations=1, warmup_rounds=3)
    record_throughput(benchmark, probs.numel(), impl=impl, batch=B, max_count=MAX_COUNT,
                      device=torch.cuda.get_device_name() if device == "cuda" else "cpu")


PB_CASES = [(K, M) for K in (20, 2000, 100000) for M in (5, K) if not (K == M == 100000)]


@pytest.mark.parametrize("K,M", PB_CASES, ids=[f"K{k}-M{m}" for k, m in PB_CASES])
@pytest.mark.parametrize("impl", ["lesioncount-cuda", "torch-dp-cuda"])
def test_gpu_poisson_binomial(benchmark, request, impl, K, M):
    Bn = 1024
    g = torch.Generator().manual_seed(K * 10007 + M)
    probs = torch.rand(Bn, K, generator=g, dtype=torch.float32)
    probs = torch.where(torch.rand(Bn, K, generator=g) < 0.8, probs * 0.1, probs).cuda().requires_grad_(True)
    w = torch.rand(Bn, M + 1, generator=g, dtype=torch.float32).cuda()
    benchmark.group = f"GPU poisson_binomial B=1024 K={K} M={M} fwd+bwd"
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
        if not lc._ops.has_kernel("poisson_binomial", torch.device("cuda")):
            pytest.skip("lesioncount was built without CUDA kernels")

        def fn():
            probs.grad = None
            pmf = lc.poisson_binomial(probs, max_count=M)
            (pmf * w).sum().backward()
            _sync()
            return pmf

    t0 = time.perf_counter()
    pmf = fn()
    elapsed = time.perf_counter() - t0
    if elapsed > 10.0:
        pytest.skip(f"one call took {elapsed:.1f} s > 10 s")
    pmf = pmf.detach().double().cpu()
    torch.testing.assert_close(pmf.sum(1), torch.ones(Bn, dtype=torch.float64), rtol=0, atol=1e-4)
    if K <= 2000:
        ref = baselines.torch_poisson_binomial(probs.detach().double().cpu()[:16], M)
        torch.testing.assert_close(pmf[:16], ref, rtol=1e-4, atol=1e-6)
    rounds = 3 if elapsed > 1.0 else 20
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    record_throughput(benchmark, Bn * K, impl=impl, K=K, M=M, batch=Bn, device=torch.cuda.get_device_name())
    benchmark.extra_info["unit"] = "candidates"
