"""CUDA `label`: bit-for-bit parity with the CPU kernel (and so with scipy.ndimage.label), opcheck,
no host synchronisation, CUDA-graph capture.

Every test taking `kernel_device` runs twice: on a real GPU (skipped without one) and on the
CUDA-on-CPU test runtime (tests/cuda_cpu), which executes the same csrc/cuda/label.cu kernels on the
CPU, so the CUDA labeler is tested on every CI run. Tests of GPU-only behaviour (streams, graphs,
sync debug mode, a second device) need a real GPU.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    ALL_CONNECTIVITIES,
    FLOAT_DTYPES,
    LABEL_DTYPES,
    ODD_SHAPES_2D,
    ODD_SHAPES_3D,
    SCIPY_STRUCT,
    binary_to_dtype,
    make_rng,
    random_probs,
    requires_cuda,
    requires_ops,
    scipy_label_batch,
)
from kernel_devices import CUDA, HAS_REAL_CUDA_KERNELS

pytestmark = [requires_ops]
requires_real_cuda = [
    pytest.mark.cuda,
    requires_cuda,
    pytest.mark.skipif(not HAS_REAL_CUDA_KERNELS, reason="lesioncount was built without the CUDA label kernel"),
]


def kernel_label(kd, x, threshold=0.1, conn=18, min_size=0):
    return kd.ops.label(kd.to(x), threshold, conn, min_size)


def assert_parity(kd, x, threshold, conn, min_size=0):
    exp = torch.ops.lesioncount.label(x, threshold, conn, min_size)
    got = kernel_label(kd, x, threshold, conn, min_size)
    assert kd.is_on(got[0]) and kd.is_on(got[1])
    assert got[0].dtype == exp[0].dtype and got[1].dtype == torch.int64
    torch.testing.assert_close(got[0].cpu(), exp[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1].cpu(), exp[1], rtol=0, atol=0)


def assert_scipy(kd, fg, conn, min_size=0):
    """Labels of the boolean batch `fg` on the kernel device equal scipy.ndimage.label's; returns num."""
    labels, num = kernel_label(kd, torch.from_numpy(fg), 0.5, conn, min_size)
    exp, exp_num = scipy_label_batch(fg, conn, min_size)
    np.testing.assert_array_equal(labels.cpu().numpy(), exp)
    np.testing.assert_array_equal(num.cpu().numpy(), exp_num)
    return num.cpu().numpy()


