"""Tests for the training data: phantoms, anatomy phantoms, nnU-Net reader, augmentation, splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from lesioncount._extras import MissingExtraError
from lesioncount.train import anatomy, phantom
from lesioncount.train.data import (
    AnatomyPhantomDataset,
    NnUNetFormatError,
    NnUNetRawDataset,
    PhantomDataset,
    RandomAffineFlip,
    build_datasets,
    center_crop_or_pad,
)
from lesioncount.train.phantom import (
    CSF,
    GM,
    SEQUENCES,
    WM,
    LesionSettings,
    case_rng,
    generate_phantom,
    place_lesions,
)

STRUCTURE_RANK = {6: 1, 18: 2, 26: 3}
SMALL = (16, 32, 32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scipy_count(mask: np.ndarray, connectivity: int) -> int:
    structure = ndimage.generate_binary_structure(3, STRUCTURE_RANK[connectivity])
    return int(ndimage.label(np.asarray(mask) > 0, structure=structure)[1])


@pytest.fixture(scope="module")
def phantom_cases():
    return [generate_phantom(i, shape=(32, 64, 64), seed=11) for i in range(24)]


# --------------------------------------------------------------------------------------------------
# phantom
# --------------------------------------------------------------------------------------------------


def test_phantom_counts_match_scipy_and_library_labels(phantom_cases):
    import lesioncount

    for case in phantom_cases:
        assert case.image.shape == (5, 32, 64, 64) and case.image.dtype == np.float32
        assert case.mask.shape == (32, 64, 64) and set(np.unique(case.mask)) <= {0, 1}
        for conn in (6, 18, 26):
            expected = scipy_count(case.mask, conn)
            assert case.count(conn) == expected
            _, num = lesioncount.label(torch.from_numpy(case.mask[None].astype(np.float32)), 0.5, conn, 0)
            assert int(num[0]) == expected
        # the mask is lesion tissue only: inside the brain, never on distractors
        assert not (case.mask.astype(bool) & ~case.brain_mask).any()
        assert not (case.mask.astype(bool) & case.distractor_mask).any()


def test_phantom_count_distribution_and_touching_pairs(phantom_cases):
    counts = np.array([c.count(18) for c in phantom_cases])
    assert (counts == 0).sum() >= 4          # many lesion-free cases
    assert ((counts >= 1) & (counts <= 3)).sum() >= 4
    assert counts.max() >= 4                  # a tail
    # some case merges placed blobs into fewer components, and connectivity matters somewhere
    assert any(c.count(26) < c.num_blobs for c in phantom_cases)
    assert any(c.count(6) != c.count(26) for c in phantom_cases)
    assert all(c.count(6) >= c.count(18) >= c.count(26) for c in phantom_cases)
    kinds = {k for c in phantom_cases for k in c.units}
    assert {"single", "overlap"} <= kinds and kinds & {"edge", "corner"}


def test_unit_count_distribution_is_skewed():
    settings = LesionSettings()
    draws = np.array([phantom._sample_unit_count(case_rng(0, i, 1), settings) for i in range(3000)])
    fractions = [np.mean(draws == 0), np.mean(draws == 1), np.mean((draws >= 2) & (draws <= 3)), np.mean(draws >= 4)]
    # 0: 0.45, 1: 0.2475, 2-3: 0.2109, 4+: 0.0916
    for got, want in zip(fractions, [0.45, 0.2475, 0.2109, 0.0916]):
        assert abs(got - want) < 0.03


@pytest.mark.parametrize(
    "kind_index,expected",
    [(1, {18: 1, 26: 1}),                 # overlapping pair: one component (6 may split a thin blob)
     (2, {18: 1, 26: 1}),                 # edge contact: one component under 18 and 26 ...
     (3, {26: 1})],                       # corner contact: one component only under 26
)
def test_touching_pairs_by_construction(kind_index, expected):
    allowed = np.ones((24, 40, 40), dtype=bool)
    sites = np.flatnonzero(np.pad(np.ones((8, 16, 16), bool), ((8, 8), (12, 12), (12, 12))))
    probs = [0.0] * 4
    probs[kind_index] = 1.0
    settings = LesionSettings(zero_fraction=0.0, unit_geometric_p=1.0, unit_kind_probs=tuple(probs),
                              distractor_mean=0.0)
    exact = 0
    for i in range(20):
        layout = place_lesions(case_rng(5, i), allowed, sites, settings=settings)
        assert layout.num_blobs == 2 and len(layout.units) == 1
        counts = {c: scipy_count(layout.mask, c) for c in (6, 18, 26)}
        assert counts[26] == 1
        if kind_index == 2:   # ... but never under 6 (no face contact possible)
            assert counts[6] >= 2
        if kind_index == 3:   # no face or edge contact possible
            assert counts[18] >= 2 and counts[6] >= 2
        exact += all(counts[c] == v for c, v in expected.items())
    assert exact == 20


def test_phantom_determinism_and_independence():
    a = generate_phantom(7, shape=SMALL, seed=3)
    b = generate_phantom(7, shape=SMALL, seed=3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    c = generate_phantom(8, shape=SMALL, seed=3)
    d = generate_phantom(7, shape=SMALL, seed=4)
    assert not np.array_equal(a.image, c.image) and not np.array_equal(a.image, d.image)
    ds = PhantomDataset(3, shape=SMALL, seed=3, first_index=6)
    item = ds[1]
    assert item["name"] == a.name
    np.testing.assert_array_equal(item["image"].numpy(), a.normalized_image())
    np.testing.assert_array_equal(item["mask"][0].numpy(), a.mask.astype(np.float32))
    assert item["count"].dtype == torch.int64 and item["count"].dim() == 0
    assert int(item["count"]) == scipy_count(a.mask, 18)


def _interior(region: np.ndarray, avoid: np.ndarray) -> np.ndarray:
    return ndimage.binary_erosion(region, iterations=1) & ~ndimage.binary_dilation(avoid, iterations=3)


def test_intensity_ordering_per_sequence(phantom_cases):
    case = phantom_cases[0]
    lesions = case.mask.astype(bool) | case.distractor_mask
    med = {}
    for tissue in (CSF, GM, WM):
        region = _interior(case.tissue == tissue, lesions)
        assert region.sum() > 20
        med[tissue] = np.median(case.image[:, region], axis=1)
    t1, t1c, t2, flair, pd = (SEQUENCES.index(s) for s in SEQUENCES)
    assert med[WM][t1] > med[GM][t1] > med[CSF][t1]
    assert med[WM][t1c] > med[GM][t1c] > med[CSF][t1c]
    assert med[CSF][t2] > med[GM][t2] > med[WM][t2]
    assert med[GM][flair] > med[WM][flair] > med[CSF][flair]       # CSF suppressed
    assert med[CSF][pd] > med[GM][pd] > med[WM][pd]


def test_enhancing_lesions_bright_in_t1c_and_distractors_not(phantom_cases):
    t1, t1c, flair = SEQUENCES.index("T1"), SEQUENCES.index("T1c"), SEQUENCES.index("FLAIR")
    checked = checked_distractors = 0
    for case in phantom_cases:
        labels, num = ndimage.label(case.mask)
        wm = case.tissue == WM
        for k in range(1, num + 1):
            lesion = labels == k
            if lesion.sum() < 8:
                continue
            ring = ndimage.binary_dilation(lesion, iterations=4) & ~ndimage.binary_dilation(lesion, iterations=2)
            ring &= wm & ~case.distractor_mask & ~case.mask.astype(bool)
            if ring.sum() < 10:
                continue
            assert case.image[t1c][lesion].mean() > 1.2 * case.image[t1c][ring].mean()
            # enhancement: T1c / T1 well above the same ratio in the surrounding white matter
            ratio_ring = case.image[t1c][ring].mean() / case.image[t1][ring].mean()
            assert case.image[t1c][lesion].mean() / case.image[t1][lesion].mean() > 1.4 * ratio_ring
            checked += 1
        d_labels, d_num = ndimage.label(case.distractor_mask)
        for k in range(1, d_num + 1):
            d = d_labels == k
            if d.sum() < 8:
                continue
            ring = ndimage.binary_dilation(d, iterations=4) & ~ndimage.binary_dilation(d, iterations=2) & wm
            ring &= ~case.distractor_mask & ~case.mask.astype(bool)
            if ring.sum() < 10:
                continue
            ratio_ring = case.image[t1c][ring].mean() / case.image[t1][ring].mean()
            ratio = case.image[t1c][d].mean() / case.image[t1][d].mean()
            assert abs(ratio / ratio_ring - 1.0) < 0.1                      # not enhancing
            assert case.image[flair][d].mean() > 1.4 * case.image[flair][ring].mean()  # FLAIR bright
            checked_distractors += 1
    assert checked >= 5 and checked_distractors >= 5


def test_normalized_image_is_zscored_in_brain(phantom_cases):
    case = phantom_cases[1]
    x = case.normalized_image()
    inside = x[:, case.brain_mask]
    np.testing.assert_allclose(inside.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(inside.std(axis=1), 1.0, atol=1e-4)


def test_large_shape_works():
    case = generate_phantom(2, shape=(64, 96, 96), seed=0)
    assert case.image.shape == (5, 64, 96, 96)
    assert case.count(18) == scipy_count(case.mask, 18)


def test_phantom_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        generate_phantom(0, shape=(4, 32, 32))
    with pytest.raises(ValueError, match="connectivity"):
        PhantomDataset(1, shape=SMALL, connectivity=8)
    with pytest.raises(ValueError, match="index"):
        generate_phantom(-1, shape=SMALL)
    with pytest.raises(IndexError, match="out of range"):
        PhantomDataset(2, shape=SMALL)[2]
    with pytest.raises(ValueError, match="zero_fraction"):
        LesionSettings(zero_fraction=1.5)


def test_phantom_dataset_cache_is_bounded():
    case_bytes = 6 * int(np.prod(SMALL)) * 4
    ds = PhantomDataset(5, shape=SMALL, seed=0, cache_bytes=2 * case_bytes)
    first = [ds[i]["image"] for i in range(5)]
    assert len(ds._cache) == 2
    again = ds[4]["image"]
    assert torch.equal(again, first[4])
    assert torch.equal(ds[0]["image"], first[0])  # regenerated identically after eviction
    assert PhantomDataset(2, shape=SMALL, cache_bytes=0).cache_cases == 0


# --------------------------------------------------------------------------------------------------
# nnU-Net raw folder
# --------------------------------------------------------------------------------------------------


def _write_nifti(path, array_xyz):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(array_xyz), np.diag([1.0, 1.2, 2.0, 1.0])), str(path))


def _make_nnunet(root, cases, xyz=(12, 10, 6), test_cases=(), num_training=None):
    """Folder with 2 channels; returns {case: (image_xyz (2, x, y, z), label_xyz)}."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"channel_names": {"0": "T1c", "1": "FLAIR"}, "labels": {"background": 0, "enhancing": 1, "edema": 2},
            "numTraining": len(cases) if num_training is None else num_training, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    truth = {}
    for split, names in (("Tr", cases), ("Ts", test_cases)):
        if names:
            (root / f"images{split}").mkdir(exist_ok=True)
            (root / f"labels{split}").mkdir(exist_ok=True)
        for name in names:
            image = rng.uniform(1.0, 5.0, size=(2, *xyz)).astype(np.float32)
            label = np.zeros(xyz, dtype=np.uint8)
            label[1:3, 1:3, 1:3] = 1          # lesion A (enhancing)
            label[8, 7, 4] = 1                # lesion B: a single voxel
            label[9, 8, 5] = 1                # touches B only at a corner
            label[5, 2, 4] = 2                # edema (label 2)
            for c in range(2):
                _write_nifti(root / f"images{split}" / f"{name}_{c:04d}.nii.gz", image[c])
            _write_nifti(root / f"labels{split}" / f"{name}.nii.gz", label)
            truth[name] = (image, label)
    return truth


