"""``lesioncount evaluate`` and ``lesioncount plot`` end to end on tiny generated NIfTI folders.

The predictions contain true lesions plus faint noise blobs (peak 0.12-0.2) that the thresholded
baseline counts at low thresholds (over-counting), and two lesions that touch under 18-connectivity
(merged). The numbers in the output files are checked against SciPy component counts and the
functional metrics recomputed here.
"""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

nib = pytest.importorskip("nibabel")
pytest.importorskip("matplotlib")
pytest.importorskip("torchmetrics")
from scipy import ndimage  # noqa: E402

import lesioncount  # noqa: E402
from lesioncount import metrics  # noqa: E402
from lesioncount.cli import main  # noqa: E402

torch.set_num_threads(1)

SHAPE = (10, 12, 12)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # 2 mm^3 voxels
STRUCT18 = ndimage.generate_binary_structure(3, 2)
# case -> blobs (corner voxel, peak probability, is a true lesion)
CASES = {
    "a": [((2, 2, 2), 0.9, True), ((7, 8, 8), 0.15, False)],
    "b": [((2, 2, 2), 0.95, True), ((6, 7, 2), 0.8, True), ((2, 8, 8), 0.12, False)],
    "c": [((4, 4, 4), 0.2, False)],
    "d": [((1, 1, 1), 0.9, True), ((5, 1, 6), 0.9, True), ((1, 8, 2), 0.9, True), ((7, 8, 8), 0.13, False),
          ((7, 2, 8), 0.14, False)],  # the last noise blob touches the (5, 1, 6) lesion: merged
    "e": [((3, 3, 3), 0.6, True)],
}


def _blob(pred, gt, corner, peak, is_lesion):
    i, j, k = corner
    box = (slice(i, i + 2), slice(j, j + 2), slice(k, k + 2))
    pred[box] = np.maximum(pred[box], np.float32(peak * 0.8))
    pred[i, j, k] = peak
    if is_lesion:
        gt[box] = 1


def _save(array, path):
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))


def make_folders(root, cases=CASES, extras=True):
    pred_dir, gt_dir = root / "pred", root / "gt"
    pred_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    arrays = {}
    for name, blobs in cases.items():
        pred = np.zeros(SHAPE, np.float32)
        gt = np.zeros(SHAPE, np.uint8)
        for blob in blobs:
            _blob(pred, gt, *blob)
        _save(pred, pred_dir / f"{name}.nii.gz")
        _save(gt, gt_dir / f"{name}.nii.gz")
        arrays[name] = (pred, gt)
    if extras:
        (pred_dir / "f.nii.gz").write_bytes(b"this is not a NIfTI file")      # corrupt prediction
        _save(np.zeros(SHAPE, np.uint8), gt_dir / "f.nii.gz")
        bad = np.zeros(SHAPE, np.float32)
        bad[3, 3, 3] = 1.5                                                   # not a probability
        _save(bad, pred_dir / "g.nii.gz")
        _save(np.zeros(SHAPE, np.uint8), gt_dir / "g.nii.gz")
        _save(np.zeros(SHAPE, np.float32), pred_dir / "h.nii.gz")           # no GT
        _save(np.zeros(SHAPE, np.uint8), gt_dir / "i.nii.gz")               # no prediction
        _save(np.zeros(SHAPE, np.float32), pred_dir / "j.nii.gz")
        _save(np.zeros((10, 12, 11), np.uint8), gt_dir / "j.nii.gz")        # shape mismatch
    return pred_dir, gt_dir, arrays


def _scipy_count(mask, min_size=0):
    labels, n = ndimage.label(mask, structure=STRUCT18)
    if min_size and n:
        sizes = np.bincount(labels.ravel())[1:]
        return int((sizes >= min_size).sum())
    return n


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _num(text):
    return None if text == "" else float(text)


