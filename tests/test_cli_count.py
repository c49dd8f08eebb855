"""``lesioncount count`` and lesioncount.report: results on real files against independent computations."""
from __future__ import annotations

import csv
import itertools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")
ndimage = pytest.importorskip("scipy.ndimage")

import lesioncount  # noqa: E402
from lesioncount.cli import main  # noqa: E402
from lesioncount.io import Volume  # noqa: E402
from lesioncount.report import (  # noqa: E402
    CountSettings,
    case_report,
    count_volume,
    credible_interval,
    lesion_table,
    min_size_for_volume,
    summary_fields,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
AFFINE = np.array([  # spacing (0.8, 1.2, 3.0) mm, axes permuted, one flipped, offset
    [0.0, -1.2, 0.0, 10.0],
    [0.8, 0.0, 0.0, -5.0],
    [0.0, 0.0, 3.0, 2.5],
    [0.0, 0.0, 0.0, 1.0],
])
SHAPE = (24, 20, 16)
STRUCT18 = ndimage.generate_binary_structure(3, 2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _maps(n, seed=0):
    from lesioncount.synthetic import realistic_probability_maps

    return realistic_probability_maps(n, SHAPE, num_lesions=(1, 4), radius=(1.5, 2.5), seed=seed).numpy()


def _write_folder(folder: pathlib.Path, maps, affine=AFFINE, prefix="case"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for b, m in enumerate(maps):
        path = folder / f"{prefix}_{b:02d}.nii.gz"
        nib.save(nib.Nifti1Image(m, affine), str(path))
        paths.append(path)
    return paths


def _run(*argv):
    return main(["count", "-q", *[str(a) for a in argv]])


def _load(out, name):
    return json.loads((out / f"{name}.json").read_text())


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- report pieces


def _credible_brute_force(pmf, level):
    best = None
    for lo, hi in itertools.combinations_with_replacement(range(len(pmf)), 2):
        mass = sum(pmf[lo:hi + 1])
        if mass >= level - 1e-9:
            key = (hi - lo, -mass, lo)
            if best is None or key < best[0]:
                best = (key, (lo, hi))
    return best[1]


def test_credible_interval_hand_cases_and_brute_force():
    assert credible_interval([0.02, 0.1, 0.6, 0.25, 0.03])[:2] == (1, 3)
    assert credible_interval([0.0, 0.95, 0.05, 0.0, 0.0])[:2] == (1, 1)
    assert credible_interval([0.05, 0.05, 0.9, 0.0, 0.0])[:2] == (2, 2)  # exactly 0.9 counts
    assert credible_interval([0.0, 0.0, 0.0, 0.08, 0.92])[:2] == (4, 4)  # "4 or more"
    assert credible_interval([0.5, 0.5])[:2] == (0, 1)
    lo, hi, mass = credible_interval([0.2, 0.3, 0.3, 0.2], level=0.5)
    assert (lo, hi) == (1, 2) and mass == pytest.approx(0.6)  # 2-bin ties: the larger mass wins
    rng = np.random.default_rng(1)
    for _ in range(200):
        probs = rng.random(rng.integers(1, 8)) ** 2
        pmf = lesioncount.poisson_binomial(torch.tensor(probs[None]), 4)[0].double().numpy()
        for level in (0.5, 0.9, 0.99):
            assert credible_interval(pmf, level)[:2] == _credible_brute_force(list(pmf), level)
    with pytest.raises(ValueError, match="level"):
        credible_interval([1.0], level=0.0)


def test_min_size_for_volume():
    assert min_size_for_volume(10.0, 1.5) == 7  # 6.67 -> 7
    assert min_size_for_volume(6.0, 1.5) == 4  # exact multiple stays 4
    assert min_size_for_volume(5.76, 0.8 * 1.2 * 3.0) == 2  # float error does not push it to 3
    assert min_size_for_volume(0.0, 2.0) == 0
    with pytest.raises(ValueError):
        min_size_for_volume(1.0, 0.0)


def test_lesion_table_matches_per_lesion_scipy():
    rng = np.random.default_rng(3)
    probs = ndimage.gaussian_filter(rng.random(SHAPE), 1.0)
    probs = (probs - probs.min()) / (probs.max() - probs.min())
    labels, num = ndimage.label(probs > 0.6, STRUCT18)
    assert num >= 3
    ids = np.arange(1, num + 1)
    maxima = ndimage.maximum(probs, labels, ids)
    argmax = np.array([np.ravel_multi_index(ndimage.maximum_position(probs, labels, i), SHAPE) for i in ids])
    rows = lesion_table(labels, np.r_[ids, 0], np.r_[maxima, 0], np.r_[argmax, -1], AFFINE)
    assert [r["id"] for r in rows] == list(ids)
    centroids = ndimage.center_of_mass(np.ones(SHAPE), labels, ids)
    for row, lesion in zip(rows, ids):
        mask = labels == lesion  # the per-lesion reference (fine in a test)
        where = np.argwhere(mask)
        assert row["size_voxels"] == mask.sum()
        assert row["volume_mm3"] == pytest.approx(mask.sum() * 0.8 * 1.2 * 3.0)
        assert row["bbox_index_min"] == where.min(0).tolist()
        assert row["bbox_index_max"] == where.max(0).tolist()
        np.testing.assert_allclose(row["centroid_index"], centroids[lesion - 1])
        np.testing.assert_allclose(row["centroid_world_mm"], (AFFINE @ np.r_[centroids[lesion - 1], 1])[:3])
        assert probs[tuple(row["argmax_index"])] == row["probability"] == probs[mask].max()
        np.testing.assert_allclose(row["argmax_world_mm"], (AFFINE @ np.r_[row["argmax_index"], 1])[:3])
    assert lesion_table(np.zeros(SHAPE, np.int32), np.zeros(3), np.zeros(3), -np.ones(3), AFFINE) == []


def test_count_volume_with_mask_and_logits():
    data = _maps(1, seed=5)[0]
    vol = Volume(data, AFFINE, "v", pathlib.Path("v.nii.gz"))
    mask = np.zeros(SHAPE, bool)
    mask[:12] = True
    settings = CountSettings(threshold=0.2, max_count=3)
    counted = count_volume(vol, settings, mask=mask)
    ref = lesioncount.count_distribution(torch.from_numpy(np.where(mask, data, 0))[None], threshold=0.2, max_count=3)
    torch.testing.assert_close(counted.result.pmf, ref.pmf)
    assert counted.cc_count == int(lesioncount.cc_count(torch.from_numpy(np.where(mask, data, 0))[None], 0.5))
    logits = np.log(data) - np.log1p(-data)
    lvol = Volume(logits, AFFINE, "l", pathlib.Path("l.nii.gz"))
    lcount = count_volume(lvol, CountSettings(from_logits=True))
    pcount = count_volume(vol, CountSettings())
    torch.testing.assert_close(lcount.result.pmf.double(), pcount.result.pmf.double(), atol=1e-5, rtol=0)
    assert lcount.cc_count == pcount.cc_count
    with pytest.raises(ValueError, match=r"mask shape \(24, 20, 15\) does not match"):
        count_volume(vol, settings, mask=mask[..., :15])
    bad = data.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        count_volume(Volume(bad, AFFINE, "n", pathlib.Path("n.npy")), settings)
    with pytest.raises(ValueError, match="either min_size"):
        CountSettings(min_size=3, min_volume=2.0)


# ----------------------------------------------------------------------------- the command on NIfTI files


def test_cli_equals_count_distribution_and_world_coordinates(tmp_path):
    maps = _maps(3, seed=11)
    paths = _write_folder(tmp_path / "in", maps)
    out = tmp_path / "out"
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.1, "--max-count", 4, "--save-labels") == 0
    summary = _csv(out / "summary.csv")
    assert [r["case"] for r in summary] == [f"case_{b:02d}" for b in range(3)]
    assert list(summary[0]) == summary_fields(4)
    for b, path in enumerate(paths):
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # as the user would read it: (i, j, k)
        report = _load(out, f"case_{b:02d}")
        ref = lesioncount.count_distribution(torch.from_numpy(np.ascontiguousarray(data))[None], threshold=0.1,
                                             connectivity=18, max_count=4)
        np.testing.assert_allclose(report["count"]["pmf"], ref.pmf[0].numpy(), atol=1e-6)
        assert report["count"]["expected_count"] == pytest.approx(float(ref.expected_count[0]), abs=1e-6)
        assert report["count"]["entropy_nats"] == pytest.approx(float(ref.entropy[0]), abs=1e-6)
        assert report["count"]["most_likely"] == int(ref.most_likely_count[0])
        np.testing.assert_allclose([r["probability"] for r in report["lesions"]],
                                   ref.lesion_probs[0][ref.lesion_ids[0] > 0].numpy(), atol=1e-6)
        # independent: SciPy labels on the (i, j, k) grid, world = nibabel affine @ index
        labels, num = ndimage.label(data > 0.1, STRUCT18)
        assert report["n_candidates"] == num == len(report["lesions"])
        assert report["baseline"]["cc_count"] == ndimage.label(data > 0.5, STRUCT18)[1]
        centroids = ndimage.center_of_mass(np.ones(data.shape), labels, range(1, num + 1))
        for row in report["lesions"]:
            i = row["id"]
            assert data[tuple(row["argmax_index"])] == pytest.approx(row["probability"], abs=1e-7)
            assert data[labels == i].max() == pytest.approx(row["probability"], abs=1e-7)
            np.testing.assert_allclose(row["argmax_world_mm"], (img.affine @ np.r_[row["argmax_index"], 1])[:3], atol=1e-5)
            np.testing.assert_allclose(row["centroid_index"], centroids[i - 1], atol=1e-9)
            np.testing.assert_allclose(row["centroid_world_mm"], (img.affine @ np.r_[centroids[i - 1], 1])[:3], atol=1e-5)
            assert row["size_voxels"] == (labels == i).sum()
        saved = nib.load(str(out / f"case_{b:02d}_labels.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(saved.dataobj), labels)
        np.testing.assert_allclose(saved.affine, img.affine)
        row = summary[b]
        assert row["P(4+)"] and float(row["expected_count"]) == pytest.approx(report["count"]["expected_count"])
        assert int(row["cc_count"]) == report["baseline"]["cc_count"]
        assert set(report["timings_s"]) == {"read_s", "read_cpu_s", "wait_s", "count_s", "write_s"}
        assert all(float(row[k]) >= 0 for k in ("read_s", "count_s", "write_s"))
    assert _csv(out / "errors.csv") == []


def test_min_volume_uses_the_spacing(tmp_path):
    # Four isolated lesions of 1, 2, 3 and 6 voxels, p = 0.9; voxel volume 0.8 * 1.2 * 3.0 = 2.88 mm^3.
    data = np.zeros(SHAPE, np.float32)
    data[2, 2, 2] = 0.9
    data[6, 2:4, 2] = 0.9
    data[10, 2:5, 2] = 0.9
    data[14:16, 2:5, 2] = 0.9
    nib.save(nib.Nifti1Image(data, AFFINE), str(tmp_path / "sizes.nii.gz"))
    voxel_volume = abs(np.linalg.det(nib.load(str(tmp_path / "sizes.nii.gz")).affine[:3, :3]))
    expected = {5.0: (2, 3), 8.7: (4, 1), 0.0: (0, 4), 2.88: (1, 4)}  # min_volume -> (voxels, lesions kept)
    for min_volume, (voxels, kept) in expected.items():
        assert min_size_for_volume(min_volume, voxel_volume) == voxels
        out = tmp_path / f"out_{min_volume}"
        assert _run("-i", tmp_path / "sizes.nii.gz", "-o", out, "--min-volume", min_volume) == 0
        report = _load(out, "sizes")
        assert report["settings"]["min_size_voxels"] == voxels
        assert report["settings"]["min_volume_mm3"] == min_volume
        assert report["n_candidates"] == kept
        assert all(r["volume_mm3"] >= min_volume for r in report["lesions"])
    out = tmp_path / "out_voxels"
    assert _run("-i", tmp_path / "sizes.nii.gz", "-o", out, "--min-size", 3) == 0
    assert _load(out, "sizes")["n_candidates"] == 2
    with pytest.raises(SystemExit):
        _run("-i", tmp_path / "sizes.nii.gz", "-o", out, "--min-size", 3, "--min-volume", 2)


def test_nnunet_layout_end_to_end(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    z, y, x = 16, 20, 24
    seg = np.zeros((z, y, x), np.uint8)
    seg[2:5, 3:6, 17:22] = 1  # lesion A: high x, low y, low z
    seg[10:13, 14:18, 2:4] = 1  # lesion B: low x, high y, high z
    lesion = np.where(seg > 0, 0.8, 0.02).astype(np.float32)
    lesion[10:13, 14:18, 2:4] = 0.5
    lesion[3, 4, 19] = 0.95
    lesion[11, 15, 3] = 0.6
    folder = tmp_path / "nnunet"
    folder.mkdir()
    np.savez_compressed(folder / "pat_01.npz", probabilities=np.stack([1 - lesion, lesion]))
    image = sitk.GetImageFromArray(seg)
    image.SetSpacing((0.9, 1.3, 2.0))
    image.SetOrigin((-40.0, 22.0, 7.5))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0))  # flip x, swap y/z
    sitk.WriteImage(image, str(folder / "pat_01.nii.gz"))
    (folder / "pat_01.pkl").write_bytes(b"not a pickle")
    out = tmp_path / "out"
    assert _run("-i", folder, "-o", out, "--save-labels") == 0
    assert sorted(p.name for p in out.iterdir()) == ["errors.csv", "lesions.csv", "pat_01.json", "pat_01_labels.nii.gz",
                                                     "summary.csv"]  # no lock or temporary file left
    report = _load(out, "pat_01")
    sibling = nib.load(str(folder / "pat_01.nii.gz"))
    assert report["shape"] == list(sibling.shape) == [x, y, z]
    np.testing.assert_allclose(report["affine"], sibling.affine)
    lesions = sorted(report["lesions"], key=lambda r: -r["probability"])
    assert [r["argmax_index"] for r in lesions] == [[19, 4, 3], [3, 15, 11]]  # (i, j, k) = (x, y, z)
    assert [r["probability"] for r in lesions] == pytest.approx([0.95, 0.6])
    assert [r["size_voxels"] for r in lesions] == [3 * 3 * 5, 3 * 4 * 2]
    assert lesions[0]["bbox_index_min"] == [17, 3, 2] and lesions[0]["bbox_index_max"] == [21, 5, 4]
    for row in lesions:  # world coordinates agree with SimpleITK's own index -> physical map (LPS -> RAS)
        lps = np.array(image.TransformIndexToPhysicalPoint(tuple(int(v) for v in row["argmax_index"])))
        np.testing.assert_allclose(row["argmax_world_mm"], lps * [-1, -1, 1], atol=1e-4)
    labels = nib.load(str(out / "pat_01_labels.nii.gz"))
    np.testing.assert_allclose(labels.affine, sibling.affine)
    np.testing.assert_array_equal(np.asanyarray(labels.dataobj) > 0, np.asanyarray(sibling.dataobj) > 0)
    ref = lesioncount.count_distribution(torch.from_numpy(lesion)[None], max_count=4)
    np.testing.assert_allclose(report["count"]["pmf"], ref.pmf[0].numpy(), atol=1e-6)
    # without the sibling: the case fails unless --allow-missing-geometry
    (folder / "pat_01.nii.gz").unlink()
    out2 = tmp_path / "out2"
    assert _run("-i", folder, "-o", out2) == 1
    assert "pat_01.nii.gz not found" in _csv(out2 / "errors.csv")[0]["error"]
    assert _run("-i", folder, "-o", out2, "--allow-missing-geometry", "--overwrite") == 0
    assert _load(out2, "pat_01")["affine"] == np.eye(4).tolist()


def test_bad_files_are_reported_and_the_rest_processed_subprocess(tmp_path):
    folder = tmp_path / "in"
    maps = _maps(2, seed=2)
    _write_folder(folder, maps)
    raw = (folder / "case_00.nii.gz").read_bytes()
    (folder / "corrupt.nii.gz").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(maps[0] * 2.5, AFFINE), str(folder / "range.nii.gz"))
    with_nan = maps[1].copy()
    with_nan[3, 3, 3] = np.nan
    np.save(folder / "nan.npy", with_nan)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lesioncount", "count", "-i", str(folder), "-o", str(out),
                           "--workers", "2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 1, proc.stderr
    errors = {r["case"]: r for r in _csv(out / "errors.csv")}
    assert set(errors) == {"corrupt", "range", "nan"}
    assert errors["corrupt"]["file"] == str(folder / "corrupt.nii.gz")
    assert "truncated or corrupt" in errors["corrupt"]["error"] or "cannot read" in errors["corrupt"]["error"]
    assert "[0, 1]" in errors["range"]["error"] and "--from-logits" in errors["range"]["error"]
    assert "NaN" in errors["nan"]["error"]
    for name in ("corrupt.nii.gz", "range.nii.gz", "nan.npy"):
        assert str(folder / name) in proc.stderr
    assert [r["case"] for r in _csv(out / "summary.csv")] == ["case_00", "case_01"]
    assert sorted(p.name for p in out.glob("*.json")) == ["case_00.json", "case_01.json"]
    assert "2 of 5 case(s) counted, 3 failed" in proc.stdout


def test_sharding_is_disjoint_and_covers(tmp_path):
    maps = _maps(7, seed=4)
    _write_folder(tmp_path / "in", maps)
    out = tmp_path / "out"
    seen = []
    for part in range(3):
        assert _run("-i", tmp_path / "in", "-o", out, "--num-parts", 3, "--part-id", part) == 0
        rows = _csv(out / f"summary.part-{part}-of-3.csv")
        seen.append([r["case"] for r in rows])
        assert seen[-1] == [f"case_{b:02d}" for b in range(part, 7, 3)]
    flat = [c for part in seen for c in part]
    assert len(flat) == len(set(flat)) == 7
    assert sorted(p.stem for p in out.glob("*.json")) == sorted(flat)
    assert _run("-i", tmp_path / "in", "-o", out, "--num-parts", 3, "--part-id", 3) == 2
    assert _run("-i", tmp_path / "in", "-o", out, "--num-parts", 0) == 2


def test_masks_shared_and_per_case(tmp_path):
    maps = _maps(2, seed=6)
    _write_folder(tmp_path / "in", maps)
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, :10] = 1
    nib.save(nib.Nifti1Image(mask, AFFINE), str(tmp_path / "brain.nii.gz"))
    out = tmp_path / "shared"
    nib.save(nib.Nifti1Image(mask, AFFINE), str(tmp_path / "in" / "brain.nii.gz"))  # inside the input folder
    assert _run("-i", tmp_path / "in", "-o", out, "--mask", tmp_path / "in" / "brain.nii.gz") == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["case_00.json", "case_01.json"]  # the mask is no case
    (tmp_path / "in" / "brain.nii.gz").unlink()
    assert _run("-i", tmp_path / "in", "-o", out, "--mask", tmp_path / "brain.nii.gz", "--overwrite") == 0
    for b in range(2):
        ref = lesioncount.count_distribution(torch.from_numpy(maps[b])[None], max_count=4,
                                             mask=torch.from_numpy(mask.astype(bool)))
        report = _load(out, f"case_{b:02d}")
        np.testing.assert_allclose(report["count"]["pmf"], ref.pmf[0].numpy(), atol=1e-6)
        assert report["settings"]["mask"] == str(tmp_path / "brain.nii.gz")
        assert all(r["bbox_index_max"][1] < 10 for r in report["lesions"])
    # per-case folder: case_00 gets the mask, case_01's mask is missing -> that case fails
    (tmp_path / "masks").mkdir()
    nib.save(nib.Nifti1Image(mask, AFFINE), str(tmp_path / "masks" / "case_00.nii.gz"))
    out = tmp_path / "per_case"
    assert _run("-i", tmp_path / "in", "-o", out, "--mask", tmp_path / "masks") == 1
    assert [r["case"] for r in _csv(out / "errors.csv")] == ["case_01"]
    assert "no mask for case 'case_01'" in _csv(out / "errors.csv")[0]["error"]
    # wrong shape and wrong affine
    nib.save(nib.Nifti1Image(mask[:, :, :8], AFFINE), str(tmp_path / "small.nii.gz"))
    assert _run("-i", tmp_path / "in", "-o", tmp_path / "o3", "--mask", tmp_path / "small.nii.gz") == 1
    assert "has shape (24, 20, 8)" in _csv(tmp_path / "o3" / "errors.csv")[0]["error"]
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "moved.nii.gz"))
    assert _run("-i", tmp_path / "in", "-o", tmp_path / "o4", "--mask", tmp_path / "moved.nii.gz") == 1
    assert "different affines" in _csv(tmp_path / "o4" / "errors.csv")[0]["error"]
    assert _run("-i", tmp_path / "in", "-o", tmp_path / "o5", "--mask", tmp_path / "absent.nii.gz") == 2


