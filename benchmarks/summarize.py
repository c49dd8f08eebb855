"""Print a markdown table from a pytest-benchmark JSON file (``--benchmark-json``).

Usage::

    python benchmarks/summarize.py out/bench_label.json [--baseline scipy --baseline cc3d]

One table per benchmark group: implementation, median (ms), IQR (ms), rounds, throughput
(voxels/s, or candidates/s for the Poisson-binomial benchmarks, from the median), peak memory
above the input where recorded, and for each ``--baseline`` the speedup
``median(baseline) / median(row)`` (> 1 means the row is faster than the baseline; blank when the
group has no such baseline). The implementation name is ``extra_info["impl"]`` (falls back to
the test name). Default baselines: scipy, cc3d, published, torch-dp.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict


def _fmt_rate(v):
    if v is None:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.1f}"


def summarize(data: dict, baselines: list[str]) -> str:
    groups: "OrderedDict[str, list]" = OrderedDict()
    for b in data["benchmarks"]:
        groups.setdefault(b.get("group") or "(no group)", []).append(b)
    lines = []
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {}).get("brand_raw", "?")
    lines.append(
        f"Machine: {cpu}, {mi.get('os_cpu_count', '?')} logical CPUs, torch {mi.get('torch', '?')} "
        f"({mi.get('torch_num_threads', '?')} threads), python {mi.get('python_version', '?')}, "
        f"scipy {mi.get('scipy', '?')}, cc3d {mi.get('cc3d', '?')}, scikit-image {mi.get('skimage', '?')}, "
        f"lesioncount ops loaded: {mi.get('lesioncount_has_ops', '?')}"
    )
    loads = [b.get("extra_info", {}).get("loadavg_1m") for b in data["benchmarks"]]
    loads = [x for x in loads if x is not None]
    if loads:
        lines.append(f"1-minute load average during the run: {min(loads):.2f} to {max(loads):.2f}")
    ci = data.get("commit_info", {})
    if ci.get("id"):
        lines.append(f"Commit: {ci['id'][:12]}{' (dirty)' if ci.get('dirty') else ''}")
    lines.append("")
    for group, rows in groups.items():
        medians = {}
        for r in rows:
            impl = r.get("extra_info", {}).get("impl", r["name"])
            medians.setdefault(impl, r["stats"]["median"])
        present = [bl for bl in baselines if bl in medians]
        unit = rows[0].get("extra_info", {}).get("unit", "voxels")
        has_mem = any("peak_mem_above_input_MiB" in r.get("extra_info", {}) for r in rows)
        lines.append(f"### {group}")
        lines.append("")
        header = ["impl", "median (ms)", "IQR (ms)", "rounds", f"{unit}/s"]
        if has_mem:
            header.append("peak mem above input (MiB)")
        header += [f"speedup vs {bl}" for bl in present]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            ei = r.get("extra_info", {})
            impl = ei.get("impl", r["name"])
            med = r["stats"]["median"]
            n = ei.get("voxels")
            cells = [
                impl,
                f"{med * 1e3:.2f}",
                f"{r['stats']['iqr'] * 1e3:.2f}",
                str(r["stats"]["rounds"]),
                _fmt_rate(n / med) if n and med > 0 else "",
            ]
            if has_mem:
                m = ei.get("peak_mem_above_input_MiB")
                cells.append(f"{m:.0f}" if m is not None else "")
            for bl in present:
                cells.append(f"{medians[bl] / med:.2f}x" if med > 0 else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s)")
    ap.add_argument("--baseline", action="append", default=None,
                    help="implementation name to compute speedups against (repeatable)")
    args = ap.parse_args(argv)
    baselines = args.baseline or ["scipy", "cc3d", "published", "torch-dp"]
    for path in args.json:
        with open(path) as f:
            data = json.load(f)
        print(f"## {path}\n")
        print(summarize(data, baselines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