def test_nnunet_reader_transposes_consistently(tmp_path):
    truth = _make_nnunet(tmp_path, ["case_a", "case_b"])
    ds = NnUNetRawDataset(tmp_path, "Tr", connectivity=26)
    assert ds.cases == ["case_a", "case_b"] and ds.channel_names == ["T1c", "FLAIR"]
    item = ds[1]
    image_xyz, label_xyz = truth["case_b"]
    assert item["image"].shape == (2, 6, 10, 12) and item["mask"].shape == (1, 6, 10, 12)
    expected_mask = (label_xyz > 0).transpose(2, 1, 0)
    np.testing.assert_array_equal(item["mask"][0].numpy(), expected_mask.astype(np.float32))
    for c in range(2):
        channel = image_xyz[c].transpose(2, 1, 0).astype(np.float64)
        expected = (channel - channel.mean()) / channel.std()
        np.testing.assert_allclose(item["image"][c].numpy(), expected, atol=1e-5)
    assert int(item["count"]) == 3  # A, B+corner (26-connected), edema voxel
    assert item["name"] == "case_b"
    assert int(NnUNetRawDataset(tmp_path, connectivity=18)[0]["count"]) == 4
    only_enhancing = NnUNetRawDataset(tmp_path, connectivity=26, lesion_label="enhancing")[0]
    assert int(only_enhancing["count"]) == 2
    assert int(NnUNetRawDataset(tmp_path, connectivity=6, lesion_label=2)[0]["count"]) == 1


