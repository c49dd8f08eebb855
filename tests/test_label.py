"""lesioncount.label and torch.ops.lesioncount.label: exact equality with scipy.ndimage.label."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lesioncount as lc
from conftest import (
    ALL_CONNECTIVITIES,
    LABEL_DTYPES,
    ODD_SHAPES_2D,
    ODD_SHAPES_3D,
    binary_to_dtype,
    make_rng,
    random_probs,
    ref,
    requires_cuda,
    requires_ops,
    scipy_label_batch,
)


def _check(labels, num, exp, exp_num):
    assert labels.dtype == torch.int32, labels.dtype
    assert num.dtype == torch.int64, num.dtype
    assert num.shape == (exp.shape[0],)
    np.testing.assert_array_equal(labels.cpu().numpy().reshape(exp.shape), exp)
    np.testing.assert_array_equal(num.cpu().numpy(), exp_num)


shapes_3d = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9))
shapes_2d = st.tuples(st.integers(1, 3), st.integers(1, 16), st.integers(1, 16))


@given(
    shape=st.one_of(shapes_3d, st.sampled_from(ODD_SHAPES_3D)),
    density=st.floats(0.0, 1.0),
    conn=st.sampled_from([6, 18, 26]),
    min_size=st.sampled_from([0, 0, 0, 2, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_label_3d_matches_scipy(shape, density, conn, min_size, seed):
    x, fg = random_probs(make_rng(seed), shape, density)
    labels, num = lc.label(x, threshold=0.1, connectivity=conn, min_size=min_size)
    assert labels.shape == x.shape
    _check(labels, num, *scipy_label_batch(fg, conn, min_size))


@given(
    shape=st.one_of(shapes_2d, st.sampled_from(ODD_SHAPES_2D)),
    density=st.floats(0.0, 1.0),
    conn=st.sampled_from([4, 8]),
    min_size=st.sampled_from([0, 0, 0, 2, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_label_2d_matches_scipy(shape, density, conn, min_size, seed):
    x, fg = random_probs(make_rng(seed), shape, density)
    labels, num = lc.label(x, threshold=0.1, connectivity=conn, min_size=min_size)
    assert labels.shape == x.shape
    _check(labels, num, *scipy_label_batch(fg, conn, min_size))


@requires_ops
@given(
    shape=st.one_of(shapes_3d, shapes_2d),
    density=st.floats(0.0, 1.0),
    conn_idx=st.integers(0, 2),
    min_size=st.sampled_from([0, 1, 3]),
    threshold=st.sampled_from([0.0, 0.1, 0.5, 0.9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_label_op_matches_reference(shape, density, conn_idx, min_size, threshold, seed):
    conn = [6, 18, 26][conn_idx] if len(shape) == 4 else [4, 8, 8][conn_idx]
    x, _ = random_probs(make_rng(seed), shape, density, threshold=threshold)
    got = torch.ops.lesioncount.label(x, threshold, conn, min_size)
    exp = ref.label(x, threshold, conn, min_size)
    assert torch.equal(got[0], exp[0])
    assert torch.equal(got[1], exp[1])


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.5, 0.7, 0.95, 1.0])
def test_label_odd_shapes_all_densities(rank, conn, density):
    rng = make_rng(int(density * 100) + conn)
    for shape in ODD_SHAPES_3D if rank == 3 else ODD_SHAPES_2D:
        x, fg = random_probs(rng, shape, density)
        _check(*lc.label(x, 0.1, conn, 0), *scipy_label_batch(fg, conn))


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_label_all_dtypes(dtype, rank, conn):
    rng = make_rng(17)
    shape = (2, 6, 7, 5) if rank == 3 else (3, 13, 11)
    fg = rng.random(shape) < 0.45
    x = binary_to_dtype(fg, dtype, rng=rng)
    _check(*lc.label(x, 0.1, conn, 0), *scipy_label_batch(fg, conn))
    if dtype.is_floating_point:
        # the same volume through random_probs in this dtype
        x2, fg2 = random_probs(rng, shape, 0.45, dtype=dtype)
        _check(*lc.label(x2, 0.1, conn, 0), *scipy_label_batch(fg2, conn))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_label_threshold_equality_is_background(dtype):
    t = 0.25  # exactly representable in every float dtype
    x = torch.tensor([[[t, 0.5, t], [0.5, t, 0.0], [t, t, 0.75]]], dtype=dtype)
    labels, num = lc.label(x, threshold=t, connectivity=4)
    assert labels.tolist() == [[[0, 1, 0], [2, 0, 0], [0, 0, 3]]]
    assert num.tolist() == [3]
    # 3D too
    labels, num = lc.label(x.unsqueeze(1), threshold=t, connectivity=6)
    assert num.tolist() == [3]
    # threshold 0 with an all-zero volume: nothing is foreground
    assert lc.label(torch.zeros(1, 3, 3, dtype=dtype), threshold=0.0, connectivity=8)[1].tolist() == [0]


def test_label_threshold_compared_in_float64():
    x = torch.tensor([[[0.1, 0.0]]], dtype=torch.float32)  # float32(0.1) > float64(0.1)
    assert lc.label(x, threshold=0.1, connectivity=4)[1].tolist() == [1]
    assert lc.label(x, threshold=float(x[0, 0, 0].double()), connectivity=4)[1].tolist() == [0]
    xh = torch.tensor([[[0.1, 0.0]]], dtype=torch.float16)  # float16(0.1) < 0.1
    assert float(xh[0, 0, 0].double()) < 0.1
    assert lc.label(xh, threshold=0.1, connectivity=4)[1].tolist() == [0]


def test_label_bool_and_uint8_defaults():
    fg = np.zeros((1, 3, 4, 5), dtype=bool)
    fg[0, 0, 0, 0] = fg[0, 1, 1, 1] = True  # corner neighbours: 26-connected only
    fg[0, 2, 3, 4] = True
    x = torch.from_numpy(fg)
    labels, num = lc.label(x)  # defaults: threshold 0.1, connectivity 18
    _check(labels, num, *scipy_label_batch(fg, 18))
    assert num.tolist() == [3]
    assert lc.label(x, connectivity=26)[1].tolist() == [2]
    assert lc.label(x.to(torch.uint8), connectivity=26)[1].tolist() == [2]


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
@pytest.mark.parametrize("min_size", [1, 2, 3, 7, 10**6])
def test_label_min_size(rank, conn, min_size):
    rng = make_rng(min_size)
    shape = (3, 7, 6, 8) if rank == 3 else (3, 15, 14)
    x, fg = random_probs(rng, shape, 0.25)
    labels, num = lc.label(x, 0.1, conn, min_size)
    exp = ref.label(x, 0.1, conn, min_size)
    assert torch.equal(labels, exp[0]) and torch.equal(num, exp[1])
    _check(labels, num, *scipy_label_batch(fg, conn, min_size))
    # sizes of surviving components are >= min_size and numbering is consecutive
    for b in range(shape[0]):
        counts = torch.bincount(labels[b].reshape(-1).long(), minlength=int(num[b]) + 1)
        assert counts.numel() == int(num[b]) + 1
        assert bool((counts[1:] >= min_size).all())


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_label_batch_items_independent(rank, conn):
    rng = make_rng(99)
    shape = (4, 5, 6, 7) if rank == 3 else (4, 9, 8)
    x, fg = random_probs(rng, shape, 0.6)
    # make the last voxel of each item and the first of the next foreground: adjacent in memory
    flat = x.view(shape[0], -1)
    flat[:, 0] = 0.9
    flat[:, -1] = 0.9
    labels, num = lc.label(x, 0.1, conn, 0)
    for b in range(shape[0]):
        lb, nb = lc.label(x[b : b + 1].clone(), 0.1, conn, 0)
        assert torch.equal(labels[b : b + 1], lb)
        assert int(num[b]) == int(nb[0])
    # a full volume is one component per item
    ones = torch.ones(shape)
    labels, num = lc.label(ones, 0.1, conn, 0)
    assert num.tolist() == [1] * shape[0]
    assert bool((labels == 1).all())


def test_label_channel_dim_and_layouts():
    rng = make_rng(5)
    x4, fg = random_probs(rng, (3, 6, 7, 8), 0.4)
    exp = scipy_label_batch(fg, 18)
    x5 = x4.unsqueeze(1)  # (B, 1, D, H, W)
    labels, num = lc.label(x5, 0.1, 18)
    assert labels.numel() == x4.numel()
    assert labels.shape in ((3, 6, 7, 8), (3, 1, 6, 7, 8))
    _check(labels, num, *exp)
    # channels-last 3d
    cl = x5.contiguous(memory_format=torch.channels_last_3d)
    assert cl.is_contiguous(memory_format=torch.channels_last_3d)
    _check(*lc.label(cl, 0.1, 18), *exp)
    # with C = 1 channels-last strides are trivially contiguous: also take channel 0 of a
    # channels-last (B, 2, D, H, W) tensor, which really is strided
    cl2 = torch.cat([x5, 1 - x5], dim=1).contiguous(memory_format=torch.channels_last_3d)[:, :1]
    assert not cl2.is_contiguous() and torch.equal(cl2, x5)
    _check(*lc.label(cl2, 0.1, 18), *exp)
    # non-contiguous views: a permuted tensor and a strided slice
    perm = x4.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    assert not perm.is_contiguous() and torch.equal(perm, x4)
    _check(*lc.label(perm, 0.1, 18), *exp)
    big = torch.zeros(3, 12, 7, 16)
    big[:, ::2, :, ::2] = x4
    sl = big[:, ::2, :, ::2]
    assert not sl.is_contiguous()
    _check(*lc.label(sl, 0.1, 18), *exp)
    # 2D transposed
    x2, fg2 = random_probs(rng, (2, 9, 11), 0.5)
    t = x2.transpose(1, 2).contiguous().transpose(1, 2)
    _check(*lc.label(t, 0.1, 8), *scipy_label_batch(fg2, 8))


def test_label_empty_batch():
    labels, num = lc.label(torch.zeros(0, 4, 5, 6), 0.1, 26)
    assert labels.shape == (0, 4, 5, 6) and num.shape == (0,)
    assert num.dtype == torch.int64
    labels, num = lc.label(torch.zeros(0, 4, 5), 0.1, 4)
    assert labels.shape == (0, 4, 5) and num.shape == (0,)


def test_label_does_not_modify_input_and_no_grad():
    x, _ = random_probs(make_rng(1), (2, 4, 5, 6), 0.5, dtype=torch.float64)
    x.requires_grad_(True)
    before = x.detach().clone()
    labels, num = lc.label(x, 0.1, 26)
    assert torch.equal(x.detach(), before)
    assert not labels.requires_grad and not num.requires_grad


@requires_ops
def test_label_opcheck():
    rng = make_rng(2)
    samples = []
    for shape, conn in [((2, 4, 5, 6), 26), ((1, 3, 1, 7), 6), ((2, 7, 9), 8), ((3, 5, 4), 4)]:
        x, _ = random_probs(rng, shape, 0.4)
        samples.append((x, 0.1, conn, 0))
    x, _ = random_probs(rng, (2, 5, 5, 5), 0.5, dtype=torch.float64)
    samples.append((x, 0.1, 18, 3))
    samples.append(((x > 0.1), 0.5, 18, 0))
    for args in samples:
        torch.library.opcheck(torch.ops.lesioncount.label.default, args)


@requires_ops
@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
def test_label_cuda_matches_cpu(kernel_device, rank, conn, dtype):
    rng = make_rng(conn)
    shapes = ODD_SHAPES_3D + [(2, 33, 31, 29)] if rank == 3 else ODD_SHAPES_2D + [(2, 130, 67)]
    for density in (0.0, 0.2, 0.5, 0.8, 1.0):
        for shape in shapes:
            fg = rng.random(shape) < density
            x = binary_to_dtype(fg, dtype, rng=rng)
            for min_size in (0, 3):
                cpu = lc.label(x, 0.1, conn, min_size)
                with kernel_device.active():
                    gpu = lc.label(kernel_device.to(x), 0.1, conn, min_size)
                assert kernel_device.is_on(gpu[0]) and kernel_device.is_on(gpu[1])
                assert torch.equal(gpu[0].cpu(), cpu[0])
                assert torch.equal(gpu[1].cpu(), cpu[1])


@requires_ops
def test_label_cuda_opcheck(kernel_device):
    rng = make_rng(3)
    for shape, conn in [((2, 4, 5, 6), 26), ((2, 4, 5, 6), 18), ((2, 4, 5, 6), 6), ((2, 7, 9), 8), ((2, 7, 9), 4)]:
        x, _ = random_probs(rng, shape, 0.4)
        with kernel_device.active():
            torch.library.opcheck(torch.ops.lesioncount.label.default, (kernel_device.to(x), 0.1, conn, 0))


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_label_larger_volumes_match_scipy(rank, conn):
    """Volumes big enough for the parallel paths (several chunks / threads per item)."""
    rng = make_rng(1000 + conn)
    shapes = [(1, 41, 37, 33), (2, 23, 64, 29)] if rank == 3 else [(1, 301, 257), (3, 97, 131)]
    for shape in shapes:
        for density in (0.2, 0.31, 0.5, 0.7):  # around the percolation thresholds: huge tangled components
            fg = rng.random(shape) < density
            x = torch.from_numpy(fg)
            for min_size in (0, 5):
                labels, num = lc.label(x, 0.5, conn, min_size)
                _check(labels, num, *scipy_label_batch_fast(fg, conn, min_size))


def scipy_label_batch_fast(fg, conn, min_size):
    out, nums = [], []
    for b in range(fg.shape[0]):
        lab, n = ref.label(torch.from_numpy(fg[b : b + 1]), 0.5, conn, min_size)
        out.append(lab.numpy()[0])
        nums.append(int(n[0]))
    return np.stack(out).astype(np.int64), np.array(nums)


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_label_patterns(rank, conn):
    """Structured patterns that stress union-find merges: checkerboards, stripes, spirals, diagonals."""
    n = 12
    if rank == 3:
        d, h, w = np.indices((n, n + 1, n + 2))
        pats = [
            (d + h + w) % 2 == 0,
            (d % 2 == 0) & (h % 3 != 1),
            (w % 2 == 0) | (d == n // 2),
            (d == h) | (h == w),
            ((d + h) % 4 == 0) & (w % 2 == 1),
            np.ones((n, n + 1, n + 2), dtype=bool),
        ]
    else:
        h, w = np.indices((2 * n, 2 * n + 1))
        spiral = np.zeros((2 * n, 2 * n + 1), dtype=bool)
        spiral[::2, :] = True
        spiral[1::4, -1] = True
        spiral[3::4, 0] = True
        pats = [(h + w) % 2 == 0, (h == w) | (h == 2 * n - 1 - w), spiral, (h % 3 == 0) ^ (w % 5 == 0)]
    fg = np.stack(pats)
    labels, num = lc.label(torch.from_numpy(fg), 0.5, conn)
    _check(labels, num, *scipy_label_batch(fg, conn))
