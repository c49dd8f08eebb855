"""lesioncount.detection: hand-computed matching, lesion F1/Dice, count errors, FROC/AP, detection maps,
and agreement with the field's own code on shared inputs (MONAI's FROC helpers, picai_eval, scikit-learn)."""
from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pytest
import torch

import lesioncount
from lesioncount import detection as det

torch.set_num_threads(1)


def _row(*values):
    """A (1, W) 2-D label map."""
    return np.array([values], dtype=np.int64)


# ------------------------------------------------------------------------------- hand-computed
def test_overlap_iou_and_scores_by_hand():
    # position: 0 1 2 3 4 5 6 7 8 9
    gt = _row(1, 1, 1, 1, 0, 0, 2, 2, 0, 0)
    cand = _row(0, 0, 1, 1, 1, 0, 0, 0, 0, 2)
    m = det.match_lesions(gt, cand, [0.8, 0.3])
    # G1 & C1 = {2, 3}: IoU 2 / (4 + 3 - 2) = 0.4, Dice 4/7; G2 missed; C2 is a false positive
    assert m.intersection.tolist() == [[2, 0], [0, 0]]
    assert m.gt_match.tolist() == [0, -1] and m.cand_match.tolist() == [0, -1]
    assert (m.tp, m.fp, m.fn) == (1, 1, 1)
    assert m.gt_iou.tolist() == pytest.approx([0.4, 0.0])
    assert m.gt_dice.tolist() == pytest.approx([4 / 7, 0.0])
    assert m.gt_score.tolist() == [0.8, 0.0]
    # BraTS-2023 style: (4/7 + 0) / (G + FP) = (4/7) / 3
    assert m.lesion_dice == pytest.approx(4 / 21)
    assert m.f1 == pytest.approx(2 / 4)
    # IoU >= 0.5 rejects the only overlap
    m = det.match_lesions(gt, cand, [0.8, 0.3], rule="iou", iou_threshold=0.5)
    assert (m.tp, m.fp, m.fn) == (0, 2, 2)
    m = det.match_lesions(gt, cand, [0.8, 0.3], rule="iou", iou_threshold=0.4)
    assert (m.tp, m.fp, m.fn) == (1, 1, 1)


def test_hungarian_finds_the_matching_greedy_misses():
    # G1 = 1..4, G2 = 6..8; C1 = 2..6 (IoU with G1 3/6 = 0.5, with G2 1/7), C2 = 0..1 (IoU with G1 1/5)
    gt = _row(0, 1, 1, 1, 1, 0, 2, 2, 2)
    cand = _row(2, 2, 1, 1, 1, 1, 1, 0, 0)
    greedy = det.match_lesions(gt, cand, [0.9, 0.5], assignment="greedy")
    assert greedy.gt_match.tolist() == [0, -1] and (greedy.tp, greedy.fp, greedy.fn) == (1, 1, 1)
    hung = det.match_lesions(gt, cand, [0.9, 0.5], assignment="hungarian")
    assert hung.gt_match.tolist() == [1, 0] and (hung.tp, hung.fp, hung.fn) == (2, 0, 0)


def test_unmatched_eligible_candidates_fp_or_ignored():
    gt = _row(1, 1, 1, 1, 1, 0, 0)
    cand = _row(1, 1, 0, 2, 2, 0, 3)        # two candidates on one lesion, one elsewhere
    fp = det.match_lesions(gt, cand, [0.7, 0.6, 0.2])
    ign = det.match_lesions(gt, cand, [0.7, 0.6, 0.2], unmatched="ignore")
    assert (fp.tp, fp.fp, fp.fn) == (1, 2, 0)
    assert (ign.tp, ign.fp, ign.fn) == (1, 1, 0) and ign.cand_ignored.tolist() == [False, True, False]
    # equal IoU (2/5 each): the tie goes to the lower candidate index with both assignments
    assert fp.gt_match.tolist() == [0]
    assert det.match_lesions(gt, cand, [0.7, 0.6, 0.2], assignment="greedy").gt_match.tolist() == [0]


