"""Pool evaluate-model outputs of several seeds into the tables of docs/REPRODUCTION.md.

    .venv/bin/python docs/comparison_summary.py --table 1 runs/comparison/phantom_s0_eval runs/comparison/phantom_s1_eval

For every model's main method (count distribution / count head) and the cc_count / MC-dropout rows:
the per-seed values and their mean (accuracy, count F1, seg F1, SR, AD in %, seg ECE in 1e-5, seg MCE,
count ECE), the paper's numbers beside them, and paired comparisons with the reference model pooled
over the seeds (the seeds' test cases are different phantoms, so the pooled cases are independent):
discordant counts, exact McNemar p, 95% paired bootstrap interval of the accuracy difference.
"""
from __future__ import annotations

import argparse
import csv
import math
import pathlib

import torch

from lesioncount.train.evaluation import PAPER_TABLES
from lesioncount.train.uncertainty import paired_comparison

ORDER = ("post_hoc", "bottleneck", "multihead", "downstream", "multitask")


def _read(path: pathlib.Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _f(v: str) -> float:
    return float(v) if v not in ("", None) else math.nan


def _fmt(v: float, digits: int = 1) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_dirs", nargs="+", type=pathlib.Path, help="evaluate-model output folders (one per seed)")
    parser.add_argument("--table", choices=("1", "C.2"), default="1", help="which paper table to put beside ours")
    parser.add_argument("--reference", default="multitask", help="model the others are compared with")
    args = parser.parse_args()

    tables = [_read(d / "table1.csv") for d in args.eval_dirs]
    cases = [_read(d / "per_case.csv") for d in args.eval_dirs]
    paper = PAPER_TABLES[args.table]

    print(f"### Ours (mean over {len(tables)} seed(s); per seed in brackets) and the paper's Table {args.table}\n")
    cols = ("acc", "count F1", "seg F1", "seg ECE [1e-5]", "seg MCE", "SR", "AD", "count ECE")
    print("| model | method | source | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---:|" * len(cols))
    methods = []
    for row in tables[0]:
        if (row["model"], row["method"]) not in methods:
            methods.append((row["model"], row["method"]))
    methods.sort(key=lambda mm: (ORDER.index(mm[0]) if mm[0] in ORDER else 99, mm[1].startswith(("cc_count", "MC"))))
    for model, method in methods:
        per_seed = []
        for t in tables:
            r = next((r for r in t if r["model"] == model and r["method"] == method), None)
            if r is None:
                continue
            per_seed.append([100 * _f(r["count_accuracy"]), 100 * _f(r["count_f1"]), 100 * _f(r["seg_f1"]),
                             1e5 * _f(r["seg_ece"]), _f(r["seg_mce"]), 100 * _f(r["attack_sr"]),
                             100 * _f(r["attack_ad"]), _f(r["count_ece"])])
        digits = (1, 1, 1, 1, 3, 1, 1, 3)
        cells = []
        for j in range(len(cols)):
            vals = [s[j] for s in per_seed]
            if all(math.isnan(v) for v in vals):
                cells.append("")
                continue
            mean = sum(vals) / len(vals)
            seeds = " / ".join(_fmt(v, digits[j]) for v in vals)
            cells.append(_fmt(mean, digits[j]) + (f" [{seeds}]" if len(vals) > 1 else ""))
        print(f"| {model} | {method} | ours | " + " | ".join(cells) + " |")
        main_method = method.startswith(("count distribution", "count head"))
        if main_method and model in paper:
            p = paper[model]
            pc = [p.get("acc"), p.get("f1"), p.get("seg_f1"), p.get("ece"), p.get("mce"), p.get("sr"), p.get("ad"), None]
            print(f"| {model} | | paper | " + " | ".join("" if v is None else f"{v:g}" for v in pc) + " |")

    print(f"\n### Paired with `{args.reference}` (its main method), pooled over the seeds\n")
    print("| model | method | acc ref | acc other | ref only | other only | McNemar p | bootstrap 95% CI of ref - other |")
    print("|---|---|---:|---:|---:|---:|---:|---|")

    def correct_vectors(model: str, kind: str):
        out = []
        for rows in cases:
            sel = [r for r in rows if r["model"] == model]
            if not sel:
                return None
            truth = torch.tensor([min(int(r["true_count"]), 4) for r in sel])
            if kind == "main":
                pred = torch.tensor([int(r["most_likely"]) for r in sel])
            else:
                key = next(k for k in sel[0] if k.startswith("cc_count_"))
                pred = torch.tensor([min(int(r[key]), 4) for r in sel])
            out.append(pred == truth)
        return torch.cat(out)

    ref = correct_vectors(args.reference, "main")
    for model in ORDER:
        for kind in ("main", "cc"):
            if model == args.reference and kind == "main":
                continue
            other = correct_vectors(model, kind)
            if other is None or ref is None or other.shape != ref.shape:
                continue
            r = paired_comparison(ref, other)
            label = "main" if kind == "main" else "cc_count (0.5)"
            print(f"| {model} | {label} | {r['accuracy_a']:.3f} | {r['accuracy_b']:.3f} | {r['a_only']} | "
                  f"{r['b_only']} | {r['mcnemar_p']:.3g} | [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] |")


if __name__ == "__main__":
    main()