def test_existing_outputs_workers_logits_and_usage_errors(tmp_path, capsys):
    maps = _maps(3, seed=8)
    _write_folder(tmp_path / "in", maps)
    out = tmp_path / "out"
    assert _run("-i", tmp_path / "in", "-o", out, "--workers", 0) == 0
    first = [_load(out, f"case_{b:02d}") for b in range(3)]
    assert _run("-i", tmp_path / "in", "-o", out) == 2
    assert "already in" in capsys.readouterr().err
    (out / "case_01.json").unlink()
    assert _run("-i", tmp_path / "in", "-o", out, "--skip-existing", "--workers", 2) == 0
    assert [r["case"] for r in _csv(out / "summary.csv")] == ["case_00", "case_01", "case_02"]
    assert _load(out, "case_00")["timings_s"] == first[0]["timings_s"]  # kept, not recomputed
    assert _run("-i", tmp_path / "in", "-o", out, "--overwrite", "--workers", 3) == 0
    for b in range(3):
        assert _load(out, f"case_{b:02d}")["count"] == first[b]["count"]  # worker count changes nothing
    # logits written to disk give the same distribution with --from-logits
    logits = np.log(maps) - np.log1p(-maps)
    _write_folder(tmp_path / "logits", logits)
    assert _run("-i", tmp_path / "logits", "-o", tmp_path / "lo", "--from-logits") == 0
    for b in range(3):
        np.testing.assert_allclose(_load(tmp_path / "lo", f"case_{b:02d}")["count"]["pmf"], first[b]["count"]["pmf"],
                                   atol=1e-5)
    assert _run("-i", tmp_path / "logits", "-o", tmp_path / "lp") == 1  # logits without the flag: range error
    capsys.readouterr()
    assert _run("-i", tmp_path / "nothing", "-o", out) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _run("-i", tmp_path / "empty", "-o", out) == 2
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 1.5) == 2
    assert _run("-i", tmp_path / "in", "-o", out, "--max-count", 0) == 2
    assert _run("-i", tmp_path / "in", "-o", out, "--workers", -1) == 2
    if not torch.cuda.is_available():
        assert _run("-i", tmp_path / "in", "-o", out, "--device", "cuda", "--overwrite") == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_case_report_settings_and_version():
    data = np.zeros(SHAPE, np.float32)
    data[3, 4, 5] = 0.7
    data[20, 15, 10] = 0.4
    vol = Volume(data, AFFINE, "hand", pathlib.Path("hand.nii.gz"))
    settings = CountSettings(max_count=2, min_volume=1.0)
    report = case_report(vol, count_volume(vol, settings), settings)
    # hand-computed: P(0) = 0.3 * 0.6, P(1) = 0.7 * 0.6 + 0.3 * 0.4, P(2+) = 0.7 * 0.4
    np.testing.assert_allclose(report["count"]["pmf"], [0.18, 0.54, 0.28], atol=1e-7)
    assert report["count"]["bins"] == ["0", "1", "2+"]
    assert report["count"]["expected_count"] == pytest.approx(1.1)
    assert report["count"]["credible_interval"]["low"] == 0 and report["count"]["credible_interval"]["high_bin"] == "2+"
    assert report["lesioncount_version"] == lesioncount.__version__
    assert report["settings"]["min_size_voxels"] == 1 and report["settings"]["min_volume_mm3"] == 1.0
    assert report["baseline"] == {"cc_count": 1, "baseline_threshold": 0.5, "cc_count_at_threshold": 2}
    json.dumps(report)  # JSON-able


