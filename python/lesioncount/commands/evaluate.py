"""``lesioncount evaluate``: score predicted probability maps against ground-truth lesion masks.

For every case present in both folders (paired by case id, :func:`lesioncount.io.case_name`):

* the true count is the number of connected components of the nonzero GT voxels, with the same
  connectivity and size rule (``--min-size`` voxels or ``--min-volume`` mm^3) as the candidates;
* the prediction is read once and, for every threshold of the sweep, counted two ways: the count
  distribution of the paper (``count_distribution``: pmf, expected count, most likely count,
  entropy) and the thresholded connected-component baseline (``cc_count``: components of
  pred > threshold, which are exactly the candidates of ``count_distribution`` at that threshold).

Over the cases, per method and threshold: count accuracy, class-averaged (macro) precision, recall
and F1 over the count bins 0..M-1, M+ (a bin absent from both predictions and targets is left out of
the average), ECE and MCE (top-label, ``--n-bins`` bins; the baseline as a one-hot distribution),
the MAE of the expected count (baseline: of its count) and the mean NLL of the true count bin
(this method only; a hard prediction has an infinite NLL whenever it is wrong). At
``--report-threshold``: accuracy after discarding the most uncertain cases (highest entropy) and
reliability diagrams (this method at the report threshold, the baseline at its most accurate
threshold).

Lesion-wise detection (:mod:`lesioncount.detection`), at every threshold of the sweep: the candidates
are matched one-to-one to the GT lesions (``--match`` overlap / iou / peak, ``--assignment``,
``--unmatched``); TP/FP/FN, lesion precision, recall and F1 (pooled and per-case mean), BraTS-2023-style
lesion Dice, mean |K - G| and E|C - G| under the exact count distribution, and with p_k as each
candidate's score the FROC (sensitivity at 1/8..8 FPs per scan, CPM) and AP. At ``--report-threshold``:
one row per GT lesion and per unmatched candidate (``lesions.csv``), the FROC curve (``froc.csv``),
recall by lesion volume (``recall_by_size.csv``) and the FROC / precision-recall figures.

Outputs in OUT_DIR: ``report.md`` (settings, tables, figures, failures), ``per_case.csv``,
``metrics.csv``, ``accuracy_vs_discarded.csv``, ``detection_metrics.csv``, ``lesions.csv``,
``froc.csv``, ``recall_by_size.csv``, ``threshold_sweep.png``, ``reliability.png``,
``accuracy_vs_discarded.png``, ``froc.png``, ``precision_recall.png``. Unpaired and unreadable cases are listed in the report and on stderr;
the exit code is 1 when any case failed or was unpaired (``--allow-missing``: unpaired cases do not
count), 2 for bad arguments. An nnU-Net ``CASE.npz`` takes its geometry from the sibling
``CASE.nii.gz``; without it the case fails unless ``--allow-missing-geometry`` (then the GT mask's
geometry is used, the shapes being equal).

Example:
    lesioncount evaluate -p nnunet_out/ -g labelsTs/ -o eval/ --min-volume 3 --thresholds 0.1,0.3,0.5
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys
import time
import warnings

from .._tables import CC_COUNT, COUNT_DISTRIBUTION_ID, markdown_table, write_csv, write_markdown
from ._options import add_count_options
from ._options import float_list as _float_list
from ._options import nonneg_float as _nonneg_float
from ._options import positive_int as _positive_int
from ._options import probability as _probability

HELP = "score count distributions and the cc_count baseline against ground-truth masks (report, CSV, plots)"

DEFAULT_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))
DEFAULT_DISCARD_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(0, 11))
METHOD = COUNT_DISTRIBUTION_ID  # as metrics.csv has always spelled it (lesioncount._tables)
BASELINE = CC_COUNT


def _thresholds(text: str) -> tuple[float, ...]:
    return _float_list(text, 0.0, 1.0)


def _fractions(text: str) -> tuple[float, ...]:
    return _float_list(text, 0.0, 1.0)


def _iou(text: str) -> float:
    v = _probability(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected an IoU in (0, 1], got {text}")
    return v


def _size_edges(text: str) -> tuple[float, ...]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated volumes in mm^3, got {text!r}") from None
    if any(not math.isfinite(v) or v <= 0 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise argparse.ArgumentTypeError(f"expected increasing positive volumes in mm^3, got {text!r}")
    return tuple(values)


def register(subparsers) -> None:
    """Add the ``evaluate`` subcommand to the ``lesioncount`` parser."""
    p = subparsers.add_parser("evaluate", help=HELP,
                              description="Score count distributions and the cc_count baseline against ground-truth "
                                          "lesion masks paired by case id; writes report.md, per_case.csv, metrics.csv, "
                                          "accuracy_vs_discarded.csv and PNG figures to OUTPUT. Exit code 1 when a case "
                                          "failed or was unpaired, 2 for bad arguments.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-p", "--predictions", required=True, type=pathlib.Path,
                   help="folder (or one file) of probability maps: .nii/.nii.gz, nnU-Net .npz, .npy")
    p.add_argument("-g", "--ground-truth", required=True, type=pathlib.Path,
                   help="folder (or one file) of lesion masks with the same case ids (nonzero = lesion)")
    p.add_argument("-o", "--output", required=True, type=pathlib.Path, help="output folder (created)")
    p.add_argument("--thresholds", type=_thresholds, default=DEFAULT_THRESHOLDS,
                   help="comma-separated candidate thresholds (probabilities in [0, 1)) of the sweep")
    p.add_argument("--report-threshold", type=_probability, default=0.1,
                   help="threshold of the accuracy-vs-discarded curve and the reliability diagram "
                        "(added to the sweep if missing)")
    add_count_options(
        p, connectivity="", min_size="drop candidates and GT lesions with fewer voxels",
        min_volume="drop candidates and GT lesions smaller than this many mm^3 (per-case voxel size)",
        max_count="M: count bins 0..M-1 and 'M or more'", from_logits="the maps hold logits (thresholds stay probabilities)",
        channel="lesion channel of multi-channel maps, 0-based (default: 1 for nnU-Net .npz; a 4-D NIfTI "
                "with several volumes needs it)", checked=True)
    p.add_argument("--n-bins", type=_positive_int, default=10, help="confidence bins of ECE/MCE and the reliability diagram")
    p.add_argument("--discard-fractions", type=_fractions, default=DEFAULT_DISCARD_FRACTIONS,
                   help="comma-separated fractions in [0, 1) of most uncertain cases to discard")
    det = p.add_argument_group("lesion-wise detection (lesioncount.detection)")
    det.add_argument("--match", choices=("overlap", "iou", "peak"), default="overlap",
                     help="when a candidate may match a GT lesion: any shared voxel; IoU >= --match-iou; or its "
                          "peak voxel within --match-distance mm of the lesion")
    det.add_argument("--match-iou", type=_iou, default=0.1, help="IoU threshold of --match iou (picai_eval: 0.1)")
    det.add_argument("--match-distance", type=_nonneg_float, default=0.0,
                     help="mm the peak may lie outside the GT lesion for --match peak (0: inside, as MONAI)")
    det.add_argument("--assignment", choices=("hungarian", "greedy"), default="hungarian",
                     help="one-to-one assignment: maximise the sum of (1 + IoU) (picai_eval), or greedy by IoU")
    det.add_argument("--unmatched", choices=("fp", "ignore"), default="fp",
                     help="a candidate eligible for an already matched lesion: a false positive, or ignored "
                          "(picai_eval, MONAI)")
    det.add_argument("--size-bins", type=_size_edges, default=(10.0, 100.0, 1000.0),
                     help="lesion volume bin edges in mm^3 for recall by size")
    det.add_argument("--froc-interpolation", choices=("linear", "step"), default="linear",
                     help="sensitivity at a FP rate: np.interp on the curve (MONAI, LUNA16) or the last operating "
                          "point at or below it (picai_eval)")
    p.add_argument("--allow-missing", action="store_true",
                   help="cases present in only one folder are reported but do not make the exit code non-zero")
    p.add_argument("--allow-missing-geometry", action="store_true",
                   help="nnU-Net .npz without its sibling CASE.nii.gz: take the geometry from the GT mask "
                        "instead of failing")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures (no matplotlib needed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-case progress lines")
    p.set_defaults(func=run)


@dataclasses.dataclass
class CaseResult:
    """Per-case numbers, for every threshold of the sweep (T thresholds, M = max_count)."""

    case: str
    gt_count: int
    pmf: "torch.Tensor"              # (T, M+1) float64
    log_pmf: "torch.Tensor"          # (T, M+1) float64
    expected_count: "torch.Tensor"   # (T,) float64, sum of the candidate probabilities
    entropy: "torch.Tensor"          # (T,) float64, nats
    cc_count: "torch.Tensor"         # (T,) int64, components of pred > threshold
    matches: list = dataclasses.field(default_factory=list)  # (T,) detection.LesionMatch per threshold
    voxel_volume: float = 1.0        # mm^3


@dataclasses.dataclass
class Failure:
    """A case that could not be evaluated: its id, the file at fault and the reason (shown in the report)."""

    case: str
    file: str
    reason: str


def _has_geometry(path: pathlib.Path) -> bool:
    return not path.name.lower().endswith(".npy")


def evaluate_case(pred_path: pathlib.Path, gt_path: pathlib.Path, args, thresholds) -> CaseResult:
    """Read one prediction (once) and its GT mask; count the GT and the prediction at every threshold.

    Args:
        pred_path: probability (or logit) map file, read by :func:`lesioncount.io.read_probability_map`
            into an (X, Y, Z) array.
        gt_path: lesion mask on the same grid (nonzero = lesion).
        args: the parsed ``evaluate`` options (connectivity, min_size / min_volume, max_count,
            from_logits, channel, allow_missing_geometry).
        thresholds: (T,) sorted candidate thresholds.

    Returns:
        :class:`CaseResult` with (T, M+1) pmf / log_pmf and (T,) expected count, entropy, cc_count.

    Raises:
        CaseReadError / ValueError naming the file at fault.

    Example:
        >>> from lesioncount.cli import build_parser
        >>> args = build_parser().parse_args(["evaluate", "-p", "p", "-g", "g", "-o", "o"])
        >>> case = evaluate_case(pathlib.Path("p/a.nii.gz"), pathlib.Path("g/a.nii.gz"), args, [0.1, 0.5])  # doctest: +SKIP
        >>> case.pmf.shape                                                                  # doctest: +SKIP
        torch.Size([2, 5])
    """
    import numpy as np
    import torch

    from .. import count_distribution, label
    from ..io import CaseReadError, _nnunet_sibling, read_mask, read_probability_map
    from ..detection import match_lesions, scored_candidates
    from ..report import min_size_for_volume

    # an nnU-Net .npz without its sibling segmentation has no geometry of its own; with
    # --allow-missing-geometry it takes the GT mask's (same grid: the shapes are compared below)
    no_sibling = pred_path.name.lower().endswith(".npz") and _nnunet_sibling(pred_path) is None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*sibling segmentation .* not found")
        pred = read_probability_map(pred_path, channel=args.channel,
                                    missing_geometry="identity" if getattr(args, "allow_missing_geometry", False)
                                    else "error")
    pred_geometry = _has_geometry(pred_path) and not no_sibling
    gt = read_mask(gt_path)
    if tuple(pred.data.shape) != tuple(gt.data.shape):
        raise CaseReadError(gt_path, f"mask shape {tuple(gt.data.shape)} does not match the prediction "
                                     f"{pred_path.name} of shape {tuple(pred.data.shape)}")
    if pred_geometry and _has_geometry(gt_path) and not np.allclose(pred.affine, gt.affine, atol=1e-3):
        raise CaseReadError(gt_path, f"affine differs from that of the prediction {pred_path.name} "
                                     f"(max difference {np.abs(pred.affine - gt.affine).max():.3g})")
    geometry = pred if pred_geometry else gt
    min_size = args.min_size
    if args.min_volume is not None:
        min_size = min_size_for_volume(args.min_volume, geometry.voxel_volume)

    gt_data = np.asarray(gt.data)
    if np.issubdtype(gt_data.dtype, np.floating) and not np.isfinite(gt_data).all():
        raise CaseReadError(gt_path, "mask contains NaN or infinite values")
    gt_foreground = torch.from_numpy(np.ascontiguousarray(gt_data != 0)).unsqueeze(0)
    gt_labels, gt_num = label(gt_foreground, 0.5, args.connectivity, min_size)
    gt_count = int(gt_num[0])
    gt_labels = gt_labels[0].numpy()
    del gt_foreground, gt_data
    spacing = geometry.spacing  # mm per voxel (1 for .npy: distances in voxels)

    x = torch.from_numpy(np.ascontiguousarray(pred.data)).unsqueeze(0)
    rows = {"pmf": [], "log_pmf": [], "expected_count": [], "entropy": [], "cc_count": []}
    matches = []
    with torch.inference_mode():
        for t in thresholds:
            try:
                r = count_distribution(x, threshold=t, connectivity=args.connectivity, min_size=min_size,
                                       max_count=args.max_count, from_logits=args.from_logits)
            except (ValueError, RuntimeError) as exc:  # NaN / out-of-range values (the compiled op raises RuntimeError)
                raise CaseReadError(pred_path, str(exc)) from None
            rows["pmf"].append(r.pmf[0].double())
            rows["log_pmf"].append(r.log_pmf[0].double())
            rows["expected_count"].append(r.expected_count[0].double())
            rows["entropy"].append(r.entropy[0].double())
            # the candidates are the components of pred > t with the size rule: the cc_count baseline
            rows["cc_count"].append(r.num_lesions[0].long())
            cand = scored_candidates(r, 0)
            matches.append(match_lesions(gt_labels, cand.labels, cand.probs, cand.peaks,
                                         rule=getattr(args, "match", "overlap"),
                                         iou_threshold=getattr(args, "match_iou", 0.1),
                                         max_distance=getattr(args, "match_distance", 0.0), spacing=spacing,
                                         assignment=getattr(args, "assignment", "hungarian"),
                                         unmatched=getattr(args, "unmatched", "fp")))
    return CaseResult(case=pred.name, gt_count=gt_count, matches=matches, voxel_volume=geometry.voxel_volume,
                      **{k: torch.stack(v) for k, v in rows.items()})


def _pair_cases(pred_root, gt_root):
    from ..io import case_name, find_cases

    preds = {case_name(p): p for p in find_cases(pred_root)}
    gts = {case_name(p): p for p in find_cases(gt_root)}
    paired = [(name, preds[name], gts[name]) for name in sorted(preds) if name in gts]
    no_gt = [(name, preds[name]) for name in sorted(preds) if name not in gts]
    no_pred = [(name, gts[name]) for name in sorted(gts) if name not in preds]
    return paired, no_gt, no_pred


def compute_tables(cases: list[CaseResult], thresholds, args):
    """Metric rows per (method, threshold), accuracy-vs-discarded rows, and what the figures need.

    Args:
        cases: N :class:`CaseResult` (same thresholds, same M).
        thresholds: (T,) the sweep; must contain ``args.report_threshold``.
        args: ``max_count``, ``n_bins``, ``report_threshold``, ``discard_fractions``.

    Returns:
        ``(rows, discard_rows, figures)``: 2T dicts ``{method, threshold, n_cases, accuracy, precision,
        recall, f1, ece, mce, count_mae, nll}`` (baseline nll None); F dicts ``{fraction, n_discarded,
        n_kept, accuracy}``; tensors for the figures (``pmf_report`` (N, M+1), ``target`` (N,), ...).

    Example:
        >>> rows, discard_rows, figures = compute_tables(cases, [0.1, 0.5], args)   # doctest: +SKIP
        >>> [(r["method"], r["threshold"]) for r in rows][:2]                       # doctest: +SKIP
        [('count_distribution', 0.1), ('cc_count', 0.1)]
    """
    import torch
    import torch.nn.functional as F

    from ..metrics import accuracy_vs_discarded, count_bins, count_metrics, discarded_counts

    M = args.max_count
    target = torch.tensor([c.gt_count for c in cases], dtype=torch.int64)
    pmf = torch.stack([c.pmf for c in cases])            # (N, T, M+1)
    log_pmf = torch.stack([c.log_pmf for c in cases])
    expected = torch.stack([c.expected_count for c in cases])
    entropy = torch.stack([c.entropy for c in cases])
    cc = torch.stack([c.cc_count for c in cases])        # (N, T)
    rows = []
    baseline_onehot = {}
    for i, t in enumerate(thresholds):
        ours = count_metrics(pmf[:, i], target, M, args.n_bins, expected_count=expected[:, i], log_pmf=log_pmf[:, i])
        rows.append({"method": METHOD, "threshold": t, "n_cases": len(cases), **{k: float(v) for k, v in ours.items()}})
        onehot = F.one_hot(count_bins(cc[:, i], M), M + 1).double()
        baseline_onehot[t] = onehot
        base = count_metrics(onehot, target, M, args.n_bins, expected_count=cc[:, i].double())
        base = {k: float(v) for k, v in base.items()}
        base["nll"] = None  # -log 0 = inf for every wrong hard prediction: not informative
        base["infeasible"] = None
        rows.append({"method": BASELINE, "threshold": t, "n_cases": len(cases), **base})
    r = thresholds.index(args.report_threshold)
    fractions = list(args.discard_fractions)
    acc = accuracy_vs_discarded(pmf[:, r], target, fractions, M)
    n = len(cases)
    dropped = discarded_counts(n, fractions)
    discard_rows = [{"fraction": f, "n_discarded": int(d), "n_kept": n - int(d), "accuracy": float(a)}
                    for f, d, a in zip(fractions, dropped, acc)]
    base_rows = [row for row in rows if row["method"] == BASELINE]
    best_baseline = max(base_rows, key=lambda row: row["accuracy"])["threshold"]  # first maximum
    figures = {
        "target": target, "pmf_report": pmf[:, r], "entropy": entropy,
        "baseline_onehot": baseline_onehot[best_baseline], "best_baseline_threshold": best_baseline,
    }
    return rows, discard_rows, figures


METRIC_COLUMNS = ("accuracy", "precision", "recall", "f1", "ece", "mce", "count_mae", "nll", "infeasible")
DETECTION_COLUMNS = ("n_gt", "n_candidates", "tp", "fp", "fn", "ignored", "precision", "recall", "f1",
                     "f1_case_mean", "lesion_dice", "count_abs_diff", "expected_abs_count_error", "ap", "cpm")
LESION_COLUMNS = ("case", "kind", "gt_id", "candidate_id", "iou", "dice", "gt_voxels", "gt_volume_mm3",
                  "candidate_voxels", "candidate_volume_mm3", "p_k")


def _rate_name(rate: float) -> str:
    return f"sens@{rate:g}fp"


def compute_detection(cases: list[CaseResult], thresholds, args):
    """Lesion-wise detection tables: one row per threshold, and the report threshold's details.

    Args:
        cases: N :class:`CaseResult` with their (T,) ``matches``.
        thresholds: (T,) the sweep; must contain ``args.report_threshold``.
        args: ``report_threshold``, ``size_bins``, ``froc_interpolation``.

    Returns:
        ``(rows, report)``: T dicts with :data:`DETECTION_COLUMNS`, ``threshold`` and the FROC
        sensitivities ``sens@Xfp``; ``report`` = {``froc`` (the :func:`~lesioncount.detection.froc_from_matches`
        dict), ``pr`` (precision-recall curve), ``recall_by_size`` rows, ``lesions`` rows (:data:`LESION_COLUMNS`)}
        at the report threshold.

    Example:
        >>> rows, report = compute_detection(cases, [0.1, 0.5], args)   # doctest: +SKIP
        >>> rows[0]["f1"], report["froc"]["cpm"]                      # doctest: +SKIP
    """
    from ..detection import (FROC_FP_RATES, detection_metrics, froc_from_matches, precision_recall_curve,
                             recall_by_size)

    interp = getattr(args, "froc_interpolation", "linear")
    rows = []
    for i, t in enumerate(thresholds):
        ms = [c.matches[i] for c in cases]
        d = detection_metrics(ms)
        f = froc_from_matches(ms, FROC_FP_RATES, interp)
        row = {"threshold": t, **{k: d[k] for k in DETECTION_COLUMNS if k in d}, "ap": f["ap"], "cpm": f["cpm"]}
        row.update({_rate_name(r): float(v) for r, v in zip(f["fp_rates"], f["sensitivities"])})
        rows.append(row)
    j = thresholds.index(args.report_threshold)
    ms = [c.matches[j] for c in cases]
    froc = froc_from_matches(ms, FROC_FP_RATES, interp)
    pr = None
    if froc["n_targets"]:
        from ..detection import _scores

        scores, is_tp, n_gt = _scores(ms)
        pr = precision_recall_curve(scores, is_tp, n_gt)
        pr["ap"] = froc["ap"]
    by_size = recall_by_size(ms, getattr(args, "size_bins", (10.0, 100.0, 1000.0)), [c.voxel_volume for c in cases])
    lesions = []
    for c, m in zip(cases, ms):
        iou, dice = m.gt_iou, m.gt_dice
        for g in range(m.n_gt):
            k = int(m.gt_match[g])
            lesions.append({"case": c.case, "kind": "tp" if k >= 0 else "fn", "gt_id": g + 1,
                            "candidate_id": k + 1 if k >= 0 else None, "iou": float(iou[g]), "dice": float(dice[g]),
                            "gt_voxels": int(m.gt_sizes[g]), "gt_volume_mm3": float(m.gt_sizes[g] * c.voxel_volume),
                            "candidate_voxels": int(m.cand_sizes[k]) if k >= 0 else None,
                            "candidate_volume_mm3": float(m.cand_sizes[k] * c.voxel_volume) if k >= 0 else None,
                            "p_k": float(m.cand_probs[k]) if k >= 0 else None})
        for k in range(m.n_candidates):
            if m.cand_match[k] >= 0:
                continue
            lesions.append({"case": c.case, "kind": "ignored" if m.cand_ignored[k] else "fp", "gt_id": None,
                            "candidate_id": k + 1, "iou": None, "dice": None, "gt_voxels": None,
                            "gt_volume_mm3": None, "candidate_voxels": int(m.cand_sizes[k]),
                            "candidate_volume_mm3": float(m.cand_sizes[k] * c.voxel_volume),
                            "p_k": float(m.cand_probs[k])})
    return rows, {"froc": froc, "pr": pr, "recall_by_size": by_size, "lesions": lesions}


def per_case_rows(cases: list[CaseResult], thresholds) -> tuple[list[str], list[dict]]:
    """Columns ``case, gt_count`` and, per threshold t, ``expected@t, most_likely@t, cc_count@t``.

    Returns:
        ``(fieldnames, rows)``: 2 + 3T column names and one dict per case.

    Example:
        >>> fields, rows = per_case_rows(cases, [0.1])   # doctest: +SKIP
        >>> fields                                         # doctest: +SKIP
        ['case', 'gt_count', 'expected@0.1', 'most_likely@0.1', 'cc_count@0.1']
    """
    fields = ["case", "gt_count"]
    for t in thresholds:
        fields += [f"expected@{t:g}", f"most_likely@{t:g}", f"cc_count@{t:g}"]
    rows = []
    for c in cases:
        row = {"case": c.case, "gt_count": c.gt_count}
        most_likely = c.pmf.argmax(1)
        for i, t in enumerate(thresholds):
            row[f"expected@{t:g}"] = float(c.expected_count[i])
            row[f"most_likely@{t:g}"] = int(most_likely[i])
            row[f"cc_count@{t:g}"] = int(c.cc_count[i])
        rows.append(row)
    return fields, rows


def write_figures(out: pathlib.Path, rows, discard_rows, figures, thresholds, args) -> list[str]:
    """Write threshold_sweep.png, reliability.png and accuracy_vs_discarded.png into ``out``.

    Args: the outputs of :func:`compute_tables` and the parsed options. Returns the file names written.

    Example:
        >>> write_figures(out, *compute_tables(cases, thresholds, args), thresholds, args)  # doctest: +SKIP
        ['threshold_sweep.png', 'reliability.png', 'accuracy_vs_discarded.png']
    """
    from .. import plot

    written = []
    fig, axes = plot.new_figure(1, 2, figsize=(11, 4.2))
    for ax, metric, name in ((axes[0], "accuracy", "count accuracy"), (axes[1], "f1", "macro F1 over count bins")):
        series = {method: [row[metric] for row in rows if row["method"] == method] for method in (METHOD, BASELINE)}
        plot.plot_threshold_sweep(thresholds, series, name, ax=ax)
    written.append(plot.save_figure(fig, out / "threshold_sweep.png").name)

    fig, axes = plot.new_figure(1, 2, figsize=(11, 4.5))
    plot.plot_reliability_diagram(figures["pmf_report"], figures["target"], args.max_count, args.n_bins, ax=axes[0],
                                  label=f"{METHOD} @ {args.report_threshold:g}")
    plot.plot_reliability_diagram(figures["baseline_onehot"], figures["target"], args.max_count, args.n_bins, ax=axes[1],
                                  label=f"{BASELINE} @ {figures['best_baseline_threshold']:g} (most accurate)")
    written.append(plot.save_figure(fig, out / "reliability.png").name)

    fig = plot.plot_accuracy_vs_discarded([r["fraction"] for r in discard_rows],
                                          {f"{METHOD} @ {args.report_threshold:g}": [r["accuracy"] for r in discard_rows]})
    written.append(plot.save_figure(fig, out / "accuracy_vs_discarded.png").name)

    detection = figures.get("detection")
    if detection is not None and detection["froc"]["n_targets"]:
        name = f"p_k @ {args.report_threshold:g}"
        written.append(plot.save_figure(plot.plot_froc({name: detection["froc"]}), out / "froc.png").name)
        written.append(plot.save_figure(plot.plot_precision_recall({name: detection["pr"]}),
                                        out / "precision_recall.png").name)
    return written


def write_report(out: pathlib.Path, args, thresholds, cases, rows, discard_rows, figures, failures, no_gt, no_pred,
                 pngs, elapsed: float) -> None:
    """Write ``out/report.md``: settings, metric tables, figure links and every failed or unpaired case.

    Example:
        >>> write_report(out, args, thresholds, cases, rows, discard_rows, figures, [], [], [], pngs, 1.2)  # doctest: +SKIP
    """
    from .. import __version__

    lines = ["# lesioncount evaluation", ""]
    lines += ["## Settings", "",
              f"- predictions: `{args.predictions}`", f"- ground truth: `{args.ground_truth}`",
              f"- thresholds: {', '.join(f'{t:g}' for t in thresholds)} (report threshold {args.report_threshold:g})",
              f"- connectivity: {args.connectivity}",
              f"- size rule (candidates and GT lesions): "
              + (f">= {args.min_volume:g} mm^3" if args.min_volume is not None else f">= {args.min_size} voxels"),
              f"- count bins: 0..{args.max_count - 1}, {args.max_count}+ (max_count = {args.max_count})",
              f"- from_logits: {args.from_logits}; channel: {args.channel}; confidence bins: {args.n_bins}",
              f"- lesioncount {__version__}; {len(cases)} cases evaluated, {len(failures)} failed, "
              f"{len(no_gt)} predictions without GT, {len(no_pred)} GT masks without prediction; {elapsed:.1f} s",
              ""]
    if cases:
        counts = [c.gt_count for c in cases]
        hist = {}
        for v in counts:
            key = f"{min(v, args.max_count)}{'+' if v >= args.max_count else ''}"
            hist[key] = hist.get(key, 0) + 1
        lines += [f"True count bins: " + ", ".join(f"{k}: {hist[k]}" for k in sorted(hist)), ""]
        lines += ["## Metrics per method and threshold", "",
                  "Accuracy of the predicted count bin (this method: the most likely bin); precision, recall and "
                  "F1 are macro averages over the count bins present in predictions or targets; ECE/MCE are "
                  "top-label calibration errors (the baseline scored as a one-hot distribution); count MAE is "
                  "|expected count - true count| (baseline: |cc_count - true count|); NLL is the mean "
                  "-log P(true count bin) (undefined for the hard baseline).", ""]
        lines += markdown_table([{**row, "threshold": f"{row['threshold']:g}"} for row in rows],
                                ["method", "threshold", *METRIC_COLUMNS], none="n/a")
        lines.append("")
        for method in (METHOD, BASELINE):
            best = max((r for r in rows if r["method"] == method), key=lambda r: r["accuracy"])
            lines.append(f"- best {method} accuracy {best['accuracy']:.4f} at threshold {best['threshold']:g} "
                         f"(F1 {best['f1']:.4f})")
        lines += ["", f"## Accuracy vs discarded most uncertain cases ({METHOD} @ {args.report_threshold:g}, "
                      "ranked by entropy of the count distribution)", ""]
        lines += markdown_table([{**r, "fraction": f"{r['fraction']:g}"} for r in discard_rows],
                                ["fraction", "n_kept", "accuracy"], header=["fraction discarded", "cases kept", "accuracy"])
        lines.append("")
        if pngs:
            lines += ["## Figures", ""]
            captions = {"threshold_sweep.png": "Count accuracy and macro F1 against the threshold",
                        "reliability.png": f"Reliability diagrams ({METHOD} at {args.report_threshold:g}; "
                                           f"{BASELINE} at its most accurate threshold "
                                           f"{figures['best_baseline_threshold']:g})",
                        "accuracy_vs_discarded.png": "Accuracy after discarding the most uncertain cases"}
            for name in pngs:
                lines += [f"![{captions.get(name, name)}]({name})", ""]
        lines += _detection_report(args, figures.get("detection_rows", []), figures.get("detection"))
        lines += ["Per-case numbers: [per_case.csv](per_case.csv); metric table: [metrics.csv](metrics.csv); "
                  "[accuracy_vs_discarded.csv](accuracy_vs_discarded.csv); lesion-wise: "
                  "[detection_metrics.csv](detection_metrics.csv), [lesions.csv](lesions.csv), [froc.csv](froc.csv), "
                  "[recall_by_size.csv](recall_by_size.csv).", ""]
    if failures or no_gt or no_pred:
        lines += ["## Problems", ""]
        for f in failures:
            lines.append(f"- FAILED `{f.case}` ({f.file}): {f.reason}")
        for name, path in no_gt:
            lines.append(f"- no ground truth for prediction `{name}` ({path})")
        for name, path in no_pred:
            lines.append(f"- no prediction for ground truth `{name}` ({path})")
        lines.append("")
    write_markdown(out / "report.md", lines)


def _detection_report(args, rows, detection) -> list[str]:
    if not rows:
        return []
    rule = {"overlap": "any shared voxel", "iou": f"IoU >= {getattr(args, 'match_iou', 0.1):g}",
            "peak": f"peak within {getattr(args, 'match_distance', 0.0):g} mm of the lesion"}[getattr(args, "match", "overlap")]
    lines = ["## Lesion-wise detection", "",
             f"Candidates matched one-to-one to GT lesions ({rule}; {getattr(args, 'assignment', 'hungarian')} "
             f"assignment; unmatched eligible candidates: {getattr(args, 'unmatched', 'fp')}). Precision, recall and "
             "F1 count every candidate (pooled over cases; f1_case_mean averages per-case F1). Lesion Dice: per case "
             "sum of the GT lesions' Dice with their matched candidate / (GT lesions + FPs), averaged (BraTS 2023 "
             "style, one-to-one). |K-G|: candidates minus GT lesions; E|C-G|: under the exact count distribution. "
             "AP and the FROC (CPM = mean sensitivity at 1/8..8 FPs per scan, "
             f"{getattr(args, 'froc_interpolation', 'linear')} reading) score each candidate by p_k.", ""]
    counts = ("n_gt", "n_candidates", "tp", "fp", "fn")
    scores = ("precision", "recall", "f1", "f1_case_mean", "lesion_dice", "count_abs_diff", "expected_abs_count_error",
              "ap", "cpm")
    lines += markdown_table([{"threshold": f"{r['threshold']:g}", **{k: r[k] for k in counts},
                              **{k: float(r[k]) for k in scores}} for r in rows],
                            ["threshold", *counts, *scores],
                            header=["threshold", "GT", "cand.", "TP", "FP", "FN", "precision", "recall", "F1",
                                    "F1 case mean", "lesion Dice", "mean abs(K-G)", "E abs(C-G)", "AP", "CPM"])
    lines.append("")
    if detection is not None and detection["froc"]["n_targets"]:
        f = detection["froc"]
        lines += [f"FROC at threshold {args.report_threshold:g}: "
                  + ", ".join(f"{r:g} FP/scan: {v:.4f}" for r, v in zip(f["fp_rates"], f["sensitivities"]))
                  + f"; CPM {f['cpm']:.4f}; AP {f['ap']:.4f}.", ""]
        lines += markdown_table(
            [{**b, "bin": f"[{b['lower']:g}, {'inf' if math.isinf(b['upper']) else format(b['upper'], 'g')})"}
             for b in detection["recall_by_size"]],
            ["bin", "n_gt", "tp", "recall"], header=["lesion volume (mm^3)", "GT lesions", "found", "recall"])
        lines.append("")
    return lines


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the outputs, print a summary. Returns the exit code (0 ok, 1 failures, 2 usage)."""
    from .._extras import require
    from ..io import CaseReadError

    require("torchmetrics", "calibration errors in `lesioncount evaluate`")
    if not args.no_plots:
        require("matplotlib", "the figures of `lesioncount evaluate` (or pass --no-plots)")
    import torch

    thresholds = sorted(set(args.thresholds) | {args.report_threshold})
    try:
        paired, no_gt, no_pred = _pair_cases(args.predictions, args.ground_truth)
    except (CaseReadError, FileNotFoundError) as exc:
        print(f"lesioncount evaluate: {exc}", file=sys.stderr)
        return 2
    out = args.output
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"lesioncount evaluate: error: -o/--output {out}: cannot create the output folder ({exc})", file=sys.stderr)
        return 2
    start = time.perf_counter()
    cases: list[CaseResult] = []
    failures: list[Failure] = []
    for i, (name, pred_path, gt_path) in enumerate(paired):
        try:
            c = evaluate_case(pred_path, gt_path, args, thresholds)
        except (CaseReadError, ValueError, TypeError, OSError, RuntimeError) as exc:
            reason = str(exc) if isinstance(exc, CaseReadError) else f"{pred_path}: {type(exc).__name__}: {exc}"
            failures.append(Failure(name, str(pred_path), reason))
            print(f"lesioncount evaluate: case {name} failed: {reason}", file=sys.stderr)
            continue
        cases.append(c)
        if not args.quiet:
            j = thresholds.index(args.report_threshold)
            print(f"[{i + 1}/{len(paired)}] {name}: true {c.gt_count}, expected {float(c.expected_count[j]):.2f}, "
                  f"most likely {int(c.pmf[j].argmax())}, cc_count {int(c.cc_count[j])} (threshold {args.report_threshold:g})")
    for name, path in no_gt:
        print(f"lesioncount evaluate: no ground truth for prediction {path}", file=sys.stderr)
    for name, path in no_pred:
        print(f"lesioncount evaluate: no prediction for ground truth {path}", file=sys.stderr)

    rows, discard_rows, figures, pngs = [], [], {}, []
    if cases:
        with torch.no_grad():
            rows, discard_rows, figures = compute_tables(cases, thresholds, args)
        detection_rows, detection = compute_detection(cases, thresholds, args)
        figures["detection_rows"], figures["detection"] = detection_rows, detection
        from ..detection import FROC_FP_RATES

        write_csv(out / "detection_metrics.csv",
                   ["threshold", *DETECTION_COLUMNS, *(_rate_name(r) for r in FROC_FP_RATES)], detection_rows)
        write_csv(out / "lesions.csv", LESION_COLUMNS, detection["lesions"])
        f = detection["froc"]
        write_csv(out / "froc.csv", ["score_threshold", "fps_per_image", "sensitivity"],
                   [{"score_threshold": float(t), "fps_per_image": float(x), "sensitivity": float(y)}
                    for t, x, y in zip(f["thresholds"], f["fps_per_image"], f["sensitivity"])])
        write_csv(out / "recall_by_size.csv", ["lower", "upper", "n_gt", "tp", "recall"], detection["recall_by_size"])
        fields, case_rows = per_case_rows(cases, thresholds)
        write_csv(out / "per_case.csv", fields, case_rows)
        write_csv(out / "metrics.csv", ["method", "threshold", "n_cases", *METRIC_COLUMNS], rows)
        write_csv(out / "accuracy_vs_discarded.csv", ["fraction", "n_discarded", "n_kept", "accuracy"], discard_rows)
        if not args.no_plots:
            pngs = write_figures(out, rows, discard_rows, figures, thresholds, args)
    else:
        print("lesioncount evaluate: no case could be evaluated", file=sys.stderr)
    write_report(out, args, thresholds, cases, rows, discard_rows, figures, failures, no_gt, no_pred, pngs,
                 time.perf_counter() - start)
    if cases:
        j = thresholds.index(args.report_threshold)
        ours = next(r for r in rows if r["method"] == METHOD and r["threshold"] == thresholds[j])
        best_base = max((r for r in rows if r["method"] == BASELINE), key=lambda r: r["accuracy"])
        d = figures["detection_rows"][j]
        print(f"{len(cases)} cases: {METHOD} @ {args.report_threshold:g} accuracy {ours['accuracy']:.4f}, F1 {ours['f1']:.4f}, "
              f"ECE {ours['ece']:.4f}; best {BASELINE} accuracy {best_base['accuracy']:.4f} @ {best_base['threshold']:g}; "
              f"lesion F1 {d['f1']:.4f}, lesion Dice {d['lesion_dice']:.4f}, CPM {d['cpm']:.4f}, AP {d['ap']:.4f}; "
              f"report in {out / 'report.md'}")
    unpaired = (len(no_gt) + len(no_pred)) if not args.allow_missing else 0
    return 1 if (failures or unpaired or not cases) else 0
