"""CUDA _region_topk and _region_max_backward against the CPU kernels, bit for bit.

Tests taking `kernel_device` run on a real GPU (skipped without one) and on the CUDA-on-CPU test
runtime (tests/cuda_cpu), which executes csrc/cuda/region_max.cu on the CPU. Every test here fails
on a build without these two CUDA kernels (the emulated ops then have no kernel to run).
"""
from __future__ import annotations

import pytest
import torch

from conftest import FLOAT_DTYPES, HAS_OPS

pytestmark = pytest.mark.skipif(not HAS_OPS, reason="compiled lesioncount ops not available")

ops = torch.ops.lesioncount if HAS_OPS else None
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().contiguous().view(_BITS[t.element_size()])


def _assert_topk_equal(kd, x, lab, k):
    exp = ops._region_topk(x, lab, k)
    got = kd.ops._region_topk(kd.to(x), kd.to(lab), k)
    kd.sync()
    assert got[0].dtype == exp[0].dtype and got[0].shape == exp[0].shape == (x.shape[0], k)
    assert torch.equal(got[2].cpu(), exp[2]), (k, got[2], exp[2])
    assert torch.equal(got[1].cpu(), exp[1]), k
    assert torch.equal(_bits(got[0]), _bits(exp[0])), k  # bitwise, the sign of zero included
    return exp