def _scipy_cc_count(values, cut, connectivity, min_size):
    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    labels, num = ndimage.label(values > cut, structure)
    sizes = np.bincount(labels.reshape(-1), minlength=num + 1)[1:]
    return int((sizes >= max(min_size, 1)).sum())


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_baseline_count_equals_an_independent_full_pass(connectivity):
    """count_volume counts the baseline inside the candidates' boxes; compare with SciPy on the full map."""
    rng = np.random.default_rng(connectivity)
    mask = np.ones(SHAPE, bool)
    mask[:, :, 12:] = False
    for trial in range(6):
        values = ndimage.gaussian_filter(rng.random(SHAPE), 0.8 + 0.2 * trial)
        values = ((values - values.min()) / (values.max() - values.min())).astype(np.float32)
        vol = Volume(values, AFFINE, "b", pathlib.Path("b.nii.gz"))
        for threshold, baseline, min_size in [(0.1, 0.5, 0), (0.3, 0.6, 2), (0.5, 0.5, 0), (0.6, 0.4, 0), (0.2, 0.7, 3)]:
            settings = CountSettings(threshold=threshold, connectivity=connectivity, min_size=min_size,
                                     baseline_threshold=baseline)
            got = count_volume(vol, settings).cc_count
            assert got == _scipy_cc_count(values.astype(np.float64), baseline, connectivity, min_size)
            assert got == int(lesioncount.cc_count(torch.from_numpy(values)[None], baseline, connectivity, min_size))
            masked = count_volume(vol, settings, mask=mask).cc_count
            assert masked == _scipy_cc_count(np.where(mask, values, 0.0), baseline, connectivity, min_size)
        logits = np.log(values + 1e-3) - np.log1p(-(values - 1e-3))
        lvol = Volume(logits, AFFINE, "l", pathlib.Path("l.nii.gz"))
        got = count_volume(lvol, CountSettings(connectivity=connectivity, from_logits=True)).cc_count
        assert got == _scipy_cc_count(logits, 0.0, connectivity, 0)


