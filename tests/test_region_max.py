"""lesioncount.region_max and torch.ops.lesioncount.region_max vs the reference and a naive loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lesioncount as lc
from conftest import (
    FLOAT_DTYPES,
    HAS_OPS,
    make_rng,
    naive_region_max,
    random_probs,
    ref,
    requires_cuda,
    requires_ops,
)


def _quantised(rng, shape, dtype, levels=8):
    """Values on a coarse grid: many exact ties inside regions."""
    return torch.from_numpy(np.round(rng.random(shape) * levels) / levels).to(dtype)


def _assert_bitwise(got, exp):
    gv, ga = got
    ev, ea = exp
    assert gv.dtype == ev.dtype and ga.dtype == torch.int64
    assert gv.shape == ev.shape and ga.shape == ea.shape
    assert torch.equal(ga.cpu(), ea.cpu())
    assert torch.equal(gv.cpu(), ev.cpu())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,conn", [((3, 5, 6, 7), 26), ((2, 1, 9, 4), 6), ((4, 12, 11), 8), ((1, 1, 1, 1), 6)])
def test_region_max_public_matches_reference_and_naive(dtype, shape, conn):
    rng = make_rng(sum(shape))
    x = _quantised(rng, shape, dtype)
    labels, num = lc.label(x, 0.3, conn)
    R = int(num.max()) if num.numel() else 0
    got = lc.region_max(x, labels, R + 3)
    _assert_bitwise(got, ref.region_max(x, labels, R + 3))
    ev, ea = naive_region_max(x.double().numpy(), labels.numpy(), R + 3)
    np.testing.assert_array_equal(got[1].numpy(), ea)
    np.testing.assert_array_equal(got[0].double().numpy(), ev)
    # num_regions=None means labels.max()
    auto = lc.region_max(x, labels)
    assert auto[0].shape == (shape[0], int(labels.max()))
    _assert_bitwise(auto, ref.region_max(x, labels, int(labels.max())))


@given(
    shape=st.one_of(
        st.tuples(st.integers(1, 3), st.integers(1, 8), st.integers(1, 8), st.integers(1, 8)),
        st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12)),
    ),
    density=st.floats(0.0, 1.0),
    levels=st.sampled_from([1, 3, 1000]),
    extra=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_region_max_property(shape, density, levels, extra, seed):
    rng = make_rng(seed)
    fg = rng.random(shape) < density
    x = torch.from_numpy(np.round(rng.random(shape) * levels) / levels).float()
    conn = 26 if len(shape) == 4 else 8
    labels, num = lc.label(torch.from_numpy(fg), 0.5, conn)
    R = int(num.max()) + extra
    got = lc.region_max(x, labels, R)
    _assert_bitwise(got, ref.region_max(x, labels, R))
    if HAS_OPS:
        _assert_bitwise(torch.ops.lesioncount.region_max(x, labels, R), got)


def test_region_max_explicit_ties_first_index_wins():
    # one item, one region holding the maximum 0.75 at flat indices 3, 7 and 11
    x = torch.tensor([0.1, 0.5, 0.2, 0.75, 0.3, 0.4, 0.0, 0.75, 0.7, 0.6, 0.5, 0.75], dtype=torch.float32)
    lab = torch.tensor([1, 1, 1, 1, 2, 2, 0, 1, 2, 2, 3, 1], dtype=torch.int32)
    v, a = lc.region_max(x.view(1, 3, 4), lab.view(1, 3, 4), 4)
    assert a.tolist() == [[3, 8, 10, -1]]
    assert v.tolist() == [[0.75, pytest.approx(0.7), 0.5, 0.0]]
    # all equal: the first voxel of each region
    x = torch.full((2, 3, 4, 5), 0.5, dtype=torch.float64)
    lab = torch.zeros(2, 3, 4, 5, dtype=torch.int32)
    lab[0, 1:, 2:, 3:] = 1
    lab[1, 2, 3, 4] = 2
    lab[1, 0, 0, 1] = 1
    v, a = lc.region_max(x, lab, 2)
    assert a.tolist() == [[1 * 20 + 2 * 5 + 3, -1], [1, 2 * 20 + 3 * 5 + 4]]
    assert v.tolist() == [[0.5, 0.0], [0.5, 0.5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_region_max_ties_large_single_item(dtype):
    """A big single item (parallel chunks inside one item) keeps the smallest-index tie rule."""
    n = 48
    x = torch.zeros(1, n, n, n, dtype=dtype)
    lab = torch.ones(1, n, n, n, dtype=torch.int32)
    v, a = lc.region_max(x, lab, 1)
    assert a.tolist() == [[0]] and v.tolist() == [[0.0]]
    flat = x.view(-1)
    for idx in (n**3 - 1, n**3 // 2 + 7, n**3 // 3, 12345):
        flat[idx] = 0.5
    lab.view(-1)[: n**3 // 4] = 2  # region 2 is the first quarter
    v, a = lc.region_max(x, lab, 3)
    assert a.tolist() == [[n**3 // 3, 12345, -1]]
    assert v.tolist() == [[0.5, 0.5, 0.0]]
    _assert_bitwise((v, a), ref.region_max(x, lab, 3))


def test_region_max_absent_regions_and_gaps():
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    lab = torch.zeros(2, 3, 4, 5, dtype=torch.int32)
    lab[0, 0, 0, :2] = 2  # label 1 missing in item 0
    lab[1, 2, 3, 4] = 4
    v, a = lc.region_max(x, lab, 6)
    assert v.shape == (2, 6) and a.shape == (2, 6)
    assert a[0].tolist() == [-1, int(x[0, 0, 0, :2].argmax()), -1, -1, -1, -1]
    assert a[1].tolist() == [-1, -1, -1, 59, -1, -1]
    present = a >= 0
    assert bool((v[~present] == 0).all())
    assert float(v[1, 3]) == float(x[1, 2, 3, 4])


def test_region_max_int64_labels_and_zero_regions():
    rng = make_rng(8)
    x = torch.from_numpy(rng.random((2, 4, 5, 6)))
    labels, num = lc.label(x, 0.5, 6)
    R = int(num.max())
    a = lc.region_max(x, labels, R)
    b = lc.region_max(x, labels.long(), R)
    _assert_bitwise(a, b)
    v, am = lc.region_max(x, torch.zeros_like(labels), 0)
    assert v.shape == (2, 0) and am.shape == (2, 0)
    v, am = lc.region_max(torch.zeros(0, 3, 4, 5), torch.zeros(0, 3, 4, 5, dtype=torch.int32), 2)
    assert v.shape == (0, 2) and am.shape == (0, 2)


def _unique_probs(seed, shape):
    x, _ = random_probs(make_rng(seed), shape, 0.5, dtype=torch.float64, unique=True)
    return x


@pytest.mark.parametrize("shape,conn", [((2, 4, 5, 6), 6), ((3, 7, 8), 4)])
def test_region_max_gradcheck(shape, conn):
    x = _unique_probs(4, shape)
    labels, num = lc.label(x, 0.1, conn)
    R = int(num.max()) + 1
    x.requires_grad_(True)
    torch.autograd.gradcheck(lambda t: lc.region_max(t, labels, R)[0], (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_region_max_gradient_is_sparse(dtype):
    rng = make_rng(6)
    x = _quantised(rng, (3, 5, 6, 7), dtype, levels=4)  # with ties
    labels, num = lc.label(x, 0.3, 18)
    R = int(num.max()) + 2
    xg = x.clone().requires_grad_(True)
    v, a = lc.region_max(xg, labels, R)
    g = torch.rand(v.shape, dtype=dtype) + 0.5  # nonzero everywhere
    (gx,) = torch.autograd.grad(v, xg, g)
    present = a >= 0
    assert int((gx != 0).sum()) == int(present.sum())
    exp = ref.region_max_backward(g, a, x.shape)
    assert torch.equal(gx, exp)
    for b in range(3):
        for r in range(R):
            if present[b, r]:
                assert float(gx[b].reshape(-1)[a[b, r]]) == float(g[b, r])


@requires_ops
def test_region_max_op_direct():
    rng = make_rng(12)
    for dtype in FLOAT_DTYPES:
        x = _quantised(rng, (3, 6, 5, 4), dtype)
        labels, num = ref.label(x, 0.4, 18, 0)
        R = int(num.max()) + 1
        _assert_bitwise(torch.ops.lesioncount.region_max(x, labels, R), ref.region_max(x, labels, R))


@requires_ops
def test_region_max_opcheck():
    rng = make_rng(13)
    samples = []
    for shape, conn, dtype in [
        ((2, 4, 5, 6), 26, torch.float64),
        ((2, 4, 5, 6), 6, torch.float32),
        ((3, 7, 9), 8, torch.float64),
        ((1, 1, 1, 1), 6, torch.float32),
    ]:
        x, _ = random_probs(rng, shape, 0.5, dtype=dtype, unique=dtype == torch.float64)
        labels, num = ref.label(x, 0.1, conn, 0)
        R = int(num.max()) + 1
        samples.append((x.clone().requires_grad_(True), labels, R))
        samples.append((x.clone(), labels, R))
    for args in samples:
        torch.library.opcheck(torch.ops.lesioncount.region_max.default, args)


@requires_ops
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_region_max_cuda_matches_cpu(kernel_device, dtype):
    rng = make_rng(14)
    for shape in [(3, 5, 6, 7), (1, 40, 41, 39), (4, 33, 17)]:
        for levels in (1, 4, 1000):
            x = _quantised(rng, shape, dtype, levels)
            labels, num = lc.label(x, 0.3, 26 if len(shape) == 4 else 8)
            R = int(num.max()) + 2
            cpu = lc.region_max(x, labels, R)
            with kernel_device.active():
                gpu = lc.region_max(kernel_device.to(x), kernel_device.to(labels), R)
            _assert_bitwise(gpu, cpu)
    x = kernel_device.to(_unique_probs(15, (2, 4, 5, 6))).requires_grad_(True)
    with kernel_device.active():
        labels, num = lc.label(x.detach(), 0.1, 6)
        torch.autograd.gradcheck(lambda t: lc.region_max(t, labels, int(num.max()))[0], (x,))


def test_region_max_non_contiguous_and_5d():
    rng = make_rng(16)
    x = torch.from_numpy(rng.random((2, 5, 6, 7)))
    labels, num = lc.label(x, 0.5, 6)
    R = int(num.max())
    exp = ref.region_max(x, labels, R)
    xt = x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    lt = labels.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    assert not xt.is_contiguous() and not lt.is_contiguous()
    _assert_bitwise(lc.region_max(xt, lt, R), exp)
    _assert_bitwise(lc.region_max(x.unsqueeze(1), labels.unsqueeze(1), R), exp)
    # gradients through the non-contiguous input, with an expanded (stride 0) upstream gradient
    xg = xt.clone().requires_grad_(True)
    v, a = lc.region_max(xg, lt, R)
    (g,) = torch.autograd.grad(v.sum(), xg)
    assert torch.equal(g, ref.region_max_backward(torch.ones_like(v), a, x.shape))
