"""Where ``lesioncount count`` spends its time on a folder of NIfTI probability maps.

Generates ``--cases`` (default 20) realistic probability maps of ``--shape`` (default 160x192x160,
float32, :func:`lesioncount.synthetic.realistic_probability_maps`, seeded) as ``.nii.gz`` files
in a temporary folder (or ``--data-dir``, reused when it already holds them), then runs the
``count`` command in-process for each ``--workers`` value, ``--repeats`` times, and prints:

- the wall time of the whole command and the process CPU time (all threads; cpu > wall means the
  reader threads really ran in parallel),
- per-case medians of the stages the command records in each ``CASE.json``: ``read_s`` (open,
  decompress, convert; measured inside the reader thread), ``wait_s`` (how long the counting
  thread waited for a case to be read), ``count_s`` (count distribution, baseline and lesion table)
  and ``write_s`` (JSON formatting, plus the label map with ``--save-labels``),
- the sum of each stage over the cases, for comparison with the wall time.

With ``--workers 0`` the main thread reads (wall ~ read + count + write). With ``--workers N >= 1``
N threads decompress ahead while the main thread counts, so the wall time approaches
``max(read / min(N, cores), count + write)``.

Usage::

    .venv/bin/python benchmarks/bench_cli_count.py                      # 20 cases, workers 0 1 2
    .venv/bin/python benchmarks/bench_cli_count.py --cases 4 --workers 1 2 --save-labels

Generating 20 cases takes about a minute (gzip compression of 20 MB float maps dominates).
Timings on a machine shared with other jobs are noisy: report the load.
"""
from __future__ import annotations

import argparse
import contextlib
import io as _io
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np


def make_cases(folder: pathlib.Path, cases: int, shape, seed: int = 0) -> list[pathlib.Path]:
    """Write ``cases`` float32 .nii.gz probability maps (1 x 1 x 1.5 mm voxels) into ``folder``."""
    import nibabel as nib

    from lesioncount.synthetic import realistic_probability_maps

    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    affine[:3, 3] = [-80.0, -96.0, -120.0]
    paths = []
    for i in range(cases):
        path = folder / f"case_{i:03d}.nii.gz"
        if not path.exists():
            probs = realistic_probability_maps(1, shape, seed=seed + i)[0].numpy()
            nib.save(nib.Nifti1Image(probs, affine), str(path))
        paths.append(path)
    return paths


def run_once(data_dir: pathlib.Path, out_dir: pathlib.Path, workers: int, save_labels: bool, threads: int = 1) -> dict:
    """Run ``lesioncount count`` in-process; returns wall time and the per-case stage timings."""
    from lesioncount.cli import main

    argv = ["count", "-i", str(data_dir), "-o", str(out_dir), "--overwrite", "--quiet", "--workers", str(workers),
            "--threads", str(threads)]
    if save_labels:
        argv.append("--save-labels")
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stderr(_io.StringIO()):
        rc = main(argv)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if rc != 0:
        raise RuntimeError(f"lesioncount count exited with {rc}")
    stages = {"read_s": [], "read_cpu_s": [], "wait_s": [], "count_s": [], "write_s": []}
    for path in sorted(out_dir.glob("*.json")):
        timings = json.loads(path.read_text())["timings_s"]
        for key in stages:
            stages[key].append(timings[key])
    return {"wall": wall, "cpu": cpu, **stages}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 192, 160))
    parser.add_argument("--workers", type=int, nargs="+", default=(0, 1, 2))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--save-labels", action="store_true")
    parser.add_argument("--data-dir", type=pathlib.Path, default=None,
                        help="folder for the generated cases (kept; reused on the next run)")
    parser.add_argument("--threads", type=int, default=1, help="the command's --threads (torch threads for counting)")
    args = parser.parse_args(argv)
    import lesioncount

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or pathlib.Path(tmp) / "cases"
        t0 = time.perf_counter()
        paths = make_cases(data_dir, args.cases, tuple(args.shape))
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} cases of {tuple(args.shape)} float32 .nii.gz ({size_mb:.0f} MB compressed, "
              f"{len(paths) * np.prod(args.shape) * 4 / 1e6:.0f} MB raw) ready in {time.perf_counter() - t0:.1f} s")
        print(f"cpu_count={os.cpu_count()} counting threads (--threads)={args.threads} has_ops={lesioncount.has_ops()} "
              f"loadavg={tuple(round(v, 2) for v in os.getloadavg())} save_labels={args.save_labels}")
        header = (f"{'workers':>7} {'rep':>3} {'wall s':>7} {'cpu s':>6} {'s/case':>7} | median per case: {'read':>6} "
                  f"{'rd cpu':>6} {'wait':>6} "
                  f"{'count':>6} {'write':>6} | sum: {'read':>6} {'wait':>6} {'count':>6} {'write':>6}")
        print(header)
        print("-" * len(header))
        summary = {}
        for workers in args.workers:
            for rep in range(args.repeats):
                r = run_once(data_dir, pathlib.Path(tmp) / f"out_{workers}", workers, args.save_labels, args.threads)
                med = {k: statistics.median(r[k]) for k in ("read_s", "read_cpu_s", "wait_s", "count_s", "write_s")}
                tot = {k: sum(r[k]) for k in ("read_s", "wait_s", "count_s", "write_s")}
                summary.setdefault(workers, []).append(r["wall"])
                print(f"{workers:>7} {rep:>3} {r['wall']:>7.2f} {r['cpu']:>6.2f} {r['wall'] / len(paths):>7.3f} | "
                      f"{'':>16}{med['read_s']:>6.3f} {med['read_cpu_s']:>6.3f} {med['wait_s']:>6.3f} {med['count_s']:>6.3f} "
                      f"{med['write_s']:>6.3f} | {'':>5}{tot['read_s']:>6.2f} {tot['wait_s']:>6.2f} "
                      f"{tot['count_s']:>6.2f} {tot['write_s']:>6.2f}")
        print()
        for workers, walls in summary.items():
            print(f"workers={workers}: median wall {statistics.median(walls):.2f} s for {len(paths)} cases")
        print(f"loadavg at end={tuple(round(v, 2) for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