shapes_3d = st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12), st.integers(1, 12))
shapes_2d = st.tuples(st.integers(1, 3), st.integers(1, 33), st.integers(1, 33))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    shape=st.one_of(shapes_3d, shapes_2d, st.sampled_from(ODD_SHAPES_3D + ODD_SHAPES_2D)),
    density=st.floats(0.0, 1.0),
    conn_idx=st.integers(0, 2),
    min_size=st.sampled_from([0, 0, 1, 2, 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cuda_matches_cpu_random(kernel_device, shape, density, conn_idx, min_size, seed):
    conn = [6, 18, 26][conn_idx] if len(shape) == 4 else [4, 8, 8][conn_idx]
    x, fg = random_probs(make_rng(seed), shape, density)
    assert_parity(kernel_device, x, 0.1, conn, min_size)
    labels, num = kernel_label(kernel_device, x, 0.1, conn, min_size)
    exp, exp_num = scipy_label_batch(fg, conn, min_size)
    np.testing.assert_array_equal(labels.cpu().numpy(), exp)
    np.testing.assert_array_equal(num.cpu().numpy(), exp_num)


def _cube(pattern: int, rank: int = 3) -> np.ndarray:
    """Voxel bit i of `pattern` at flat index i of a 2x2x2 cube (2x2 square): the block's bit order."""
    return ((pattern >> np.arange(2**rank)) & 1).astype(bool).reshape((2,) * rank)


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_cuda_every_block_pattern(kernel_device, rank, conn):
    """Every foreground pattern of one 2x2x2 cube (2x2 square in 2D), one batch item each: the blocks
    (2x2x2 for 26 and 18, 1x2x2 for 8, single voxels for 6 and 4) split into the right union-find
    nodes, among them the four antipodal-corner pairs that are two components under 18."""
    fg = np.stack([_cube(m, rank) for m in range(2 ** 2**rank)])
    num = assert_scipy(kernel_device, fg, conn)
    two_voxel_splits = [m for m in range(len(fg)) if bin(m).count("1") == 2 and num[m] == 2]
    if conn == 18:
        assert two_voxel_splits == [0x18, 0x24, 0x42, 0x81]  # bits i and 7 - i
    elif conn in (26, 8):
        assert two_voxel_splits == []  # the cube (square) is a clique


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_cuda_every_voxel_pair_across_blocks(kernel_device, rank, conn):
    """Two foreground voxels, one in the central 2x2x2 cube of a 6x6x6 volume (2x2 of 6x6 in 2D), the
    other anywhere, one batch item per pair: every direction between neighbouring blocks and every
    voxel pair across it is labelled, one component exactly when the voxels are neighbours."""
    centre = list(itertools.product((2, 3), repeat=rank))
    anywhere = list(itertools.product(range(6), repeat=rank))
    fg = np.zeros((len(centre) * len(anywhere),) + (6,) * rank, dtype=bool)
    neighbours = []
    _, reach = SCIPY_STRUCT[conn]
    for k, (a, b) in enumerate(itertools.product(centre, anywhere)):
        fg[(k,) + a] = fg[(k,) + b] = True
        d = np.abs(np.subtract(a, b))
        neighbours.append(bool(d.max() <= 1 and d.sum() <= reach))  # a == b: one voxel, one component
    num = assert_scipy(kernel_device, fg, conn)
    np.testing.assert_array_equal(num == 1, neighbours)


def test_cuda_split_blocks_next_to_split_blocks(kernel_device):
    """18-connectivity's two-node blocks: every pair of antipodal patterns in two adjacent 2x2x2 blocks
    along each axis (unions between two-node blocks), and each antipodal pair joined through the
    blocks around it (its two nodes end in one component)."""
    pats = [0x81, 0x42, 0x24, 0x18]
    for axis in range(3):
        shape = [2, 2, 2]
        shape[axis] = 4
        second = [slice(0, 2)] * 3
        second[axis] = slice(2, 4)
        fg = np.zeros((len(pats) ** 2, *shape), dtype=bool)
        for k, (pa, pb) in enumerate(itertools.product(pats, repeat=2)):
            fg[k, :2, :2, :2] = _cube(pa)
            fg[(k, *second)] = _cube(pb)
        for conn in (6, 18, 26):
            assert_scipy(kernel_device, fg, conn)
    bridged = np.ones((4, 4, 4, 4), dtype=bool)  # foreground around the central 2x2x2 block
    for k, p in enumerate(pats):
        bridged[k, 1:3, 1:3, 1:3] = _cube(p)
    for conn in (6, 18, 26):
        num = assert_scipy(kernel_device, bridged, conn)
        if conn == 18:
            assert num.tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.5, 0.7, 1.0])
def test_cuda_odd_shapes(kernel_device, rank, conn, density):
    rng = make_rng(int(density * 100) + conn)
    for shape in ODD_SHAPES_3D if rank == 3 else ODD_SHAPES_2D:
        x, _ = random_probs(rng, shape, density)
        assert_parity(kernel_device, x, 0.1, conn)


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_cuda_all_dtypes(kernel_device, dtype, rank, conn):
    rng = make_rng(17)
    shape = (2, 9, 10, 11) if rank == 3 else (3, 37, 29)
    fg = rng.random(shape) < 0.45
    assert_parity(kernel_device, binary_to_dtype(fg, dtype, rng=rng), 0.1, conn)
    if dtype.is_floating_point:
        for t in (0.1, 1 / 3, 0.5, 0.0):  # not representable in the dtype: exact float64 semantics
            assert_parity(kernel_device, torch.from_numpy(rng.random(shape)).to(dtype), t, conn)