def test_nnunet_crop_pad_and_splits(tmp_path):
    _make_nnunet(tmp_path, [f"c{i}" for i in range(6)], test_cases=["t0", "t1"])
    ds = NnUNetRawDataset(tmp_path, "Tr", connectivity=18, shape=(16, 16, 16))
    item = ds[0]
    assert item["image"].shape == (2, 16, 16, 16)
    assert int(item["mask"].sum()) == 8 + 2 + 1 and int(item["count"]) == 4  # padding keeps every lesion
    ramp = np.arange(10)[None, None, None].repeat(2, 1)  # (1, 2, 1, 10)
    assert center_crop_or_pad(ramp, (2, 1, 4)).tolist() == [[[[3, 4, 5, 6]], [[3, 4, 5, 6]]]]
    assert center_crop_or_pad(ramp, (3, 1, 11))[0, :, 0].tolist() == [list(range(10)) + [0]] * 2 + [[0] * 11]
    train, val, test = build_datasets("nnunet", num_train=0, num_val=2, num_test=0, shape=(16, 16, 16), seed=0,
                                      connectivity=18, data_dir=tmp_path)
    assert len(train) == 4 and len(val) == 2 and test.cases == ["t0", "t1"] and test.split == "Ts"
    assert not set(train.cases) & set(val.cases)
    assert int(test[1]["count"]) == 4


