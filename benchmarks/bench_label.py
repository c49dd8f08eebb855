"""Connected-component labelling: lesioncount.label vs SciPy, cc3d and scikit-image.

Volumes: one realistic 64x192x192 float32 lesion probability map (tens of candidates at 0.1) and
one 50%-density noise volume (worst case), connectivity 6, 18 and 26, threshold 0.1 (strict >).
Implementations (``extra_info["impl"]``):

- ``lesioncount``       lesioncount.label on the float map (threshold inside the op)
- ``lesioncount-1thread`` the same with ``torch.set_num_threads(1)`` (per-core comparison; the
                        baselines below are single-threaded)
- ``lesioncount-mask``  lesioncount.label on the precomputed bool mask
- ``scipy``             x > 0.1 then scipy.ndimage.label (prebuilt structure, preallocated output)
- ``scipy-mask``        scipy.ndimage.label on the precomputed mask
- ``cc3d``              x > 0.1 then cc3d.connected_components (uint8 view)
- ``cc3d-mask``         cc3d.connected_components on the precomputed mask
- ``skimage-mask``      skimage.measure.label on the precomputed mask

Correctness is checked outside the timed call: lesioncount's labels equal SciPy's exactly; the
others must find the same number of components. A B=4 batch of realistic maps compares one
lesioncount call with a loop over the items for SciPy and cc3d.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import baselines
from conftest import THRESHOLD, record_throughput

CONNECTIVITIES = [6, 18, 26]
SINGLE_IMPLS = ["lesioncount", "lesioncount-1thread", "lesioncount-mask", "scipy", "scipy-mask", "cc3d", "cc3d-mask", "skimage-mask"]


@pytest.fixture(scope="module")
def volumes(realistic_item, noise_item):
    return {"realistic": realistic_item, "noise50": noise_item}


_reference_cache: dict = {}


def _scipy_reference(name: str, x_np: np.ndarray, connectivity: int):
    """SciPy labels of one item with a double-precision threshold (the op's exact semantics)."""
    key = (name, connectivity)
    if key not in _reference_cache:
        mask = x_np.astype(np.float64) > THRESHOLD
        out = np.empty(mask.shape, np.int32)
        n = baselines.scipy_label(mask, baselines.scipy_structure(x_np.ndim, connectivity), out)
        _reference_cache[key] = (out, n)
    return _reference_cache[key]


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("volume", ["realistic", "noise50"])
@pytest.mark.parametrize("impl", SINGLE_IMPLS)
def test_label_single(benchmark, request, volumes, volume, connectivity, impl):
    x = volumes[volume]  # (1, D, H, W) float32
    x_np = x[0].numpy()
    mask = x_np > THRESHOLD
    mask_u8 = mask.view(np.uint8)
    mask_t = torch.from_numpy(mask).unsqueeze(0)
    ref_labels, ref_n = _scipy_reference(volume, x_np, connectivity)
    structure = baselines.scipy_structure(3, connectivity)
    out = np.empty(mask.shape, np.int32)
    benchmark.group = f"label {volume} 1x64x192x192 c{connectivity}"

    if impl.startswith("lesioncount"):
        lc = request.getfixturevalue("lesioncount")
        inp = mask_t if impl == "lesioncount-mask" else x

        def fn():
            return lc.label(inp, threshold=THRESHOLD, connectivity=connectivity)

        labels, num = fn()  # correctness, outside the timed call
        assert int(num[0]) == ref_n
        np.testing.assert_array_equal(labels[0].numpy(), ref_labels)
        if impl == "lesioncount-1thread":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                benchmark(fn)
            finally:
                torch.set_num_threads(threads)
            record_throughput(benchmark, x_np.size, impl=impl, volume=volume, connectivity=connectivity,
                              batch=1, components=ref_n, torch_threads=1)
            return
    elif impl == "scipy":

        def fn():
            return baselines.scipy_label(x_np > THRESHOLD, structure, out)

        assert fn() == ref_n
    elif impl == "scipy-mask":

        def fn():
            return baselines.scipy_label(mask, structure, out)

        assert fn() == ref_n
    elif impl == "cc3d":

        def fn():
            return baselines.cc3d_label((x_np > THRESHOLD).view(np.uint8), connectivity)

        assert int(fn()[1]) == ref_n
    elif impl == "cc3d-mask":

        def fn():
            return baselines.cc3d_label(mask_u8, connectivity)

        assert int(fn()[1]) == ref_n
    elif impl == "skimage-mask":

        def fn():
            return baselines.skimage_label(mask, connectivity)

        assert int(fn()[1]) == ref_n
    else:  # pragma: no cover
        raise AssertionError(impl)

    benchmark(fn)
    record_throughput(benchmark, x_np.size, impl=impl, volume=volume, connectivity=connectivity,
                      batch=1, components=ref_n, torch_threads=torch.get_num_threads())


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("impl", ["lesioncount", "scipy", "cc3d"])
def test_label_batch(benchmark, request, realistic_batch, connectivity, impl):
    """B=4 realistic maps, threshold included: one lesioncount call vs a per-item loop."""
    x, _ = realistic_batch
    x_np = x.numpy()
    B = x_np.shape[0]
    structure = baselines.scipy_structure(3, connectivity)
    refs = [_scipy_reference(f"batch{b}", x_np[b], connectivity) for b in range(B)]
    out = np.empty(x_np.shape[1:], np.int32)
    benchmark.group = f"label realistic 4x64x192x192 c{connectivity}"

    if impl == "lesioncount":
        lc = request.getfixturevalue("lesioncount")

        def fn():
            return lc.label(x, threshold=THRESHOLD, connectivity=connectivity)

        labels, num = fn()
        for b in range(B):
            assert int(num[b]) == refs[b][1]
            np.testing.assert_array_equal(labels[b].numpy(), refs[b][0])
    elif impl == "scipy":

        def fn():
            return [baselines.scipy_label(x_np[b] > THRESHOLD, structure, out) for b in range(B)]

        assert fn() == [r[1] for r in refs]
    elif impl == "cc3d":

        def fn():
            return [baselines.cc3d_label((x_np[b] > THRESHOLD).view(np.uint8), connectivity) for b in range(B)]

        assert [int(r[1]) for r in fn()] == [r[1] for r in refs]
    else:  # pragma: no cover
        raise AssertionError(impl)

    benchmark(fn)
    record_throughput(benchmark, x_np.size, impl=impl, volume="realistic", connectivity=connectivity,
                      batch=B, components=sum(r[1] for r in refs), torch_threads=torch.get_num_threads())
