"""Derivatives of the count distribution on every backend: the pmf's gradient at p exactly 0 or 1
(eq. 3 differentiated), forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd) and
the other torch.func transforms (grad, jacrev, vmap), with clear errors where a transform cannot
apply.

Backends, each in this process: ``cpu`` (the compiled CPU kernels), ``cuda-on-cpu`` (the CUDA kernels
on the CUDA-on-CPU test runtime, through the public API), ``fallback`` (the pure torch/SciPy
reference, as without the compiled library).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import lesioncount as lc
from conftest import HAS_OPS
from kernel_devices import CUDA_ON_CPU, _skip_reason

BACKENDS = ["cpu", "cuda-on-cpu", "fallback"]


@contextlib.contextmanager
def _fallback(monkeypatch):
    from lesioncount import _ops

    for key in list(_ops._KERNELS):
        monkeypatch.setitem(_ops._KERNELS, key, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "using the pure torch/SciPy fallback"
        yield


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """A context manager factory routing the public API to one backend."""
    name = request.param
    if name in ("cpu", "cuda-on-cpu") and not HAS_OPS:
        pytest.skip("compiled lesioncount ops not available")
    if name == "cuda-on-cpu":
        reason = _skip_reason(CUDA_ON_CPU)
        if reason:
            pytest.skip(reason)
        return CUDA_ON_CPU.active
    if name == "fallback":
        return lambda: _fallback(monkeypatch)
    return contextlib.nullcontext


# ---------------------------------------------------------------------------- analytic references
def _pmf_exact(p, max_count):
    """Truncated Poisson-binomial pmf by enumerating the 2^K outcomes (float64, small K)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros(max_count + 1)
    for outcome in itertools.product((0, 1), repeat=len(p)):
        prob = np.prod(np.where(np.array(outcome) == 1, p, 1.0 - p)) if len(p) else 1.0
        out[min(sum(outcome), max_count)] += prob
    return out


def _jacobian_exact(p, max_count):
    """dP(bin c)/dp_k of eq. 3: Q_k(c-1) - Q_k(c) with Q_k the pmf without candidate k (the tail
    bin "M or more": Q_k(M-1)); exact at p = 0 and p = 1, where nothing divides by a probability."""
    p = np.asarray(p, dtype=np.float64)
    K = len(p)
    jac = np.zeros((max_count + 1, K))
    for k in range(K):
        q = _pmf_exact(np.delete(p, k), max_count)
        for c in range(max_count + 1):
            below = q[c - 1] if c >= 1 else 0.0
            jac[c, k] = below if c == max_count else below - q[c]
    return jac


def _peak_map(peaks, dtype=torch.float64):
    """(1, 6, 10, 10) map with one single-voxel candidate per peak, far apart (18-connectivity)."""
    x = torch.zeros(1, 6, 10, 10, dtype=dtype)
    spots = [(1, 1, 1), (1, 6, 6), (4, 1, 7), (4, 7, 2), (2, 4, 4)]
    for (d, h, w), value in zip(spots, peaks):
        x[0, d, h, w] = value
    return x, spots[: len(peaks)]