def _tied_inputs(B, shape, R, gen, dtype, label_dtype):
    """Compact runs of labels 1..R (some absent) and quantised values: equal values inside a region,
    equal maxima across regions, negative values and both zeros."""
    lab = torch.randint(0, R + 1, (B,) + shape, generator=gen)
    runs = torch.randint(0, R + 1, (B, shape[0], 1) + shape[2:], generator=gen).expand_as(lab)
    lab = torch.where(torch.rand(lab.shape, generator=gen) < 0.7, runs, lab)
    if R >= 3:
        lab[lab == 2] = 0
    x = (torch.randint(-4, 9, (B,) + shape, generator=gen).to(torch.float64) / 4).to(dtype)
    zeros = x == 0
    x[zeros] = torch.where(torch.rand(int(zeros.sum()), generator=gen) < 0.5, 0.0, -0.0).to(dtype)
    return x, lab.to(label_dtype).contiguous()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_region_topk_parity_bitwise(kernel_device, dtype, label_dtype):
    gen = torch.Generator().manual_seed(11)
    for B, shape, R in [(3, (5, 17, 33), 40), (1, (1, 1, 1), 1), (2, (4, 5, 30), 3), (4, (9, 17), 120)]:
        x, lab = _tied_inputs(B, shape, R, gen, dtype, label_dtype)
        for k in sorted({0, 1, 2, R // 2, R - 1, R, R + 7}):
            _assert_topk_equal(kernel_device, x, lab, k)


def test_region_topk_batch_of_different_region_counts(kernel_device):
    """Items with 0, 1, a few and many regions in one batch; k below, at and above each count."""
    gen = torch.Generator().manual_seed(12)
    x = torch.rand(5, 6, 20, 20, generator=gen)
    lab = torch.zeros(5, 6, 20, 20, dtype=torch.int32)
    lab[1, 2, 3, 4] = 1
    lab[2, :, :5, :5] = torch.randint(0, 4, (6, 5, 5), generator=gen).to(torch.int32)
    lab[3] = torch.randint(0, 300, (6, 20, 20), generator=gen).to(torch.int32)
    lab[4] = (torch.arange(6 * 20 * 20).reshape(6, 20, 20) % 700 + 1).to(torch.int32)  # labels up to 700
    for k in (0, 1, 3, 5, 64, 299, 300, 301, 700, 1000):
        exp = _assert_topk_equal(kernel_device, x, lab, k)
        assert exp[2][0].eq(0).all() and exp[1][0].eq(-1).all()  # the empty item: all padding


def test_region_topk_ties_keep_the_smaller_labels(kernel_device):
    """Many regions share the same maximum: the smaller labels win, output in label order; inside a
    region several voxels reach the maximum: the smallest flat index is the argmax."""
    x = torch.full((2, 1000), 0.25)
    lab = (torch.arange(1000) // 10 + 1).to(torch.int64).expand(2, -1).contiguous()  # 100 regions
    x[:, ::10] = 0.5  # every region's maximum is 0.5, reached at its first voxel ...
    x[:, 5::10] = 0.5  # ... and again at its sixth
    x[1, 437] = 0.75  # item 1: region 44 is the best
    x[1, 905] = 0.75  # and region 91 ties with it
    for k in (1, 2, 3, 50, 99, 100, 101):
        exp = _assert_topk_equal(kernel_device, x, lab, k)
        kk = min(k, 100)
        assert exp[2][0, :kk].tolist() == list(range(1, kk + 1))
        assert exp[1][0, :kk].tolist() == [10 * r for r in range(kk)]
    exp = _assert_topk_equal(kernel_device, x, lab, 3)
    assert exp[2][1].tolist() == [1, 44, 91]


def test_region_topk_empty_shapes(kernel_device):
    kd = kernel_device
    for B, N, k in [(0, 5, 3), (3, 0, 4), (2, 6, 0), (0, 0, 0)]:
        x = torch.rand(B, N)
        lab = torch.ones(B, N, dtype=torch.int32)
        v, a, i = kd.ops._region_topk(kd.to(x), kd.to(lab), k)
        ev, ea, ei = ops._region_topk(x, lab, k)
        assert v.shape == ev.shape == (B, k)
        assert torch.equal(v.cpu(), ev) and torch.equal(a.cpu(), ea) and torch.equal(i.cpu(), ei)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_region_topk_large_item_path(cuda_on_cpu, emulation_settings, dtype):
    """The two-pass scan (float64, or items above 2^32 voxels on a GPU) forced on small inputs: the
    selection then runs over 128-bit keys (value bits, then the label)."""
    emulation_settings(large_item_paths=1)
    gen = torch.Generator().manual_seed(13)
    for B, shape, R in [(3, (5, 17, 33), 40), (2, (4, 5, 30), 3)]:
        x, lab = _tied_inputs(B, shape, R, gen, dtype, torch.int32)
        for k in (1, 2, R // 2, R, R + 3):
            _assert_topk_equal(cuda_on_cpu, x, lab, k)


def test_region_topk_under_other_schedules(cuda_on_cpu, emulation_settings):
    """Other block orders, host-thread counts and interleavings of the atomics: same result."""
    gen = torch.Generator().manual_seed(14)
    x, lab = _tied_inputs(2, (8, 24, 24), 60, gen, torch.float32, torch.int32)
    for workers, seed in ((1, 0), (3, 1), (4, 2)):
        emulation_settings(workers, seed, 0.5)
        for k in (5, 30):
            _assert_topk_equal(cuda_on_cpu, x, lab, k)


def test_region_topk_bad_labels_and_nan_raise(cuda_on_cpu):
    """As the CPU op: a negative label or a NaN inside a region is an error (on a GPU a device-side
    assertion, no host sync; synchronous on the CPU runtime). NaN in the background is fine."""
    kd = cuda_on_cpu
    x = torch.rand(2, 4, 4, 4)
    labels = torch.zeros(2, 4, 4, 4, dtype=torch.int32)
    labels[1, 1, 1, 1] = -2
    with pytest.raises(RuntimeError, match="_region_topk: `labels` must lie"):
        kd.ops._region_topk(x, labels, 2)
    with pytest.raises(RuntimeError, match="_region_topk: `labels` must lie"):
        kd.ops._region_topk(x, labels, 0)  # the CPU op checks with k = 0 too
    labels[1, 1, 1, 1] = 1
    x[1, 1, 1, 1] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        kd.ops._region_topk(x, labels, 2)
    x[1, 1, 1, 1] = 0.5
    x[1, 2, 2, 2] = float("nan")
    _assert_topk_equal(kd, x, labels, 2)  # NaN in the background
    # a label above the item's voxel count (the CPU accepts it; the CUDA workspace has one key per
    # voxel, so the CUDA op rejects it through the same flag)
    labels[1, 1, 1, 1] = 65
    with pytest.raises(RuntimeError, match="_region_topk: `labels` must lie"):
        kd.ops._region_topk(x, labels, 2)
    labels[1, 1, 1, 1] = 64
    _assert_topk_equal(kd, x, labels, 2)


# --------------------------------------------------------------------------------------------
# _region_max_backward
# --------------------------------------------------------------------------------------------


def _assert_backward_equal(kd, g, argmax, shape):
    exp = ops._region_max_backward(g, argmax, shape)
    got = kd.ops._region_max_backward(kd.to(g), kd.to(argmax), shape)
    kd.sync()
    assert got.shape == exp.shape and got.dtype == exp.dtype
    assert torch.equal(_bits(got), _bits(exp))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_region_max_backward_parity_bitwise(kernel_device, dtype):
    gen = torch.Generator().manual_seed(15)
    for B, shape, R in [(3, (5, 17, 33), 40), (1, (1, 1, 1), 1), (4, (9, 17), 120)]:
        x, lab = _tied_inputs(B, shape, R, gen, dtype, torch.int32)
        _, argmax = ops.region_max(x, lab, R)  # absent regions: -1
        g = torch.randn(B, R, generator=gen, dtype=torch.float64).to(dtype)
        g[:, ::7] = -0.0  # 0 + (-0.0) = +0.0, as the CPU kernel adds
        _assert_backward_equal(kernel_device, g, argmax, [B, *shape])
        _, topk_argmax, _ = ops._region_topk(x, lab, 5)
        g5 = torch.randn(B, 5, generator=gen, dtype=torch.float64).to(dtype)
        _assert_backward_equal(kernel_device, g5, topk_argmax, [B, *shape])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_region_max_backward_shared_voxels_sum_in_region_order(kernel_device, dtype):
    """Hand-made argmax naming one voxel for several regions: the CPU kernel adds the gradients in
    region order (rounding after each addition in float16/bfloat16); the CUDA kernel does the same."""
    gen = torch.Generator().manual_seed(16)
    B, N, R = 3, 50, 64
    argmax = torch.randint(-1, 6, (B, R), generator=gen)  # voxels 0..5 shared by ~10 regions each
    argmax[1, :] = torch.randint(-1, N, (R,), generator=gen)
    g = (torch.randn(B, R, generator=gen, dtype=torch.float64) * torch.logspace(-6, 6, R, dtype=torch.float64)).to(dtype)
    _assert_backward_equal(kernel_device, g, argmax, [B, N])
    _assert_backward_equal(kernel_device, g, argmax, [B, 5, 10])


def test_region_max_backward_empty_shapes(kernel_device):
    kd = kernel_device
    for B, R, shape in [(0, 3, [0, 4]), (2, 0, [2, 5]), (2, 3, [2, 0]), (2, 3, [2, 3, 0])]:
        g = torch.rand(B, R)
        argmax = torch.full((B, R), -1, dtype=torch.int64)
        got = kd.ops._region_max_backward(kd.to(g), kd.to(argmax), shape)
        exp = ops._region_max_backward(g, argmax, shape)
        assert got.shape == exp.shape and torch.equal(got.cpu(), exp)


def test_region_max_backward_bad_argmax_raises(cuda_on_cpu):
    kd = cuda_on_cpu
    g = torch.rand(2, 3)
    argmax = torch.tensor([[0, 4, -1], [7, 8, 2]])
    with pytest.raises(RuntimeError, match="_region_max_backward"):
        ops._region_max_backward(g, argmax, [2, 8])
    with pytest.raises(RuntimeError, match="_region_max_backward: `argmax` must lie"):
        kd.ops._region_max_backward(g, argmax, [2, 8])
    with pytest.raises(RuntimeError, match="_region_max_backward: `argmax` must lie"):
        kd.ops._region_max_backward(g, torch.zeros(2, 3, dtype=torch.int64), [2, 0])
    with pytest.raises(RuntimeError, match="must be int64"):
        kd.ops._region_max_backward(g, argmax.int(), [2, 9])
    _assert_backward_equal(kd, g, argmax, [2, 9])


# --------------------------------------------------------------------------------------------
# through the public API: count_distribution(max_lesions), gradients, opcheck
# --------------------------------------------------------------------------------------------


def _op_calls(fn):
    """Runs fn() under the profiler; returns its result and the names of the ops it called."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


def test_count_distribution_static_path_runs_the_cuda_topk(kernel_device):
    """count_distribution(max_lesions=k) on the kernel device: the CUDA _region_topk and
    _region_max_backward run (no region_max over a bound, no sort) and every output and the
    gradient equal the CPU path's."""
    import lesioncount
    from lesioncount import synthetic

    kd = kernel_device
    probs, _, counts = synthetic.realistic_probability_maps(3, (12, 40, 40), seed=5, return_masks=True)
    target = counts.clamp(max=4).view(-1, 1)

    def run(t, k):
        t = t.clone().requires_grad_(True)
        r = lesioncount.count_distribution(t, max_count=4, max_lesions=k)
        (g,) = torch.autograd.grad(-r.log_pmf.gather(1, target.to(r.pmf.device)).sum(), t)
        return r, g

    for k in (1, 3, 64):
        r_cpu, g_cpu = run(probs, k)
        with kd.active():
            (r_dev, g_dev), names = _op_calls(lambda: run(kd.to(probs), k))
        if kd.emulated:
            assert "lesioncount_cuda_cpu::_region_topk" in names
            assert "lesioncount_cuda_cpu::_region_max_backward" in names
            assert "lesioncount_cuda_cpu::region_max" not in names and "aten::sort" not in names
        for field in ("lesion_ids", "argmax", "truncated", "num_lesions"):
            assert torch.equal(getattr(r_dev, field).cpu(), getattr(r_cpu, field)), field
        assert torch.equal(r_dev.lesion_probs.cpu(), r_cpu.lesion_probs)
        torch.testing.assert_close(r_dev.pmf.cpu(), r_cpu.pmf, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_dev.cpu(), g_cpu, rtol=1e-5, atol=1e-7)


def test_gradcheck_and_opcheck_through_the_cuda_kernels(kernel_device):
    kd = kernel_device
    gen = torch.Generator().manual_seed(17)
    x = kd.to(torch.rand(2, 5, 6, 7, generator=gen, dtype=torch.float64))
    lab = kd.to(torch.randint(0, 6, (2, 5, 6, 7), generator=gen).to(torch.int32))
    with kd.active():
        torch.autograd.gradcheck(lambda t: ops._region_topk(t, lab, 3)[0], (x.clone().requires_grad_(True),))
        torch.autograd.gradgradcheck(lambda t: ops.region_max(t, lab, 5)[0], (x.clone().requires_grad_(True),))
        torch.library.opcheck(ops._region_topk, (x.clone().requires_grad_(True), lab, 4))
        _, argmax = ops.region_max(x, lab, 5)
        g = kd.to(torch.rand(2, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
        torch.library.opcheck(ops._region_max_backward, (g, argmax, [2, 5, 6, 7]))
