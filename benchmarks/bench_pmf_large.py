"""Full Poisson-binomial pmf (max_count = K): the O(K log^2 K) product tree vs the O(K^2) DP.

B = 1, p ~ U(0, 1), float64. The DP (torch.ops.lesioncount.poisson_binomial through
lesioncount.poisson_binomial) only where it finishes within ~10 s; nothing is extrapolated.

    .venv/bin/python -m pytest benchmarks/bench_pmf_large.py --benchmark-json=out/bench_pmf_large.json
"""

from __future__ import annotations

import pytest
import torch

import lesioncount as lc
from lesioncount._pmf_large import full_pmf_large

# (K, log) pairs where the DP finishes within ~10 s on the 2-core machine (linear DP ~0.75 ns,
# log-space DP ~15 ns per K*M step)
_DP_OK = {(1000, False), (10_000, False), (100_000, False), (1000, True), (10_000, True)}
_SIZES = [1000, 10_000, 100_000, 1_000_000]


def _probs(k, grad):
    p = torch.rand(1, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    return p.requires_grad_(grad)


def _run(fn, p, backward):
    out = fn(p)
    if backward:
        out[0, p.shape[1] // 2].backward()
        p.grad = None
    return out


def _rounds(k, log):
    work = k * (30 if log else 1)
    return 5 if work <= 10**5 else (3 if work <= 10**6 else 1)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("log", [False, True], ids=["pmf", "log"])
@pytest.mark.parametrize("k", _SIZES)
def test_large_path(benchmark, k, log, backward):
    if log and k >= 1_000_000 and backward:
        pytest.skip("log fwd+bwd at K = 10^6: several minutes; not run")
    p = _probs(k, backward)
    fn = lambda x: full_pmf_large(x, None, log=log)  # noqa: E731
    benchmark.extra_info.update(K=k, log=log, backward=backward, method="product tree")
    benchmark.pedantic(_run, args=(fn, p, backward), rounds=_rounds(k, log), warmup_rounds=1 if k <= 10**5 else 0)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("log", [False, True], ids=["pmf", "log"])
@pytest.mark.parametrize("k", _SIZES)
def test_dp(benchmark, k, log, backward):
    if (k, log) not in _DP_OK:
        pytest.skip("the O(K^2) DP takes more than ~10 s here; not run")
    p = _probs(k, backward)
    fn = lambda x: lc.poisson_binomial(x, None, log=log)  # noqa: E731
    benchmark.extra_info.update(K=k, log=log, backward=backward, method="DP")
    benchmark.pedantic(_run, args=(fn, p, backward), rounds=_rounds(k, log), warmup_rounds=1)