def test_evaluate_end_to_end(tmp_path, capsys):
    import matplotlib.image as mpimg

    pred_dir, gt_dir, arrays = make_folders(tmp_path)
    out = tmp_path / "out"
    rc = main(["evaluate", "-p", str(pred_dir), "-g", str(gt_dir), "-o", str(out), "--n-bins", "5", "-q"])
    err = capsys.readouterr().err
    assert rc == 1  # failures and unpaired cases
    for needle in ("f.nii.gz", "g.nii.gz", "h.nii.gz", "i.nii.gz", "j.nii.gz"):
        assert needle in err
    for name in ("report.md", "per_case.csv", "metrics.csv", "accuracy_vs_discarded.csv"):
        assert (out / name).stat().st_size > 0
    for name in ("threshold_sweep.png", "reliability.png", "accuracy_vs_discarded.png"):
        img = mpimg.imread(str(out / name))
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300

    report = (out / "report.md").read_text()
    assert "5 cases evaluated, 3 failed, 1 predictions without GT, 1 GT masks without prediction" in report
    assert "FAILED `f`" in report and "FAILED `g`" in report and "FAILED `j`" in report
    assert "[0, 1]" in report.split("FAILED `g`")[1].splitlines()[0]           # the reason is given
    assert "does not match" in report.split("FAILED `j`")[1].splitlines()[0]
    assert "no ground truth for prediction `h`" in report and "no prediction for ground truth `i`" in report
    for png in ("threshold_sweep.png", "reliability.png", "accuracy_vs_discarded.png"):
        assert f"]({png})" in report

    thresholds = [round(0.1 * i, 1) for i in range(1, 10)]
    names = sorted(CASES)
    per_case = {r["case"]: r for r in _read_csv(out / "per_case.csv")}
    assert sorted(per_case) == names
    gt_counts = torch.tensor([_scipy_count(arrays[n][1] != 0) for n in names])
    assert [int(per_case[n]["gt_count"]) for n in names] == gt_counts.tolist() == [1, 2, 0, 3, 1]

    rows = _read_csv(out / "metrics.csv")
    assert len(rows) == 2 * len(thresholds)
    for t in thresholds:
        # independent baseline: SciPy components of pred > t (compared in float64, as lesioncount.label does)
        cc = torch.tensor([_scipy_count(arrays[n][0].astype(np.float64) > t) for n in names])
        assert [int(per_case[n][f"cc_count@{t:g}"]) for n in names] == cc.tolist()
        x = torch.stack([torch.from_numpy(arrays[n][0]) for n in names])
        r = lesioncount.count_distribution(x, threshold=t, max_count=4)
        assert [float(per_case[n][f"expected@{t:g}"]) for n in names] == pytest.approx(r.expected_count.tolist())
        assert [int(per_case[n][f"most_likely@{t:g}"]) for n in names] == r.most_likely_count.tolist()
        ours = metrics.count_metrics(r.pmf, gt_counts, 4, n_bins=5, expected_count=r.expected_count, log_pmf=r.log_pmf)
        onehot = F.one_hot(cc.clamp_max(4), 5).double()
        base = metrics.count_metrics(onehot, gt_counts, 4, n_bins=5, expected_count=cc.double())
        for method, ref in (("count_distribution", ours), ("cc_count", base)):
            (row,) = [r_ for r_ in rows if r_["method"] == method and float(r_["threshold"]) == t]
            assert int(row["n_cases"]) == 5
            for k in metrics.COUNT_METRIC_NAMES:
                if method == "cc_count" and k in ("nll", "infeasible"):
                    assert row[k] == ""
                    continue
                assert _num(row[k]) == pytest.approx(float(ref[k]), rel=1e-6, abs=1e-9), (method, t, k)

    by = {(r["method"], float(r["threshold"])): r for r in rows}
    # at 0.1 the baseline counts the noise blobs: it over-counts a, b, c; the count distribution does not
    assert [int(per_case[n]["cc_count@0.1"]) for n in "abc"] == [2, 3, 1]
    assert float(by[("cc_count", 0.1)]["accuracy"]) == pytest.approx(0.2)
    assert float(by[("count_distribution", 0.1)]["accuracy"]) == pytest.approx(1.0)

    x = torch.stack([torch.from_numpy(arrays[n][0]) for n in names])
    r = lesioncount.count_distribution(x, threshold=0.1, max_count=4)
    fractions = [round(0.05 * i, 2) for i in range(11)]
    expected_acc = metrics.accuracy_vs_discarded(r.pmf, gt_counts, fractions)
    disc = _read_csv(out / "accuracy_vs_discarded.csv")
    assert [float(d["fraction"]) for d in disc] == fractions
    assert [float(d["accuracy"]) for d in disc] == pytest.approx(expected_acc.tolist())
    assert [int(d["n_kept"]) for d in disc] == [5 - math.floor(f * 5 + 1e-9) for f in fractions]