def test_case_without_candidates():
    vol = Volume(np.full(SHAPE, 0.05, np.float32), AFFINE, "empty", pathlib.Path("empty.nii.gz"))
    settings = CountSettings()
    counted = count_volume(vol, settings)
    report = case_report(vol, counted, settings)
    assert report["n_candidates"] == 0 and report["lesions"] == []
    assert report["count"]["pmf"] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert report["count"]["expected_count"] == 0.0 and report["count"]["entropy_nats"] == 0.0
    assert str(report["count"]["entropy_nats"]) == "0.0"  # not "-0.0" in the JSON and CSV
    assert (report["count"]["credible_interval"]["low"], report["count"]["credible_interval"]["high"]) == (0, 0)
    assert report["baseline"]["cc_count"] == 0


def test_skip_existing_refuses_results_computed_with_other_settings(tmp_path, capsys):
    """--skip-existing must not mix kept rows computed with another threshold/size rule/... into the summary."""
    maps = _maps(2, seed=9)
    _write_folder(tmp_path / "in", maps)
    out = tmp_path / "out"
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.1) == 0
    (out / "case_01.json").unlink()
    # case_00.json was counted at 0.1: with --threshold 0.3 it must not go into the 0.3 summary
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.3, "--skip-existing") == 1
    errors = _csv(out / "errors.csv")
    assert [r["case"] for r in errors] == ["case_00"]
    assert "threshold" in errors[0]["error"] and "--overwrite" in errors[0]["error"]
    assert [r["case"] for r in _csv(out / "summary.csv")] == ["case_01"]
    assert _load(out, "case_01")["settings"]["threshold"] == 0.3
    # same settings (device and worker count do not matter): kept
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.3, "--skip-existing", "--workers", 0) == 1
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.3, "--overwrite") == 0
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.3, "--skip-existing", "--workers", 0) == 0
    assert [r["case"] for r in _csv(out / "summary.csv")] == ["case_00", "case_01"]
    for flags in (["--min-size", 2], ["--connectivity", 6], ["--from-logits"], ["--baseline-threshold", 0.6],
                  ["--channel", 0]):
        assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.3, "--skip-existing", *flags) == 1, flags
        assert len(_csv(out / "errors.csv")) == 2
    capsys.readouterr()