def test_cuda_threshold_compared_in_float64(kernel_device):
    """`value > threshold` is decided in float64, as on the CPU, for thresholds that are not
    representable in the input's dtype, infinite or beyond its range."""
    kd = kernel_device
    x = torch.tensor([[[0.1, 0.0]]], dtype=torch.float32)  # float32(0.1) > float64(0.1)
    assert kernel_label(kd, x, 0.1, 4)[1].tolist() == [1]
    assert kernel_label(kd, x, float(x[0, 0, 0].double()), 4)[1].tolist() == [0]
    xh = torch.tensor([[[0.1, 0.0]]], dtype=torch.float16)  # float16(0.1) < 0.1
    assert kernel_label(kd, xh, 0.1, 4)[1].tolist() == [0]
    y = torch.tensor([[[float("inf"), -float("inf"), 0.0, -0.0, 3.0e38, -3.0e38]]])
    for dtype in FLOAT_DTYPES:
        for t in (float("inf"), -float("inf"), 1e300, -1e300, -1e-50, 0.0):
            assert_parity(kd, y.to(dtype), t, 4)


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
@pytest.mark.parametrize("min_size", [2, 3, 7, 10**6])
def test_cuda_min_size(kernel_device, rank, conn, min_size):
    rng = make_rng(min_size)
    shape = (3, 17, 16, 18) if rank == 3 else (3, 45, 44)
    x, _ = random_probs(rng, shape, 0.3)
    assert_parity(kernel_device, x, 0.1, conn, min_size)


@pytest.mark.parametrize("conn", [6, 18, 26])
@pytest.mark.parametrize("min_size", [0, 10])
def test_cuda_realistic_and_noise(kernel_device, conn, min_size):
    from lesioncount import synthetic

    for x in (
        synthetic.realistic_probability_maps(3, (32, 80, 72), seed=3),
        synthetic.noise_volume(2, (33, 64, 65), density=0.5, seed=4),
        synthetic.noise_volume(1, (16, 64, 64), density=0.3, seed=5),
    ):
        assert_parity(kernel_device, x, 0.1, conn, min_size)


@pytest.mark.parametrize("conn", [4, 8])
def test_cuda_2d_large(kernel_device, conn):
    from lesioncount import synthetic

    x = synthetic.noise_volume(4, (517, 301), density=0.55, seed=6)
    assert_parity(kernel_device, x, 0.1, conn)
    assert_parity(kernel_device, x, 0.1, conn, 3)


def test_cuda_repeatable_and_deterministic(kernel_device):
    from lesioncount import synthetic

    x = kernel_device.to(synthetic.noise_volume(2, (40, 96, 96), density=0.5, seed=7))
    first = kernel_device.ops.label(x, 0.1, 6, 0)
    for _ in range(3):
        again = kernel_device.ops.label(x, 0.1, 6, 0)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_cuda_batch_items_independent(kernel_device, rank, conn):
    rng = make_rng(99)
    shape = (4, 5, 6, 7) if rank == 3 else (4, 9, 8)
    x, _ = random_probs(rng, shape, 0.6)
    flat = x.view(shape[0], -1)
    flat[:, 0] = 0.9  # first and last voxels of consecutive items are adjacent in memory
    flat[:, -1] = 0.9
    assert_parity(kernel_device, x, 0.1, conn)
    labels, num = kernel_label(kernel_device, torch.ones(shape), 0.1, conn)
    assert num.tolist() == [1] * shape[0] and bool((labels == 1).all())


def test_cuda_empty_and_noncontiguous(kernel_device):
    for shape in ((0, 4, 4, 4), (2, 0, 4, 4), (3, 0, 5)):
        conn = 6 if len(shape) == 4 else 4
        labels, num = kernel_label(kernel_device, torch.rand(shape), 0.1, conn)
        assert labels.shape == shape and num.tolist() == [0] * shape[0]
    x = torch.rand(2, 7, 8, 9).permute(0, 3, 2, 1)
    assert_parity(kernel_device, x, 0.5, 18)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cuda_nan_marks_item_without_sync(kernel_device, dtype):
    x = torch.rand(3, 6, 7, 8, dtype=torch.float64)
    x[1, 2, 3, 4] = float("nan")
    x = kernel_device.to(x.to(dtype))
    labels, num = kernel_device.ops.label(x, 0.5, 26, 0)
    assert int(num[1]) == -1 and bool((labels[1] == 0).all())
    ok = torch.ops.lesioncount.label(x[[0, 2]].cpu(), 0.5, 26, 0)
    assert torch.equal(labels[[0, 2]].cpu(), ok[0]) and torch.equal(num[[0, 2]].cpu(), ok[1])


