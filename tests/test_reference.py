"""The pure torch / SciPy reference (``lesioncount._reference``) against SciPy and brute force.

These tests need neither the compiled library nor the public package ``__init__``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import (
    ALL_CONNECTIVITIES,
    FLOAT_DTYPES,
    LABEL_DTYPES,
    ODD_SHAPES_2D,
    ODD_SHAPES_3D,
    binary_to_dtype,
    make_rng,
    naive_region_max,
    random_probs,
    ref,
    scipy_label_batch,
)

# ============================================================================================
# label
# ============================================================================================

shapes_3d = st.tuples(
    st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)
)
shapes_2d = st.tuples(st.integers(1, 3), st.integers(1, 15), st.integers(1, 15))


@given(
    shape=shapes_3d,
    density=st.floats(0.0, 1.0),
    conn=st.sampled_from([6, 18, 26]),
    seed=st.integers(0, 2**31 - 1),
)
def test_label_matches_scipy_3d(shape, density, conn, seed):
    rng = make_rng(seed)
    x, fg = random_probs(rng, shape, density)
    labels, num = ref.label(x, 0.1, conn, 0)
    exp, exp_num = scipy_label_batch(fg, conn)
    assert labels.dtype == torch.int32 and num.dtype == torch.int64
    assert labels.shape == x.shape and num.shape == (shape[0],)
    np.testing.assert_array_equal(labels.numpy(), exp)
    np.testing.assert_array_equal(num.numpy(), exp_num)


@given(
    shape=shapes_2d,
    density=st.floats(0.0, 1.0),
    conn=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_label_matches_scipy_2d(shape, density, conn, seed):
    rng = make_rng(seed)
    x, fg = random_probs(rng, shape, density)
    labels, num = ref.label(x, 0.1, conn, 0)
    exp, exp_num = scipy_label_batch(fg, conn)
    np.testing.assert_array_equal(labels.numpy(), exp)
    np.testing.assert_array_equal(num.numpy(), exp_num)


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_label_dtypes(dtype, rank, conn):
    rng = make_rng()
    shapes = ODD_SHAPES_3D if rank == 3 else ODD_SHAPES_2D
    for shape in shapes:
        fg = rng.random(shape) < 0.4
        x = binary_to_dtype(fg, dtype, rng=rng)
        labels, num = ref.label(x, 0.1, conn, 0)
        exp, exp_num = scipy_label_batch(fg, conn)
        np.testing.assert_array_equal(labels.numpy(), exp)
        np.testing.assert_array_equal(num.numpy(), exp_num)


@pytest.mark.parametrize("min_size", [0, 1, 2, 3, 5, 1000])
@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_label_min_size(min_size, rank, conn):
    rng = make_rng(min_size)
    shape = (3, 5, 7, 6) if rank == 3 else (3, 11, 13)
    x, fg = random_probs(rng, shape, 0.3)
    labels, num = ref.label(x, 0.1, conn, min_size)
    exp, exp_num = scipy_label_batch(fg, conn, min_size)
    np.testing.assert_array_equal(labels.numpy(), exp)
    np.testing.assert_array_equal(num.numpy(), exp_num)


def test_label_threshold_edge_is_background():
    x = torch.tensor([[[0.1, 0.1000001, 0.0], [0.5, 0.1, 0.1]]], dtype=torch.float64)
    labels, num = ref.label(x, 0.1, 4, 0)
    assert labels.tolist() == [[[0, 1, 0], [2, 0, 0]]]
    assert num.tolist() == [2]
    # float32 0.1 is slightly above float64 0.1: the comparison is in float64
    x32 = torch.tensor([[[0.1]]], dtype=torch.float32)
    assert float(x32.double()) > 0.1
    assert ref.label(x32, 0.1, 4, 0)[1].tolist() == [1]
    assert ref.label(x32, float(x32.double()), 4, 0)[1].tolist() == [0]


def test_label_batch_items_independent():
    fg = np.ones((3, 4, 5, 6), dtype=bool)
    labels, num = ref.label(torch.from_numpy(fg), 0.5, 26, 0)
    assert num.tolist() == [1, 1, 1]
    assert (labels == 1).all()


def test_label_empty_batch_and_bad_connectivity():
    labels, num = ref.label(torch.zeros(0, 3, 4, 5), 0.1, 18, 0)
    assert labels.shape == (0, 3, 4, 5) and num.shape == (0,)
    with pytest.raises(ValueError, match="connectivity"):
        ref.label(torch.zeros(1, 3, 4), 0.1, 26, 0)
    with pytest.raises(ValueError, match="connectivity"):
        ref.label(torch.zeros(1, 3, 4, 5), 0.1, 8, 0)
    with pytest.raises(ValueError, match="connectivity"):
        ref.label(torch.zeros(1, 3, 4, 5), 0.1, 5, 0)
    with pytest.raises(ValueError, match="min_size"):
        ref.label(torch.zeros(1, 3, 4, 5), 0.1, 6, -1)
    with pytest.raises(ValueError, match="input"):
        ref.label(torch.zeros(3, 4), 0.1, 4, 0)
    with pytest.raises(ValueError, match="NaN"):
        ref.label(torch.full((1, 3, 4), math.nan), 0.1, 4, 0)


# ============================================================================================
# region_max
# ============================================================================================


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,conn", [((3, 5, 6, 7), 26), ((2, 1, 9, 4), 6), ((4, 12, 11), 8)])
def test_region_max_matches_naive(dtype, shape, conn):
    rng = make_rng()
    # quantised values produce many ties; the first index must win
    x = torch.from_numpy(np.round(rng.random(shape) * 8) / 8).to(dtype)
    labels, num = ref.label(x, 0.3, conn, 0)
    R = int(num.max()) + 2  # two trailing absent regions
    vals, am = ref.region_max(x, labels, R)
    exp_vals, exp_am = naive_region_max(x.double().numpy(), labels.numpy(), R)
    assert vals.dtype == dtype and am.dtype == torch.int64
    assert vals.shape == (shape[0], R) and am.shape == (shape[0], R)
    np.testing.assert_array_equal(am.numpy(), exp_am)
    np.testing.assert_array_equal(vals.double().numpy(), exp_vals)


def test_region_max_explicit_ties_and_absent():
    x = torch.tensor([[0.2, 0.7, 0.7, 0.1, 0.7, 0.9, 0.9]], dtype=torch.float32)
    lab = torch.tensor([[1, 1, 1, 0, 3, 3, 3]], dtype=torch.int32)
    vals, am = ref.region_max(x.view(1, 1, 7), lab.view(1, 1, 7), 4)
    assert am.tolist() == [[1, -1, 5, -1]]
    assert vals[0].tolist() == pytest.approx([0.7, 0.0, 0.9, 0.0])


def test_region_max_grad_sparse_and_gradcheck():
    rng = make_rng(3)
    x, _ = random_probs(rng, (2, 4, 5, 6), 0.5, dtype=torch.float64, unique=True)
    labels, num = ref.label(x, 0.1, 6, 0)
    R = int(num.max()) + 1
    xg = x.clone().requires_grad_(True)
    vals, am = ref.region_max(xg, labels, R)
    g = torch.randn_like(vals)
    (gx,) = torch.autograd.grad(vals, xg, g)
    present = am >= 0
    assert int((gx != 0).sum()) == int(present.sum())
    torch.testing.assert_close(gx, ref.region_max_backward(g, am, x.shape), rtol=0, atol=0)
    torch.autograd.gradcheck(lambda t: ref.region_max(t, labels, R)[0], (xg,))


# ============================================================================================
# poisson_binomial
# ============================================================================================


def test_poisson_binomial_paper_example():
    p = torch.tensor([[0.5189, 0.7840]], dtype=torch.float64)
    pmf = ref.poisson_binomial(p, 4, False, False)
    torch.testing.assert_close(
        pmf, torch.tensor([[0.1039, 0.4892, 0.4068, 0.0, 0.0]], dtype=torch.float64), atol=1e-4, rtol=0
    )
    lpmf = ref.poisson_binomial(p, 4, True, False)
    torch.testing.assert_close(lpmf.exp(), pmf, atol=1e-15, rtol=1e-12)


@given(
    k=st.integers(0, 10),
    m=st.integers(0, 13),
    seed=st.integers(0, 2**31 - 1),
    log_space=st.booleans(),
    extremes=st.booleans(),
)
def test_poisson_binomial_matches_bruteforce(k, m, seed, log_space, extremes):
    rng = make_rng(seed)
    p = rng.random((2, k))
    if extremes and k:
        p[0, rng.integers(0, k)] = 0.0
        p[1, rng.integers(0, k)] = 1.0
    pt = torch.from_numpy(p)
    out = ref.poisson_binomial(pt, m, log_space, False)
    assert out.shape == (2, m + 1) and out.dtype == torch.float64
    pmf = out.exp() if log_space else out
    for b in range(2):
        exp = ref.poisson_binomial_bruteforce(p[b], m)
        np.testing.assert_allclose(pmf[b].numpy(), exp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pmf.sum(1).numpy(), 1.0, rtol=0, atol=1e-12)


def test_poisson_binomial_mean_tail_and_padding():
    rng = make_rng(7)
    p = torch.from_numpy(rng.random((3, 9)))
    pmf = ref.poisson_binomial(p, 9, False, False)  # untruncated: M = K
    mean = (pmf * torch.arange(10, dtype=torch.float64)).sum(1)
    torch.testing.assert_close(mean, p.sum(1), rtol=1e-12, atol=1e-12)
    trunc = ref.poisson_binomial(p, 4, False, False)
    torch.testing.assert_close(trunc[:, :4], pmf[:, :4], rtol=0, atol=1e-15)
    torch.testing.assert_close(trunc[:, 4], pmf[:, 4:].sum(1), rtol=1e-12, atol=1e-15)
    padded = torch.cat([p, torch.zeros(3, 5, dtype=torch.float64)], dim=1)
    assert torch.equal(ref.poisson_binomial(padded, 4, False, False), trunc)
    assert torch.equal(ref.poisson_binomial(padded, 4, True, False), ref.poisson_binomial(p, 4, True, False))
    # K = 0 and M = 0
    assert ref.poisson_binomial(torch.zeros(2, 0), 3, False, False).tolist() == [[1, 0, 0, 0]] * 2
    assert ref.poisson_binomial(p, 0, False, False).tolist() == [[1.0]] * 3
    assert ref.poisson_binomial(p, 0, True, False).tolist() == [[0.0]] * 3


def test_poisson_binomial_log_near_certain():
    p = torch.full((1, 400), 0.999, dtype=torch.float64, requires_grad=True)
    lp = ref.poisson_binomial(p, 4, True, False)
    assert torch.isfinite(lp).all()
    exp = 400 * math.log(0.001)
    assert abs(float(lp[0, 0].detach()) - exp) <= 1e-9 * abs(exp)
    lp[0, :4].sum().backward()
    assert torch.isfinite(p.grad).all()


def test_poisson_binomial_logits_and_float32():
    rng = make_rng(11)
    z = torch.from_numpy(rng.normal(size=(4, 7)) * 3)
    for log_space in (False, True):
        a = ref.poisson_binomial(z, 5, log_space, True)
        b = ref.poisson_binomial(torch.sigmoid(z), 5, log_space, False)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        o32 = ref.poisson_binomial(z.float(), 5, log_space, True)
        assert o32.dtype == torch.float32
        torch.testing.assert_close(o32.double(), ref.poisson_binomial(z.float().double(), 5, log_space, True), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("log_space", [False, True])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("m", [0, 2, 9])
def test_poisson_binomial_gradcheck(log_space, from_logits, m):
    rng = make_rng(5)
    if from_logits:
        x = torch.from_numpy(rng.normal(size=(2, 6)) * 2)
    else:
        x = torch.from_numpy(rng.uniform(0.05, 0.95, size=(2, 6)))
    x.requires_grad_(True)
    # in log space the bins above K are -inf (finite differences give NaN there): leave them out
    keep = min(m, x.shape[1]) + 1
    torch.autograd.gradcheck(lambda t: ref.poisson_binomial(t, m, log_space, from_logits)[:, :keep], (x,))