def test_peak_rule_distance_in_mm_with_anisotropic_spacing():
    gt = np.zeros((5, 9, 9), np.int64)
    gt[2, 4, 4] = 1
    cand = np.zeros_like(gt)
    cand[2, 4, 6] = 1                       # peak two voxels from the lesion along the last axis
    peaks = np.array([[2, 4, 6]])
    inside = det.match_lesions(gt, cand, [0.5], peaks, rule="peak")
    assert inside.tp == 0                   # max_distance 0: the peak must lie inside
    near = det.match_lesions(gt, cand, [0.5], peaks, rule="peak", max_distance=1.0, spacing=(3.0, 1.0, 0.5))
    assert near.tp == 1                     # 2 voxels x 0.5 mm = 1 mm
    assert det.match_lesions(gt, cand, [0.5], peaks, rule="peak", max_distance=0.9,
                             spacing=(3.0, 1.0, 0.5)).tp == 0
    assert det.match_lesions(gt, cand, [0.5], peaks, rule="peak", max_distance=1.0,
                             spacing=(0.5, 1.0, 3.0)).tp == 0   # 6 mm along that axis
    assert det.match_lesions(gt, cand, [0.5], peaks, rule="peak", max_distance=2.0).tp == 1  # voxels
    # a peak rule match need not overlap: IoU 0, Dice 0, but a TP
    assert near.gt_iou.tolist() == [0.0]


def test_peak_rule_prefers_the_most_probable_hit():
    gt = _row(1, 1, 1, 1, 0)
    cand = _row(1, 0, 2, 0, 0)
    m = det.match_lesions(gt, cand, [0.3, 0.9], [[0, 0], [0, 2]], rule="peak", unmatched="ignore")
    assert m.gt_match.tolist() == [1] and m.cand_ignored.tolist() == [True, False] and m.fp == 0


def test_empty_cases():
    z = np.zeros((3, 4), np.int64)
    m = det.match_lesions(z, z, [])
    assert (m.tp, m.fp, m.fn, m.lesion_dice, m.f1) == (0, 0, 0, 1.0, 1.0)
    one = z.copy(); one[1, 1] = 1
    m = det.match_lesions(z, one, [0.4])
    assert (m.tp, m.fp, m.fn, m.lesion_dice, m.f1) == (0, 1, 0, 0.0, 0.0)
    m = det.match_lesions(one, z, [])
    assert (m.tp, m.fp, m.fn, m.lesion_dice) == (0, 0, 1, 0.0)


def test_candidates_and_ground_truth_use_the_size_rule_and_connectivity():
    p = np.zeros((1, 6, 6), np.float32)
    p[0, 0, 0] = 0.9; p[0, 1, 1] = 0.6      # diagonal neighbours: one candidate at 26, two at 6
    p[0, 4, 4:6] = 0.3
    c26 = det.find_candidates(p, 0.1, connectivity=26)
    c6 = det.find_candidates(p, 0.1, connectivity=6)
    assert c26.probs.tolist() == pytest.approx([0.9, 0.3]) and c26.sizes.tolist() == [2, 2]
    assert c6.probs.tolist() == pytest.approx([0.9, 0.6, 0.3]) and c6.peaks.tolist() == [[0, 0, 0], [0, 1, 1], [0, 4, 4]]
    assert det.find_candidates(p, 0.1, connectivity=6, min_size=2).probs.tolist() == pytest.approx([0.3])
    labels, n = det.ground_truth_lesions(p > 0.1, connectivity=6, min_size=2)
    assert n == 1 and labels.max() == 1 and (labels > 0).sum() == 2


def test_scored_candidates_refuses_truncated_results():
    p = torch.zeros(1, 1, 6, 6); p[0, 0, 0, 0] = 0.9; p[0, 0, 3, 3] = 0.6
    r = lesioncount.count_distribution(p, max_lesions=1)
    with pytest.raises(ValueError, match="max_lesions"):
        det.scored_candidates(r)