@pytest.mark.cuda
@requires_cuda
@pytest.mark.skipif(not HAS_REAL_CUDA_KERNELS, reason="needs the CUDA build")
def test_cuda_other_device_and_stream():
    x = torch.rand(2, 9, 9, 9)
    exp = torch.ops.lesioncount.label(x, 0.5, 18, 0)
    s = torch.cuda.Stream()
    xc = x.cuda()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = torch.ops.lesioncount.label(xc, 0.5, 18, 0)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(got[0].cpu(), exp[0]) and torch.equal(got[1].cpu(), exp[1])
    if torch.cuda.device_count() > 1:
        got = torch.ops.lesioncount.label(x.to("cuda:1"), 0.5, 18, 0)
        assert got[0].device == torch.device("cuda:1")
        assert torch.equal(got[0].cpu(), exp[0])


@pytest.mark.cuda
@requires_cuda
@pytest.mark.skipif(not HAS_REAL_CUDA_KERNELS, reason="needs the CUDA build")
def test_cuda_no_host_sync():
    x = torch.rand(2, 16, 17, 18, device="cuda")
    torch.ops.lesioncount.label(x, 0.5, 26, 0)  # warm up (allocator, module load)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for conn, ms in ((6, 0), (18, 3), (26, 0)):
            torch.ops.lesioncount.label(x, 0.5, conn, ms)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.skipif(not HAS_REAL_CUDA_KERNELS, reason="needs the CUDA build")
def test_cuda_graph_capture():
    x = torch.rand(2, 16, 17, 18, device="cuda")
    static_out = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            torch.ops.lesioncount.label(x, 0.5, 18, 2)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = torch.ops.lesioncount.label(x, 0.5, 18, 2)
    for seed in range(3):
        torch.manual_seed(seed)
        x.copy_(torch.rand_like(x))
        g.replay()
        torch.cuda.synchronize()
        exp = torch.ops.lesioncount.label(x.cpu(), 0.5, 18, 2)
        assert torch.equal(static_out[0].cpu(), exp[0]) and torch.equal(static_out[1].cpu(), exp[1])


@pytest.mark.parametrize("conn,shape", [(26, (2, 5, 6, 7)), (6, (1, 4, 4, 4)), (8, (2, 9, 10))])
def test_cuda_opcheck(kernel_device, conn, shape):
    x = kernel_device.to(torch.rand(shape))
    with kernel_device.active():
        torch.library.opcheck(torch.ops.lesioncount.label.default, (x, 0.5, conn, 0))
        torch.library.opcheck(torch.ops.lesioncount.label.default, (x, 0.5, conn, 3))


def test_cuda_public_wrapper(kernel_device):
    import lesioncount as lc

    x = torch.rand(2, 1, 6, 7, 8)
    exp = lc.label(x, 0.5, 18)
    with kernel_device.active():
        got = lc.label(kernel_device.to(x), 0.5, 18)
    assert kernel_device.is_on(got[0])
    assert torch.equal(got[0].cpu(), exp[0]) and torch.equal(got[1].cpu(), exp[1])


@pytest.mark.slow
@pytest.mark.cuda
@requires_cuda
def test_cuda_large_item():
    """A big single item (~134 M voxels) stays exact (int32 labels; near-worst-case merge chains)."""
    from lesioncount import synthetic

    x = synthetic.noise_volume(1, (128, 1024, 1024), density=0.5, seed=8)
    assert_parity(CUDA, x, 0.1, 26)