def test_label_maps_saved_into_the_input_folder_are_not_cases_later(tmp_path, capsys):
    maps = _maps(2, seed=12)
    folder = tmp_path / "in"
    _write_folder(folder, maps)
    assert _run("-i", folder, "-o", folder, "--save-labels") == 0  # OUT_DIR = input folder
    assert (folder / "case_00_labels.nii.gz").is_file()
    # a later run into another folder must not count the integer label maps as probability maps
    assert main(["count", "-i", str(folder), "-o", str(tmp_path / "other")]) == 0
    assert "skipping 2 label map(s)" in capsys.readouterr().err
    assert [r["case"] for r in _csv(tmp_path / "other" / "summary.csv")] == ["case_00", "case_01"]
    # a file merely ending in _labels without its case is still a case
    (folder / "case_01_labels.nii.gz").rename(folder / "orphan_labels.nii.gz")
    nib.save(nib.Nifti1Image(maps[0], AFFINE), str(folder / "orphan_labels.nii.gz"))
    assert _run("-i", folder, "-o", tmp_path / "third") == 0
    assert [r["case"] for r in _csv(tmp_path / "third" / "summary.csv")] == ["case_00", "case_01", "orphan_labels"]


def test_case_names_with_dots_brackets_and_commas_survive_into_the_outputs(tmp_path):
    folder = tmp_path / "in"
    names = ["sub-01_ses-1.T2w", "scan[1,2]"]
    maps = _maps(2, seed=13)
    folder.mkdir()
    for name, m in zip(names, maps):
        nib.save(nib.Nifti1Image(m, AFFINE), str(folder / f"{name}.nii.gz"))
    out = tmp_path / "out"
    assert _run("-i", folder, "-o", out, "--save-labels") == 0
    for name, m in zip(names, maps):
        report = _load(out, name)  # valid JSON, strings unchanged
        assert report["case"] == name and report["file"] == str(folder / f"{name}.nii.gz")
        ref = lesioncount.count_distribution(torch.from_numpy(m)[None], max_count=4)
        np.testing.assert_allclose(report["count"]["pmf"], ref.pmf[0].numpy(), atol=1e-6)
        assert (out / f"{name}_labels.nii.gz").is_file()
    assert sorted(r["case"] for r in _csv(out / "summary.csv")) == sorted(names)
    assert _run("-i", folder, "-o", out, "--skip-existing") == 0
    assert sorted(r["case"] for r in _csv(out / "summary.csv")) == sorted(names)


def test_min_volume_tolerates_float32_spacings_of_nifti_headers(tmp_path):
    """NIfTI stores spacings in float32: 0.9 mm is 0.89999998 mm, a voxel 0.72899994 mm^3. --min-volume 7.29
    (10 voxels of 0.9 mm in decimal) must keep a 10-voxel lesion, not require 11 voxels."""
    data = np.zeros((12, 12, 12), np.float32)
    data[2:7, 2:4, 2] = 0.9  # 10 voxels
    data[8, 8, 8:11] = 0.9  # 3 voxels
    path = tmp_path / "iso09.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.9, 0.9, 0.9, 1.0])), str(path))
    voxel_volume = abs(np.linalg.det(nib.load(str(path)).affine[:3, :3]))
    assert voxel_volume < 0.729  # the float32 header
    assert min_size_for_volume(7.29, voxel_volume) == 10
    assert min_size_for_volume(7.3, voxel_volume) == 11  # genuinely above 10 voxels
    for spacing, voxels in [(0.7, 7), (1.1, 4), (1.2, 5)]:
        v32 = float(np.float32(spacing)) ** 3
        assert min_size_for_volume(round(voxels * spacing ** 3, 6), v32) == voxels, spacing
    out = tmp_path / "out"
    assert _run("-i", path, "-o", out, "--min-volume", 7.29) == 0
    report = _load(out, "iso09")
    assert report["settings"]["min_size_voxels"] == 10
    assert [r["size_voxels"] for r in report["lesions"]] == [10]


# ----------------------------------------------------------------------------- crash-safe outputs (issue 16, item 4)


