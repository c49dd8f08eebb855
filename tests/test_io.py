"""lesioncount.io: NIfTI / nnU-Net .npz / .npy reading with geometry, label map writing, errors."""
from __future__ import annotations

import gzip
import pathlib
import warnings

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from lesioncount.io import (  # noqa: E402
    CaseReadError,
    Volume,
    case_name,
    find_cases,
    read_mask,
    read_probability_map,
    write_label_map,
)

# Anisotropic spacing (0.8, 1.2, 3.0) mm, axes permuted and the second one flipped, and an offset.
AFFINE = np.array([
    [0.0, -1.2, 0.0, 10.0],
    [0.8, 0.0, 0.0, -5.0],
    [0.0, 0.0, 3.0, 2.5],
    [0.0, 0.0, 0.0, 1.0],
])
SHAPE_XYZ = (24, 20, 16)


def _random_map(shape=SHAPE_XYZ, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).random(shape).astype(dtype)


def _save_nifti(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


# ----------------------------------------------------------------------------- NIfTI


def test_nifti_round_trip_keeps_data_and_affine(tmp_path):
    data = _random_map()
    path = _save_nifti(tmp_path / "case_a.nii.gz", data)
    vol = read_probability_map(path)
    assert vol.name == "case_a" and vol.path == path
    assert vol.data.dtype == np.float32 and vol.data.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, nib.load(str(path)).affine)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, (0.8, 1.2, 3.0), rtol=1e-6)
    assert vol.voxel_volume == pytest.approx(0.8 * 1.2 * 3.0, rel=1e-6)
    idx = np.array([[0, 0, 0], [3, 7, 11], [23, 19, 15]])
    expected = (AFFINE @ np.c_[idx, np.ones(3)].T).T[:, :3]
    np.testing.assert_allclose(vol.world(idx), expected, atol=1e-5)


def test_uncompressed_nifti_float64_and_integer_data(tmp_path):
    data64 = _random_map(dtype=np.float64)
    vol = read_probability_map(_save_nifti(tmp_path / "f64.nii", data64))
    assert vol.data.dtype == np.float64
    np.testing.assert_array_equal(vol.data, data64)
    ints = (np.arange(np.prod(SHAPE_XYZ)).reshape(SHAPE_XYZ) % 2).astype(np.uint8)
    vol = read_probability_map(_save_nifti(tmp_path / "u8.nii.gz", ints))
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, ints)


def test_nifti2_and_scaled_integer_maps(tmp_path):
    data = _random_map()
    path = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti2Image(data, AFFINE), str(path))
    vol = read_probability_map(path)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-6)
    stored = (np.arange(np.prod(SHAPE_XYZ)) % 101).astype(np.int16).reshape(SHAPE_XYZ)
    img = nib.Nifti1Image(stored, AFFINE)
    img.header.set_slope_inter(0.01, 0.0)  # probabilities stored as scaled integers
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    vol = read_probability_map(tmp_path / "scaled.nii.gz")
    assert vol.data.dtype.kind == "f" and vol.data.flags.writeable
    np.testing.assert_allclose(vol.data, stored * 0.01, rtol=1e-6)
    tiny = tmp_path / "tiny.nii.gz"  # a shape whose F-ordered array is also C-contiguous
    nib.save(nib.Nifti1Image(data[:1, :1, :], AFFINE), str(tiny))
    vol = read_probability_map(tiny)
    assert vol.data.flags.writeable and vol.data.shape == (1, 1, SHAPE_XYZ[2])


def test_nifti_4d_singleton_and_multichannel(tmp_path):
    data = _random_map()
    vol = read_probability_map(_save_nifti(tmp_path / "single.nii.gz", data[..., None]))
    np.testing.assert_array_equal(vol.data, data)  # channel ignored for a singleton 4th dim
    stack = np.stack([1 - data, data, data * 0.5], axis=-1)
    path = _save_nifti(tmp_path / "multi.nii.gz", stack)
    np.testing.assert_array_equal(read_probability_map(path, channel=1).data, data)
    np.testing.assert_array_equal(read_probability_map(path, channel=2).data, data * 0.5)
    with pytest.raises(CaseReadError, match=r"multi\.nii\.gz: channel 3 out of range: the image has 3 channels"):
        read_probability_map(path, channel=3)