@pytest.mark.slow
@pytest.mark.cuda
@requires_cuda
def test_cuda_wide_item():
    """An item of 2^31 voxels takes the int64 path (int64 labels and indices, >= 2^31 blocks at
    6-connectivity). Needs ~40 GB of device memory and ~20 GB of host memory."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("not enough device memory for a 2^31-voxel item")
    shape = (1, 1024, 1024, 2048)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.empty(shape, dtype=torch.uint8, device="cuda")
    for z in range(0, shape[1], 128):  # 128 slices at a time: no 8 GB float temporary
        x[:, z : z + 128] = torch.rand((1, 128) + shape[2:], device="cuda", generator=g) < 0.2
    x[0, -1, -1, -1] = 1  # a component whose first voxel has a flat index >= 2^31
    x[0, -1, -1, -2] = 0
    x[0, -1, -2, -1] = 0
    x[0, -2, -1, -1] = 0
    labels, num = torch.ops.lesioncount.label(x, 0.5, 6, 0)
    assert labels.dtype == torch.int64
    assert int(labels[0, -1, -1, -1]) == int(num[0])  # the last voxel is the last component
    exp_labels, exp_num = torch.ops.lesioncount.label(x.cpu(), 0.5, 6, 0)
    assert torch.equal(num.cpu(), exp_num)
    assert torch.equal(labels, exp_labels.cuda())


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_cuda_int64_label_path(cuda_on_cpu, emulation_settings, rank, conn):
    """The int64 path (items of >= 2^31 voxels on a GPU) forced on small inputs: int64 labels,
    indices and union-find, same numbering; with and without the min_size filter."""
    rng = make_rng(conn)
    shape = (2, 9, 14, 13) if rank == 3 else (3, 31, 29)
    x, _ = random_probs(rng, shape, 0.45)
    emulation_settings(large_item_paths=1)
    for min_size in (0, 3):
        exp = torch.ops.lesioncount.label(x, 0.1, conn, min_size)
        got = cuda_on_cpu.ops.label(x, 0.1, conn, min_size)
        assert got[0].dtype == torch.int64
        assert torch.equal(got[0], exp[0].to(torch.int64)) and torch.equal(got[1], exp[1])


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_cuda_label_under_other_schedules(cuda_on_cpu, emulation_settings, rank, conn):
    """The merge phase's concurrent unions under other block orders, host-thread counts and
    intra-block interleavings (every atomic yields with probability 1/2): the result never changes,
    with the size filter (sizes added atomically) or without (root bits set atomically)."""
    from lesioncount import synthetic

    shape = (12, 40, 36) if rank == 3 else (90, 96)
    x = synthetic.noise_volume(2, shape, density=0.5, seed=conn)
    before = cuda_on_cpu.stats()
    for min_size in (2, 0):
        exp = torch.ops.lesioncount.label(x, 0.1, conn, min_size)
        for workers, seed in ((1, 0), (3, 1), (4, 2), (2, 3)):
            emulation_settings(workers, seed, 0.5)
            got = cuda_on_cpu.ops.label(x, 0.1, conn, min_size)
            assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])
    after = cuda_on_cpu.stats()
    assert after["launches"] - before["launches"] >= 4 * (7 + 6)  # every phase ran as its own launch
    assert after["switches"] > before["switches"] + after["threads"] - before["threads"]  # threads interleaved


# --------------------------------------------------------------------------------------------
# Adversarial maps for the merge phase: long snakes and spirals (deep union-find chains whose root,
# the first voxel in raster order, is far along the path), checkerboards (every voxel its own
# component, or everything joined only through diagonals), 50% noise. The merge phase's finds halve
# the paths they walk while other threads link roots (block_union_find.h, uf_find_halving): the labels
# must stay exactly SciPy's, for every connectivity, block order and interleaving.
# --------------------------------------------------------------------------------------------


def _spiral(h: int, w: int) -> np.ndarray:
    """A one-voxel-wide clockwise square spiral from (0, 0) inwards, its turns one voxel apart: one
    path of about h * w / 2 voxels (one component under every connectivity)."""
    a = np.zeros((h, w), dtype=bool)
    y = x = 0
    dy, dx = 0, 1
    a[0, 0] = True

    def inside(yy, xx):
        return 0 <= yy < h and 0 <= xx < w

    while True:
        for _ in range(2):  # straight on while the voxel after the next one is free, else turn right
            ny, nx = y + dy, x + dx
            if inside(ny, nx) and not a[ny, nx] and not (inside(ny + dy, nx + dx) and a[ny + dy, nx + dx]):
                y, x = ny, nx
                a[y, x] = True
                break
            dy, dx = dx, -dy
        else:
            return a


def _serpentine(h: int, w: int) -> np.ndarray:
    """Rows 0, 2, 4, ... joined alternately at the right and the left end: one boustrophedon path."""
    a = np.zeros((h, w), dtype=bool)
    a[::2] = True
    for k, y in enumerate(range(1, h, 2)):
        a[y, w - 1 if k % 2 == 0 else 0] = True
    return a


def _snake_3d(d: int, h: int, w: int) -> np.ndarray:
    """A serpentine in every even slice, alternately reversed, consecutive ones joined through one
    voxel of the odd slice between them where one ends and the next starts: one path through the
    volume."""
    a = np.zeros((d, h, w), dtype=bool)
    s = _serpentine(h, w)
    last_row = (h - 1) // 2 * 2
    end = (last_row, w - 1 if (last_row // 2) % 2 == 0 else 0)  # where the serpentine from (0, 0) ends
    for z in range(0, d, 2):
        forward = (z // 2) % 2 == 0
        a[z] = s if forward else s[::-1, ::-1]
        if z + 2 < d:
            a[(z + 1,) + (end if forward else (0, 0))] = True
    return a


def _flips(a: np.ndarray) -> np.ndarray:
    """The map and its mirror images along every axis: the root (first voxel in raster order) at
    either end of the path, and unions arriving in the opposite order."""
    out = [a]
    for axis in range(a.ndim):
        out.append(np.flip(a, axis))
    out.append(np.flip(a, tuple(range(a.ndim))))
    return np.ascontiguousarray(np.stack(out))


def _adversarial_maps(rank: int) -> dict:
    rng = make_rng(4321 + rank)
    if rank == 2:
        y, x = np.indices((46, 51))
        return {
            "spiral": _flips(_spiral(131, 127)),
            "spiral-wide": _flips(_spiral(23, 140)),
            "serpentine": _flips(_serpentine(97, 128)),
            "checkerboard": np.stack([(y + x) % 2 == 0, (y + x) % 2 == 1]),
            "diagonals": np.stack([(y + x) % 3 == 0, (y - x) % 3 == 0, (y + x) % 2 == (y // 3) % 2]),
            "block-checkerboard": np.stack([(y // 2 + x // 2) % 2 == 0, ((y + 1) // 2 + (x + 1) // 2) % 2 == 0]),
            "noise-50": rng.random((3, 160, 161)) < 0.5,
        }
    z, y, x = np.indices((10, 13, 12))
    tube = np.repeat(_spiral(29, 27)[None], 3, axis=0)  # a spiral extruded through 3 slices
    return {
        "snake": _flips(_snake_3d(15, 25, 26)),
        "spiral-tube": _flips(tube),
        "checkerboard": np.stack([(z + y + x) % 2 == 0, (z + y + x) % 2 == 1]),
        "diagonal-planes": np.stack([(z + y + x) % 3 == 0, (z - y + x) % 3 == 0, (y + x) % 2 == (z // 2) % 2]),
        "block-checkerboard": np.stack([
            (z // 2 + y // 2 + x // 2) % 2 == 0,
            ((z + 1) // 2 + (y + 1) // 2 + (x + 1) // 2) % 2 == 0,
        ]),
        "noise-50": rng.random((2, 32, 48, 49)) < 0.5,
    }


def test_adversarial_maps_are_what_they_claim():
    """The generators: one long path each (so the labeler sees deep chains), and the checkerboards
    split exactly as expected."""
    import scipy.ndimage as ndi

    for a in (_spiral(131, 127), _spiral(23, 140), _serpentine(97, 128)):
        assert ndi.label(a)[1] == 1 and a.sum() > a.size // 2 - max(a.shape)
    snake = _snake_3d(15, 25, 26)
    assert ndi.label(snake)[1] == 1 and snake.sum() > 8 * 13 * 26
    board = _adversarial_maps(3)["checkerboard"][0]
    assert ndi.label(board)[1] == board.sum()  # 6-connectivity: every voxel alone
    assert ndi.label(board, np.ones((3, 3, 3)))[1] == 1  # 18/26: one component through diagonals


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_cuda_adversarial_maps_match_scipy(kernel_device, rank, conn):
    """Deep chains, checkerboards and 50% noise: labels (int32) equal scipy.ndimage.label's and the
    CPU op's, with and without the size filter."""
    for name, fg in _adversarial_maps(rank).items():
        labels, _ = kernel_label(kernel_device, torch.from_numpy(fg), 0.5, conn)
        assert labels.dtype == torch.int32, name
        assert_scipy(kernel_device, fg, conn)
        x = torch.from_numpy(fg).to(torch.float32) * 0.75
        assert_parity(kernel_device, x, 0.5, conn)
        assert_parity(kernel_device, x, 0.5, conn, min_size=3)