def _hidden_leftovers(folder):
    """Temporary and lock files left in an output folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_outputs_are_replaced_atomically_through_unique_fsynced_temporary_files(tmp_path, monkeypatch):
    import re

    from lesioncount.commands import count as count_command

    replaced, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((pathlib.Path(a), pathlib.Path(b))),
                                                     real_replace(a, b))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    target = tmp_path / "c.json"
    count_command._write_json(target, '{"a": 1}')
    count_command._write_json(target, '{"a": 2}')
    assert json.loads(target.read_text()) == {"a": 2} and len(synced) == 2
    (first, dest1), (second, dest2) = replaced
    assert dest1 == dest2 == target and first != second  # a fresh name per write
    assert re.fullmatch(rf"\.c\.json\.{os.getpid()}\.[0-9a-f]{{16}}\.tmp", first.name), first.name
    # every file of a run goes through the same path: case JSON, label map, summary, lesions, errors
    maps = _maps(2, seed=21)
    _write_folder(tmp_path / "in", maps)
    replaced.clear()
    assert _run("-i", tmp_path / "in", "-o", tmp_path / "out", "--save-labels") == 0
    assert sorted(dest.name for _, dest in replaced) == sorted(
        ["case_00.json", "case_01.json", "case_00_labels.nii.gz", "case_01_labels.nii.gz", "summary.csv",
         "lesions.csv", "errors.csv"])
    assert all(src.name.startswith(f".{dest.name}.{os.getpid()}.") for src, dest in replaced)
    assert _hidden_leftovers(tmp_path / "out") == []


def test_a_failed_label_map_write_leaves_no_partial_file_and_skip_existing_rewrites_bad_ones(tmp_path, monkeypatch,
                                                                                             capsys):
    maps = _maps(3, seed=22)
    _write_folder(tmp_path / "in", maps)
    out = tmp_path / "out"
    assert _run("-i", tmp_path / "in", "-o", out, "--save-labels", "--threshold", 0.1) == 0
    good = {b: np.asanyarray(nib.load(str(out / f"case_{b:02d}_labels.nii.gz")).dataobj) for b in range(3)}
    # a write that dies half-way (disk full) while --overwrite recomputes case_01: no partial label map
    real = nib.Nifti1Image.to_file_map
    calls = []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            holder = (args[0] if args else kwargs.get("file_map", self.file_map))["image"]
            if holder.fileobj is not None:
                holder.fileobj.write(b"\0" * 100)
            else:
                pathlib.Path(holder.filename).write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", dying)
    assert _run("-i", tmp_path / "in", "-o", out, "--save-labels", "--overwrite", "--workers", 0,
                "--threshold", 0.3) == 1
    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", real)
    assert [r["case"] for r in _csv(out / "errors.csv")] == ["case_01"]
    assert "No space left" in _csv(out / "errors.csv")[0]["error"]
    assert not (out / "case_01_labels.nii.gz").exists()  # neither a partial file nor the old (threshold 0.1) one
    assert not (out / "case_01.json").exists()  # nor the old JSON: --overwrite replaced this case's outputs
    assert [r["case"] for r in _csv(out / "summary.csv")] == ["case_00", "case_02"]
    assert _hidden_leftovers(out) == []
    # --skip-existing --save-labels: a kept case with a 0-byte or a missing label map gets it written
    (out / "case_00_labels.nii.gz").write_bytes(b"")
    (out / "case_02_labels.nii.gz").unlink()
    capsys.readouterr()
    assert _run("-i", tmp_path / "in", "-o", out, "--save-labels", "--skip-existing", "--threshold", 0.3) == 0
    assert "case_00_labels.nii.gz: empty (0 bytes)" in capsys.readouterr().err
    for b in range(3):
        report = _load(out, f"case_{b:02d}")
        labels = np.asanyarray(nib.load(str(out / f"case_{b:02d}_labels.nii.gz")).dataobj)
        assert report["settings"]["threshold"] == 0.3 and labels.max() == report["n_candidates"]
        ref = ndimage.label(maps[b] > 0.3, STRUCT18)[0]
        np.testing.assert_array_equal(labels, ref)
    assert [r["case"] for r in _csv(out / "summary.csv")] == ["case_00", "case_01", "case_02"]
    # a label map of other settings (truncated, or with other labels) is not kept either
    raw = (out / "case_01_labels.nii.gz").read_bytes()
    (out / "case_01_labels.nii.gz").write_bytes(raw[: len(raw) // 2])
    write_label = lesioncount.io.write_label_map
    write_label(out / "case_02_labels.nii.gz", good[2], AFFINE)  # threshold 0.1 labels beside a 0.3 JSON
    assert _run("-i", tmp_path / "in", "-o", out, "--save-labels", "--skip-existing", "--threshold", 0.3) == 0
    err = capsys.readouterr().err
    assert "case_01_labels.nii.gz: cannot decompress" in err and "case_02_labels.nii.gz: it holds labels" in err
    for b in (1, 2):
        labels = np.asanyarray(nib.load(str(out / f"case_{b:02d}_labels.nii.gz")).dataobj)
        np.testing.assert_array_equal(labels, ndimage.label(maps[b] > 0.3, STRUCT18)[0])
    # a recomputed case without --save-labels loses the label map of an earlier run
    assert _run("-i", tmp_path / "in", "-o", out, "--overwrite", "--threshold", 0.5) == 0
    assert not list(out.glob("*_labels.nii.gz"))


def test_unwritable_summary_is_one_line_error(tmp_path, capsys):
    maps = _maps(2, seed=23)
    _write_folder(tmp_path / "in", maps)
    out = tmp_path / "out"
    (out / "summary.csv").mkdir(parents=True)  # cannot be replaced by a file (also as root)
    (out / "summary.csv" / "x").write_text("x")
    assert _run("-i", tmp_path / "in", "-o", out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lesioncount count: error: cannot write {out / 'summary.csv'}: Is a directory"]
    assert sorted(p.name for p in out.glob("*.json")) == ["case_00.json", "case_01.json"]
    assert _csv(out / "errors.csv") == [] and len({r["case"] for r in _csv(out / "lesions.csv")}) == 2
    assert _hidden_leftovers(out) == []


def test_dangling_symlinks_and_symlink_loops_are_listed_in_errors(tmp_path, capsys):
    maps = _maps(2, seed=24)
    folder = tmp_path / "in"
    _write_folder(folder, maps)
    (folder / "gone.nii.gz").symlink_to(tmp_path / "deleted.nii.gz")
    (folder / "loop_a.nii.gz").symlink_to(folder / "loop_b.nii.gz")
    (folder / "loop_b.nii.gz").symlink_to(folder / "loop_a.nii.gz")
    (folder / "ok_link.nii.gz").symlink_to(folder / "case_00.nii.gz")
    out = tmp_path / "out"
    assert _run("-i", folder, "-o", out) == 1
    errors = {r["case"]: r["error"] for r in _csv(out / "errors.csv")}
    assert set(errors) == {"gone", "loop_a", "loop_b"}
    assert errors["gone"].startswith("dangling symbolic link") and "deleted.nii.gz" in errors["gone"]
    assert errors["loop_a"].startswith("symbolic link loop") and errors["loop_b"].startswith("symbolic link loop")
    assert [r["case"] for r in _csv(out / "summary.csv")] == ["case_00", "case_01", "ok_link"]
    assert "3 case(s) failed" in capsys.readouterr().err


def test_a_second_run_into_a_busy_folder_refuses_naming_the_holder(tmp_path, capsys):
    from lesioncount.commands.count import LOCK_NAME, FolderLock, _part_lock_name

    maps = _maps(3, seed=25)
    _write_folder(tmp_path / "in", maps)
    out = tmp_path / "out"
    out.mkdir()
    with FolderLock(out / LOCK_NAME, "count"):  # another (unsharded) run holds the folder
        assert _run("-i", tmp_path / "in", "-o", out) == 2
        assert _run("-i", tmp_path / "in", "-o", out, "--num-parts", 2, "--part-id", 1) == 2
        err = capsys.readouterr().err
        assert f"is in use by another lesioncount run (pid {os.getpid()} on " in err and ", count;" in err
        assert not list(out.glob("*.json")) and not list(out.glob("*.csv"))
    # shards share the folder, but one part cannot run twice, and an unsharded run waits for all
    with FolderLock(out / LOCK_NAME, "count part 0 of 2", shared=True), \
            FolderLock(out / _part_lock_name(0, 2), "count part 0 of 2"):
        assert _run("-i", tmp_path / "in", "-o", out, "--num-parts", 2, "--part-id", 0) == 2
        assert f"pid {os.getpid()} on" in capsys.readouterr().err
        assert _run("-i", tmp_path / "in", "-o", out, "--num-parts", 2, "--part-id", 1) == 0
        assert _run("-i", tmp_path / "in", "-o", out, "--overwrite") == 2
        assert "count part 0 of 2" in capsys.readouterr().err
    assert [r["case"] for r in _csv(out / "summary.part-1-of-2.csv")] == ["case_01"]
    assert _hidden_leftovers(out) == [".lesioncount.part-1-of-2.manifest"]  # lock files removed on release
    assert _run("-i", tmp_path / "in", "-o", out, "--skip-existing") == 0  # an unsharded run: part files go
    assert sorted(p.name for p in out.glob("*.csv")) == ["errors.csv", "lesions.csv", "summary.csv"]
    assert _hidden_leftovers(out) == []


_SLOW_RUN = """
import sys, time
from lesioncount.commands import count
real = count._process_case
def slow(*args):
    time.sleep(0.6)
    return real(*args)
count._process_case = slow
from lesioncount.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _threshold_of(path):
    try:  # (a file can go between glob and open: --overwrite removes the old ones; never a partial one)
        return json.loads(path.read_text())["settings"]["threshold"]
    except FileNotFoundError:
        return None


