"""The CUDA labeler's algorithm (block union-find, csrc/common/block_union_find.h), tested on the CPU.

``torch.ops.lesioncount._label_block_emulation`` runs the same per-block phase functions as the
CUDA kernels (csrc/cuda/label.cu), each kernel as a sequential loop over its grid (optionally in a
shuffled block order); ``_label_block_tables`` exports the block geometry. These tests check the
algorithm against scipy.ndimage.label exactly and the index arithmetic against an independent
derivation. They say nothing about races or the device code itself: see tests/test_cuda_label.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import (
    ALL_CONNECTIVITIES,
    LABEL_DTYPES,
    ODD_SHAPES_2D,
    ODD_SHAPES_3D,
    SCIPY_STRUCT,
    binary_to_dtype,
    make_rng,
    random_probs,
    requires_ops,
    scipy_label_batch,
)

pytestmark = requires_ops


def _has_emulation() -> bool:
    try:
        return hasattr(torch.ops.lesioncount, "_label_block_emulation")
    except Exception:  # noqa: BLE001
        return False


if not _has_emulation():  # pragma: no cover
    pytest.skip("library built without the block-union-find emulation", allow_module_level=True)


def emulate(x, threshold=0.1, conn=18, min_size=0, seed=0, wide=False, threads=1):
    return torch.ops.lesioncount._label_block_emulation(x, threshold, conn, min_size, seed, wide, threads)


def _check(labels, num, exp, exp_num, wide=False):
    assert labels.dtype == (torch.int64 if wide else torch.int32)
    assert num.dtype == torch.int64
    np.testing.assert_array_equal(labels.numpy().reshape(exp.shape), exp)
    np.testing.assert_array_equal(num.numpy(), exp_num)


# ------------------------------------------------------------------------------------------------
# index arithmetic: block geometry, neighbour masks, node split patterns
# ------------------------------------------------------------------------------------------------

BLOCK_DIMS = {26: (2, 2, 2), 18: (2, 2, 2), 8: (1, 2, 2), 6: (1, 1, 1), 4: (1, 1, 1)}


def py_is_neighbour(conn, dz, dy, dx):
    """Independent definition of the neighbourhoods (the SciPy structures)."""
    if max(abs(dz), abs(dy), abs(dx)) > 1 or (dz, dy, dx) == (0, 0, 0):
        return False
    rank, r = SCIPY_STRUCT[conn]
    if rank == 2 and dz != 0:
        return False
    return abs(dz) + abs(dy) + abs(dx) <= r


def local(conn, i):
    bz, by, bx = BLOCK_DIMS[conn]
    return i // (by * bx), (i // bx) % by, i % bx


def tables(conn):
    t = torch.ops.lesioncount._label_block_tables(conn).numpy()
    return t[:27], t[27:40], t[40:]


@pytest.mark.parametrize("conn", [4, 8, 6, 18, 26])
def test_is_neighbour_offset_table(conn):
    offsets, _, _ = tables(conn)
    for o, (dz, dy, dx) in enumerate(itertools.product((-1, 0, 1), repeat=3)):
        assert bool(offsets[o, 0]) == py_is_neighbour(conn, dz, dy, dx), (conn, dz, dy, dx)
        assert tuple(offsets[o, 1:4]) == BLOCK_DIMS[conn]
    # neighbour counts, as the connectivity's name says
    assert int(offsets[:, 0].sum()) == conn


@pytest.mark.parametrize("conn", [4, 8, 6, 18, 26])
def test_adjacency_masks_between_blocks(conn):
    """Bit j of adjacency_mask(d, i): voxel j of the block in direction d touches voxel i of this
    block, derived here from absolute voxel coordinates of two blocks in a grid."""
    _, adj, _ = tables(conn)
    bz, by, bx = BLOCK_DIMS[conn]
    n = bz * by * bx
    for d, (dz, dy, dx) in enumerate(itertools.product((-1, 0, 1), repeat=3)):
        if d >= 13:
            break
        for i in range(8):
            if i >= n:
                assert adj[d, i] == -1
                continue
            zi, yi, xi = local(conn, i)
            expected = 0
            for j in range(n):
                zj, yj, xj = local(conn, j)
                # block A at block coords (1,1,1), block B at (1+dz, 1+dy, 1+dx)
                a = (bz + zi, by + yi, bx + xi)
                b = (bz * (1 + dz) + zj, by * (1 + dy) + yj, bx * (1 + dx) + xj)
                if py_is_neighbour(conn, b[0] - a[0], b[1] - a[1], b[2] - a[2]):
                    expected |= 1 << j
            assert adj[d, i] == expected, (conn, d, i)


@pytest.mark.parametrize(
    "conn,used",
    [
        (26, list(range(13))),
        (18, [1, 3, 4, 5, 7, 9, 10, 11, 12]),  # the 4 corner directions never connect under 18
        (8, [9, 10, 11, 12]),  # in-plane only
        (6, [4, 10, 12]),  # faces
        (4, [10, 12]),
    ],
)
def test_preceding_directions(conn, used):
    _, adj, patterns = tables(conn)
    got = [d for d in range(13) if patterns[d, 3]]
    assert got == used
    # a direction is used iff some voxel pair across it is adjacent
    assert [d for d in range(13) if (adj[d][adj[d] >= 0] > 0).any()] == used


def _components_in_block(conn, mask):
    """Connected components (voxel masks, ordered by first voxel) of one block pattern."""
    bz, by, bx = BLOCK_DIMS[conn]
    n = bz * by * bx
    voxels = [i for i in range(n) if mask >> i & 1]
    parent = {v: v for v in voxels}

    def find(v):
        while parent[v] != v:
            v = parent[v]
        return v

    for a, b in itertools.combinations(voxels, 2):
        za, ya, xa = local(conn, a)
        zb, yb, xb = local(conn, b)
        if py_is_neighbour(conn, zb - za, yb - ya, xb - xa):
            ra, rb = find(a), find(b)
            parent[max(ra, rb)] = min(ra, rb)
    comps = {}
    for v in voxels:
        comps.setdefault(find(v), 0)
        comps[find(v)] |= 1 << v
    return [comps[r] for r in sorted(comps)]


@pytest.mark.parametrize("conn", [4, 8, 6, 18, 26])
def test_block_patterns_split_into_connected_nodes(conn):
    """Every block pattern's nodes are exactly its connected components: one node per nonempty
    block, except the 4 antipodal-corner pairs under 18-connectivity."""
    _, _, patterns = tables(conn)
    n = int(np.prod(BLOCK_DIMS[conn]))
    split = []
    for m in range(1 << n):
        comps = _components_in_block(conn, m)
        count, n0, n1, _, is_split = patterns[m, :5]
        assert count == len(comps), (conn, m)
        assert [n0, n1][:count] == comps, (conn, m)
        if is_split:
            split.append(m)
        assert bool(is_split) == (len(comps) == 2)
    if conn == 18:
        assert split == [0x18, 0x24, 0x42, 0x81]
        for m in split:  # antipodal corners: bits i and 7 - i
            i, j = [b for b in range(8) if m >> b & 1]
            assert i + j == 7
    else:
        assert split == []


def test_antipodal_special_cases_end_to_end():
    """The 4 antipodal patterns in one 2x2x2 block, alone and bridged through a neighbour block."""
    for i in range(4):
        j = 7 - i
        fg = np.zeros((1, 2, 2, 2), dtype=bool)
        fg.reshape(-1)[[i, j]] = True
        for conn, comps in ((18, 2), (26, 1), (6, 2)):
            labels, num = emulate(torch.from_numpy(fg), 0.5, conn)
            _check(labels, num, *scipy_label_batch(fg, conn))
            assert int(num[0]) == comps
        # bridge: extend along x into the next block so the two corners become connected under 18
        big = np.zeros((1, 2, 2, 4), dtype=bool)
        big[0, :, :, :2] = fg[0]
        zi, yi, xi = i // 4, (i // 2) % 2, i % 2
        zj, yj, xj = j // 4, (j // 2) % 2, j % 2
        big[0, zi, yi, 2] = big[0, zj, yj, 2] = True
        big[0, zi, yj, 2] = True
        for conn in (6, 18, 26):
            for seed in (0, 3):
                _check(*emulate(torch.from_numpy(big), 0.5, conn, seed=seed), *scipy_label_batch(big, conn))


def test_eighteen_split_blocks_as_neighbours():
    """Split blocks next to split blocks: every antipodal pattern pair in two adjacent blocks, along
    each axis (exercises node-to-node unions where both sides have two nodes)."""
    pats = [0x81, 0x42, 0x24, 0x18]
    for axis in range(3):
        shape = [2, 2, 2]
        shape[axis] = 4
        for pa, pb in itertools.product(pats, repeat=2):
            fg = np.zeros(shape, dtype=bool)
            a = np.array([(pa >> k) & 1 for k in range(8)], dtype=bool).reshape(2, 2, 2)
            b = np.array([(pb >> k) & 1 for k in range(8)], dtype=bool).reshape(2, 2, 2)
            sl_a = [slice(0, 2)] * 3
            sl_b = [slice(0, 2)] * 3
            sl_b[axis] = slice(2, 4)
            fg[tuple(sl_a)] = a
            fg[tuple(sl_b)] = b
            fg = fg[None]
            for conn in (18, 26, 6):
                _check(*emulate(torch.from_numpy(fg), 0.5, conn), *scipy_label_batch(fg, conn))


# ------------------------------------------------------------------------------------------------
# the whole algorithm vs scipy.ndimage.label
# ------------------------------------------------------------------------------------------------

shapes_3d = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9))
shapes_2d = st.tuples(st.integers(1, 3), st.integers(1, 17), st.integers(1, 17))


@given(
    shape=st.one_of(shapes_3d, st.sampled_from(ODD_SHAPES_3D)),
    density=st.floats(0.0, 1.0),
    conn=st.sampled_from([6, 18, 26]),
    min_size=st.sampled_from([0, 0, 1, 2, 5]),
    seed=st.integers(0, 2**31 - 1),
    order=st.sampled_from([0, 0, 1, 12345]),
    wide=st.booleans(),
    threads=st.sampled_from([1, 1, 3]),
)
def test_emulation_3d_matches_scipy(shape, density, conn, min_size, seed, order, wide, threads):
    x, fg = random_probs(make_rng(seed), shape, density)
    labels, num = emulate(x, 0.1, conn, min_size, order, wide, threads)
    _check(labels, num, *scipy_label_batch(fg, conn, min_size), wide=wide)


@given(
    shape=st.one_of(shapes_2d, st.sampled_from(ODD_SHAPES_2D)),
    density=st.floats(0.0, 1.0),
    conn=st.sampled_from([4, 8]),
    min_size=st.sampled_from([0, 0, 1, 2, 5]),
    seed=st.integers(0, 2**31 - 1),
    order=st.sampled_from([0, 0, 7]),
    wide=st.booleans(),
)
def test_emulation_2d_matches_scipy(shape, density, conn, min_size, seed, order, wide):
    x, fg = random_probs(make_rng(seed), shape, density)
    labels, num = emulate(x, 0.1, conn, min_size, order, wide)
    _check(labels, num, *scipy_label_batch(fg, conn, min_size), wide=wide)


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_emulation_odd_shapes(rank, conn, density):
    rng = make_rng(int(density * 10) + conn)
    for shape in ODD_SHAPES_3D if rank == 3 else ODD_SHAPES_2D:
        x, fg = random_probs(rng, shape, density)
        _check(*emulate(x, 0.1, conn, 0, 5), *scipy_label_batch(fg, conn))


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_emulation_all_dtypes_equal_cpu_op(dtype, rank, conn):
    rng = make_rng(23)
    shape = (2, 6, 7, 5) if rank == 3 else (3, 13, 11)
    fg = rng.random(shape) < 0.45
    x = binary_to_dtype(fg, dtype, rng=rng)
    labels, num = emulate(x, 0.1, conn)
    _check(labels, num, *scipy_label_batch(fg, conn))
    cpu = torch.ops.lesioncount.label(x, 0.1, conn, 0)
    assert torch.equal(labels, cpu[0]) and torch.equal(num, cpu[1])
    if dtype.is_floating_point:
        for t in (0.1, 0.3, 1 / 3, 0.5):  # thresholds that are not representable in the dtype
            x2 = torch.from_numpy(rng.random(shape)).to(dtype)
            got = emulate(x2, t, conn)
            exp = torch.ops.lesioncount.label(x2, t, conn, 0)
            assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


def test_emulation_threshold_in_float64():
    x = torch.tensor([[[0.1, 0.0]]], dtype=torch.float32)  # float32(0.1) > float64(0.1)
    assert emulate(x, 0.1, 4)[1].tolist() == [1]
    assert emulate(x, float(x[0, 0, 0].double()), 4)[1].tolist() == [0]
    xh = torch.tensor([[[0.1, 0.0]]], dtype=torch.float16)  # float16(0.1) < 0.1
    assert emulate(xh, 0.1, 4)[1].tolist() == [0]
    for t in (float("inf"), -float("inf"), 1e300, -1e300, -1e-50, 0.0):
        y = torch.tensor([[[float("inf"), -float("inf"), 0.0, -0.0, 3.0e38, -3.0e38]]])
        exp = torch.ops.lesioncount.label(y, t, 4, 0)
        got = emulate(y, t, 4)
        assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1]), t


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
@pytest.mark.parametrize("min_size", [2, 3, 7, 10**6])
def test_emulation_min_size(rank, conn, min_size):
    rng = make_rng(min_size + conn)
    shape = (3, 7, 6, 8) if rank == 3 else (3, 15, 14)
    x, fg = random_probs(rng, shape, 0.3)
    for order in (0, 99):
        _check(*emulate(x, 0.1, conn, min_size, order), *scipy_label_batch(fg, conn, min_size))


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_emulation_batch_items_independent(rank, conn):
    rng = make_rng(99)
    shape = (4, 5, 6, 7) if rank == 3 else (4, 9, 8)
    x, fg = random_probs(rng, shape, 0.6)
    flat = x.view(shape[0], -1)
    flat[:, 0] = 0.9  # first and last voxels of consecutive items are adjacent in memory
    flat[:, -1] = 0.9
    fg = x.numpy() > 0.1
    _check(*emulate(x, 0.1, conn, 0, 3), *scipy_label_batch(fg, conn))
    labels, num = emulate(torch.ones(shape), 0.1, conn)
    assert num.tolist() == [1] * shape[0] and bool((labels == 1).all())


def test_emulation_nan_marks_item():
    """GPU semantics: an item with NaN gets num = -1 and zero labels; other items are unaffected."""
    x = torch.rand(3, 4, 5, 6, dtype=torch.float64)
    x[1, 2, 3, 4] = float("nan")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        labels, num = emulate(x.to(dtype), 0.5, 26)
        assert int(num[1]) == -1 and bool((labels[1] == 0).all())
        ok = torch.ops.lesioncount.label(x[[0, 2]].to(dtype), 0.5, 26, 0)
        assert torch.equal(labels[[0, 2]], ok[0]) and torch.equal(num[[0, 2]], ok[1])


@pytest.mark.parametrize("conn", [6, 18, 26])
def test_emulation_realistic_and_noise(conn):
    from lesioncount import synthetic

    vols = [
        synthetic.realistic_probability_maps(2, (20, 36, 35), seed=1),
        synthetic.noise_volume(1, (17, 32, 33), density=0.5, seed=2),
    ]
    for x in vols:
        for min_size in (0, 4):
            got = emulate(x, 0.1, conn, min_size, 11)
            exp = torch.ops.lesioncount.label(x, 0.1, conn, min_size)
            assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_emulation_concurrent_threads(rank, conn):
    """Every phase run by several std::threads at once with real atomics: the lock-free union
    races as on the GPU (on few cores the interleavings are limited; repeated to vary them)."""
    from lesioncount import synthetic

    if rank == 3:
        vols = [synthetic.noise_volume(2, (24, 40, 40), density=d, seed=9) for d in (0.3, 0.5)]
    else:
        vols = [synthetic.noise_volume(2, (160, 150), density=d, seed=9) for d in (0.45, 0.6)]
    for x in vols:
        for min_size in (0, 3):
            exp = torch.ops.lesioncount.label(x, 0.1, conn, min_size)
            for rep in range(3):
                got = emulate(x, 0.1, conn, min_size, seed=rep, threads=4)
                assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1]), (rep, min_size)
