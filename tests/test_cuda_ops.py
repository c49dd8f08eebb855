"""CUDA region_max and poisson_binomial: parity with the CPU kernels, gradients, opcheck, CUDA
graphs, torch.compile, device errors.

Tests taking `kernel_device` run twice: on a real GPU (skipped without one) and on the CUDA-on-CPU
test runtime (tests/cuda_cpu), which executes the same csrc/cuda/*.cu kernels on the CPU, so they run
on every CI machine. Tests of GPU-only behaviour (CUDA graphs, torch.compile on the GPU, mixed
devices, asynchronous device assertions) need a real GPU. The launch-plan test at the top compiles
the host/device launch helpers of csrc/cuda/*_launch.h with the host compiler and checks them.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import FLOAT_DTYPES, HAS_CUDA, HAS_OPS, ROOT
from kernel_devices import HAS_REAL_CUDA_KERNELS

# --------------------------------------------------------------------------------------------
# CPU-runnable: launch configuration helpers (plain C++, no CUDA needed)
# --------------------------------------------------------------------------------------------

_PLAN_TEST = r"""
#include <cassert>
#include <initializer_list>
#include <cstdio>
#include "cuda/poisson_binomial_launch.h"
#include "cuda/region_max_launch.h"
using namespace lesioncount::cuda;
#define CHECK(c) do { if (!(c)) { std::printf("FAILED line %d: %s\n", __LINE__, #c); return 1; } } while (0)
int main() {
  // exact integer ceil(sqrt(n))
  for (long long n = 1; n < 200000; ++n) {
    long long r = pb_ceil_sqrt(n);
    CHECK(r * r >= n && (r - 1) * (r - 1) < n);
  }
  CHECK(pb_ceil_sqrt(1LL << 62) == (1LL << 31));
  // split kernel for M + 1 <= 16, bins a power of two >= M + 1
  for (long long M = 0; M < 40; ++M) {
    for (long long K : {0LL, 1LL, 20LL, 31LL, 32LL, 33LL, 2000LL, 100000LL}) {
      for (long long B : {1LL, 7LL, 1024LL, 5000000LL}) {
        for (bool bwd : {false, true}) {
          PbPlan p = pb_plan(B, K, M, bwd);
          CHECK(p.split == (M + 1 <= kPbSplitMaxBins));
          CHECK(p.blocks >= 1 && p.blocks <= kPbMaxBlocks);
          CHECK(p.scratch_doubles * 8 <= kPbScratchBudgetBytes || p.blocks == 1 ||
                (p.split && p.blocks * kPbSplitWarpsPerBlock * p.scratch_per_unit * 8 <= kPbScratchBudgetBytes + 4 * p.scratch_per_unit * 8));
          if (p.split) {
            CHECK(p.bins >= M + 1 && p.bins >= 2 && p.bins <= 16 && (p.bins & (p.bins - 1)) == 0);
            CHECK(p.chunk * 32 >= K && (p.chunk - 1) * 32 < K + 32);
            CHECK(p.seg_len * p.num_ckpt >= p.chunk);
            CHECK(p.threads == 32 * kPbSplitWarpsPerBlock);
            if (bwd) CHECK(p.scratch_doubles == p.scratch_per_unit * p.blocks * kPbSplitWarpsPerBlock);
            else CHECK(p.scratch_doubles == 0);
            // enough warps for every item unless the scratch budget binds
            if (!bwd && B <= kPbMaxBlocks * kPbSplitWarpsPerBlock) CHECK(p.blocks * kPbSplitWarpsPerBlock >= B);
          } else {
            CHECK(p.seg_len * p.num_ckpt >= K);
            CHECK(p.scratch_doubles == p.scratch_per_unit * p.blocks);
            CHECK(p.scratch_per_unit >= 3 * K);
            if (bwd) CHECK(p.scratch_per_unit >= 3 * K + (p.num_ckpt + p.seg_len) * (M + 1));
            CHECK(p.smem_bytes <= kPbSmemStateLimitBytes);
            CHECK(p.blocks <= B || B < 1);
          }
        }
      }
    }
  }
  // huge M: one block, scratch beyond the budget only when a single item needs it
  PbPlan big = pb_plan(1024, 100000, 100000, true);
  CHECK(!big.split && big.blocks == 1 && !big.smem_state);
  // region_max: two passes for float64 or items above 2^32 voxels
  CHECK(!region_max_two_pass(DType::kFloat, 1LL << 32));
  CHECK(region_max_two_pass(DType::kFloat, (1LL << 32) + 1));
  CHECK(region_max_two_pass(DType::kDouble, 10));
  CHECK(!region_max_two_pass(DType::kHalf, 10) && !region_max_two_pass(DType::kBFloat16, 10));
  RegionMaxGrid g = region_max_grid(8, 64LL * 192 * 192);
  CHECK(g.blocks_y == 8 && g.blocks_x * kRegionMaxVoxelsPerBlock >= 64LL * 192 * 192);
  g = region_max_grid(100000, 10);
  CHECK(g.blocks_y == 65535 && g.blocks_x == 1);
  g = region_max_grid(1, 1LL << 40);
  CHECK(g.blocks_x == 65535);
  g = region_max_grid(0, 5);
  CHECK(g.blocks_x == 0);
  std::printf("ok\n");
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_launch_plan_host_compiled(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    src = tmp_path / "plan_test.cpp"
    src.write_text(_PLAN_TEST)
    exe = tmp_path / "plan_test"
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", str(ROOT / "csrc"), "-I", str(ROOT / "tests" / "cuda_cpu" / "include"), str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


# --------------------------------------------------------------------------------------------
# CUDA tests
# --------------------------------------------------------------------------------------------


requires_cuda_kernels = pytest.mark.skipif(
    not HAS_REAL_CUDA_KERNELS, reason="needs a CUDA device and the compiled CUDA kernels of lesioncount"
)
requires_ops = pytest.mark.skipif(not HAS_OPS, reason="compiled lesioncount ops not available")

ops = torch.ops.lesioncount if HAS_OPS else None


def _regions(B, shape, R, gen, dtype=torch.int32):
    """Labels with compact runs (like lesions) plus scattered voxels; some labels left absent."""
    lab = torch.randint(0, R + 1, (B,) + shape, generator=gen)
    runs = torch.randint(0, R + 1, (B, shape[0], 1) + shape[2:], generator=gen).expand_as(lab)
    lab = torch.where(torch.rand(lab.shape, generator=gen) < 0.7, runs, lab)
    if R >= 3:
        lab[lab == 2] = 0  # region 2 absent everywhere
    return lab.to(dtype).contiguous()


@requires_ops
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_region_max_parity_bitwise(kernel_device, dtype, label_dtype):
    gen = torch.Generator().manual_seed(1)
    for B, shape, R in [(3, (7, 33, 65), 40), (1, (1, 1, 1), 1), (2, (4, 5, 300), 3), (4, (17, 9), 200)]:
        lab = _regions(B, shape, R, gen, label_dtype)
        # quantised values: many ties inside a region, negative values and both zeros present
        x = (torch.randint(-4, 9, (B,) + shape, generator=gen).to(torch.float64) / 4).to(dtype)
        x[x == 0] = torch.where(torch.rand(int((x == 0).sum()), generator=gen) < 0.5, 0.0, -0.0).to(dtype)
        v_cpu, i_cpu = ops.region_max(x, lab, R)
        v_gpu, i_gpu = kernel_device.ops.region_max(kernel_device.to(x), kernel_device.to(lab), R)
        assert torch.equal(i_gpu.cpu(), i_cpu)
        # bitwise, including the sign of zero
        assert torch.equal(v_gpu.cpu().view(torch.int16 if dtype.itemsize == 2 else
                                             (torch.int32 if dtype.itemsize == 4 else torch.int64)),
                           v_cpu.view(torch.int16 if dtype.itemsize == 2 else
                                      (torch.int32 if dtype.itemsize == 4 else torch.int64)))


@requires_ops
def test_region_max_ties_absent_and_empty(kernel_device):
    kd = kernel_device
    x = kd.to(torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9, 0.3]]))
    lab = kd.to(torch.tensor([[1, 1, 1, 0, 3, 3]], dtype=torch.int32))
    v, i = kd.ops.region_max(x, lab, 4)
    assert i.tolist() == [[1, -1, 4, -1]]
    assert v.tolist() == [[pytest.approx(0.9), 0.0, pytest.approx(0.9), 0.0]]
    v0, i0 = kd.ops.region_max(x[:0], lab[:0], 3)  # empty batch
    assert v0.shape == (0, 3) and i0.shape == (0, 3)
    z = kd.to(torch.zeros(2, 5))
    v, i = kd.ops.region_max(z, torch.zeros_like(z, dtype=torch.int64), 0)  # no regions
    assert v.shape == (2, 0) and i.shape == (2, 0)
    v, i = kd.ops.region_max(z, torch.zeros_like(z, dtype=torch.int32), 3)  # all background
    assert i.tolist() == [[-1] * 3] * 2 and v.tolist() == [[0.0] * 3] * 2
    v, i = kd.ops.region_max(kd.to(torch.zeros(2, 0)), kd.to(torch.zeros(2, 0, dtype=torch.int32)), 2)  # empty items
    assert i.tolist() == [[-1] * 2] * 2
    # a big item: the warp pre-aggregation crosses tiles and blocks
    x = torch.rand(2, 64, 96, 96)
    lab = (torch.arange(64 * 96 * 96).reshape(64, 96, 96) // 1000 % 50).to(torch.int32).expand(2, -1, -1, -1).contiguous()
    v, i = kd.ops.region_max(kd.to(x), kd.to(lab), 50)
    vc, ic = ops.region_max(x, lab, 50)
    assert torch.equal(i.cpu(), ic) and torch.equal(v.cpu(), vc)


@requires_ops
def test_region_max_deterministic(kernel_device):
    gen = torch.Generator().manual_seed(3)
    kd = kernel_device
    lab = kd.to(_regions(2, (16, 64, 64), 30, gen))
    x = kd.to(torch.randint(0, 3, lab.shape, generator=gen).float() / 2)  # ties everywhere
    ref = ops.region_max(x.cpu(), lab.cpu(), 30)
    for _ in range(3):
        out = kd.ops.region_max(x, lab, 30)
        out = (out[0].cpu(), out[1].cpu())
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def _pb_inputs(B, K, gen, from_logits):
    if from_logits:
        z = torch.randn(B, K, generator=gen, dtype=torch.float64) * 4
        if K:
            z[:, 0] = 40.0  # saturated
            z[:, -1] = -math.inf  # padding
        return z
    p = torch.rand(B, K, generator=gen, dtype=torch.float64)
    p = torch.where(torch.rand(B, K, generator=gen) < 0.5, p * 0.1, p)
    if K >= 3:
        p[:, 0] = 1.0
        p[:, 1] = 0.0
        p[:, 2] = 0.999
    return p


PB_CASES = [(K, M) for K in (0, 1, 20, 2000) for M in sorted({0, 5, K})]


@requires_ops
@pytest.mark.parametrize("K,M", PB_CASES)
@pytest.mark.parametrize("mode", ["linear", "log", "logits", "logits-log"])
def test_poisson_binomial_parity(kernel_device, K, M, mode):
    log_space = "log" in mode
    from_logits = "logits" in mode
    gen = torch.Generator().manual_seed(K * 31 + M)
    _assert_pb_parity(kernel_device, _pb_inputs(5, K, gen, from_logits), M, log_space, from_logits, gen)


def _assert_pb_parity(kd, x, M, log_space, from_logits, gen, rtol=1e-12):
    """Forward (pmf to rtol, log-pmf relative) and backward (float64 tolerance) of the kernel
    device against the CPU kernel, with a random upstream gradient."""
    cpu = ops.poisson_binomial(x, M, log_space, from_logits)
    gpu = kd.ops.poisson_binomial(kd.to(x), M, log_space, from_logits).cpu()
    if log_space:
        torch.testing.assert_close(gpu.exp(), cpu.exp(), rtol=rtol, atol=1e-12)
        finite = torch.isfinite(cpu)
        assert torch.equal(finite, torch.isfinite(gpu))
        torch.testing.assert_close(gpu[finite], cpu[finite], rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(gpu, cpu, rtol=rtol, atol=1e-12)
    w = torch.randn(x.shape[0], M + 1, generator=gen, dtype=torch.float64)
    if log_space:
        w = torch.where(torch.isfinite(cpu), w, 0.0)
    g_cpu = ops._poisson_binomial_backward(w, x, M, log_space, from_logits)
    g_gpu = kd.ops._poisson_binomial_backward(kd.to(w), kd.to(x), M, log_space, from_logits).cpu()
    scale = g_cpu.abs().max().clamp_min(1.0) if g_cpu.numel() else 1.0
    torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-9, atol=1e-10 * float(scale))


@requires_ops
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_poisson_binomial_low_precision_parity(kernel_device, dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(6, 300, generator=gen).to(dtype)
    for M, log_space in [(4, True), (4, False), (40, True), (40, False)]:
        cpu = ops.poisson_binomial(x, M, log_space, False)
        gpu = kernel_device.ops.poisson_binomial(kernel_device.to(x), M, log_space, False).cpu()
        torch.testing.assert_close(gpu.float(), cpu.float(), rtol=2e-3 if dtype != torch.float32 else 1e-6, atol=1e-6)


@requires_ops
def test_poisson_binomial_large_k_small_m(kernel_device):
    gen = torch.Generator().manual_seed(11)
    x = (torch.rand(3, 100000, generator=gen, dtype=torch.float64) * 1e-4)
    for log_space in (False, True):
        cpu = ops.poisson_binomial(x, 5, log_space, False)
        gpu = kernel_device.ops.poisson_binomial(kernel_device.to(x), 5, log_space, False).cpu()
        if log_space:
            cpu, gpu = cpu.exp(), gpu.exp()
        torch.testing.assert_close(gpu, cpu, rtol=1e-11, atol=1e-12)


@requires_ops
@pytest.mark.parametrize("M", [3, 30])
@pytest.mark.parametrize("log_space,from_logits", [(False, False), (True, False), (False, True), (True, True)])
def test_gradcheck_cuda(kernel_device, M, log_space, from_logits):
    import lesioncount

    gen = torch.Generator().manual_seed(5)
    if from_logits:
        x = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    else:
        x = torch.rand(3, 40, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    kd = kernel_device
    x = kd.to(x).requires_grad_(True)
    values = kd.to(torch.rand(2, 6, 7, generator=gen, dtype=torch.float64)).requires_grad_(True)
    lab = kd.to(torch.randint(0, 4, (2, 6, 7), generator=gen).to(torch.int32))
    with kd.active():
        torch.autograd.gradcheck(lambda t: lesioncount.poisson_binomial(t, M, log=log_space, from_logits=from_logits), (x,))
        torch.autograd.gradcheck(lambda t: lesioncount.region_max(t, lab, 4)[0], (values,))


@requires_ops
def test_opcheck_cuda(kernel_device):
    gen = torch.Generator().manual_seed(9)
    kd = kernel_device
    x = kd.to(torch.rand(2, 5, 6, 7, generator=gen))
    lab = kd.to(torch.randint(0, 5, (2, 5, 6, 7), generator=gen).to(torch.int32))
    with kd.active():
        torch.library.opcheck(ops.region_max, (x.requires_grad_(True), lab, 5))
        for log_space, from_logits in [(False, False), (True, False), (True, True)]:
            p = kd.to(torch.rand(3, 25, generator=gen, dtype=torch.float64)).requires_grad_(True)
            torch.library.opcheck(ops.poisson_binomial, (p, 4, log_space, from_logits))
            torch.library.opcheck(ops.poisson_binomial, (p, 30, log_space, from_logits))
            g = kd.to(torch.rand(3, 5, dtype=torch.float64))
            torch.library.opcheck(ops._poisson_binomial_backward, (g, p.detach(), 4, log_space, from_logits),
                                  test_utils=("test_schema", "test_faketensor"))


def _realistic(B=2, shape=(16, 48, 48)):
    from lesioncount import synthetic

    probs, _, counts = synthetic.realistic_probability_maps(B, shape, seed=3, return_masks=True)
    return probs, counts


@requires_ops
def test_count_distribution_cuda_matches_cpu(kernel_device):
    import lesioncount

    probs, counts = _realistic()
    r_cpu = lesioncount.count_distribution(probs, max_count=4)
    with kernel_device.active():
        r_gpu = lesioncount.count_distribution(kernel_device.to(probs), max_count=4)
    assert torch.equal(r_gpu.labels.cpu(), r_cpu.labels)
    assert torch.equal(r_gpu.argmax.cpu(), r_cpu.argmax)
    torch.testing.assert_close(r_gpu.pmf.cpu(), r_cpu.pmf, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@requires_cuda_kernels
def test_count_distribution_cuda_graph_forward_backward():
    import lesioncount

    probs, counts = _realistic()
    x = probs.cuda().requires_grad_(True)
    target = counts.clamp(max=4).cuda()

    def step():
        r = lesioncount.count_distribution(x, max_count=4, max_lesions=32)
        loss = -r.log_pmf.gather(1, target.view(-1, 1)).sum()
        (g,) = torch.autograd.grad(loss, x)
        return r.pmf, loss, g

    pmf_e, loss_e, g_e = step()  # eager (also warms up the allocator / kernels)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pmf_g, loss_g, g_g = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(pmf_g, pmf_e, rtol=0, atol=0)
    torch.testing.assert_close(loss_g, loss_e, rtol=0, atol=0)
    torch.testing.assert_close(g_g, g_e, rtol=0, atol=0)
    # new data through the same graph
    with torch.no_grad():
        x.mul_(0.9)
    graph.replay()
    pmf_e2, loss_e2, g_e2 = step()
    torch.testing.assert_close(pmf_g, pmf_e2, rtol=0, atol=0)
    torch.testing.assert_close(g_g, g_e2, rtol=0, atol=0)


@pytest.mark.cuda
@requires_cuda_kernels
def test_torch_compile_fullgraph_cuda():
    import lesioncount

    probs, counts = _realistic()
    x = probs.cuda()
    target = counts.clamp(max=4).cuda()

    def loss_fn(t):
        r = lesioncount.count_distribution(t, max_count=4, max_lesions=32)
        return -r.log_pmf.gather(1, target.view(-1, 1)).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    xe = x.clone().requires_grad_(True)
    le = loss_fn(xe)
    le.backward()
    xc = x.clone().requires_grad_(True)
    lc = compiled(xc)
    lc.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-6, atol=1e-7)

    pb = torch.compile(lambda p: lesioncount.poisson_binomial(p, 6, log=True), fullgraph=True)
    p = torch.rand(4, 50, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(pb(p), lesioncount.poisson_binomial(p, 6, log=True), rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@requires_cuda_kernels
def test_mixed_devices_rejected():
    import lesioncount

    x = torch.rand(1, 4, 4, 4, device="cuda")
    lab = torch.ones(1, 4, 4, 4, dtype=torch.int32)
    with pytest.raises((ValueError, RuntimeError), match=r"`input`.*`labels`"):
        lesioncount.region_max(x, lab, 1)
    with pytest.raises(RuntimeError, match=r"`input`.*`labels`"):
        ops.region_max(x, lab, 1)
    with pytest.raises(RuntimeError, match=r"`grad`.*`probs`"):
        ops._poisson_binomial_backward(torch.ones(1, 3), torch.rand(1, 4, device="cuda"), 2, False, False)
    with pytest.raises((ValueError, RuntimeError), match=r"`input`.*`mask`"):
        lesioncount.count_distribution(x, mask=torch.ones(4, 4, 4, dtype=torch.bool))


_BAD_INPUT_SCRIPT = textwrap.dedent(
    """
    import sys, torch, lesioncount
    ops = torch.ops.lesioncount
    kind = sys.argv[1]
    if kind == "nan-label":
        x = torch.rand(2, 4, 5, 6, device="cuda"); x[1, 2, 3, 4] = float("nan")
        out = lesioncount.label(x, 0.5, 26)
    elif kind == "label":
        x = torch.rand(1, 8, device="cuda"); lab = torch.full((1, 8), 5, dtype=torch.int32, device="cuda")
        out = ops.region_max(x, lab, 2)
    elif kind == "nan":
        x = torch.rand(1, 8, device="cuda"); x[0, 3] = float("nan")
        out = ops.region_max(x, torch.ones(1, 8, dtype=torch.int32, device="cuda"), 1)
    else:
        p = torch.rand(2, 10, device="cuda", dtype=torch.float64); p[1, 4] = 1.5
        out = ops.poisson_binomial(p, 3, False, False)
    try:
        torch.cuda.synchronize()
    except RuntimeError as exc:  # the asynchronous device assertion surfaces here
        print("DEVICE-ERROR", exc)
        sys.exit(3)
    print("NO-ERROR")
    """
)


@pytest.mark.cuda
@requires_cuda_kernels
@pytest.mark.parametrize("kind", ["label", "nan", "probs", "nan-label"])
def test_bad_inputs_raise_asynchronously(kind):
    # a device-side assertion poisons the CUDA context: run it in a subprocess
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", _BAD_INPUT_SCRIPT, kind], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode != 0 and "NO-ERROR" not in out.stdout, out.stdout + out.stderr


# --------------------------------------------------------------------------------------------
# GPU-readiness: zero-size launches, grid limits, layouts, dtypes, the split and block kernels
# --------------------------------------------------------------------------------------------


@requires_ops
def test_bad_inputs_flag_without_sync(kernel_device):
    """The kernels skip bad voxels/candidates and clear the `ok` flag that at::_assert_async reads
    (synchronous on the CPU runtime; a device-side assertion on a GPU: see the subprocess test)."""
    kd = kernel_device
    if not kd.emulated:
        pytest.skip("on a GPU the assertion poisons the context: test_bad_inputs_raise_asynchronously")
    x = torch.rand(1, 8)
    with pytest.raises(RuntimeError, match=r"region_max: `labels` must lie in \[0, num_regions\]"):
        kd.ops.region_max(x, torch.full((1, 8), 5, dtype=torch.int32), 2)
    with pytest.raises(RuntimeError, match=r"region_max: `labels` must lie"):
        kd.ops.region_max(x, torch.full((1, 8), -1, dtype=torch.int64), 2)
    xn = x.clone()
    xn[0, 3] = float("nan")
    with pytest.raises(RuntimeError, match=r"`input` must not be NaN inside a region"):
        kd.ops.region_max(xn, torch.ones(1, 8, dtype=torch.int32), 1)
    kd.ops.region_max(xn, torch.zeros(1, 8, dtype=torch.int32), 1)  # NaN in the background is fine
    for M in (3, 40):  # split and block kernels
        p = torch.rand(2, 10, dtype=torch.float64)
        p[1, 4] = 1.5
        with pytest.raises(RuntimeError, match=r"poisson_binomial: `probs` must not be NaN"):
            kd.ops.poisson_binomial(p, M, False, False)
        with pytest.raises(RuntimeError, match=r"poisson_binomial: `probs` must not be NaN"):
            kd.ops._poisson_binomial_backward(torch.ones(2, M + 1, dtype=torch.float64), p, M, True, False)
        p[1, 4] = float("nan")
        with pytest.raises(RuntimeError, match=r"poisson_binomial: `probs` must not be NaN"):
            kd.ops.poisson_binomial(p, M, True, True)
        p[1, 4] = 7.0  # a logit may be anything finite
        kd.ops.poisson_binomial(p, M, False, True)


@requires_ops
def test_zero_size_launches(kernel_device):
    kd = kernel_device
    for M in (0, 3, 40):
        for log_space in (False, True):
            out = kd.ops.poisson_binomial(kd.to(torch.rand(0, 7, dtype=torch.float64)), M, log_space, False)
            assert out.shape == (0, M + 1)
            out = kd.ops.poisson_binomial(kd.to(torch.rand(3, 0, dtype=torch.float64)), M, log_space, False).cpu()
            exp = ops.poisson_binomial(torch.rand(3, 0, dtype=torch.float64), M, log_space, False)
            assert torch.equal(out, exp)
            g = kd.ops._poisson_binomial_backward(kd.to(torch.ones(3, M + 1, dtype=torch.float64)),
                                                  kd.to(torch.rand(3, 0, dtype=torch.float64)), M, log_space, False)
            assert g.shape == (3, 0)
            g = kd.ops._poisson_binomial_backward(kd.to(torch.ones(0, M + 1, dtype=torch.float64)),
                                                  kd.to(torch.rand(0, 5, dtype=torch.float64)), M, log_space, False)
            assert g.shape == (0, 5)
    # an item without foreground between items with foreground
    x = torch.rand(3, 6, 7, 8)
    x[1] = 0
    got = kd.ops.label(kd.to(x), 0.5, 26, 0)
    exp = ops.label(x, 0.5, 26, 0)
    assert int(got[1][1]) == 0 and torch.equal(got[0].cpu(), exp[0]) and torch.equal(got[1].cpu(), exp[1])


@requires_ops
def test_long_batch_beyond_grid_y(kernel_device):
    """More items than gridDim.y allows (65535): the kernels stride over the batch."""
    kd = kernel_device
    B = 65535 + 70
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(B, 2, 3, generator=gen)
    lab, num = kd.ops.label(kd.to(x), 0.5, 8, 0)
    exp_lab, exp_num = ops.label(x, 0.5, 8, 0)
    assert torch.equal(lab.cpu(), exp_lab) and torch.equal(num.cpu(), exp_num)
    R = int(exp_num.max())
    v, i = kd.ops.region_max(kd.to(x), kd.to(exp_lab), R)
    ev, ei = ops.region_max(x, exp_lab, R)
    assert torch.equal(i.cpu(), ei) and torch.equal(v.cpu(), ev)
    p = torch.rand(B, 3, generator=gen, dtype=torch.float64)
    for M in (2, 20):
        torch.testing.assert_close(kd.ops.poisson_binomial(kd.to(p), M, False, False).cpu(),
                                   ops.poisson_binomial(p, M, False, False), rtol=1e-12, atol=1e-12)


@requires_ops
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_contiguous_inputs(kernel_device, dtype):
    kd = kernel_device
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 9, 8, 7, generator=gen).to(dtype).permute(0, 3, 1, 2)  # (2, 7, 9, 8), strided
    lab = _regions(2, (8, 9, 7), 6, gen).permute(0, 3, 2, 1)
    assert not x.is_contiguous() and not lab.is_contiguous()
    v, i = kd.ops.region_max(kd.to(x), kd.to(lab), 6)
    ev, ei = ops.region_max(x, lab, 6)
    assert torch.equal(i.cpu(), ei) and torch.equal(v.cpu(), ev)
    p = torch.rand(30, 4, generator=gen, dtype=torch.float64).to(dtype).t()  # (4, 30), strided
    for M in (3, 30):
        torch.testing.assert_close(kd.ops.poisson_binomial(kd.to(p), M, True, False).cpu().double(),
                                   ops.poisson_binomial(p, M, True, False).double(), rtol=1e-3, atol=1e-6)


@requires_ops
@pytest.mark.parametrize("K", [1, 31, 33, 1000, 5000])
@pytest.mark.parametrize("M", [1, 7, 15, 16, 200])
def test_poisson_binomial_split_and_block_kernels(kernel_device, K, M):
    """M + 1 <= 16 takes the warp-split kernel (chunks of K/32 per lane), larger M the block kernel;
    K below, at and above a warp, up to thousands of candidates; forward, log and backward."""
    if M > K + 16 or (K == 5000 and M == 200 and kernel_device.emulated):
        pytest.skip("covered by neighbouring cases")
    gen = torch.Generator().manual_seed(K + 1000 * M)
    p = _pb_inputs(2, K, gen, False)
    for log_space in (False, True):
        _assert_pb_parity(kernel_device, p, M, log_space, False, gen, rtol=1e-11)


@requires_ops
@pytest.mark.parametrize("from_logits", [False, True])
def test_count_distribution_static_max_lesions_and_backward(kernel_device, from_logits):
    """The training path of a GPU user: static max_lesions (no host sync; the CUDA _region_topk),
    the count loss and its sparse gradient (the CUDA _region_max_backward)."""
    import lesioncount

    kd = kernel_device
    probs, counts = _realistic(B=3, shape=(12, 40, 40))
    x = torch.logit(probs.clamp(1e-6, 1 - 1e-6)) if from_logits else probs
    target = counts.clamp(max=4)

    def run(t, max_lesions):
        t = t.clone().requires_grad_(True)
        r = lesioncount.count_distribution(t, max_count=4, max_lesions=max_lesions, from_logits=from_logits)
        loss = -r.log_pmf.gather(1, target.to(device=r.pmf.device, dtype=torch.long).view(-1, 1)).sum()
        (g,) = torch.autograd.grad(loss, t)
        return r, g

    for max_lesions in (None, 2, 64):
        r_cpu, g_cpu = run(x, max_lesions)
        with kd.active():
            r_dev, g_dev = run(kd.to(x), max_lesions)
        assert torch.equal(r_dev.truncated.cpu(), r_cpu.truncated)
        assert torch.equal(r_dev.argmax.cpu(), r_cpu.argmax) and torch.equal(r_dev.lesion_ids.cpu(), r_cpu.lesion_ids)
        torch.testing.assert_close(r_dev.pmf.cpu(), r_cpu.pmf, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_dev.cpu(), g_cpu, rtol=1e-5, atol=1e-7)
        assert int((g_dev != 0).sum()) <= int((r_cpu.argmax >= 0).sum())  # sparse: one voxel per lesion
        if max_lesions == 2:  # the phantom has more candidates than that: flagged, not dropped silently
            assert bool(r_cpu.truncated.any())


@requires_ops
def test_static_max_lesions_ties_keep_the_smaller_labels(kernel_device):
    """Defect fixed (counting.py, CUDA path of count_distribution(max_lesions=k)): torch.topk chose
    among equal maxima arbitrarily, so the kept candidates (and the voxels receiving the gradient)
    differed from the CPU's _region_topk, which keeps the smaller labels. Now the CUDA _region_topk."""
    import lesioncount

    x = torch.zeros(2, 5, 30, 30)
    vals = [0.5] * 12
    vals[3], vals[8] = 0.9, 0.7
    for i, v in enumerate(vals):  # 12 separate one-voxel lesions, ten of them tied
        x[:, 2, 6 * (i // 6) + 1, 4 * (i % 6) + 1] = v
    for max_lesions in (1, 3, 5, 11, 20):
        r_cpu = lesioncount.count_distribution(x, max_count=4, max_lesions=max_lesions)
        with kernel_device.active():
            r_dev = lesioncount.count_distribution(kernel_device.to(x), max_count=4, max_lesions=max_lesions)
        assert torch.equal(r_dev.lesion_ids.cpu(), r_cpu.lesion_ids), max_lesions
        assert torch.equal(r_dev.argmax.cpu(), r_cpu.argmax)
        assert torch.equal(r_dev.truncated.cpu(), r_cpu.truncated)
        torch.testing.assert_close(r_dev.pmf.cpu(), r_cpu.pmf)
        if max_lesions == 3:  # the two distinct maxima (labels 4 and 9) and the smallest tied label
            assert r_dev.lesion_ids[0].tolist() == [1, 4, 9]


@requires_ops
def test_public_label_rejects_nan_on_the_kernel_device(kernel_device):
    """Defect fixed (ops.py, lesioncount.label on CUDA): the CUDA labeler marks an item with NaN by
    num = -1 and all-zero labels; the public function returned that silently. It now asserts on the
    device (asynchronously on a GPU: see test_bad_inputs_raise_asynchronously)."""
    import lesioncount

    if not kernel_device.emulated:
        pytest.skip("a device-side assertion poisons the CUDA context: covered in a subprocess")
    x = torch.rand(3, 6, 7, 8)
    x[1, 2, 3, 4] = float("nan")
    with kernel_device.active():
        labels, num = kernel_device.ops.label(x, 0.5, 26, 0)  # the op itself reports, never raises
        assert num.tolist()[1] == -1
        with pytest.raises(RuntimeError, match="label: `input` contains NaN"):
            lesioncount.label(x, 0.5, 26)
        lesioncount.label(x[[0, 2]], 0.5, 26)  # clean items pass


@requires_ops
@pytest.mark.parametrize("M", [1, 4, 15, 40])
@pytest.mark.parametrize("mode", ["linear", "log", "logits", "logits-log"])
def test_zero_padding_is_exact_on_the_kernel_device(kernel_device, M, mode):
    """Defect fixed (poisson_binomial.cu, split kernel): zero padding changed the pmf in the last
    bits, because padding moved candidates between the warp's chunks and so regrouped the chunk
    products (count_distribution pads with zeros: max_lesions=k vs exact differed). The chunks are
    now cut over the active candidates. Padding at the end, in the middle and in front."""
    kd = kernel_device
    log_space, from_logits = "log" in mode, "logits" in mode
    gen = torch.Generator().manual_seed(M)
    pad_value = -math.inf if from_logits else 0.0
    for K in (7, 45, 300):
        p = _pb_inputs(3, K, gen, from_logits)
        if from_logits:
            p[:, -1] = 0.3  # keep every candidate active in the unpadded input
        base = kd.ops.poisson_binomial(kd.to(p), M, log_space, from_logits).cpu()
        for pad in (1, 33, 200):
            z = torch.full((3, pad), pad_value, dtype=p.dtype)
            for padded in (torch.cat([p, z], 1), torch.cat([z, p], 1), torch.cat([p[:, :3], z, p[:, 3:]], 1)):
                got = kd.ops.poisson_binomial(kd.to(padded), M, log_space, from_logits).cpu()
                assert torch.equal(got, base), (K, pad)


@requires_ops
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_region_max_two_pass_path_for_every_dtype(cuda_on_cpu, emulation_settings, dtype):
    """The two-pass region_max (max value, then first index; on a GPU for items of > 2^32 voxels,
    and for float64) forced for 16- and 32-bit values too: same values and argmax, ties included."""
    gen = torch.Generator().manual_seed(8)
    lab = _regions(3, (6, 17, 19), 25, gen)
    x = (torch.randint(-3, 6, lab.shape, generator=gen).to(torch.float64) / 2).to(dtype)  # ties
    exp = ops.region_max(x, lab, 25)
    emulation_settings(large_item_paths=1)
    got = cuda_on_cpu.ops.region_max(x, lab, 25)
    assert torch.equal(got[1], exp[1]) and torch.equal(got[0], exp[0])
