"""lesioncount.poisson_binomial and torch.ops.lesioncount.poisson_binomial."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lesioncount as lc
from conftest import make_rng, ref, requires_cuda, requires_ops

PAPER_P = [0.5189, 0.7840]
PAPER_PMF = [0.1039, 0.4892, 0.4068, 0.0, 0.0]


def _probs(seed, shape, lo=0.0, hi=1.0, dtype=torch.float64):
    return torch.from_numpy(make_rng(seed).uniform(lo, hi, size=shape)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_paper_example(dtype):
    p = torch.tensor([PAPER_P], dtype=dtype)
    pmf = lc.poisson_binomial(p, max_count=4)
    assert pmf.shape == (1, 5) and pmf.dtype == dtype
    torch.testing.assert_close(pmf, torch.tensor([PAPER_PMF], dtype=dtype), atol=1e-4, rtol=0)
    lpmf = lc.poisson_binomial(p, max_count=4, log=True)
    torch.testing.assert_close(lpmf.exp(), pmf, atol=1e-6, rtol=1e-6)
    assert lpmf[0, 3] == -math.inf and lpmf[0, 4] == -math.inf
    z = torch.logit(p.double()).to(dtype)
    torch.testing.assert_close(lc.poisson_binomial(z, max_count=4, from_logits=True), pmf, atol=1e-6, rtol=1e-5)


@given(
    k=st.integers(0, 11),
    m=st.integers(0, 14),
    b=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    log=st.booleans(),
    extremes=st.booleans(),
)
def test_matches_bruteforce(k, m, b, seed, log, extremes):
    rng = make_rng(seed)
    p = rng.random((b, k))
    if extremes and k:
        p[rng.random((b, k)) < 0.3] = 0.0
        p[rng.random((b, k)) < 0.3] = 1.0
    pt = torch.from_numpy(p)
    out = lc.poisson_binomial(pt, max_count=m, log=log)
    assert out.shape == (b, m + 1) and out.dtype == torch.float64
    pmf = out.exp() if log else out
    assert torch.isfinite(pmf).all()
    for i in range(b):
        np.testing.assert_allclose(pmf[i].numpy(), ref.poisson_binomial_bruteforce(p[i], m), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pmf.sum(1), torch.ones(b, dtype=torch.float64), rtol=0, atol=1e-12)
    # the reference agrees too (same semantics on every implementation)
    torch.testing.assert_close(out, ref.poisson_binomial(pt, m, log, False), rtol=1e-12, atol=1e-12)


def test_default_max_count_is_k_and_mean():
    p = _probs(1, (4, 13))
    pmf = lc.poisson_binomial(p)
    assert pmf.shape == (4, 14)
    mean = (pmf * torch.arange(14, dtype=torch.float64)).sum(1)
    torch.testing.assert_close(mean, p.sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pmf.sum(1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    # untruncated also when M > K: the top bins are exactly zero
    big = lc.poisson_binomial(p, max_count=20)
    torch.testing.assert_close(big[:, :14], pmf, rtol=1e-12, atol=1e-15)
    assert bool((big[:, 14:] == 0).all())


@pytest.mark.parametrize("m", [0, 1, 2, 5])
def test_tail_bin_holds_p_at_least_m(m):
    p = _probs(2, (3, 10))
    full = lc.poisson_binomial(p, max_count=10)
    trunc = lc.poisson_binomial(p, max_count=m)
    assert trunc.shape == (3, m + 1)
    torch.testing.assert_close(trunc[:, :m], full[:, :m], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(trunc[:, m], full[:, m:].sum(1), rtol=1e-12, atol=1e-15)
    ltrunc = lc.poisson_binomial(p, max_count=m, log=True)
    torch.testing.assert_close(ltrunc.exp(), trunc, rtol=1e-10, atol=1e-15)


def test_max_count_zero_and_k_zero():
    p = _probs(3, (2, 5))
    assert lc.poisson_binomial(p, max_count=0).tolist() == [[1.0], [1.0]]
    assert lc.poisson_binomial(p, max_count=0, log=True).tolist() == [[0.0], [0.0]]
    e = torch.zeros(3, 0, dtype=torch.float64)
    assert lc.poisson_binomial(e, max_count=3).tolist() == [[1.0, 0.0, 0.0, 0.0]] * 3
    assert lc.poisson_binomial(e, max_count=2, log=True).tolist() == [[0.0, -math.inf, -math.inf]] * 3
    assert lc.poisson_binomial(e).shape == (3, 1)
    assert lc.poisson_binomial(torch.zeros(0, 4), max_count=3).shape == (0, 4)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("m", [1, 3, 12])
def test_zero_padding_is_exact(log, m):
    p = _probs(4, (3, 7))
    base = lc.poisson_binomial(p, max_count=m, log=log)
    for pad in (1, 5, 40):
        padded = torch.cat([p, torch.zeros(3, pad, dtype=p.dtype)], dim=1)
        assert torch.equal(lc.poisson_binomial(padded, max_count=m, log=log), base)
    # padding in the middle and in front is exact too
    mid = torch.cat([p[:, :3], torch.zeros(3, 4, dtype=p.dtype), p[:, 3:]], dim=1)
    torch.testing.assert_close(lc.poisson_binomial(mid, max_count=m, log=log), base, rtol=0, atol=0)


def test_log_space_many_near_certain():
    p = torch.full((1, 400), 0.999, dtype=torch.float64)
    lp = lc.poisson_binomial(p, max_count=4, log=True)
    assert torch.isfinite(lp).all()
    exp = 400 * math.log(0.001)
    assert abs(float(lp[0, 0]) - exp) <= 1e-9 * abs(exp)
    # P(C >= 4) is essentially 1
    assert abs(float(lp[0, 4])) < 1e-12
    # the same through logits
    z = torch.full((1, 400), math.log(0.999 / 0.001), dtype=torch.float64)
    lz = lc.poisson_binomial(z, max_count=4, log=True, from_logits=True)
    assert abs(float(lz[0, 0]) - exp) <= 1e-9 * abs(exp)


@pytest.mark.parametrize("from_logits", [False, True])
def test_log_space_gradients_finite_near_certain(from_logits):
    n = 300
    if from_logits:
        x = torch.full((2, n), 12.0, dtype=torch.float64)
        x[1, ::3] = -15.0
    else:
        x = torch.full((2, n), 0.9999, dtype=torch.float64)
        x[1, ::3] = 1e-6
    x.requires_grad_(True)
    lp = lc.poisson_binomial(x, max_count=4, log=True, from_logits=from_logits)
    assert torch.isfinite(lp).all()
    # the loss a user would write: -log P(C = c) for small c (extremely unlikely counts)
    loss = -(lp[:, 0] + lp[:, 1] + lp[:, 2] + lp[:, 3]).sum()
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all()
    assert bool((g != 0).any())
    # compare with the reference autograd
    xr = x.detach().clone().requires_grad_(True)
    lr = ref.poisson_binomial(xr, 4, True, from_logits)
    (gr,) = torch.autograd.grad(-(lr[:, 0] + lr[:, 1] + lr[:, 2] + lr[:, 3]).sum(), xr)
    torch.testing.assert_close(g, gr, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("log", [False, True])
def test_probs_exactly_zero_and_one(log):
    p = torch.tensor([[0.0, 1.0, 0.3, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out = lc.poisson_binomial(p, max_count=4, log=log)
    pmf = out.exp() if log else out
    torch.testing.assert_close(
        pmf.detach(), torch.tensor([[0.0, 0.0, 0.7, 0.3, 0.0]], dtype=torch.float64), rtol=0, atol=1e-15
    )
    sel = out[:, 2:4].sum() if log else out.sum() + out[:, 2].sum()
    (g,) = torch.autograd.grad(sel, p)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("log", [False, True])
def test_from_logits_matches_probs(log):
    z = torch.from_numpy(make_rng(5).normal(size=(5, 9)) * 4)
    a = lc.poisson_binomial(z, max_count=6, log=log, from_logits=True)
    b = lc.poisson_binomial(torch.sigmoid(z), max_count=6, log=log)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a, ref.poisson_binomial(z, 6, log, True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_input_computed_in_float64(log, from_logits, dtype):
    rng = make_rng(6)
    n = 200
    x = torch.from_numpy(rng.normal(size=(3, n)) * 3 if from_logits else rng.uniform(0.0, 1.0, size=(3, n)))
    x = x.to(dtype)
    out = lc.poisson_binomial(x, max_count=150, log=log, from_logits=from_logits)
    assert out.dtype == dtype
    exp = ref.poisson_binomial(x.double(), 150, log, from_logits)
    if dtype == torch.float32:
        if log:
            fin = torch.isfinite(exp)
            assert torch.equal(torch.isfinite(out), fin)
            torch.testing.assert_close(out.double()[fin], exp[fin], rtol=1e-7, atol=1e-7)
        else:
            torch.testing.assert_close(out.double(), exp, rtol=1e-6, atol=1e-7)
    else:
        torch.testing.assert_close(out, exp.to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("k,m", [(6, 3), (6, 6), (4, 9), (1, 1), (5, 0)])
def test_gradcheck(log, from_logits, k, m):
    rng = make_rng(k * 31 + m)
    if from_logits:
        x = torch.from_numpy(rng.normal(size=(2, k)) * 2)
    else:
        x = torch.from_numpy(rng.uniform(0.05, 0.95, size=(2, k)))
    x.requires_grad_(True)
    keep = min(m, k) + 1 if log else m + 1  # log bins above K are -inf: no finite differences there
    torch.autograd.gradcheck(lambda t: lc.poisson_binomial(t, max_count=m, log=log, from_logits=from_logits)[:, :keep], (x,))


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("from_logits", [False, True])
def test_gradient_matches_reference(log, from_logits):
    rng = make_rng(21)
    x = torch.from_numpy(rng.normal(size=(3, 25)) * 2 if from_logits else rng.uniform(0.01, 0.99, size=(3, 25)))
    x.requires_grad_(True)
    out = lc.poisson_binomial(x, max_count=7, log=log, from_logits=from_logits)
    g = torch.from_numpy(rng.normal(size=out.shape))
    (gx,) = torch.autograd.grad(out, x, g)
    xr = x.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(ref.poisson_binomial(xr, 7, log, from_logits), xr, g)
    torch.testing.assert_close(gx, gr, rtol=1e-9, atol=1e-12)


@requires_ops
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("from_logits", [False, True])
def test_backward_op_direct(log, from_logits):
    rng = make_rng(22)
    x = torch.from_numpy(rng.normal(size=(3, 11)) if from_logits else rng.uniform(0.02, 0.98, size=(3, 11)))
    for m in (0, 3, 11, 15):
        out = torch.ops.lesioncount.poisson_binomial(x, m, log, from_logits)
        torch.testing.assert_close(out, ref.poisson_binomial(x, m, log, from_logits), rtol=1e-12, atol=1e-12)
        keep = min(m, 11) + 1 if log else m + 1
        g = torch.zeros(3, m + 1, dtype=torch.float64)
        g[:, :keep] = torch.from_numpy(rng.normal(size=(3, keep)))
        gx = torch.ops.lesioncount._poisson_binomial_backward(g, x, m, log, from_logits)
        xr = x.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(ref.poisson_binomial(xr, m, log, from_logits), xr, g)
        assert gx.shape == x.shape and gx.dtype == x.dtype
        torch.testing.assert_close(gx, gr, rtol=1e-9, atol=1e-12)


@requires_ops
def test_opcheck():
    rng = make_rng(23)
    cases = [  # (log, from_logits, K, M, dtype)
        (False, False, 5, 3, torch.float64),
        (True, False, 4, 6, torch.float64),
        (False, True, 5, 5, torch.float64),
        (True, True, 6, 2, torch.float64),
        (False, False, 0, 2, torch.float64),
        (True, True, 3, 0, torch.float64),
        (False, True, 5, 3, torch.float32),
        (True, False, 5, 3, torch.float32),
    ]
    for log, fl, k, m, dtype in cases:
        x = torch.from_numpy(rng.normal(size=(2, k)) if fl else rng.uniform(0.05, 0.95, size=(2, k))).to(dtype)
        torch.library.opcheck(torch.ops.lesioncount.poisson_binomial.default, (x, m, log, fl))
        if k and m:
            torch.library.opcheck(
                torch.ops.lesioncount.poisson_binomial.default, (x.clone().requires_grad_(True), m, log, fl)
            )
        keep = min(m, k) + 1 if log else m + 1
        g = torch.zeros(2, m + 1, dtype=dtype)
        g[:, :keep] = 1.0
        torch.library.opcheck(torch.ops.lesioncount._poisson_binomial_backward.default, (g, x, m, log, fl))


@requires_ops
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_matches_cpu(kernel_device, log, from_logits, dtype):
    rng = make_rng(24)
    for b, k, m in ((3, 7, 4), (5, 300, 10), (1, 0, 3), (2, 5, 0), (64, 40, 40)):
        x = torch.from_numpy(rng.normal(size=(b, k)) * 3 if from_logits else rng.uniform(0.0, 1.0, size=(b, k)))
        x = x.to(dtype)
        cpu = lc.poisson_binomial(x, max_count=m, log=log, from_logits=from_logits)
        xc = kernel_device.to(x).requires_grad_(True)
        xh = x.clone().requires_grad_(True)
        keep = min(m, k) + 1 if log else m + 1
        with kernel_device.active():
            gpu = lc.poisson_binomial(xc.detach(), max_count=m, log=log, from_logits=from_logits)
            (gg,) = torch.autograd.grad(lc.poisson_binomial(xc, max_count=m, log=log, from_logits=from_logits)[:, :keep].sum(), xc, allow_unused=True)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-12)
        (gc,) = torch.autograd.grad(lc.poisson_binomial(xh, max_count=m, log=log, from_logits=from_logits)[:, :keep].sum(), xh, allow_unused=True)
        if gc is not None and gg is not None:
            torch.testing.assert_close(gg.cpu(), gc, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=1e-8)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("from_logits", [False, True])
def test_gradient_with_expanded_sliced_and_strided_inputs(log, from_logits):
    rng = make_rng(25)
    base = rng.normal(size=(6, 3)) if from_logits else rng.uniform(0.05, 0.95, size=(6, 3))
    xT = torch.from_numpy(base).requires_grad_(True)
    x = xT.t()  # non-contiguous (3, 6)
    out = lc.poisson_binomial(x, max_count=3, log=log, from_logits=from_logits)
    xr = torch.from_numpy(base).requires_grad_(True)
    outr = ref.poisson_binomial(xr.t().contiguous(), 3, log, from_logits)
    for sel in (lambda o: o.sum(), lambda o: o[:, 1].sum(), lambda o: o[1:, ::2].sum()):
        (g,) = torch.autograd.grad(sel(out), xT, retain_graph=True)
        (gr,) = torch.autograd.grad(sel(outr), xr, retain_graph=True)
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-12)


@requires_ops
def test_double_backward_is_a_clear_error_not_a_silent_wrong_answer():
    p = torch.tensor([[0.3, 0.6, 0.2]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(lc.poisson_binomial(p, max_count=3)[:, 1].sum(), p, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(g.sum(), p)
