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