# ---------------------------------------------------------------------------- 1. gradient at p = 0, 1
@pytest.mark.parametrize("peaks", [(1.0, 0.3), (1.0, 0.3, 1.0, 0.75), (0.55, 1.0, 0.2)])
def test_count_distribution_pmf_gradient_is_eq3_at_p_one(backend, peaks):
    max_count = 3
    with backend():
        x, spots = _peak_map(peaks)
        x.requires_grad_(True)
        result = lc.count_distribution(x, max_count=max_count)
        expected = _jacobian_exact(peaks, max_count)
        for c in range(max_count + 1):
            (grad,) = torch.autograd.grad(result.pmf[0, c], x, retain_graph=True)
            got = np.array([float(grad[0, d, h, w]) for d, h, w in spots])
            np.testing.assert_allclose(got, expected[c], rtol=1e-12, atol=1e-12, err_msg=f"bin {c}")
            assert int((grad != 0).sum()) <= len(peaks)  # sparse: one voxel per candidate
        torch.testing.assert_close(result.pmf[0].detach(), torch.from_numpy(_pmf_exact(peaks, max_count)),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_poisson_binomial_gradient_with_exact_zeros_and_ones(backend, log, dtype):
    p = [1.0, 0.0, 0.3, 1.0, 0.8, 0.0, 0.45]
    max_count = 5
    jac = _jacobian_exact(p, max_count)
    pmf = _pmf_exact(p, max_count)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    with backend():
        probs = torch.tensor([p], dtype=dtype, requires_grad=True)
        out = lc.poisson_binomial(probs, max_count, log=log)
        for c in range(max_count + 1):
            (grad,) = torch.autograd.grad(out[0, c], probs, retain_graph=True)
            if log:
                # d log P / dp = (dP/dp) / P where P > 0; a bin with log P = -inf has gradient 0
                want = jac[c] / pmf[c] if pmf[c] > 0 else np.zeros_like(jac[c])
            else:
                want = jac[c]
            np.testing.assert_allclose(grad[0].double().numpy(), want, rtol=tol, atol=tol, err_msg=f"bin {c}")


def test_log_pmf_gradient_is_zero_at_minus_inf_and_never_nan(backend):
    with backend():
        probs = torch.tensor([[1.0, 1.0, 0.4]], dtype=torch.float64, requires_grad=True)
        log_pmf = lc.poisson_binomial(probs, 3, log=True)
        assert log_pmf[0, 0] == -math.inf and log_pmf[0, 1] == -math.inf
        (grad,) = torch.autograd.grad(log_pmf.sum(), probs)  # an -inf bin's upstream gradient is 1 here
        assert torch.isfinite(grad).all()
        (grad_bin0,) = torch.autograd.grad(lc.poisson_binomial(probs, 3, log=True)[0, 0], probs)
        assert torch.equal(grad_bin0, torch.zeros_like(grad_bin0))


# ---------------------------------------------------------------------------- 2. forward-mode AD
@pytest.mark.parametrize("log,from_logits", [(False, False), (True, False), (False, True), (True, True)])
def test_poisson_binomial_gradcheck_forward_and_reverse(backend, log, from_logits):
    gen = torch.Generator().manual_seed(5)
    probs = torch.rand(3, 6, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    if from_logits:
        probs = torch.logit(probs)
    with backend():
        assert torch.autograd.gradcheck(lambda q: lc.poisson_binomial(q, 4, log=log, from_logits=from_logits),
                                        (probs.requires_grad_(True),), check_forward_ad=True)


def test_region_max_gradcheck_forward_and_reverse(backend):
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(2, 5, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 5, 7), generator=gen, dtype=torch.int32)
    with backend():
        assert torch.autograd.gradcheck(lambda v: lc.region_max(v, labels, 4)[0], (x.requires_grad_(True),),
                                        check_forward_ad=True)


@pytest.mark.parametrize("max_lesions", [None, 6])
def test_count_distribution_gradcheck_forward_and_reverse(backend, max_lesions):
    gen = torch.Generator().manual_seed(7)
    # a few candidates with unique maxima; no value within gradcheck's step of 0 or 1
    x = torch.rand(2, 4, 6, 6, generator=gen, dtype=torch.float64) ** 4 * 0.98 + 1e-3
    with backend():
        f = lambda v: lc.count_distribution(v, max_count=3, max_lesions=max_lesions).pmf  # noqa: E731
        assert torch.autograd.gradcheck(f, (x.requires_grad_(True),), check_forward_ad=True)


@pytest.mark.parametrize("log", [False, True])
def test_jvp_exact_at_zeros_ones_and_saturated_logits(backend, log):
    p = [1.0, 0.0, 0.3, 1.0, 0.8]
    max_count = 4
    jac = _jacobian_exact(p, max_count)
    pmf = _pmf_exact(p, max_count)
    tangent = np.array([0.5, -1.0, 2.0, 1.5, -0.25])
    want = jac @ tangent
    if log:
        want = np.where(pmf > 0, want / np.where(pmf > 0, pmf, 1.0), 0.0)  # -inf bins: tangent 0
    with backend():
        _, got = torch.func.jvp(lambda q: lc.poisson_binomial(q, max_count, log=log),
                                (torch.tensor([p], dtype=torch.float64),),
                                (torch.tensor([tangent], dtype=torch.float64),))
        np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-12, atol=1e-12)
        # 400 logits of 40: log P(C=0) = -400 softplus(40) underflows any linear pmf; its tangent per
        # unit logit step of every candidate is -400 sigmoid(40)
        z = torch.full((1, 400), 40.0, dtype=torch.float64)
        _, t = torch.func.jvp(lambda q: lc.poisson_binomial(q, 3, log=True, from_logits=True), (z,),
                              (torch.ones_like(z),))
        # (the ratio T/P is formed from two logarithms near -16000: ~1e-12 relative rounding each)
        assert float(t[0, 0]) == pytest.approx(-400 * float(torch.sigmoid(torch.tensor(40.0, dtype=torch.float64))),
                                               rel=1e-9)


def test_forward_ad_dual_tensors_give_tangents(backend):
    import torch.autograd.forward_ad as fwAD

    x, spots = _peak_map((0.9, 0.4, 0.7))
    tangent = torch.zeros_like(x)
    tangent[0, 1, 1, 1] = 1.0  # move the first candidate's peak only
    with backend(), fwAD.dual_level():
        result = lc.count_distribution(fwAD.make_dual(x, tangent), max_count=3)
        pmf_tangent = fwAD.unpack_dual(result.pmf).tangent
        probs_tangent = fwAD.unpack_dual(result.lesion_probs).tangent
    assert pmf_tangent is not None and probs_tangent is not None
    np.testing.assert_allclose(pmf_tangent[0].numpy(), _jacobian_exact((0.9, 0.4, 0.7), 3)[:, 0], rtol=1e-12, atol=1e-12)
    assert probs_tangent[0].tolist() == [1.0, 0.0, 0.0]


