"""Shared fixtures for the lesioncount benchmarks (pytest-benchmark).

Run from the repository root, e.g.::

    .venv/bin/python -m pytest benchmarks/bench_label.py --benchmark-json=out/bench_label.json
    .venv/bin/python benchmarks/summarize.py out/bench_label.json

lesioncount benchmarks are skipped when the compiled library is not loaded (timing the pure
Python fallback would be meaningless); set LESIONCOUNT_BENCH_ALLOW_FALLBACK=1 to time it anyway.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402

SHAPE = (64, 192, 192)
THRESHOLD = 0.1

try:
    import lesioncount as _lc
except ImportError:  # pragma: no cover
    _lc = None


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_num_threads"] = torch.get_num_threads()
    machine_info["numpy"] = np.__version__
    machine_info["platform"] = platform.platform()
    from importlib import metadata

    for key, dist in (("scipy", "scipy"), ("cc3d", "connected-components-3d"), ("skimage", "scikit-image")):
        try:
            machine_info[key] = metadata.version(dist)
        except Exception:  # noqa: BLE001
            machine_info[key] = None
    machine_info["lesioncount_has_ops"] = _has_ops()
    machine_info["os_cpu_count"] = os.cpu_count()
    machine_info["loadavg_at_start"] = list(os.getloadavg())


def _has_ops() -> bool:
    try:
        return bool(_lc is not None and _lc.has_ops())
    except Exception:  # noqa: BLE001 - a half-built package
        return False


@pytest.fixture(scope="session")
def lesioncount():
    if _lc is None:
        pytest.skip("lesioncount is not importable")
    if not _has_ops() and os.environ.get("LESIONCOUNT_BENCH_ALLOW_FALLBACK") != "1":
        pytest.skip("lesioncount compiled ops not loaded (set LESIONCOUNT_BENCH_ALLOW_FALLBACK=1 to time the fallback)")
    return _lc


@pytest.fixture(scope="session")
def synthetic():
    return baselines.load_synthetic()


@pytest.fixture(scope="session")
def realistic_item(synthetic):
    """One realistic 64x192x192 float32 probability map, shape (1, D, H, W)."""
    return synthetic.realistic_probability_maps(1, SHAPE, seed=0)


@pytest.fixture(scope="session")
def realistic_batch(synthetic):
    """B=4 realistic 64x192x192 float32 maps with their true counts."""
    probs, _, counts = synthetic.realistic_probability_maps(4, SHAPE, seed=0, return_masks=True)
    return probs, counts


@pytest.fixture(scope="session")
def noise_item(synthetic):
    """One 64x192x192 volume with ~50% of the voxels above 0.1, shape (1, D, H, W)."""
    return synthetic.noise_volume(1, SHAPE, density=0.5, seed=0)


def record_throughput(benchmark, voxels: int, **info):
    """Store voxel count, implementation name and voxels/s (from the median) in extra_info."""
    benchmark.extra_info["voxels"] = int(voxels)
    benchmark.extra_info.update(info)
    benchmark.extra_info["loadavg_1m"] = os.getloadavg()[0]  # other processes competing for the CPUs
    try:
        median = benchmark.stats.stats.median
        benchmark.extra_info["voxels_per_s"] = voxels / median if median > 0 else None
    except AttributeError:  # benchmarks disabled (--benchmark-disable)
        pass
