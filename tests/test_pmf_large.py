"""lesioncount._pmf_large: the O(K log^2 K) full pmf (tilted FFT product tree) for large K."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import lesioncount as lc
from lesioncount._pmf_large import full_pmf_large, use_large_path


def _dp(p, m, log=False, logits=False):
    return lc.poisson_binomial(p, max_count=m, log=log, from_logits=logits)


def _exact(p_row):
    """Exact rational pmf of the count (all bins), as floats."""
    poly = [Fraction(1)]
    for x in p_row:
        x = Fraction(x)
        new = [Fraction(0)] * (len(poly) + 1)
        for i, c in enumerate(poly):
            new[i] += c * (1 - x)
            new[i + 1] += c * x
        poly = new
    return poly


def _mixed(seed, b, k):
    """Probabilities spread over (0, 1), tiny ones and ones near 1: a log pmf with steep tails."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(b, k, generator=g, dtype=torch.float64)
    r = torch.rand(b, k, generator=g)
    p[r < 0.3] = p[r < 0.3] * 1e-9
    p[r > 0.7] = 1 - p[r > 0.7] * 1e-9
    return p


@pytest.mark.parametrize("k", [1, 2, 7, 30])
def test_matches_exact_rationals(k):
    p = _mixed(k, 1, k)
    exact = _exact(p[0].tolist())
    ref = torch.tensor([float(c) for c in exact], dtype=torch.float64)
    lref = torch.tensor([math.log(c) if c > 0 else -math.inf for c in exact], dtype=torch.float64)
    lin = full_pmf_large(p, None)[0]
    torch.testing.assert_close(lin, ref, rtol=0, atol=1e-15)
    lg = full_pmf_large(p, None, log=True)[0]
    # every log bin to ~1e-12 relative of the value (bins down to e^-600 here)
    assert bool(torch.isfinite(lg).all())
    torch.testing.assert_close(lg, lref, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("kind", ["uniform", "small", "mixed"])
@pytest.mark.parametrize("k", [300, 3000])
def test_matches_dp(k, kind):
    g = torch.Generator().manual_seed(k)
    if kind == "uniform":
        p = torch.rand(2, k, generator=g, dtype=torch.float64)
    elif kind == "small":
        p = torch.rand(2, k, generator=g, dtype=torch.float64) * 1e-3
    else:
        p = _mixed(k, 2, k)
    torch.testing.assert_close(full_pmf_large(p, None), _dp(p, None), rtol=0, atol=1e-13)
    ld = _dp(p, None, log=True)
    la = full_pmf_large(p, None, log=True)
    assert bool((torch.isfinite(la) == torch.isfinite(ld)).all())
    fin = torch.isfinite(ld)
    # relative accuracy of the log values themselves (the DP's logs carry |log| * 1e-16 rounding)
    err = (la - ld).abs()[fin] / ld.abs()[fin].clamp_min(1.0)
    assert float(err.max()) < 1e-12, float(err.max())
    # the tails are really far out: log P(C = 0) well below the float64 range of the pmf
    if kind != "uniform":
        assert float(ld[fin].min()) < -745


@pytest.mark.slow
def test_matches_dp_k20000():
    p = torch.rand(1, 20000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(full_pmf_large(p, None), _dp(p, None), rtol=0, atol=1e-12)


@pytest.mark.parametrize("m", [0, 1, 50, 299, 300, 305])
def test_truncation_and_tail_bin(m):
    p = _mixed(3, 2, 300)
    for log in (False, True):
        out = full_pmf_large(p, m, log=log)
        ref = _dp(p, m, log=log)
        assert out.shape == (2, m + 1)
        if log:
            fin = torch.isfinite(ref)
            assert bool((torch.isfinite(out) == fin).all())
            torch.testing.assert_close(out[fin], ref[fin], rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)


def test_tail_bin_is_sum_of_upper_bins_not_one_minus():
    # P(C >= M) ~ 1e-200: 1 - sum(lower bins) would give 0 (or rounding noise)
    p = torch.full((1, 4000), 0.01, dtype=torch.float64)
    m = 300
    out = full_pmf_large(p, m, log=True)
    full = _dp(p, None, log=True)
    ref_tail = torch.logsumexp(full[:, m:], 1)
    assert float(ref_tail) < -300
    torch.testing.assert_close(out[:, m], ref_tail, rtol=1e-12, atol=0)
    # linear pmf: FFT rounding is absolute (~1e-16 per bin), so the tail is accurate to that
    lin = full_pmf_large(p, m)
    assert 0 <= float(lin[0, m]) < 1e-14


def test_zero_padding_exact_and_ones_shift():
    p = _mixed(7, 1, 200)
    padded = torch.cat([p, torch.zeros(1, 57, dtype=torch.float64)], 1)
    for log in (False, True):
        a = full_pmf_large(p, 200, log=log)
        b = full_pmf_large(padded, 200, log=log)
        assert torch.equal(a, b)
    # logits: -inf is padding too
    z = torch.logit(p)
    zp = torch.cat([z, torch.full((1, 9), -math.inf, dtype=torch.float64)], 1)
    assert torch.equal(full_pmf_large(z, 200, from_logits=True), full_pmf_large(zp, 200, from_logits=True))
    # p = 1 shifts the counts by one
    ones = torch.cat([p, torch.ones(1, 3, dtype=torch.float64)], 1)
    out = full_pmf_large(ones, None, log=True)
    assert bool((out[0, :3] == -math.inf).all())
    torch.testing.assert_close(out[0, 3:], full_pmf_large(p, None, log=True)[0], rtol=0, atol=0)
    torch.testing.assert_close(full_pmf_large(ones, None), _dp(ones, None), rtol=0, atol=1e-15)


def test_from_logits_matches_dp():
    z = torch.randn(2, 500, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 30
    z[0, :5] = math.inf
    z[1, :5] = -math.inf
    for log in (False, True):
        ref = _dp(z, None, log=log, logits=True)
        out = full_pmf_large(z, None, log=log, from_logits=True)
        if log:
            fin = torch.isfinite(ref)
            assert bool((torch.isfinite(out) == fin).all())
            # bins down to log ~ -3e4; the DP's own logs carry ~K * eps * |log| rounding
            err = (out - ref).abs()[fin] / ref.abs()[fin].clamp_min(1.0)
            assert float(err.max()) < 5e-11, float(err.max())
        else:
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_out_like_input(dtype):
    p = torch.rand(2, 100, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = full_pmf_large(p, None)
    assert out.dtype == dtype and out.shape == (2, 101)
    ref = _dp(p.double(), None)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=torch.finfo(dtype).eps)
    lo = full_pmf_large(p, None, log=True)
    assert lo.dtype == dtype
    fin = torch.isfinite(lo)
    torch.testing.assert_close(lo[fin].double(), _dp(p.double(), None, log=True)[fin], rtol=4 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        full_pmf_large(torch.tensor([[0.2, float("nan")]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        full_pmf_large(torch.tensor([[0.2, 1.5]]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        full_pmf_large(torch.tensor([[-0.1]]))
    with pytest.raises(ValueError, match="max_count"):
        full_pmf_large(torch.tensor([[0.2]]), -1)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        full_pmf_large(torch.tensor([0.2]))
    with pytest.raises(TypeError, match="floating"):
        full_pmf_large(torch.tensor([[1]]))


@pytest.mark.parametrize("log", [False, True])
def test_gradcheck(log):
    g = torch.Generator().manual_seed(11)
    p = (torch.rand(1, 300, generator=g, dtype=torch.float64) * 0.98 + 0.01).requires_grad_(True)
    w = torch.randn(1, 301, generator=g, dtype=torch.float64)
    # fast mode: random projections of input and output (the slow mode is 600 forward passes)
    assert torch.autograd.gradcheck(lambda x: full_pmf_large(x, None, log=log) * w, (p,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: full_pmf_large(x, 40, log=log), (p,), fast_mode=True)


@pytest.mark.parametrize("log", [False, True])
def test_gradient_matches_dp_k5000(log):
    g = torch.Generator().manual_seed(3)
    p = torch.rand(1, 5000, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(1, 5001, generator=g, dtype=torch.float64)
    (ga,) = torch.autograd.grad((full_pmf_large(p, None, log=log) * w).sum(), p)
    d = _dp(p, None, log=log)
    (gd,) = torch.autograd.grad((torch.where(torch.isfinite(d), d, 0) * w).sum(), p)
    scale = float(gd.abs().max())
    torch.testing.assert_close(ga, gd, rtol=0, atol=1e-10 * scale)


def test_gradient_at_exact_zero_and_one():
    # dP(C = j)/dp_k = P_{-k}(j - 1) - P_{-k}(j) (eq. 3), also for p_k in {0, 1}
    p = torch.tensor([[0.0, 1.0, 0.3, 0.6, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out = full_pmf_large(p, None)
    jac = torch.stack([torch.autograd.grad(out[0, j], p, retain_graph=True)[0][0] for j in range(7)])
    base = p.detach()[0]
    for k in range(6):
        others = torch.cat([base[:k], base[k + 1 :]])
        rest = torch.tensor([float(c) for c in _exact(others.tolist())] + [0.0], dtype=torch.float64)
        shifted = torch.cat([torch.zeros(1, dtype=torch.float64), rest[:-1]])
        torch.testing.assert_close(jac[:, k], shifted - rest, rtol=0, atol=1e-15)
    # log: the same derivative divided by P(C = j) on the finite bins, 0 on the -inf bins
    lo = full_pmf_large(p, None, log=True)
    pm = out.detach()[0]
    for j in range(7):
        (gj,) = torch.autograd.grad(lo[0, j], p, retain_graph=True)
        if pm[j] > 0:
            torch.testing.assert_close(gj[0], jac[j] / pm[j], rtol=1e-12, atol=1e-12)
        else:
            assert bool(torch.isfinite(gj).all())


def test_memory_linear_in_k():
    # no K x K intermediate: K = 2**16 would need 32 GiB as a float64 square
    p = torch.rand(1, 2**16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = full_pmf_large(p, None)
    assert out.shape == (1, 2**16 + 1)
    torch.testing.assert_close(out.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)
    mean = (out[0] * torch.arange(2**16 + 1, dtype=torch.float64)).sum()
    torch.testing.assert_close(mean, p.sum(), rtol=1e-12, atol=0)


def test_use_large_path():
    assert use_large_path(10**6, 10**6) and use_large_path(10**6, 10**6, log=False)
    assert not use_large_path(1000, 1000) and not use_large_path(10**6, 64)
    assert use_large_path(10**5, 50_000)  # M large but < K


# ---- the public function dispatches to the large path ----
def test_public_poisson_binomial_uses_large_path(monkeypatch):
    import lesioncount._pmf_large as pl

    calls = []
    real = pl.full_pmf_large

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(pl, "full_pmf_large", spy)
    p = torch.rand(1, 20000, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = lc.poisson_binomial(p)  # linear: min(M, K) = 20000 >= 12000
    assert calls, "poisson_binomial(max_count=None) with K = 20000 did not use the large path"
    torch.testing.assert_close(out, real(p, None), rtol=0, atol=0)


@pytest.mark.parametrize("log", [False, True])
def test_public_poisson_binomial_large_m_below_k(monkeypatch, log):
    # M large but < K: the large path too, with the tail bin from the upper bins
    import lesioncount._pmf_large as pl

    calls = []
    real = pl.full_pmf_large
    monkeypatch.setattr(pl, "full_pmf_large", lambda *a, **k: calls.append(a) or real(*a, **k))
    p = torch.rand(1, 30000, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 0.8
    out = lc.poisson_binomial(p, max_count=20000, log=log)
    assert calls, "poisson_binomial(max_count=20000) with K = 30000 did not use the large path"
    torch.testing.assert_close(out, real(p, 20000, log=log), rtol=0, atol=0)