def test_nifti_wrong_rank(tmp_path):
    path = _save_nifti(tmp_path / "flat.nii.gz", np.zeros((5, 6), np.float32))
    with pytest.raises(CaseReadError, match=r"flat\.nii\.gz: expected a 3-D image .* got 2-D shape \(5, 6\)"):
        read_probability_map(path)


def test_truncated_and_garbage_nifti(tmp_path):
    good = _save_nifti(tmp_path / "good.nii.gz", _random_map())
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(CaseReadError, match=r"truncated\.nii\.gz: .*(truncated or corrupt|cannot read)") as info:
        read_probability_map(truncated)
    assert info.value.path == truncated
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header" * 3))
    with pytest.raises(CaseReadError, match=r"garbage\.nii\.gz: cannot read NIfTI header"):
        read_probability_map(garbage)
    with pytest.raises(CaseReadError, match=r"missing\.nii\.gz: no such file"):
        read_probability_map(tmp_path / "missing.nii.gz")


def test_degenerate_affine_is_rejected(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE_XYZ)
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = AFFINE[0], AFFINE[1], [0.0, 0.0, 0.0, 2.5]
    header["sform_code"], header["qform_code"] = 1, 0  # nibabel cannot build this from an affine
    path = tmp_path / "flat_affine.nii.gz"
    nib.save(nib.Nifti1Image(_random_map(), None, header=header), str(path))
    with pytest.raises(CaseReadError, match=r"flat_affine\.nii\.gz: degenerate affine"):
        read_probability_map(path)


# ----------------------------------------------------------------------------- nnU-Net .npz