def test_evaluate_size_rule_applies_to_gt_and_candidates(tmp_path, capsys):
    cases = {
        # a one-voxel GT lesion (2 mm^3) and a one-voxel candidate: both below --min-volume 3 mm^3
        "s": [((2, 2, 2), 0.9, True)],
        "t": [((6, 6, 6), 0.7, True), ((1, 9, 9), 0.5, False)],
    }
    pred_dir, gt_dir, arrays = make_folders(tmp_path, cases, extras=False)
    pred, gt = arrays["s"]
    pred[8, 8, 1] = 0.95
    gt[8, 1, 9] = 1
    _save(pred, pred_dir / "s.nii.gz")
    _save(gt, gt_dir / "s.nii.gz")
    _save(np.zeros(SHAPE, np.uint8), gt_dir / "u.nii.gz")  # GT without prediction: allowed below
    out = tmp_path / "out"
    rc = main(["evaluate", "-p", str(pred_dir), "-g", str(gt_dir), "-o", str(out), "--min-volume", "3",
               "--thresholds", "0.3,0.6", "--report-threshold", "0.2", "--no-plots", "--allow-missing", "-q"])
    assert rc == 0
    assert "no prediction for ground truth" in capsys.readouterr().err
    per_case = {r["case"]: r for r in _read_csv(out / "per_case.csv")}
    # min_size = ceil(3 / 2) = 2 voxels, for GT lesions and candidates alike
    assert int(per_case["s"]["gt_count"]) == _scipy_count(gt != 0, min_size=2) == 1
    for t in (0.2, 0.3, 0.6):  # the report threshold joins the sweep
        assert int(per_case["s"][f"cc_count@{t:g}"]) == _scipy_count(pred.astype(np.float64) > t, min_size=2) == 1
    assert not list(out.glob("*.png"))
    assert "no prediction for ground truth `u`" in (out / "report.md").read_text()


def test_evaluate_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "-p", "x", "-g", "y", "-o", "z", "--thresholds", "0.1,1.5"])
    assert exc.value.code == 2
    assert "--thresholds: 1.5 is outside [0.0, 1.0)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "-p", "x", "-g", "y", "-o", "z", "--min-size", "2", "--min-volume", "3"])
    capsys.readouterr()
    rc = main(["evaluate", "-p", str(tmp_path / "missing"), "-g", str(tmp_path), "-o", str(tmp_path / "o")])
    assert rc == 2
    assert "missing: no such file or folder" in capsys.readouterr().err


def test_evaluate_without_torchmetrics_names_the_eval_extra(tmp_path, capsys, monkeypatch):
    import importlib

    from lesioncount import _extras

    real = importlib.import_module

    def fake_import(name, *a, **k):
        if name.split(".")[0] == "torchmetrics":
            raise ImportError("No module named 'torchmetrics'")
        return real(name, *a, **k)

    monkeypatch.setattr(_extras.importlib, "import_module", fake_import)
    rc = main(["evaluate", "-p", str(tmp_path), "-g", str(tmp_path), "-o", str(tmp_path / "o")])
    assert rc == 2
    assert "pip install torchmetrics scipy (the lesioncount[eval] extra" in capsys.readouterr().err


