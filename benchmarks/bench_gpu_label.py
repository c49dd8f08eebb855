"""GPU connected-component labelling: lesioncount.label on CUDA vs cupyx.scipy.ndimage.label and the
library's CPU path. Skipped without CUDA (with LC_GPU_DRY_RUN=1 the lesioncount-cuda rows run on
the CUDA-on-CPU runtime at tiny sizes instead, see gpu_device.py; their timings mean nothing).

Inputs (float32, threshold 0.1, strict >): B=8 realistic 64x192x192 maps
(``lesioncount.synthetic.realistic_probability_maps``) and B=8 50%-density noise volumes
(``noise_volume``), connectivity 6/18/26. Implementations (``extra_info["impl"]``):

- ``lesioncount-cuda``        one ``torch.ops.lesioncount.label`` call on the (B, D, H, W) CUDA tensor
                              (threshold fused; ``num`` stays on the device);
- ``lesioncount-cuda-graph``  the same call captured once in a CUDA graph and replayed (no launch gaps);
- ``cupyx``                   ``x[b] > bound`` then ``cupyx.scipy.ndimage.label`` per item (it returns
                              the count to the host: one sync per item), zero-copy DLPack views;
- ``lesioncount-cpu``         the CPU kernel on the same batch (host tensors); CPU-bound, so only with
                              ``LC_GPU_BENCH_CPU_BOUND=1`` (gpu_check.sh leaves it out).
- ``device-copy``             ``x.clone()`` of the same input: the measured copy bandwidth.

Every timed call ends with ``torch.cuda.synchronize()``. Correctness outside the timed calls: the CUDA
labels equal the CPU labels exactly; cupyx finds the same component counts. ``extra_info`` holds
GVx/s (from the median), the copy bandwidth (bytes read + written per second) and the floor: one read
of the input plus one write of the int32 labels at that bandwidth, and median / floor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import os
import time

import baselines
import gpu_device
from conftest import THRESHOLD
from gpu_device import DEVICE, DRY_RUN

_AVAILABLE, _WHY = gpu_device.available()
pytestmark = pytest.mark.skipif(not _AVAILABLE, reason=_WHY)

B = gpu_device.size(8, 2)
SHAPE = gpu_device.size((64, 192, 192), (8, 24, 24))
CPU_BOUND = os.environ.get("LC_GPU_BENCH_CPU_BOUND", "") == "1"
CONNECTIVITIES = [6, 18, 26]
VOXELS = B * int(np.prod(SHAPE))


def _sync():
    gpu_device.sync()


@pytest.fixture(scope="module")
def lc():
    import lesioncount

    return lesioncount


@pytest.fixture(scope="module")
def volumes():
    synthetic = baselines.load_synthetic()
    cpu = {
        "realistic": synthetic.realistic_probability_maps(B, SHAPE, seed=0),
        "noise50": synthetic.noise_volume(B, SHAPE, density=0.5, seed=0),
    }
    return {k: (v, v.to(DEVICE).clone()) for k, v in cpu.items()}


def _event_median_s(fn, reps=20):
    fn()
    _sync()
    if DRY_RUN:  # no CUDA events on the CPU
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


@pytest.fixture(scope="module")
def copy_bandwidth():
    """Device copy bandwidth (bytes read + bytes written per second) on a 1 GiB buffer."""
    n = gpu_device.size(1 << 28, 1 << 20)
    x = torch.empty(n, dtype=torch.float32, device=DEVICE).uniform_()
    y = torch.empty_like(x)
    t = _event_median_s(lambda: y.copy_(x))
    del x, y
    if not DRY_RUN:
        torch.cuda.empty_cache()
    return 2 * n * 4 / t


def _record(benchmark, copy_bw, **info):
    benchmark.extra_info.update(info)
    benchmark.extra_info["voxels"] = VOXELS
    benchmark.extra_info["device"] = gpu_device.device_name()
    benchmark.extra_info["copy_bandwidth_GBps"] = copy_bw / 1e9
    floor_s = VOXELS * (4 + 4) / copy_bw  # float32 read + int32 write
    benchmark.extra_info["floor_us"] = floor_s * 1e6
    try:
        median = benchmark.stats.stats.median
    except AttributeError:  # --benchmark-disable
        return
    benchmark.extra_info["GVx_per_s"] = VOXELS / median / 1e9
    benchmark.extra_info["median_over_floor"] = median / floor_s


_cpu_reference: dict = {}


def _reference(name, x_cpu, conn):
    key = (name, conn)
    if key not in _cpu_reference:
        _cpu_reference[key] = torch.ops.lesioncount.label(x_cpu, THRESHOLD, conn, 0)
    return _cpu_reference[key]


def _float_bound(threshold: float) -> np.float32:
    f = np.float32(threshold)
    if float(f) > threshold:
        f = np.nextafter(f, np.float32(-np.inf), dtype=np.float32)
    return f


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("volume", ["realistic", "noise50"])
@pytest.mark.parametrize("impl", ["lesioncount-cuda", "lesioncount-cuda-graph", "cupyx", "lesioncount-cpu"])
def test_gpu_label(benchmark, request, volumes, copy_bandwidth, volume, connectivity, impl):
    x_cpu, x = volumes[volume]
    ref_labels, ref_num = _reference(volume, x_cpu, connectivity)
    benchmark.group = f"gpu label {volume} {B}x{'x'.join(map(str, SHAPE))} c{connectivity}"
    info = dict(impl=impl, volume=volume, connectivity=connectivity, batch=B,
                components=int(ref_num.sum()))
    if impl == "lesioncount-cpu" and not CPU_BOUND:
        pytest.skip("lesioncount-cpu is CPU-bound: set LC_GPU_BENCH_CPU_BOUND=1 to time it")
    if impl in ("lesioncount-cuda-graph", "cupyx") and DRY_RUN:
        pytest.skip(f"{impl} needs a real GPU (dry run)")
    label = gpu_device.label_op()

    if impl in ("lesioncount-cuda", "lesioncount-cuda-graph"):
        lc = request.getfixturevalue("lc")
        labels, num = label(x, THRESHOLD, connectivity, 0)
        assert torch.equal(num.cpu(), ref_num)
        assert torch.equal(labels.cpu(), ref_labels)
        assert lc is not None
        if impl == "lesioncount-cuda":

            def fn():
                out = label(x, THRESHOLD, connectivity, 0)
                _sync()
                return out
        else:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                torch.ops.lesioncount.label(x, THRESHOLD, connectivity, 0)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = torch.ops.lesioncount.label(x, THRESHOLD, connectivity, 0)
            graph.replay()
            _sync()
            assert torch.equal(static[0].cpu(), ref_labels) and torch.equal(static[1].cpu(), ref_num)

            def fn():
                graph.replay()
                _sync()

        if DRY_RUN:
            benchmark.pedantic(fn, rounds=3, warmup_rounds=0)
        else:
            benchmark(fn)
    elif impl == "cupyx":
        cp = pytest.importorskip("cupy")
        cndi = pytest.importorskip("cupyx.scipy.ndimage")
        structure = cp.asarray(baselines.scipy_structure(3, connectivity))
        bound = _float_bound(THRESHOLD)
        views = [cp.from_dlpack(x[b]) for b in range(B)]
        outs = [cp.empty(SHAPE, dtype=cp.int32) for _ in range(B)]

        def fn():
            nums = []
            for b in range(B):
                nums.append(cndi.label(views[b] > bound, structure, output=outs[b]))
            _sync()
            return nums

        nums = fn()
        assert [int(n) for n in nums] == ref_num.tolist()
        benchmark.pedantic(fn, rounds=10, warmup_rounds=1)
    elif impl == "lesioncount-cpu":
        request.getfixturevalue("lc")

        def fn():
            return torch.ops.lesioncount.label(x_cpu, THRESHOLD, connectivity, 0)

        got = fn()
        assert torch.equal(got[1], ref_num)
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
        info["torch_threads"] = torch.get_num_threads()
    else:  # pragma: no cover
        raise AssertionError(impl)
    _record(benchmark, copy_bandwidth, **info)


def test_gpu_device_copy(benchmark, volumes, copy_bandwidth):
    """x.clone() of the B=8 float32 batch: the bandwidth floor's reference at this size."""
    _, x = volumes["realistic"]
    benchmark.group = "gpu device copy"

    def fn():
        y = x.clone()
        _sync()
        return y

    if DRY_RUN:
        benchmark.pedantic(fn, rounds=3, warmup_rounds=0)
    else:
        benchmark(fn)
    _record(benchmark, copy_bandwidth, impl="device-copy", volume="realistic", batch=B)
    try:
        benchmark.extra_info["clone_GBps"] = 2 * x.numel() * 4 / benchmark.stats.stats.median / 1e9
    except AttributeError:
        pass