@pytest.mark.parametrize("rank,conn", ALL_CONNECTIVITIES)
def test_cuda_adversarial_maps_under_other_schedules(cuda_on_cpu, emulation_settings, rank, conn):
    """The racy path-halving stores of the merge phase under other block orders, host-thread counts
    and intra-block interleavings (every atomic yields with probability 0, 1/2 or 1), and on the int64
    path: the labels never change."""
    maps = _adversarial_maps(rank)
    names = ("spiral", "noise-50") if rank == 2 else ("snake", "noise-50")
    expected = {n: scipy_label_batch(maps[n], conn) for n in names}
    for workers, seed, yield_p, large in ((1, 11, 0.0, 0), (4, 12, 0.5, 0), (3, 13, 1.0, 0), (8, 15, 0.1, 0),
                                           (2, 14, 0.5, 1)):
        emulation_settings(workers, seed, yield_p, large)
        for n in names:
            labels, num = cuda_on_cpu.ops.label(torch.from_numpy(maps[n]), 0.5, conn, 0)
            assert labels.dtype == (torch.int64 if large else torch.int32)
            np.testing.assert_array_equal(labels.numpy(), expected[n][0], err_msg=f"{n} {workers} {seed}")
            np.testing.assert_array_equal(num.numpy(), expected[n][1])