def test_plot_cli(tmp_path, capsys):
    import matplotlib.image as mpimg

    pred_dir, gt_dir, arrays = make_folders(tmp_path, {"b": CASES["b"]}, extras=False)
    pred = arrays["b"][0]
    image = np.random.default_rng(0).random(SHAPE).astype(np.float32) * 300
    _save(image, tmp_path / "b_image.nii.gz")
    rc = main(["plot", "-i", str(pred_dir / "b.nii.gz"), "--image", str(tmp_path / "b_image.nii.gz"),
               "-o", str(tmp_path / "fig.png"), "--true-count", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    # default slice: the one holding the argmax of the most probable candidate (the global maximum here)
    k = np.unravel_index(np.argmax(pred), SHAPE)[2]
    assert f"slice {k} along axis 2" in out and "3 candidates" in out
    img = mpimg.imread(str(tmp_path / "fig.png"))
    assert img.shape[1] > img.shape[0] > 300  # two panels side by side

    rc = main(["plot", "-i", str(pred_dir / "b.nii.gz"), "-o", str(tmp_path / "figs"), "--axis", "0",
               "--slice", "6", "--threshold", "0.5"])
    assert rc == 0
    assert "2 candidates" in capsys.readouterr().out
    for name in ("b_count_distribution.png", "b_slice.png"):
        assert mpimg.imread(str(tmp_path / "figs" / name)).shape[0] > 200

    rc = main(["plot", "-i", str(pred_dir / "b.nii.gz"), "-o", str(tmp_path / "x.png"), "--slice", "99"])
    assert rc == 1
    assert "--slice 99 is out of range: axis 2 has 12 slices" in capsys.readouterr().err
    rc = main(["plot", "-i", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "x.png")])
    assert rc == 1
    assert "nope.nii.gz" in capsys.readouterr().err


def test_unusable_output_paths_give_a_message_not_a_traceback(tmp_path, capsys):
    pred_dir, gt_dir, _ = make_folders(tmp_path, {"e": CASES["e"]}, extras=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc = main(["evaluate", "-p", str(pred_dir), "-g", str(gt_dir), "-o", str(blocker), "--no-plots", "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "-o/--output" in err and "a_file" in err
    for out in (blocker / "fig.png", blocker / "figs"):
        rc = main(["plot", "-i", str(pred_dir / "e.nii.gz"), "-o", str(out)])
        assert rc == 2
        err = capsys.readouterr().err
        assert "-o/--output" in err and "a_file" in err


def test_argument_errors_name_the_argument_given(tmp_path, capsys):
    # plot's --threshold shares the parser of evaluate's --report-threshold: the message must not name the latter
    with pytest.raises(SystemExit):
        main(["plot", "-i", "x.nii.gz", "-o", "y.png", "--threshold", "1.5"])
    err = capsys.readouterr().err
    assert "argument --threshold: 1.5 is outside [0.0, 1.0)" in err and "report-threshold" not in err
    # one report threshold, not a list whose smallest entry is silently taken
    with pytest.raises(SystemExit):
        main(["evaluate", "-p", "x", "-g", "y", "-o", "z", "--report-threshold", "0.3,0.1"])
    assert "argument --report-threshold: expected one number, got '0.3,0.1'" in capsys.readouterr().err


def test_plot_rejects_an_image_on_another_grid(tmp_path, capsys):
    pred_dir, _, _ = make_folders(tmp_path, {"e": CASES["e"]}, extras=False)
    image = np.random.default_rng(1).random(SHAPE).astype(np.float32)
    flipped = AFFINE.copy()
    flipped[0, 0], flipped[0, 3] = -1.0, SHAPE[0] - 1.0  # same shape, i axis flipped: overlay would be mirrored
    nib.save(nib.Nifti1Image(image, flipped), str(tmp_path / "flipped.nii.gz"))
    rc = main(["plot", "-i", str(pred_dir / "e.nii.gz"), "--image", str(tmp_path / "flipped.nii.gz"),
               "-o", str(tmp_path / "f.png")])
    assert rc == 1
    assert "flipped.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists()
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "same.nii.gz"))
    assert main(["plot", "-i", str(pred_dir / "e.nii.gz"), "--image", str(tmp_path / "same.nii.gz"),
                 "-o", str(tmp_path / "f.png")]) == 0


def test_nnunet_npz_without_sibling_evaluate_and_plot(tmp_path, capsys):
    """The error names --allow-missing-geometry, which evaluate and plot must then accept; evaluate takes
    the GT's geometry (2 mm^3 voxels here), so --min-volume 3 keeps a 2-voxel lesion (identity: 3 voxels)."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    pred = np.zeros(SHAPE, np.float32)
    gt = np.zeros(SHAPE, np.uint8)
    pred[2, 3, 4:6] = 0.9  # 2 voxels = 4 mm^3
    gt[2, 3, 4:6] = 1
    np.savez(pred_dir / "n.npz", probabilities=np.stack([1 - pred, pred]).transpose(0, 3, 2, 1))  # (C, z, y, x)
    _save(gt, gt_dir / "n.nii.gz")
    args = ["evaluate", "-p", str(pred_dir), "-g", str(gt_dir), "--min-volume", "3", "--thresholds", "0.5",
            "--report-threshold", "0.5", "--no-plots", "-q"]
    assert main(args + ["-o", str(tmp_path / "o1")]) == 1
    assert "--allow-missing-geometry" in capsys.readouterr().err
    assert main(args + ["-o", str(tmp_path / "o2"), "--allow-missing-geometry"]) == 0
    (row,) = _read_csv(tmp_path / "o2" / "per_case.csv")
    assert row["gt_count"] == "1" and row["cc_count@0.5"] == "1"
    assert main(["plot", "-i", str(pred_dir / "n.npz"), "-o", str(tmp_path / "p.png")]) == 1
    assert "--allow-missing-geometry" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="identity affine"):
        assert main(["plot", "-i", str(pred_dir / "n.npz"), "-o", str(tmp_path / "p.png"), "--allow-missing-geometry",
                     "--image", str(gt_dir / "n.nii.gz")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


# ------------------------------------------------------------------------ lesion-wise detection
def _detection_run(tmp_path, *extra):
    pred_dir, gt_dir, arrays = make_folders(tmp_path, extras=False)
    out = tmp_path / ("out" + "".join(extra).replace("-", "_").replace(".", ""))
    rc = main(["evaluate", "-p", str(pred_dir), "-g", str(gt_dir), "-o", str(out), "--thresholds", "0.1,0.5",
               "-q", *extra])
    assert rc == 0
    rows = {float(r["threshold"]): r for r in _read_csv(out / "detection_metrics.csv")}
    return out, rows, arrays


def test_evaluate_lesion_wise_detection_by_hand(tmp_path, capsys):
    import matplotlib.image as mpimg

    out, rows, arrays = _detection_run(tmp_path)
    # threshold 0.1: the 7 lesions are found (d's (5,1,6) lesion merged with a noise blob into one
    # 16-voxel candidate: IoU 1/2, Dice 2/3); the noise blobs of a, b, c, d are 4 FPs
    r = rows[0.1]
    assert [int(r[k]) for k in ("n_gt", "n_candidates", "tp", "fp", "fn")] == [7, 11, 7, 4, 0]
    assert float(r["precision"]) == pytest.approx(7 / 11) and float(r["recall"]) == 1.0
    assert float(r["f1"]) == pytest.approx(14 / 18)
    # per case sum(Dice) / (G + FP): a 1/2, b 2/3, c 0/1, d (2 + 2/3)/4, e 1
    assert float(r["lesion_dice"]) == pytest.approx((1 / 2 + 2 / 3 + 0 + (2 + 2 / 3) / 4 + 1) / 5)
    assert float(r["count_abs_diff"]) == pytest.approx(4 / 5)
    # every lesion scores above every noise blob: AP 1, sensitivity 1 at 0 FPs, CPM 1
    assert float(r["ap"]) == pytest.approx(1.0) and float(r["cpm"]) == 1.0
    # E|C - G| from the exact count distribution of each case's candidates
    names = sorted(CASES)
    expected = []
    for n in names:
        pred, gt = arrays[n]
        res = lesioncount.count_distribution(torch.from_numpy(pred)[None], threshold=0.1)
        c = _scipy_count(gt != 0)
        k = int(res.num_lesions[0])
        pmf = res.pmf[0].double()
        expected.append(float((pmf * (torch.arange(k + 1) - c).abs()).sum()))
    assert float(r["expected_abs_count_error"]) == pytest.approx(np.mean(expected), rel=1e-6)
    # threshold 0.5: no noise; e's lesion (peak 0.6, the rest 0.48) is a 1-voxel candidate: Dice 2/9
    r = rows[0.5]
    assert [int(r[k]) for k in ("tp", "fp", "fn")] == [7, 0, 0]
    assert float(r["lesion_dice"]) == pytest.approx((1 + 1 + 1 + 1 + 2 / 9) / 5)  # c: no lesion, no candidate: 1
    assert float(r["lesion_dice"]) != pytest.approx(1.0)

    lesions = _read_csv(out / "lesions.csv")
    assert sorted(l_["kind"] for l_ in lesions) == ["fp"] * 4 + ["tp"] * 7
    (merged,) = [l_ for l_ in lesions if l_["case"] == "d" and l_["kind"] == "tp" and float(l_["iou"]) < 1]
    assert float(merged["iou"]) == pytest.approx(0.5) and float(merged["dice"]) == pytest.approx(2 / 3)
    assert int(merged["gt_voxels"]) == 8 and float(merged["gt_volume_mm3"]) == 16.0
    assert int(merged["candidate_voxels"]) == 16 and float(merged["p_k"]) == pytest.approx(0.9)
    fps = sorted(float(l_["p_k"]) for l_ in lesions if l_["kind"] == "fp")
    assert fps == pytest.approx([0.12, 0.13, 0.15, 0.2])
    size_rows = _read_csv(out / "recall_by_size.csv")   # 8 voxels x 2 mm^3 = 16 mm^3: bin [10, 100)
    assert [int(b["n_gt"]) for b in size_rows] == [0, 7, 0, 0]
    froc_rows = _read_csv(out / "froc.csv")
    assert float(froc_rows[0]["fps_per_image"]) == 0 and float(froc_rows[-1]["fps_per_image"]) == pytest.approx(4 / 5)
    report = (out / "report.md").read_text()
    assert "## Lesion-wise detection" in report and "](froc.png)" in report and "](precision_recall.png)" in report
    for name in ("froc.png", "precision_recall.png"):
        img = mpimg.imread(str(out / name))
        assert img.ndim == 3 and img.shape[0] > 200
    assert "lesion F1 0.7778" in capsys.readouterr().out


def test_evaluate_matching_rules(tmp_path):
    # IoU >= 0.6 rejects the merged candidate of d (IoU 0.5): one FN and one more FP
    _, rows, _ = _detection_run(tmp_path, "--match", "iou", "--match-iou", "0.6")
    assert [int(rows[0.1][k]) for k in ("tp", "fp", "fn")] == [6, 5, 1]
    # its peak (0.9) lies inside the lesion: a TP under the peak rule
    _, rows, _ = _detection_run(tmp_path / "p", "--match", "peak")
    assert [int(rows[0.1][k]) for k in ("tp", "fp", "fn")] == [7, 4, 0]