def test_nnunet_errors_name_the_problem(tmp_path):
    _make_nnunet(tmp_path / "a", ["x"])
    (tmp_path / "a" / "imagesTr" / "x_0001.nii.gz").unlink()
    with pytest.raises(NnUNetFormatError, match=r"x_0001\.nii\.gz: missing channel 1 \('FLAIR'\)"):
        NnUNetRawDataset(tmp_path / "a")[0]
    _make_nnunet(tmp_path / "b", ["x"])
    (tmp_path / "b" / "labelsTr" / "x.nii.gz").unlink()
    with pytest.raises(NnUNetFormatError, match=r"labelsTr/x\.nii\.gz: missing label"):
        NnUNetRawDataset(tmp_path / "b")[0]
    _make_nnunet(tmp_path / "c", ["x", "y"], num_training=3)
    with pytest.raises(NnUNetFormatError, match="numTraining=3"):
        NnUNetRawDataset(tmp_path / "c")
    _make_nnunet(tmp_path / "d", ["x"])
    _write_nifti(tmp_path / "d" / "labelsTr" / "x.nii.gz", np.zeros((12, 10, 5), np.uint8))
    with pytest.raises(NnUNetFormatError, match=r"label shape \(z, y, x\) \(5, 10, 12\) differs"):
        NnUNetRawDataset(tmp_path / "d")[0]
    with pytest.raises(NnUNetFormatError, match="dataset.json: missing"):
        NnUNetRawDataset(tmp_path / "d" / "imagesTr")
    with pytest.raises(NnUNetFormatError, match="not a key of 'labels'"):
        NnUNetRawDataset(tmp_path / "d", lesion_label="tumour")
    with pytest.raises(NnUNetFormatError, match="labelsTs: missing"):
        (tmp_path / "d" / "imagesTs").mkdir()
        NnUNetRawDataset(tmp_path / "d", split="Ts")
    with pytest.raises(ValueError, match="divisible by 16"):
        NnUNetRawDataset(tmp_path / "d", shape=(16, 16, 20))


# --------------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------------