def test_torch_func_transforms_agree_with_autograd(backend):
    gen = torch.Generator().manual_seed(8)
    x = torch.rand(2, 4, 6, 6, generator=gen, dtype=torch.float64) ** 4
    with backend():
        f = lambda v: lc.count_distribution(v, max_count=3, max_lesions=6).pmf  # noqa: E731
        jac_rev = torch.func.jacrev(f)(x)
        jac_fwd = torch.func.jacfwd(f)(x)
        xr = x.clone().requires_grad_(True)
        rows = [torch.autograd.grad(f(xr)[b, c], xr)[0] for b in range(2) for c in range(4)]
        reference = torch.stack(rows).reshape(2, 4, *x.shape)
        torch.testing.assert_close(jac_rev, reference, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(jac_fwd, reference, rtol=1e-12, atol=1e-12)
        grad = torch.func.grad(lambda v: lc.count_distribution(v, max_count=3).log_pmf[:, 1].sum())(x)
        torch.testing.assert_close(grad, torch.autograd.grad(
            lc.count_distribution(xr, max_count=3).log_pmf[:, 1].sum(), xr)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["cpu", "cuda-on-cpu"])
def test_vmap_over_a_leading_dimension_matches_the_loop(name, monkeypatch):
    if not HAS_OPS:
        pytest.skip("compiled lesioncount ops not available")
    context = CUDA_ON_CPU.active if name == "cuda-on-cpu" else contextlib.nullcontext
    if name == "cuda-on-cpu" and _skip_reason(CUDA_ON_CPU):
        pytest.skip(_skip_reason(CUDA_ON_CPU))
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(3, 2, 4, 6, 6, generator=gen, dtype=torch.float64) ** 4
    with context():
        f = lambda v: lc.count_distribution(v, max_count=3, max_lesions=6).pmf  # noqa: E731
        batched = torch.func.vmap(f)(x)
        looped = torch.stack([f(x[i]) for i in range(3)])
        torch.testing.assert_close(batched, looped, rtol=0, atol=0)
        per_sample = torch.func.vmap(torch.func.jacrev(lambda v: f(v).sum()))(x)
        assert per_sample.shape == x.shape and torch.isfinite(per_sample).all()
        labels, num = torch.func.vmap(lambda v: lc.label(v, 0.1))(x)
        assert torch.equal(num, torch.stack([lc.label(x[i], 0.1)[1] for i in range(3)]))


def test_transforms_that_cannot_apply_say_why(monkeypatch):
    x = torch.rand(2, 1, 4, 6, 6, dtype=torch.float64)
    if HAS_OPS:
        with pytest.raises(RuntimeError, match="max_lesions"):
            torch.func.vmap(lambda v: lc.count_distribution(v, max_count=3).pmf)(x)
        with pytest.raises(RuntimeError, match="num_regions"):
            labels = torch.zeros(2, 1, 4, 6, 6, dtype=torch.int32)
            torch.func.vmap(lambda v, lab: lc.region_max(v, lab)[0])(x, labels)
        with pytest.raises(NotImplementedError, match="first-order"):
            torch.func.hessian(lambda q: lc.poisson_binomial(q, 3).sum())(torch.rand(1, 4, dtype=torch.float64))
    with _fallback(monkeypatch):
        with pytest.raises(RuntimeError, match="SciPy"):
            torch.func.vmap(lambda v: lc.count_distribution(v, max_count=3, max_lesions=6).pmf)(x)


# ---------------------------------------------------------------------------- 5. compile and meta
def test_compile_dynamic_with_static_max_lesions():
    if not HAS_OPS:
        pytest.skip("the SciPy fallback cannot be traced into one graph")
    torch._dynamo.reset()

    def f(v, threshold):
        r = lc.count_distribution(v, threshold=threshold, max_count=4, max_lesions=8, from_logits=True)
        return r.log_pmf

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(10)
    for shape, threshold in (((2, 6, 10, 10), 0.1), ((3, 5, 8, 12), 0.25)):
        z = torch.randn(*shape, generator=gen) * 3 - 4
        torch.testing.assert_close(compiled(z, threshold), f(z, threshold), rtol=1e-6, atol=1e-6)


def test_meta_tensors_get_a_clear_error_and_fake_tensors_trace():
    meta = torch.rand(2, 8, 16, 16, device="meta")
    for call in (lambda: lc.count_distribution(meta, max_count=4), lambda: lc.label(meta),
                 lambda: lc.poisson_binomial(torch.rand(2, 5, device="meta"), 3),
                 lambda: lc.region_max(meta, torch.zeros(2, 8, 16, 16, dtype=torch.int32, device="meta"), 3)):
        with pytest.raises(ValueError, match="meta tensor"):
            call()
    if HAS_OPS:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            fake = torch.rand(2, 8, 16, 16)
            assert lc.count_distribution(fake, max_count=4, max_lesions=8).pmf.shape == (2, 5)