def test_sigint_and_sigterm_leave_consistent_outputs_and_a_busy_folder_refuses(tmp_path, capsys):
    """Two slow runs (workers / main thread) are stopped by SIGINT / SIGTERM; meanwhile a third run into
    the first folder refuses. Afterwards each folder's summary lists exactly the cases whose files are there."""
    import signal
    import time

    maps = _maps(10, seed=26)
    _write_folder(tmp_path / "in", maps)
    out_int, out_term = tmp_path / "out_int", tmp_path / "out_term"
    # an earlier complete run at threshold 0.1 into out_int: its summary must not survive beside new files
    assert _run("-i", tmp_path / "in", "-o", out_int, "--save-labels", "--threshold", 0.1) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    for sig, out, workers in ((signal.SIGINT, out_int, 2), (signal.SIGTERM, out_term, 0)):
        cmd = [sys.executable, "-c", _SLOW_RUN, "count", "-q", "-i", str(tmp_path / "in"), "-o", str(out),
               "--threshold", "0.3", "--save-labels", "--overwrite", "--workers", str(workers)]
        procs[sig] = (subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True), out)
    deadline = time.monotonic() + 120  # (process start-up takes seconds on a loaded machine)
    waiting = dict(procs)
    while waiting:  # each gets its signal once it has written a case of its own (>= 2.4 s of work left)
        for sig, (proc, out) in list(waiting.items()):
            if any(_threshold_of(p) == 0.3 for p in out.glob("*.json")):
                if sig == signal.SIGINT:  # meanwhile a second run into its folder refuses at once
                    assert _run("-i", tmp_path / "in", "-o", out, "--overwrite") == 2
                    assert f"pid {proc.pid} on" in capsys.readouterr().err
                proc.send_signal(sig)
                del waiting[sig]
            else:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    for sig, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, stderr
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith(
            f"lesioncount count: interrupted by {sig.name}: "), stderr
        done = [r["case"] for r in _csv(out / "summary.csv")]
        errors = {r["case"]: r["error"] for r in _csv(out / "errors.csv")}
        assert 1 <= len(done) < 10
        assert sorted(done + list(errors)) == [f"case_{b:02d}" for b in range(10)]
        assert all(f"interrupted by {sig.name}" in e and "--skip-existing" in e for e in errors.values())
        assert sorted(p.stem for p in out.glob("*.json")) == done  # no old case file beside the new ones
        assert sorted(p.name for p in out.glob("*_labels.nii.gz")) == [f"{c}_labels.nii.gz" for c in done]
        assert sorted({r["case"] for r in _csv(out / "lesions.csv")}) == sorted(
            c for c in done if _load(out, c)["n_candidates"])
        for case in done:
            report = _load(out, case)
            labels = np.asanyarray(nib.load(str(out / f"{case}_labels.nii.gz")).dataobj)
            assert report["settings"]["threshold"] == 0.3 and labels.max() == report["n_candidates"]
        assert _hidden_leftovers(out) == []  # no temporary or lock file
        # finishing with --skip-existing completes the folder
        assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.3, "--save-labels", "--skip-existing") == 0
        assert [r["case"] for r in _csv(out / "summary.csv")] == [f"case_{b:02d}" for b in range(10)]


def test_num_parts_auto_reads_the_slurm_job_array(tmp_path, monkeypatch, capsys):
    from lesioncount.commands.count import slurm_array_shard

    maps = _maps(5, seed=27)
    _write_folder(tmp_path / "in", maps)
    out = tmp_path / "out"
    for var in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
                "SLURM_ARRAY_TASK_MAX"):
        monkeypatch.delenv(var, raising=False)
    assert _run("-i", tmp_path / "in", "-o", out, "--num-parts", "auto") == 2
    err = capsys.readouterr().err
    assert "SLURM_ARRAY_TASK_COUNT" in err and "not a task of a SLURM job array" in err and "--num-parts N" in err
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    for task in (1, 2):  # sbatch --array=1-2
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        assert _run("-i", tmp_path / "in", "-o", out, "--num-parts", "auto") == 0  # --part-id auto implied
    assert [r["case"] for r in _csv(out / "summary.part-0-of-2.csv")] == ["case_00", "case_02", "case_04"]
    assert [r["case"] for r in _csv(out / "summary.part-1-of-2.csv")] == ["case_01", "case_03"]
    assert slurm_array_shard({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0",
                              "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_MAX": "6"}) == (4, 3)
    with pytest.raises(ValueError, match="not a uniform range"):  # --array=1,5,7
        slurm_array_shard({"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1",
                           "SLURM_ARRAY_TASK_MAX": "7"})
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID='x' is not an integer"):
        slurm_array_shard({"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_MIN": "1"})
    with pytest.raises(SystemExit):
        _run("-i", tmp_path / "in", "-o", out, "--num-parts", "many")


def test_lesions_csv_rows_are_the_json_lesion_tables(tmp_path):
    from lesioncount.report import lesion_fields

    maps = _maps(3, seed=28)
    _write_folder(tmp_path / "in", maps)
    out = tmp_path / "out"
    assert _run("-i", tmp_path / "in", "-o", out) == 0
    rows = _csv(out / "lesions.csv")
    assert list(rows[0]) == lesion_fields()
    expected = [(f"case_{b:02d}", lesion) for b in range(3) for lesion in _load(out, f"case_{b:02d}")["lesions"]]
    assert len(rows) == len(expected) > 3
    for row, (case, lesion) in zip(rows, expected):
        assert row["case"] == case and int(row["lesion_id"]) == lesion["id"]
        assert float(row["probability"]) == lesion["probability"] and int(row["size_voxels"]) == lesion["size_voxels"]
        assert float(row["volume_mm3"]) == pytest.approx(lesion["size_voxels"] * 0.8 * 1.2 * 3.0)
        assert [int(row[f"argmax_{a}"]) for a in "ijk"] == lesion["argmax_index"]
        assert [float(row[f"argmax_{a}_mm"]) for a in "xyz"] == lesion["argmax_world_mm"]
        assert [float(row[f"centroid_{a}_mm"]) for a in "xyz"] == lesion["centroid_world_mm"]
    # kept cases keep their rows
    (out / "case_01.json").unlink()
    assert _run("-i", tmp_path / "in", "-o", out, "--skip-existing") == 0
    assert _csv(out / "lesions.csv") == rows


# ----------------------------------------------------------------------------- detection maps (issue 21, item 2)


def _detection(out, name):
    img = nib.load(str(out / f"{name}_detection.nii.gz"))
    return np.asanyarray(img.dataobj), img