def _aligned_item():
    """An item whose channel 0 is exactly 10 * mask, so alignment can be read off the image."""
    base = PhantomDataset(1, shape=(16, 32, 24), seed=2, settings=LesionSettings(zero_fraction=0.0))[0]
    image = base["image"].clone()
    image[0] = base["mask"][0] * 10.0
    return {**base, "image": image}


def test_augmentation_without_transform_is_identity_and_flips_exact():
    item = _aligned_item()
    same = RandomAffineFlip(flip_prob=0.0, affine_prob=0.0)(item, torch.Generator().manual_seed(0))
    assert torch.equal(same["image"], item["image"]) and torch.equal(same["mask"], item["mask"])
    flipped = RandomAffineFlip(flip_prob=1.0, affine_prob=0.0)(item, torch.Generator().manual_seed(0))
    assert torch.equal(flipped["image"], torch.flip(item["image"], (1, 2, 3)))
    assert torch.equal(flipped["mask"], torch.flip(item["mask"], (1, 2, 3)))
    assert int(flipped["count"]) == int(item["count"])


def test_affine_matches_scipy_voxel_space_transform():
    item = _aligned_item()
    aug = RandomAffineFlip(flip_prob=0.0, affine_prob=1.0, max_rotation_deg=8.0, connectivity=26)
    out = aug(item, torch.Generator().manual_seed(4))
    params = aug.sample(torch.Generator().manual_seed(4))
    # independent voxel-space reference: p_in - c = R diag(1/s) (p_out - c), c = (n - 1) / 2
    from lesioncount.train.data import _rotation_matrix

    matrix = (_rotation_matrix(params["angles"]) @ torch.diag(1.0 / params["scales"])).numpy()
    center = (np.array(item["mask"].shape[1:]) - 1) / 2.0
    offset = center - matrix @ center
    ref_mask = ndimage.affine_transform(item["mask"][0].numpy(), matrix, offset=offset, order=0, mode="constant")
    agree = (ref_mask == out["mask"][0].numpy()).mean()
    assert agree > 0.995
    ref_img = ndimage.affine_transform(item["image"][1].numpy().astype(np.float64), matrix, offset=offset, order=1,
                                       mode="nearest")
    np.testing.assert_allclose(out["image"][1].numpy(), ref_img, atol=1e-3)


def test_augmentation_keeps_alignment_and_count_consistent():
    item = _aligned_item()
    aug = RandomAffineFlip(flip_prob=0.5, affine_prob=1.0, max_rotation_deg=10.0, connectivity=6)
    for seed in range(4):
        out = aug(item, torch.Generator().manual_seed(seed))
        again = aug(item, torch.Generator().manual_seed(seed))
        assert torch.equal(out["image"], again["image"]) and torch.equal(out["mask"], again["mask"])
        mask = out["mask"][0].numpy() > 0.5
        assert set(torch.unique(out["mask"]).tolist()) <= {0.0, 1.0}
        bright = out["image"][0].numpy() > 5.0
        dice = 2 * (mask & bright).sum() / max(1, mask.sum() + bright.sum())
        assert dice > 0.7  # nearest vs thresholded trilinear differ on the rims of small lesions
        # aligned: the image matches the mask better than it matches the mask shifted by one voxel
        image0 = out["image"][0].numpy().ravel()

        def corr(m):
            return np.corrcoef(image0, m.ravel().astype(np.float64))[0, 1]

        aligned = corr(mask)
        assert aligned > 0.8
        for axis in range(3):
            for step in (-1, 1):
                assert aligned > corr(np.roll(mask, step, axis=axis)) + 0.1
        assert int(out["count"]) == scipy_count(mask, 6)
        assert out["image"].shape == item["image"].shape and out["name"] == item["name"]


def test_dataset_transform_depends_on_epoch():
    ds = PhantomDataset(2, shape=SMALL, seed=0, transform=RandomAffineFlip(flip_prob=0.5))
    a = ds[0]["image"]
    assert torch.equal(a, ds[0]["image"])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[0]["image"])


# --------------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------------


def test_build_datasets_phantom_disjoint():
    train, val, test = build_datasets("phantom", num_train=3, num_val=2, num_test=2, shape=SMALL, seed=5,
                                      connectivity=26)
    names = [ds[i]["name"] for ds in (train, val, test) for i in range(len(ds))]
    assert len(set(names)) == 7
    assert train.connectivity == val.connectivity == test.connectivity == 26
    with pytest.raises(ValueError, match="source"):
        build_datasets("mnist", num_train=1, num_val=1, num_test=1, shape=SMALL, seed=0, connectivity=18)
    with pytest.raises(ValueError, match="data_dir"):
        build_datasets("nnunet", num_train=1, num_val=1, num_test=1, shape=SMALL, seed=0, connectivity=18)


