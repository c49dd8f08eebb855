"""Count distribution forward+backward, and the Poisson-binomial DP alone.

1. ``test_count_fwd_bwd``: B=4 realistic 64x192x192 float32 maps, threshold 0.1, 18-connectivity,
   max_count=4 (bins 0..3 and 4+), loss ``-sum_b log P(C_b = c_b)``, forward + backward timed.
   - ``lesioncount``: ``lesioncount.count_distribution`` (compiled ops, sparse backward).
   - ``published``: the paper's published function re-implemented from its description
     (``baselines.published_count_distribution``: SciPy labels, dense (B, 20, D, H, W) masks,
     masked max, Python Poisson-binomial loop, autograd). It keeps at most 20 candidates.
   Peak resident memory of one step above the state before it is measured in a subprocess
   (``baselines.peak_memory_above_input``) and stored in ``extra_info``; set
   LESIONCOUNT_BENCH_NO_MEM=1 to skip it.
2. ``test_poisson_binomial``: B=1024, K in {20, 2000}, M in {5, K}, forward + backward,
   ``lesioncount.poisson_binomial`` vs a pure torch float64 DP (``baselines.torch_poisson_binomial``).
   The torch DP is not run for M=K=2000 (autograd would keep K saved (B, K+1) float64 tensors,
   ~32 GB); lesioncount's M=K=2000 case is skipped if one call takes more than 10 s.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import baselines
from conftest import THRESHOLD, record_throughput

MAX_COUNT = 4
PUBLISHED_ROUNDS = 3  # one published step is several seconds on a 2-core machine


@pytest.fixture(scope="module")
def count_inputs(realistic_batch):
    x, true_counts = realistic_batch
    targets = true_counts.clamp(max=MAX_COUNT)
    return x, targets


@pytest.fixture(scope="module")
def published_once(count_inputs):
    """One published forward+backward (for the correctness checks), computed once."""
    x, targets = count_inputs
    xg = x.clone().requires_grad_(True)
    pmf, lesion_probs, num = baselines.published_count_distribution(xg, max_count=MAX_COUNT)
    loss = -torch.log(pmf.gather(1, targets.view(-1, 1))).sum()
    loss.backward()
    return pmf.detach(), lesion_probs.detach(), num, xg.grad.clone()


def _memory(benchmark, impl):
    if os.environ.get("LESIONCOUNT_BENCH_NO_MEM") == "1":
        return
    info = baselines.peak_memory_above_input(impl, batch=4, shape=(64, 192, 192), max_count=MAX_COUNT)
    benchmark.extra_info["input_MiB"] = info["input_bytes"] / 2**20
    benchmark.extra_info["peak_mem_above_input_MiB"] = info["peak_above_before_bytes"] / 2**20
    benchmark.extra_info["mem_method"] = "subprocess VmHWM - VmRSS (clear_refs reset, MALLOC_MMAP_THRESHOLD_=65536)"


@pytest.mark.parametrize("impl", ["lesioncount", "lesioncount-static64", "published"])
def test_count_fwd_bwd(benchmark, request, count_inputs, published_once, impl):
    x, targets = count_inputs
    B = x.shape[0]
    xg = x.clone().requires_grad_(True)
    benchmark.group = f"count fwd+bwd 4x64x192x192 c18 M={MAX_COUNT}"
    pub_pmf, pub_lp, pub_num, pub_grad = published_once
    K_pub = pub_lp.shape[1]

    if impl == "lesioncount":
        lc = request.getfixturevalue("lesioncount")

        def fn():
            xg.grad = None
            r = lc.count_distribution(xg, threshold=THRESHOLD, connectivity=18, max_count=MAX_COUNT)
            loss = -r.log_pmf.gather(1, targets.view(-1, 1)).sum()
            loss.backward()
            return r

        r = fn()  # correctness, outside the timed call
        labels, num = lc.label(x, threshold=THRESHOLD, connectivity=18)
        assert num.tolist() == pub_num
        values, _ = lc.region_max(x, labels)  # lesion probabilities in label order
        # the published function's candidates are the first 20 labels: same probabilities
        k = min(K_pub, values.shape[1])
        torch.testing.assert_close(values[:, :k], pub_lp[:, :k], rtol=0, atol=0)
        # ours uses every candidate: equal to a float64 DP over all of them
        exact = baselines.torch_poisson_binomial(values.double(), MAX_COUNT)
        torch.testing.assert_close(r.pmf.double(), exact, rtol=1e-5, atol=1e-6)
        # and restricted to the first 20 candidates it reproduces the published pmf
        trunc = lc.poisson_binomial(values[:, :K_pub], max_count=MAX_COUNT)
        torch.testing.assert_close(trunc, pub_pmf, rtol=1e-4, atol=1e-6)
        if max(pub_num) <= K_pub:  # no truncation: gradients must agree too
            torch.testing.assert_close(xg.grad, pub_grad, rtol=1e-4, atol=1e-6)
        benchmark(fn)
        benchmark.extra_info["candidates_per_item"] = num.tolist()
    elif impl == "lesioncount-static64":
        # the static-shape path used under torch.compile / CUDA graphs: max_lesions=64 columns
        lc = request.getfixturevalue("lesioncount")

        def fn():
            xg.grad = None
            r = lc.count_distribution(xg, threshold=THRESHOLD, connectivity=18, max_count=MAX_COUNT,
                                      max_lesions=64)
            loss = -r.log_pmf.gather(1, targets.view(-1, 1)).sum()
            loss.backward()
            return r

        r = fn()  # correctness, outside the timed call: no item has more than 64 candidates here
        exact = lc.count_distribution(x, threshold=THRESHOLD, connectivity=18, max_count=MAX_COUNT)
        assert not bool(r.truncated.any())
        torch.testing.assert_close(r.pmf, exact.pmf)
        benchmark(fn)
        record_throughput(benchmark, x.numel(), impl=impl, batch=B, max_count=MAX_COUNT,
                          torch_threads=torch.get_num_threads())
        return
    else:

        def fn():
            xg.grad = None
            pmf, _, _ = baselines.published_count_distribution(xg, max_count=MAX_COUNT)
            loss = -torch.log(pmf.gather(1, targets.view(-1, 1))).sum()
            loss.backward()
            return pmf

        benchmark.pedantic(fn, rounds=PUBLISHED_ROUNDS, iterations=1, warmup_rounds=0)
        benchmark.extra_info["candidates_per_item"] = pub_num
        benchmark.extra_info["candidates_kept"] = [min(n, K_pub) for n in pub_num]
    record_throughput(benchmark, x.numel(), impl=impl, batch=B, max_count=MAX_COUNT,
                      torch_threads=torch.get_num_threads())
    _memory(benchmark, impl)


PB_CASES = [(20, 5), (20, 20), (2000, 5), (2000, 2000)]


@pytest.mark.parametrize("K,M", PB_CASES, ids=[f"K{k}-M{m}" for k, m in PB_CASES])
@pytest.mark.parametrize("impl", ["lesioncount", "torch-dp"])
def test_poisson_binomial(benchmark, request, impl, K, M):
    B = 1024
    g = torch.Generator().manual_seed(K * 10007 + M)
    probs = torch.rand(B, K, generator=g, dtype=torch.float32)
    # a realistic mix: most candidates unlikely, some near-certain
    probs = torch.where(torch.rand(B, K, generator=g) < 0.8, probs * 0.1, probs).requires_grad_(True)
    w = torch.rand(B, M + 1, generator=g, dtype=torch.float32)
    benchmark.group = f"poisson_binomial B=1024 K={K} M={M} fwd+bwd"

    if impl == "torch-dp":
        if M == K == 2000:
            pytest.skip("torch DP with M=K=2000: autograd keeps K saved (B, K+1) float64 tensors (~32 GB)")

        def fn():
            probs.grad = None
            pmf = baselines.torch_poisson_binomial(probs, M)
            (pmf * w).sum().backward()
            return pmf

        pmf = fn()
        lc = request.getfixturevalue("lesioncount") if _has_lc(request) else None
        if lc is not None:
            ref = lc.poisson_binomial(probs.detach(), max_count=M)
            torch.testing.assert_close(pmf.detach(), ref, rtol=1e-4, atol=1e-6)
    else:
        lc = request.getfixturevalue("lesioncount")

        def fn():
            probs.grad = None
            pmf = lc.poisson_binomial(probs, max_count=M)
            (pmf * w).sum().backward()
            return pmf

        t0 = time.perf_counter()
        pmf = fn()
        if time.perf_counter() - t0 > 10.0:
            pytest.skip(f"one lesioncount call took {time.perf_counter() - t0:.1f} s > 10 s")
        pmf = pmf.detach().double()
        torch.testing.assert_close(pmf.sum(1), torch.ones(B, dtype=torch.float64), rtol=0, atol=1e-4)
        if M == K:  # no tail: E[C] = sum p exactly
            mean = (pmf * torch.arange(M + 1, dtype=torch.float64)).sum(1)
            torch.testing.assert_close(mean, probs.detach().double().sum(1), rtol=1e-4, atol=1e-3)
        else:
            ref = baselines.torch_poisson_binomial(probs.detach().double(), M)
            torch.testing.assert_close(pmf, ref, rtol=1e-4, atol=1e-6)
    if M == K == 2000:
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    else:
        benchmark(fn)
    record_throughput(benchmark, B * K, impl=impl, K=K, M=M, batch=B, torch_threads=torch.get_num_threads())
    benchmark.extra_info["unit"] = "candidates"


def _has_lc(request) -> bool:
    try:
        request.getfixturevalue("lesioncount")
        return True
    except pytest.skip.Exception:
        return False