def test_save_detection_map_paints_each_candidate_with_its_probability(tmp_path, monkeypatch):
    """CASE_detection.nii.gz: the input's shape and affine, float32, each candidate's voxels hold its p_k,
    background 0; equal to detection_map() of count_distribution on the same data and to an independent
    SciPy labelling; written atomically like the other outputs; p_k stays a probability with --from-logits."""
    from lesioncount.detection import detection_map
    from lesioncount.report import count_file

    maps = _maps(3, seed=31)
    paths = _write_folder(tmp_path / "in", maps)
    out = tmp_path / "out"
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((pathlib.Path(a), pathlib.Path(b))),
                                                     real_replace(a, b))[1])
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.1, "--save-detection-map") == 0
    monkeypatch.setattr(os, "replace", real_replace)
    detection_files = sorted(dest.name for _, dest in replaced if dest.name.endswith("_detection.nii.gz"))
    assert detection_files == [f"case_{b:02d}_detection.nii.gz" for b in range(3)]
    assert all(src.name.startswith(f".{dest.name}.{os.getpid()}.") for src, dest in replaced)
    assert _hidden_leftovers(out) == [] and not list(out.glob("*_labels.nii.gz"))
    for b, path in enumerate(paths):
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        dmap, dimg = _detection(out, f"case_{b:02d}")
        assert dimg.get_data_dtype() == np.float32 and dmap.dtype == np.float32
        assert dmap.shape == data.shape
        np.testing.assert_allclose(dimg.affine, img.affine, atol=1e-6)
        # independent: SciPy components of data > 0.1, each painted with its maximum
        labels, num = ndimage.label(data > 0.1, STRUCT18)
        assert num >= 1
        assert np.all(dmap[labels == 0] == 0)
        report = _load(out, f"case_{b:02d}")
        for row in report["lesions"]:
            inside = labels == row["id"]
            assert np.all(dmap[inside] == np.float32(data[inside].max()))
            assert np.all(dmap[inside] == np.float32(row["probability"]))
        ref = lesioncount.count_distribution(torch.from_numpy(np.ascontiguousarray(data))[None], threshold=0.1,
                                             connectivity=18, max_count=4)
        np.testing.assert_array_equal(dmap, detection_map(ref.labels[0], ref.lesion_probs[0],
                                                          ref.lesion_ids[0]).numpy())
    # the Python API writes the same file
    report = count_file(paths[0], detection_path=tmp_path / "api_detection.nii.gz")
    assert report["lesions"] == _load(out, "case_00")["lesions"]
    np.testing.assert_array_equal(_detection(tmp_path, "api")[0], _detection(out, "case_00")[0])
    # logits in, probabilities painted
    logits = (np.log(maps[0]) - np.log1p(-maps[0])).astype(np.float32)
    nib.save(nib.Nifti1Image(logits, AFFINE), str(tmp_path / "logits.nii.gz"))
    assert _run("-i", tmp_path / "logits.nii.gz", "-o", tmp_path / "out_logits", "--from-logits",
                "--save-detection-map") == 0
    from_logits = _detection(tmp_path / "out_logits", "logits")[0]
    np.testing.assert_allclose(from_logits, _detection(out, "case_00")[0], atol=1e-6, rtol=0)
    assert (from_logits != 0).sum() == (_detection(out, "case_00")[0] != 0).sum()


def test_detection_maps_under_skip_existing_overwrite_and_in_the_input_folder(tmp_path, capsys):
    """--skip-existing keeps matching detection maps, rewrites missing, empty, truncated or stale ones (like
    label maps); --overwrite without the flag removes them; maps written into the input folder are not cases."""
    maps = _maps(4, seed=32)
    _write_folder(tmp_path / "in", maps)
    out = tmp_path / "out"

    def expected(b, threshold):
        labels, num = ndimage.label(maps[b] > threshold, STRUCT18)
        peaks = np.asarray(ndimage.maximum(maps[b], labels, range(1, num + 1)), np.float32).reshape(-1)
        return np.concatenate([[np.float32(0)], peaks])[labels]

    # a first run without maps: --skip-existing --save-detection-map keeps the JSONs and writes the maps
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.3) == 0
    capsys.readouterr()
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.3, "--skip-existing", "--save-detection-map") == 0
    assert capsys.readouterr().err.count("_detection.nii.gz: missing; counting") == 4
    for b in range(4):
        np.testing.assert_array_equal(_detection(out, f"case_{b:02d}")[0], expected(b, 0.3))
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.3, "--skip-existing", "--save-detection-map",
                "--save-labels") == 0  # (label maps were missing: counted again, detection maps rewritten)
    capsys.readouterr()
    # all present and matching: every case kept, JSONs and maps untouched
    jsons = {b: (out / f"case_{b:02d}.json").read_text() for b in range(4)}
    stamps = {b: os.stat(out / f"case_{b:02d}_detection.nii.gz").st_ino for b in range(4)}
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.3, "--skip-existing", "--save-detection-map",
                "--save-labels") == 0
    assert "counting" not in capsys.readouterr().err
    assert all((out / f"case_{b:02d}.json").read_text() == jsons[b] for b in range(4))
    assert all(os.stat(out / f"case_{b:02d}_detection.nii.gz").st_ino == stamps[b] for b in range(4))
    # empty, truncated, stale (threshold 0.1 map beside a 0.3 JSON) and wrong-geometry maps are rewritten
    (out / "case_00_detection.nii.gz").write_bytes(b"")
    raw = (out / "case_01_detection.nii.gz").read_bytes()
    (out / "case_01_detection.nii.gz").write_bytes(raw[: len(raw) // 2])
    lesioncount.detection.write_detection_map(out / "case_02_detection.nii.gz", expected(2, 0.1), AFFINE)
    lesioncount.detection.write_detection_map(out / "case_03_detection.nii.gz", expected(3, 0.3), np.eye(4))
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.3, "--skip-existing", "--save-detection-map") == 0
    err = capsys.readouterr().err
    assert "case_00_detection.nii.gz: empty (0 bytes)" in err and "case_01_detection.nii.gz: cannot decompress" in err
    assert "case_02_detection.nii.gz: its values or their extents" in err
    assert "case_03_detection.nii.gz: its affine differs" in err
    for b in range(4):
        dmap, img = _detection(out, f"case_{b:02d}")
        np.testing.assert_array_equal(dmap, expected(b, 0.3))
        np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    assert [r["case"] for r in _csv(out / "summary.csv")] == [f"case_{b:02d}" for b in range(4)]
    assert _csv(out / "errors.csv") == [] and _hidden_leftovers(out) == []
    # --overwrite without the flag: the recomputed cases lose their detection maps (they would not match)
    assert _run("-i", tmp_path / "in", "-o", out, "--threshold", 0.5, "--overwrite") == 0
    assert not list(out.glob("*_detection.nii.gz"))
    # maps written into the input folder are skipped as cases by later runs
    folder = tmp_path / "in"
    assert _run("-i", folder, "-o", folder, "--save-detection-map", "--save-labels") == 0
    assert (folder / "case_00_detection.nii.gz").is_file()
    capsys.readouterr()
    assert main(["count", "-i", str(folder), "-o", str(tmp_path / "other")]) == 0
    err = capsys.readouterr().err
    assert "skipping 4 detection map(s)" in err and "skipping 4 label map(s)" in err
    assert [r["case"] for r in _csv(tmp_path / "other" / "summary.csv")] == [f"case_{b:02d}" for b in range(4)]
    assert _run("-i", folder, "-o", folder, "--skip-existing", "--save-detection-map") == 0  # same folder: kept
    assert [r["case"] for r in _csv(folder / "summary.csv")] == [f"case_{b:02d}" for b in range(4)]