# --------------------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------------------

needs_mni = pytest.mark.skipif(anatomy.nilearn_template_dir() is None, reason="nilearn's MNI152 files not installed")


@needs_mni
def test_anatomy_case_with_mni152():
    case = anatomy.generate_anatomy_case(1, shape=(16, 32, 32), seed=0, source="mni152")
    assert case.image.shape == (5, 16, 32, 32) and case.name == "anatomy_mni152_s0_000001"
    again = anatomy.generate_anatomy_case(1, shape=(16, 32, 32), seed=0, source="mni152")
    assert np.array_equal(case.image, again.image) and np.array_equal(case.mask, again.mask)
    for conn in (6, 18, 26):
        assert case.count(conn) == scipy_count(case.mask, conn)
    t1, t2 = SEQUENCES.index("T1"), SEQUENCES.index("T2")
    wm = _interior(case.tissue == WM, case.mask.astype(bool) | case.distractor_mask)
    gm = _interior(case.tissue == GM, case.mask.astype(bool) | case.distractor_mask)
    assert np.median(case.image[t1][wm]) > np.median(case.image[t1][gm])
    assert np.median(case.image[t2][gm]) > np.median(case.image[t2][wm])
    ds = AnatomyPhantomDataset(6, shape=(16, 32, 32), seed=0, connectivity=18)
    counts = [int(ds[i]["count"]) for i in range(6)]
    assert ds[0]["image"].shape == (5, 16, 32, 32)
    assert counts == [anatomy.generate_anatomy_case(i, (16, 32, 32), 0).count(18) for i in range(6)]


def test_anatomy_missing_source_message(monkeypatch):
    monkeypatch.setattr(anatomy, "nilearn_template_dir", lambda: None)
    monkeypatch.setattr(anatomy, "colin27_path", lambda: None)
    with pytest.raises(MissingExtraError) as info:
        anatomy.resolve_source()
    assert "pip install nilearn" in str(info.value) and "'.[anatomy]'" in str(info.value)
    assert "pip install 'lesioncount[" not in str(info.value)  # not on PyPI
    assert "apt install mricron-data" in str(info.value)
    with pytest.raises(MissingExtraError, match="pip install nilearn"):
        AnatomyPhantomDataset(2, shape=SMALL)
    with pytest.raises(MissingExtraError, match="mricron-data"):
        anatomy.resolve_source("colin27")
    with pytest.raises(ValueError, match="source"):
        anatomy.resolve_source("bigbrain")


def test_colin27_branch_on_a_synthetic_template(tmp_path, monkeypatch):
    """The Colin27 code path (T1 intensities -> soft CSF/GM/WM) on a stand-in ch2bet-like file."""
    shape_xyz = (40, 48, 36)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_xyz], indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    t1 = np.where(r < 0.9, 70.0, 0.0)            # grey matter shell
    t1 = np.where(r < 0.7, 110.0, t1)             # white matter
    t1 = np.where(r < 0.2, 30.0, t1)              # ventricle (CSF)
    path = tmp_path / "ch2bet.nii.gz"
    _write_nifti(path, t1.astype(np.uint8))
    monkeypatch.setattr(anatomy, "nilearn_template_dir", lambda: None)
    monkeypatch.setenv("LESIONCOUNT_COLIN27", str(path))
    anatomy.load_template.cache_clear()
    anatomy._smoothed_template.cache_clear()
    try:
        assert anatomy.resolve_source() == "colin27"
        template = anatomy.load_template("colin27")
        center = tuple(n // 2 for n in template.gm.shape)
        assert template.csf[center] > 0.9
        assert template.wm.max() > 0.9 and template.gm.max() > 0.9
        case = anatomy.generate_anatomy_case(0, shape=(16, 32, 32), seed=0, source="colin27")
        assert case.name.startswith("anatomy_colin27") and case.count(18) == scipy_count(case.mask, 18)
    finally:
        anatomy.load_template.cache_clear()
        anatomy._smoothed_template.cache_clear()