# ------------------------------------------------------------------------------- count errors
@pytest.mark.parametrize("seed", range(4))
def test_expected_abs_count_error_matches_enumeration(seed):
    rng = np.random.default_rng(seed)
    p = rng.random(6)
    for c in (0, 2, 7):
        brute = 0.0
        for bits in itertools.product((0, 1), repeat=6):
            prob = np.prod([pi if b else 1 - pi for pi, b in zip(p, bits)])
            brute += prob * abs(sum(bits) - c)
        assert det.expected_abs_count_error(p, c) == pytest.approx(brute, abs=1e-12)
    assert det.expected_abs_count_error([], 3) == 3.0


def test_detection_metrics_and_recall_by_size_by_hand():
    a = det.match_lesions(_row(1, 1, 0, 2, 0, 0), _row(1, 0, 0, 0, 0, 2), [0.9, 0.5])   # TP, FN, FP
    b = det.match_lesions(_row(0, 0, 0, 0), _row(1, 0, 0, 0), [0.4])                     # FP
    d = det.detection_metrics([a, b])
    assert (d["tp"], d["fp"], d["fn"], d["n_gt"], d["n_candidates"]) == (1, 2, 1, 2, 3)
    assert d["precision"] == pytest.approx(1 / 3) and d["recall"] == pytest.approx(1 / 2)
    assert d["f1"] == pytest.approx(2 / 5)
    assert d["f1_case_mean"] == pytest.approx((2 / 4 + 0) / 2)
    # case a: Dice (2*1/(2+1) + 0) / (2 + 1); case b: 0 / (0 + 1)
    assert d["lesion_dice"] == pytest.approx((2 / 3 / 3 + 0) / 2)
    assert d["count_abs_diff"] == pytest.approx((0 + 1) / 2)
    e_a = det.expected_abs_count_error([0.9, 0.5], 2)
    assert d["expected_abs_count_error"] == pytest.approx((e_a + 0.4) / 2)
    rows = det.recall_by_size([a, b], [1.5], voxel_volumes=[2.0, 1.0])   # sizes 2 voxels -> 4 mm^3, 1 -> 2
    assert [(r["n_gt"], r["tp"]) for r in rows] == [(0, 0), (2, 1)] and math.isnan(rows[0]["recall"])


# --------------------------------------------------------------------------------- FROC and AP
def test_froc_and_ap_by_hand():
    scores = [0.9, 0.8, 0.7, 0.3, 0.2]
    is_tp = [True, False, True, False, True]
    r = det.froc(scores, is_tp, n_targets=4, n_images=2, fp_rates=(0.25, 0.5, 1.0))
    assert r["fps_per_image"].tolist() == [0, 0, 0.5, 0.5, 1.0, 1.0]
    assert r["sensitivity"].tolist() == [0, 0.25, 0.25, 0.5, 0.5, 0.75]
    # np.interp at 0.25 between (0, .25) and (.5, .25); at 0.5 and 1.0 the last duplicate x wins
    assert r["sensitivities"].tolist() == [0.25, 0.5, 0.75]
    step = det.froc(scores, is_tp, 4, 2, fp_rates=(0.25, 0.5, 1.0), interpolation="step")
    assert step["sensitivities"].tolist() == [0.25, 0.5, 0.75]
    # AP: recall steps at 0.9 (P 1), 0.7 (P 2/3), 0.2 (P 3/5), 0.25 each
    assert det.average_precision(scores, is_tp, 4) == pytest.approx(0.25 * (1 + 2 / 3 + 3 / 5))