# --------------------------------------------------------------------------------------------
# check_probabilities on CUDA: the first pass clears a device flag on a value outside [0, 1] (or NaN),
# which at::_assert_async turns into an error (synchronous on the CUDA-on-CPU runtime; a device-side
# assertion on a GPU, see test_cuda_check_probabilities_device_assert).
# --------------------------------------------------------------------------------------------

RANGE_MESSAGE = r"label: `input` must hold probabilities in \[0, 1\]"


def _outside_unit_interval(dtype):
    """Values of `dtype` outside [0, 1], the closest ones included."""
    if dtype == torch.uint8:
        return [2, 255]
    above_one = {torch.float16: 1 + 2**-10, torch.bfloat16: 1 + 2**-7, torch.float32: 1 + 2**-23,
                 torch.float64: 1 + 2**-52}[dtype]
    tiny = torch.finfo(dtype).tiny
    return [above_one, -tiny, 1.5, -0.1, float("inf"), -float("inf"), float("nan")]


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (3, 9, 8)], ids=["3d", "2d"])
def test_cuda_check_probabilities(cuda_on_cpu, dtype, shape):
    """check_probabilities=True: any value outside [0, 1] (the nearest ones, +-inf) or NaN, in any
    batch item, raises with the CPU kernel's message; in-range values (0, -0.0, 1 included) do not,
    and the labels equal the CPU op's. check_probabilities=False never raises (NaN: num = -1)."""
    ops = cuda_on_cpu.ops
    conn = 26 if len(shape) == 4 else 8
    rng = make_rng(5)
    base = torch.from_numpy(rng.random(shape)).to(dtype) if dtype.is_floating_point else \
        torch.from_numpy(rng.random(shape) < 0.5).to(dtype)
    edge = base.clone().flatten(1)
    edge[0, :3] = torch.tensor([0.0, 1.0, -0.0 if dtype.is_floating_point else 1.0]).to(dtype)
    edge = edge.view(shape)
    for x in (base, edge):
        got = ops.label(x, 0.5, conn, 0, True)
        exp = torch.ops.lesioncount.label(x, 0.5, conn, 0, True)
        assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])
    if dtype == torch.bool:
        return  # always in [0, 1]
    for item in (0, shape[0] - 1):
        for bad in _outside_unit_interval(dtype):
            x = base.clone()
            x.view(shape[0], -1)[item, 7] = bad
            with pytest.raises(RuntimeError, match=RANGE_MESSAGE):
                ops.label(x, 0.5, conn, 0, True)
            with pytest.raises(RuntimeError, match=RANGE_MESSAGE):  # the CPU kernel: same words
                torch.ops.lesioncount.label(x, 0.5, conn, 0, True)
            labels, num = ops.label(x, 0.5, conn, 0, False)
            if bad != bad:
                assert int(num[item]) == -1 and bool((labels[item] == 0).all())
            else:
                exp = torch.ops.lesioncount.label(x, 0.5, conn, 0, False)
                assert torch.equal(labels, exp[0]) and torch.equal(num, exp[1])