def _write_nnunet_case(folder: pathlib.Path, name: str, probs_czyx: np.ndarray, seg_zyx: np.ndarray,
                       spacing_xyz=(0.7, 1.1, 2.5), origin=(12.0, -30.0, 5.0)):
    """An nnU-Net v2 prediction: CASE.npz (C, z, y, x) and CASE.nii.gz written by SimpleITK."""
    sitk = pytest.importorskip("SimpleITK")
    np.savez_compressed(folder / f"{name}.npz", probabilities=probs_czyx)
    image = sitk.GetImageFromArray(seg_zyx.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    # a rotation about z by 90 degrees (direction cosines as columns, row-major flattened)
    image.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    return image


def _nnunet_arrays(shape_zyx=(16, 20, 24)):
    z, y, x = shape_zyx
    seg = np.zeros(shape_zyx, np.uint8)
    seg[2:5, 3:6, 17:22] = 1  # asymmetric placement: near high x, low y, low z
    probs1 = np.where(seg > 0, 0.9, 0.01).astype(np.float32)
    probs1[3, 4, 19] = 0.97
    probs = np.stack([1 - probs1, probs1])
    return probs, seg


def test_simpleitk_axis_convention_matches_nibabel(tmp_path):
    probs, seg = _nnunet_arrays()
    image = _write_nnunet_case(tmp_path, "sitk", probs, seg)
    sitk_seg = nib.load(str(tmp_path / "sitk.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(sitk_seg.dataobj), seg.transpose(2, 1, 0))
    # nibabel's affine is SimpleITK's index->physical map (LPS) converted to RAS.
    for index in [(0, 0, 0), (19, 4, 3), (23, 19, 15)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = lps * np.array([-1.0, -1.0, 1.0])
        np.testing.assert_allclose(sitk_seg.affine @ np.r_[index, 1.0], np.r_[ras, 1.0], atol=1e-5)


def test_nnunet_npz_is_transposed_to_the_nifti_grid(tmp_path):
    probs, seg = _nnunet_arrays()
    _write_nnunet_case(tmp_path, "case_007", probs, seg)
    vol = read_probability_map(tmp_path / "case_007.npz")
    sibling = nib.load(str(tmp_path / "case_007.nii.gz"))
    assert vol.name == "case_007"
    assert vol.data.shape == sibling.shape == (24, 20, 16)
    np.testing.assert_array_equal(vol.data, probs[1].transpose(2, 1, 0))
    np.testing.assert_allclose(vol.affine, sibling.affine)
    # the lesion sits where the sibling segmentation says, in (i, j, k) = (x, y, z)
    assert vol.data[19, 4, 3] == np.float32(0.97)
    np.testing.assert_array_equal(vol.data > 0.5, np.asanyarray(sibling.dataobj) > 0)
    np.testing.assert_allclose(vol.spacing, (0.7, 1.1, 2.5), rtol=1e-6)
    vol0 = read_probability_map(tmp_path / "case_007.npz", channel=0)
    np.testing.assert_array_equal(vol0.data, probs[0].transpose(2, 1, 0))
    # nnU-Net may store float16 probabilities: returned as float32, same grid
    np.savez_compressed(tmp_path / "case_007.npz", probabilities=probs.astype(np.float16))
    vol16 = read_probability_map(tmp_path / "case_007.npz")
    assert vol16.data.dtype == np.float32 and vol16.data.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(vol16.data, probs[1].astype(np.float16).astype(np.float32).transpose(2, 1, 0))


def test_nnunet_errors(tmp_path):
    probs, seg = _nnunet_arrays()
    _write_nnunet_case(tmp_path, "ok", probs, seg)
    with pytest.raises(CaseReadError, match=r"ok\.npz: channel 2 out of range: 'probabilities' has 2 channels"):
        read_probability_map(tmp_path / "ok.npz", channel=2)
    np.savez(tmp_path / "nokey.npz", softmax=probs)
    with pytest.raises(CaseReadError, match=r"nokey\.npz: missing key 'probabilities'.*softmax"):
        read_probability_map(tmp_path / "nokey.npz")
    np.savez(tmp_path / "rank3.npz", probabilities=probs[1])
    with pytest.raises(CaseReadError, match=r"rank3\.npz: 'probabilities' must be 4-D \(C, z, y, x\)"):
        read_probability_map(tmp_path / "rank3.npz")
    # probabilities not transposed by the writer (x, y, z order): shape differs from the sibling
    np.savez(tmp_path / "mismatch.npz", probabilities=probs.transpose(0, 3, 2, 1))
    (tmp_path / "mismatch.nii.gz").write_bytes((tmp_path / "ok.nii.gz").read_bytes())
    with pytest.raises(CaseReadError, match=r"mismatch\.npz: shape mismatch: .* \(16, 20, 24\).* mismatch\.nii\.gz has shape \(24, 20, 16\)"):
        read_probability_map(tmp_path / "mismatch.npz")
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "broken.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CaseReadError, match=r"broken\.npz: cannot read \.npz archive"):
        read_probability_map(tmp_path / "broken.npz")


def test_nnunet_missing_sibling(tmp_path):
    probs, _ = _nnunet_arrays()
    np.savez(tmp_path / "alone.npz", probabilities=probs)
    with pytest.raises(CaseReadError, match=r"alone\.npz: sibling segmentation .*alone\.nii\.gz not found"):
        read_probability_map(tmp_path / "alone.npz")
    with pytest.warns(UserWarning, match="identity affine"):
        vol = read_probability_map(tmp_path / "alone.npz", missing_geometry="identity")
    np.testing.assert_array_equal(vol.affine, np.eye(4))
    np.testing.assert_array_equal(vol.data, probs[1].transpose(2, 1, 0))
    with pytest.raises(ValueError, match="missing_geometry"):
        read_probability_map(tmp_path / "alone.npz", missing_geometry="guess")


def test_pkl_is_never_opened(tmp_path):
    probs, seg = _nnunet_arrays()
    _write_nnunet_case(tmp_path, "p", probs, seg)
    (tmp_path / "p.pkl").write_bytes(b"\x80\x04this would explode if unpickled")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vol = read_probability_map(tmp_path / "p.npz")
    assert vol.data.shape == (24, 20, 16)


# ----------------------------------------------------------------------------- .npy, masks, discovery


def test_npy_identity_geometry_and_rank(tmp_path):
    data = _random_map()
    np.save(tmp_path / "arr.npy", data)
    vol = read_probability_map(tmp_path / "arr.npy")
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_array_equal(vol.affine, np.eye(4))
    assert vol.spacing == (1.0, 1.0, 1.0) and vol.voxel_volume == 1.0
    np.save(tmp_path / "four.npy", data[None])
    with pytest.raises(CaseReadError, match=r"four\.npy: expected a 3-D array .* got 4-D"):
        read_probability_map(tmp_path / "four.npy")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(CaseReadError, match=r"junk\.npy: cannot read \.npy file"):
        read_probability_map(tmp_path / "junk.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(CaseReadError, match=r"objects\.npy"):
        read_probability_map(tmp_path / "objects.npy")


def test_read_mask_keeps_raw_values(tmp_path):
    mask = np.zeros(SHAPE_XYZ, np.uint8)
    mask[2:10, 3:9, 1:4] = 1
    vol = read_mask(_save_nifti(tmp_path / "m.nii.gz", mask))
    assert vol.data.dtype == np.uint8
    np.testing.assert_array_equal(vol.data, mask)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-6)
    np.savez(tmp_path / "m2.npz", probabilities=mask[None])
    with pytest.raises(CaseReadError, match=r"m2\.npz: masks must be"):
        read_mask(tmp_path / "m2.npz")
    with pytest.raises(CaseReadError, match=r"m4\.nii\.gz: expected a 3-D image, got 4-D"):
        read_mask(_save_nifti(tmp_path / "m4.nii.gz", np.stack([mask, mask], -1)))


def test_case_name_and_find_cases(tmp_path):
    assert case_name("a/b/BRATS_001.nii.gz") == "BRATS_001"
    assert case_name("x.NII") == "x"
    assert case_name("c.npz") == "c" and case_name("d.npy") == "d"
    with pytest.raises(CaseReadError, match="unsupported file type"):
        case_name("x.mha")
    probs, seg = _nnunet_arrays()
    _write_nnunet_case(tmp_path, "b_case", probs, seg)  # b_case.nii.gz is geometry only: skipped
    _save_nifti(tmp_path / "c_case.nii.gz", _random_map())
    np.save(tmp_path / "a_case.npy", _random_map())
    (tmp_path / "b_case.pkl").write_bytes(b"")
    (tmp_path / "plans.json").write_text("{}")
    (tmp_path / ".hidden.npy").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in find_cases(tmp_path)] == ["a_case.npy", "b_case.npz", "c_case.nii.gz"]
    assert find_cases(tmp_path / "c_case.nii.gz") == [tmp_path / "c_case.nii.gz"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_cases(tmp_path / "nowhere")
    np.save(tmp_path / "c_case.npy", _random_map())
    with pytest.raises(CaseReadError, match=r"case id 'c_case' is also used by"):
        find_cases(tmp_path)


# ----------------------------------------------------------------------------- writing


def test_write_label_map_dtype_and_affine(tmp_path):
    labels = np.zeros(SHAPE_XYZ, np.int32)
    labels[1:3, 2:4, 5] = 1
    labels[20, 10, 10] = 2
    path = tmp_path / "labels.nii.gz"
    write_label_map(path, labels, AFFINE)
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), labels)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    assert img.header.get_xyzt_units()[0] == "mm"
    labels[0, 0, 0] = 40000  # more labels than int16 holds
    write_label_map(path, labels, AFFINE)
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.int32
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), labels)
    import torch

    write_label_map(tmp_path / "t.nii", torch.from_numpy(labels), AFFINE)  # tensors accepted
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "t.nii")).dataobj), labels)
    with pytest.raises(ValueError, match=">= 0"):
        write_label_map(path, -labels, AFFINE)
    with pytest.raises(TypeError, match="integer"):
        write_label_map(path, labels.astype(np.float32), AFFINE)
    with pytest.raises(ValueError, match="3-D"):
        write_label_map(path, labels[0], AFFINE)


def test_volume_properties_with_shear_free_rotation():
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.5, 2.0, 1.5])
    vol = Volume(np.zeros((2, 2, 2), np.float32), affine, "r", pathlib.Path("r.npy"))
    np.testing.assert_allclose(vol.spacing, (0.5, 2.0, 1.5))
    assert vol.voxel_volume == pytest.approx(1.5)
