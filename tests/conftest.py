"""Shared fixtures and helpers for the lesioncount test-suite.

Helpers are plain functions so test modules can ``from conftest import ...`` them; the fixtures
wrap the same helpers.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import sys

import numpy as np
import pytest
import torch

try:  # hypothesis is a test dependency; keep the suite fast and deterministic
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "lesioncount",
        max_examples=60,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(
        "lesioncount-thorough",
        max_examples=500,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("LESIONCOUNT_HYPOTHESIS_PROFILE", "lesioncount"))
except ImportError:  # pragma: no cover
    pass

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEED = 20220706  # MIDL 2022

# --------------------------------------------------------------------------------------------
# the reference module (importable even when the package __init__ is missing or broken)
# --------------------------------------------------------------------------------------------


def _load_reference():
    try:
        from lesioncount import _reference as mod  # noqa: PLC0415

        return mod
    except Exception:  # package not importable yet: load the file directly
        path = ROOT / "python" / "lesioncount" / "_reference.py"
        spec = importlib.util.spec_from_file_location("_lesioncount_reference", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


ref = _load_reference()

# --------------------------------------------------------------------------------------------
# availability of the compiled ops / CUDA
# --------------------------------------------------------------------------------------------


def _has_ops() -> bool:
    try:
        import lesioncount  # noqa: PLC0415

        return bool(lesioncount.has_ops())
    except Exception:
        return False


HAS_OPS = _has_ops()
HAS_CUDA = torch.cuda.is_available()

requires_ops = pytest.mark.skipif(not HAS_OPS, reason="compiled lesioncount ops not available")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
cuda = pytest.mark.cuda

# connectivity per spatial rank
CONNECTIVITIES = {2: (4, 8), 3: (6, 18, 26)}
ALL_CONNECTIVITIES = [(2, c) for c in (4, 8)] + [(3, c) for c in (6, 18, 26)]
SCIPY_STRUCT = {4: (2, 1), 8: (2, 2), 6: (3, 1), 18: (3, 2), 26: (3, 3)}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.bool, torch.uint8) + FLOAT_DTYPES

# odd shapes (batch first) used throughout
ODD_SHAPES_3D = [(1, 1, 1, 1), (2, 1, 7, 5), (3, 5, 1, 9), (1, 17, 13, 11), (2, 4, 4, 1), (2, 3, 6, 5)]
ODD_SHAPES_2D = [(1, 1, 1), (2, 1, 7), (3, 9, 1), (1, 17, 13), (2, 6, 6)]

# --------------------------------------------------------------------------------------------
# random volumes
# --------------------------------------------------------------------------------------------


def make_rng(seed: int = SEED) -> np.random.Generator:
    return np.random.default_rng(seed)


def random_binary(rng: np.random.Generator, shape, density: float) -> np.ndarray:
    """Boolean array of ``shape`` with roughly ``density`` foreground."""
    return rng.random(shape) < density


def random_probs(
    rng: np.random.Generator,
    shape,
    density: float,
    threshold: float = 0.1,
    dtype: torch.dtype = torch.float32,
    unique: bool = False,
):
    """Probability volume whose foreground (``> threshold``) has roughly ``density``.

    Foreground voxels get values in (threshold, 1], background in [0, threshold). The values are
    representable in ``dtype`` and keep their side of the threshold after the cast. Returns
    ``(probs tensor, foreground bool ndarray)``. With ``unique`` all values are distinct (float64
    only), which avoids ties.
    """
    fg = random_binary(rng, shape, density)
    n = int(np.prod(shape))
    if unique:
        u = (rng.permutation(n).reshape(shape) + 0.5) / max(n, 1)
    else:
        u = rng.random(shape)
    hi = threshold + (1.0 - threshold) * (1.0 - u)  # (threshold, 1]
    lo = threshold * u  # [0, threshold)
    vals = np.where(fg, hi, lo)
    t = torch.from_numpy(vals).to(dtype)
    # make sure rounding to a narrow dtype did not move a voxel across the threshold
    t64 = t.to(torch.float64).numpy()
    bad_fg = fg & ~(t64 > threshold)
    bad_bg = ~fg & ~(t64 <= threshold)
    if bad_fg.any() or bad_bg.any():
        vals = np.where(bad_fg, 1.0, np.where(bad_bg, 0.0, vals))
        t = torch.from_numpy(vals).to(dtype)
    return t, fg


def binary_to_dtype(fg: np.ndarray, dtype: torch.dtype, threshold: float = 0.1, rng=None):
    """Encode a boolean mask as an input of ``dtype`` whose foreground is ``> threshold``."""
    t = torch.from_numpy(np.ascontiguousarray(fg))
    if dtype == torch.bool:
        return t.clone()
    if dtype == torch.uint8:
        return t.to(torch.uint8)
    if rng is None:
        return t.to(dtype) * 0.9 + 0.05  # fg 0.95, bg 0.05
    u = torch.from_numpy(rng.random(fg.shape))
    vals = torch.where(t, 0.5 + 0.5 * u, 0.09 * u)
    return vals.to(dtype)


def scipy_label_batch(fg: np.ndarray, connectivity: int, min_size: int = 0):
    """SciPy labelling of a boolean batch (B, *spatial) -> (labels int64 ndarray, num ndarray).

    Written independently of ``_reference.label`` (min_size handled by an explicit loop).
    """
    import scipy.ndimage as ndi

    rank, r = SCIPY_STRUCT[connectivity]
    assert fg.ndim == rank + 1, (fg.shape, connectivity)
    structure = ndi.generate_binary_structure(rank, r)
    out = np.zeros(fg.shape, dtype=np.int64)
    nums = np.zeros(fg.shape[0], dtype=np.int64)
    for b in range(fg.shape[0]):
        lab, n = ndi.label(fg[b], structure=structure)
        new = np.zeros_like(lab, dtype=np.int64)
        k = 0
        for i in range(1, n + 1):
            m = lab == i
            if m.sum() >= min_size:
                k += 1
                new[m] = k
        out[b] = new
        nums[b] = k
    return out, nums


def naive_region_max(x: np.ndarray, labels: np.ndarray, num_regions: int):
    """Loop-based region max / first argmax per item (float64 values, int64 argmax)."""
    B = x.shape[0]
    xf = x.reshape(B, -1)
    lf = labels.reshape(B, -1)
    vals = np.zeros((B, num_regions), dtype=np.float64)
    am = np.full((B, num_regions), -1, dtype=np.int64)
    for b in range(B):
        for r in range(1, num_regions + 1):
            idx = np.nonzero(lf[b] == r)[0]
            if idx.size == 0:
                continue
            v = xf[b, idx]
            j = int(np.argmax(v))  # numpy returns the first occurrence
            vals[b, r - 1] = v[j]
            am[b, r - 1] = idx[j]
    return vals, am


def blobs_volume(shape, centers, peaks, radius=1, background=0.0, dtype=torch.float64):
    """(1, D, H, W) volume with cubic blobs of half-size ``radius`` around ``centers``.

    Each blob decays from its peak value at the centre, so its maximum is unique.
    """
    D, H, W = shape
    x = torch.full((1, D, H, W), background, dtype=torch.float64)
    for (d, h, w), p in zip(centers, peaks):
        for dd in range(-radius, radius + 1):
            for hh in range(-radius, radius + 1):
                for ww in range(-radius, radius + 1):
                    dist = abs(dd) + abs(hh) + abs(ww)
                    x[0, d + dd, h + hh, w + ww] = p - 0.03 * dist - 0.001 * (dd + 2 * hh + 3 * ww + 10)
                    if dist == 0:
                        x[0, d, h, w] = p
    return x.to(dtype)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def rng() -> np.random.Generator:
    return make_rng()


@pytest.fixture
def make_volume(rng):
    """``make_volume(shape, density, dtype=torch.float32)`` -> (probs tensor, fg ndarray)."""

    def _make(shape, density, dtype=torch.float32, threshold=0.1, unique=False):
        return random_probs(rng, shape, density, threshold=threshold, dtype=dtype, unique=unique)

    return _make


@pytest.fixture(scope="session")
def reference():
    return ref


@pytest.fixture(autouse=True)
def _torch_seed():
    torch.manual_seed(SEED)
    yield


def pytest_report_header(config):
    return f"lesioncount: compiled ops {'available' if HAS_OPS else 'NOT available'}; cuda={HAS_CUDA}"


__all__ = [
    "ALL_CONNECTIVITIES",
    "CONNECTIVITIES",
    "FLOAT_DTYPES",
    "HAS_CUDA",
    "HAS_OPS",
    "LABEL_DTYPES",
    "ODD_SHAPES_2D",
    "ODD_SHAPES_3D",
    "binary_to_dtype",
    "blobs_volume",
    "make_rng",
    "naive_region_max",
    "random_binary",
    "random_probs",
    "ref",
    "requires_cuda",
    "requires_ops",
    "scipy_label_batch",
    "math",
]


@pytest.fixture
def one_torch_thread():
    """Run a test with ``torch.set_num_threads(1)`` (tiny ops on a shared 2-core machine: a second
    OpenMP thread only adds waiting), restoring the previous count afterwards. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# CUDA tests run on a real GPU and on the CUDA-on-CPU test runtime (tests/kernel_devices.py).
from kernel_devices import cuda_on_cpu, emulation_settings, kernel_device  # noqa: E402,F401