def test_cuda_check_probabilities_min_size_and_int64_path(cuda_on_cpu, emulation_settings):
    """The check does not depend on the size filter or on the index width."""
    x = torch.rand(2, 6, 7, 8)
    x[1, 5, 6, 7] = 1.0 + 2**-23
    for large in (0, 1):
        emulation_settings(large_item_paths=large)
        for min_size in (0, 4):
            with pytest.raises(RuntimeError, match=RANGE_MESSAGE):
                cuda_on_cpu.ops.label(x, 0.1, 18, min_size, True)
            cuda_on_cpu.ops.label(x.clamp(0, 1), 0.1, 18, min_size, True)


@pytest.mark.parametrize("max_lesions", [None, 4])
def test_cuda_count_distribution_checks_in_labeler(kernel_device, max_lesions):
    """count_distribution on the CUDA kernels: probabilities outside [0, 1] and NaN raise (the labeler's
    check, no separate pass), with the CPU path's words; logits may lie anywhere, NaN logits raise
    where the result is read on the host (max_lesions=None)."""
    import lesioncount as lc

    kd = kernel_device
    if not kd.emulated:
        pytest.skip("on a GPU the assertion poisons the context: test_cuda_check_probabilities_device_assert")
    x = torch.rand(2, 6, 7, 8)
    for bad in (1.5, -0.25, float("nan")):
        y = x.clone()
        y[1, 2, 3, 4] = bad
        with pytest.raises((ValueError, RuntimeError), match=r"`input`.*(\[0, 1\]|NaN)"):
            with kd.active():
                lc.count_distribution(kd.to(y), max_count=3, max_lesions=max_lesions)
    z = (x - 0.5) * 20  # logits, far outside [0, 1]
    exp = lc.count_distribution(z, max_count=3, max_lesions=max_lesions, from_logits=True)
    with kd.active():
        got = lc.count_distribution(kd.to(z), max_count=3, max_lesions=max_lesions, from_logits=True)
    assert torch.equal(got.labels.cpu(), exp.labels)
    torch.testing.assert_close(got.pmf.cpu(), exp.pmf, rtol=1e-6, atol=1e-7)
    if max_lesions is None:
        z[0, 1, 1, 1] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            with kd.active():
                lc.count_distribution(kd.to(z), max_count=3, from_logits=True)


_RANGE_SCRIPT = """
import sys, torch, lesioncount
x = torch.rand(2, 8, 9, 10, device="cuda")
x[1, 3, 4, 5] = float(sys.argv[1])
if sys.argv[2] == "op":
    torch.ops.lesioncount.label(x, 0.5, 18, 0, True)
else:
    lesioncount.count_distribution(x, max_count=3, max_lesions=4)
try:
    torch.cuda.synchronize()
except RuntimeError as exc:  # the asynchronous device assertion surfaces here
    print("DEVICE-ERROR", exc)
    sys.exit(3)
print("NO-ERROR")
"""


@pytest.mark.parametrize("bad,where", [("1.5", "op"), ("-0.5", "count"), ("nan", "count"), ("0.5", "op")])
def test_cuda_check_probabilities_device_assert(bad, where):
    """On a GPU: the labeler's flag becomes a device-side assertion (in a subprocess: it poisons the
    CUDA context); an in-range value runs clean."""
    import os
    import subprocess
    import sys

    if not (torch.cuda.is_available() and HAS_REAL_CUDA_KERNELS):
        pytest.skip("needs a CUDA device and the CUDA build")
    out = subprocess.run([sys.executable, "-c", _RANGE_SCRIPT, bad, where], capture_output=True, text=True,
                         env=dict(os.environ), timeout=300)
    if bad == "0.5":
        assert out.returncode == 0 and "NO-ERROR" in out.stdout, out.stdout + out.stderr
    else:
        assert out.returncode != 0 and "NO-ERROR" not in out.stdout, out.stdout + out.stderr