def _synthetic_cases(n, seed, shape=(12, 20, 20)):
    """Smooth random probability maps and ground truths that overlap them partly."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        field = ndimage.gaussian_filter(rng.random(shape), 1.6)
        field = (field - field.min()) / np.ptp(field)
        probs = (field ** 6).astype(np.float32)
        other = ndimage.gaussian_filter(rng.random(shape), 1.6)
        other = (other - other.min()) / np.ptp(other)
        mix = 0.9 * field + 0.1 * other
        gt = mix > np.quantile(mix, 0.9)
        cases.append((probs, gt))
    return cases


def _match_all(cases, connectivity, **kw):
    out = []
    for probs, gt in cases:
        cand = det.find_candidates(probs, 0.15, connectivity=connectivity)
        gl, _ = det.ground_truth_lesions(gt, connectivity=connectivity)
        out.append((cand, gl, det.match_lesions(gl, cand.labels, cand.probs, cand.peaks, **kw)))
    return out


def test_froc_equals_monai_on_the_same_detections():
    froc_mod = pytest.importorskip("monai.metrics.froc")
    cases = _synthetic_cases(6, seed=3)
    matched = _match_all(cases, 18, rule="peak", unmatched="ignore")
    fp_all, tp_all, n_targets = [], [], 0
    for cand, gl, m in matched:
        fp, tp, nt = froc_mod.compute_fp_tp_probs_nd(cand.probs.astype(np.float32), cand.peaks, gl)
        # the same classification: FP scores, and per lesion the score of its best hit (0 = missed)
        assert sorted(fp.tolist()) == pytest.approx(sorted(m.cand_probs[m.cand_is_fp].tolist()))
        assert tp.tolist() == pytest.approx(m.gt_score.astype(np.float32).tolist())
        fp_all.append(fp); tp_all.append(tp); n_targets += nt
    fp_all, tp_all = np.concatenate(fp_all), np.concatenate(tp_all)
    assert (tp_all == 0).any(), "MONAI drops the lowest threshold; the curves agree when some lesion is missed"
    fps, sens = froc_mod.compute_froc_curve_data(fp_all, tp_all, n_targets, len(cases))
    ours = det.froc_from_matches([m for *_, m in matched])
    assert ours["n_targets"] == n_targets
    np.testing.assert_allclose(ours["fps_per_image"], fps[::-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours["sensitivity"], sens[::-1], rtol=0, atol=1e-12)
    monai_cpm = froc_mod.compute_froc_score(fps, sens, det.FROC_FP_RATES)
    assert ours["cpm"] == pytest.approx(float(monai_cpm), abs=1e-12)
    assert ours["sensitivities"].tolist() == pytest.approx(
        np.interp(det.FROC_FP_RATES, fps[::-1], sens[::-1]).tolist(), abs=1e-12)


@pytest.mark.parametrize("min_overlap", [0.1, 0.2])
def test_ap_and_froc_equal_picai_eval_on_detection_maps(min_overlap):
    picai = pytest.importorskip("picai_eval")
    cases = _synthetic_cases(6, seed=11)
    matched = _match_all(cases, 26, rule="iou", iou_threshold=min_overlap, unmatched="ignore")
    dmaps = [det.detection_map(torch.from_numpy(c.labels), torch.from_numpy(c.probs)).numpy() for c, _, _ in matched]
    metrics = picai.evaluate(y_det=dmaps, y_true=[gt.astype(np.int32) for _, gt in cases], min_overlap=min_overlap,
                             num_parallel_calls=1)
    ours = det.froc_from_matches([m for *_, m in matched], fp_rates=(0.5, 1.0, 2.0, 5.0), interpolation="step")
    assert ours["n_targets"] == metrics.num_lesions
    d = det.detection_metrics([m for *_, m in matched])
    assert d["tp"] >= 10 and d["fp"] >= 10, d
    assert d["fn"] > 0, "picai_eval drops the lowest threshold's FPs; the curves agree when some lesion is missed"
    assert ours["ap"] == pytest.approx(metrics.AP, abs=1e-12)
    for rate, sens in zip(ours["fp_rates"], ours["sensitivities"]):
        assert sens == pytest.approx(metrics.lesion_TPR_at_FPR(rate), abs=1e-7)  # picai counts TPs in float32
    # and the per-lesion records: (is_lesion, confidence) of every TP / FN / FP entry
    flat = sorted((int(a), round(float(b), 6)) for a, b, _ in metrics.lesion_results_flat)
    mine = []
    for *_, m in matched:
        mine += [(1, round(float(s), 6)) for s in m.gt_score]
        mine += [(0, round(float(s), 6)) for s in m.cand_probs[m.cand_is_fp]]
    assert flat == sorted(mine)


def test_average_precision_equals_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(5)
    scores = np.round(rng.random(40), 2)    # ties
    is_tp = rng.random(40) < 0.5
    n_targets = int(is_tp.sum()) + 7        # seven lesions never detected: score-0 positives for sklearn
    y = np.r_[is_tp, np.ones(7, bool)]
    s = np.r_[scores, np.zeros(7)]
    # sklearn counts the score-0 positives as found at threshold 0 with precision < 1; picai sets that
    # precision to 0: the same as leaving them out of the recall
    prec, rec, thr = sk.precision_recall_curve(y, s)
    prec[:-1][thr == 0] = 0
    ap_ref = -np.sum(np.diff(rec) * prec[:-1])
    assert det.average_precision(scores, is_tp, n_targets) == pytest.approx(ap_ref, abs=1e-12)
    assert det.average_precision(scores, is_tp, int(is_tp.sum())) == pytest.approx(
        sk.average_precision_score(is_tp, scores), abs=1e-12)


# ------------------------------------------------------------------------------ detection maps
def test_detection_map_paints_p_k_and_parses_back_with_picai():
    p = torch.zeros(1, 8, 16, 16)
    p[0, 1:3, 2:5, 2:5] = torch.linspace(0.2, 0.9, 2 * 3 * 3).reshape(2, 3, 3)
    p[0, 5, 10:12, 10] = torch.tensor([0.35, 0.55])
    r = lesioncount.count_distribution(p, threshold=0.1, connectivity=26)
    dmap = det.detection_map(r.labels[0], r.lesion_probs[0], r.lesion_ids[0])
    assert dmap.dtype == torch.float32 and dmap.shape == p.shape[1:]
    assert torch.equal(dmap > 0, r.labels[0] > 0)
    assert sorted(dmap.unique().tolist()) == pytest.approx([0.0, 0.55, 0.9])
    pu = pytest.importorskip("picai_eval.analysis_utils")
    conf, blobs = pu.parse_detection_map(dmap.numpy())
    assert sorted(conf.values()) == pytest.approx([0.55, 0.9])
    with pytest.raises(ValueError, match="no probability"):
        det.detection_map(r.labels[0], r.lesion_probs[0][:1], r.lesion_ids[0][:1])


def test_write_detection_map_keeps_geometry(tmp_path):
    nib = pytest.importorskip("nibabel")
    affine = np.diag([0.8, 0.9, 3.0, 1.0]); affine[:3, 3] = [1, 2, 3]
    d = np.zeros((4, 5, 6), np.float32); d[1, 2, 3] = 0.7
    det.write_detection_map(tmp_path / "c.nii.gz", d, affine)
    img = nib.load(str(tmp_path / "c.nii.gz"))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), d)


# ----------------------------------------------------------------------------------- bad input
def test_bad_arguments_are_named():
    g = _row(1, 0); c = _row(0, 1)
    with pytest.raises(ValueError, match="`rule`"):
        det.match_lesions(g, c, [0.5], rule="dice")
    with pytest.raises(ValueError, match="`assignment`"):
        det.match_lesions(g, c, [0.5], assignment="random")
    with pytest.raises(ValueError, match="`iou_threshold`"):
        det.match_lesions(g, c, [0.5], rule="iou", iou_threshold=0)
    with pytest.raises(ValueError, match="`cand_peaks`"):
        det.match_lesions(g, c, [0.5], rule="peak")
    with pytest.raises(ValueError, match="same shape"):
        det.match_lesions(g, _row(0, 1, 0), [0.5])
    with pytest.raises(ValueError, match="cand_probs"):
        det.match_lesions(g, _row(0, 2), [0.5])
    with pytest.raises(TypeError, match="integer label map"):
        det.match_lesions(g.astype(float), c, [0.5])
    with pytest.raises(ValueError, match="`spacing`"):
        det.match_lesions(g, c, [0.5], [[0, 1]], rule="peak", max_distance=1, spacing=(1, 0))
    with pytest.raises(ValueError, match="`n_targets`"):
        det.froc([0.5], [True], n_targets=0, n_images=1)
    with pytest.raises(ValueError, match="`edges`"):
        det.recall_by_size([], [10, 5])


def test_docstring_examples():
    results = doctest.testmod(det, extraglobs={"np": np, "torch": torch, "lesioncount": lesioncount},
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 20 and results.failed == 0
