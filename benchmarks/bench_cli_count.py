"""Throughput of ``lesioncount count`` on a folder of NIfTI probability maps, against the floor.

Generates ``--cases`` (default 20) realistic probability maps of ``--shape`` (default 160x192x160,
float32, :func:`lesioncount.synthetic.realistic_probability_maps`, seeded) as ``.nii.gz`` files
in a temporary folder (or ``--data-dir``, reused when it already holds them), then measures, in
one process, interleaved round by round (so load from other processes hits every variant alike):

1. **decompression alone**: :func:`lesioncount.io.gunzip` of every file with each installed
   library (``zlib``, ``zlib-ng``, ``isal``), one thread, and ``gzip.decompress`` (what nibabel
   and the code before issue 12 used);
2. **the floor**: per case, read the compressed bytes and write the float32 array once (allocate
   and fill ``X*Y*Z`` floats), serially and in ``W`` threads: no command can beat it;
3. **the command**: ``lesioncount count`` in-process for every ``--gzip`` library and every
   ``--workers`` value, ``--repeats`` rounds. After each round the ``CASE.json`` files, timings
   removed, must be byte-identical to those of the first variant (the run fails otherwise).

Printed per variant: wall time of the whole command, process CPU time (cpu > wall: the threads
really ran in parallel), cases/s, and per-case medians and sums over the cases of the stages the
command records in each ``CASE.json``: ``read_s`` (open, decompress, convert to C order),
``read_cpu_s`` (CPU time of that), ``wait_s`` (how long the main thread waited for the case's
result), ``count_s`` (count distribution, baseline and lesion table) and ``write_s``. The summary
gives medians over the rounds and speedups against the zlib variants (serial and best).

Usage::

    .venv/bin/python benchmarks/bench_cli_count.py --data-dir /tmp/cli_cases --repeats 5
    .venv/bin/python benchmarks/bench_cli_count.py --cases 4 --workers 0 2 --gzip zlib isal --save-labels

Generating 20 cases takes 15-60 s (gzip compression of 20 MB float maps dominates).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gzip
import io as _io
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

STAGES = ("read_s", "read_cpu_s", "wait_s", "count_s", "write_s")


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


def run_once(data_dir: pathlib.Path, out_dir: pathlib.Path, workers: int, save_labels: bool, threads: int = 1,
             backend: str = "auto") -> dict:
    """Run ``lesioncount count`` in-process with gzip library ``backend``; wall/CPU time and stages."""
    from lesioncount.cli import main
    from lesioncount.io import set_gzip_backend

    set_gzip_backend(backend)
    argv = ["count", "-i", str(data_dir), "-o", str(out_dir), "--overwrite", "--quiet", "--workers", str(workers),
            "--threads", str(threads)]
    if save_labels:
        argv.append("--save-labels")
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stderr(_io.StringIO()):
        rc = main(argv)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    set_gzip_backend("auto")
    if rc != 0:
        raise RuntimeError(f"lesioncount count exited with {rc}")
    stages = {key: [] for key in STAGES}
    results = {}
    for path in sorted(out_dir.glob("*.json")):
        report = json.loads(path.read_text())
        for key in STAGES:
            stages[key].append(report["timings_s"][key])
        # the file without its timings line: what must not depend on the library or the threads
        text = path.read_text()
        timings = re.search(r',\n "timings_s": \{\n[^{}]*\n \}', text)
        results[path.name] = text[:timings.start()] + text[timings.end():]
    return {"wall": wall, "cpu": cpu, "results": results, **stages}


def _decompress_round(raws: list[bytes], fn) -> float:
    t0 = time.perf_counter()
    for raw in raws:
        fn(raw)
    return time.perf_counter() - t0


def _floor_case(path: pathlib.Path, shape) -> float:
    raw = path.read_bytes()
    out = np.empty(shape, dtype=np.float32)
    out.fill(0.5)  # one write of the whole array
    return float(out[0, 0, 0]) + len(raw) * 0.0


def _floor_round(paths, shape, threads: int) -> float:
    t0 = time.perf_counter()
    if threads <= 1:
        for p in paths:
            _floor_case(p, shape)
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: _floor_case(p, shape), paths))
    return time.perf_counter() - t0


def _commit() -> str:
    try:
        root = pathlib.Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "python", "benchmarks"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + (" (+ uncommitted changes in python/ or benchmarks/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    from lesioncount import _gunzip

    installed = [b for b in _gunzip.GZIP_BACKENDS if _installed(b)]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 192, 160))
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="--workers values of the command (default: 0 and the usable cores)")
    parser.add_argument("--gzip", nargs="+", default=None, choices=_gunzip.GZIP_BACKENDS,
                        help="libraries to compare (default: zlib and the fastest installed one)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each runs every variant once)")
    parser.add_argument("--save-labels", action="store_true")
    parser.add_argument("--data-dir", type=pathlib.Path, default=None,
                        help="folder for the generated cases (kept; reused on the next run)")
    parser.add_argument("--threads", type=int, default=1, help="the command's --threads (torch threads per worker)")
    args = parser.parse_args(argv)
    import lesioncount
    from lesioncount.commands.count import default_workers
    from lesioncount.io import gunzip

    cores = default_workers()
    workers_list = args.workers if args.workers is not None else sorted({0, cores})
    backends = args.gzip if args.gzip is not None else ["zlib"] + ([installed[0]] if installed[0] != "zlib" else [])
    for b in backends:
        if b not in installed:
            parser.error(f"--gzip {b}: not installed (pip install {b})")
    shape = tuple(args.shape)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or pathlib.Path(tmp) / "cases"
        t0 = time.perf_counter()
        paths = make_cases(data_dir, args.cases, shape)
        n = len(paths)
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        raw_mb = n * np.prod(shape) * 4 / 1e6
        print(f"{n} cases of {shape} float32 .nii.gz ({size_mb:.0f} MB compressed, {raw_mb:.0f} MB raw) "
              f"ready in {time.perf_counter() - t0:.1f} s")
        print(f"commit {_commit()}; cpu: {_cpu_name()}; usable cores={cores}; torch {__import__('torch').__version__}; "
              f"has_ops={lesioncount.has_ops()}; gzip libraries installed: {', '.join(installed)} "
              f"({_versions()}); counting threads per worker (--threads)={args.threads}; save_labels={args.save_labels}")
        print(f"loadavg at start={tuple(round(v, 2) for v in os.getloadavg())}")

        # 1. decompression alone, one thread (files in the page cache)
        raws = [p.read_bytes() for p in paths]
        decoders = {"gzip.decompress": gzip.decompress}
        decoders.update({f"gunzip {b}": (lambda raw, b=b: gunzip(raw, b)) for b in installed})
        reference = gzip.decompress(raws[0])
        for name, fn in decoders.items():
            assert fn(raws[0]) == reference, name
        times = {name: [] for name in decoders}
        floors = {1: [], cores: []}
        for _ in range(args.repeats):
            for name, fn in decoders.items():
                times[name].append(_decompress_round(raws, fn))
            for threads in floors:
                floors[threads].append(_floor_round(paths, shape, threads))
        del raws
        print()
        print("decompression alone, 1 thread (median of rounds):")
        base = statistics.median(times["gzip.decompress"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:<18} {med / n * 1e3:7.1f} ms/case  {raw_mb / med:7.0f} MB/s out  "
                  f"{base / med:5.2f}x gzip.decompress")
        print("floor (read the compressed bytes + write the float32 array once):")
        for threads, ts in floors.items():
            med = statistics.median(ts)
            print(f"  {threads} thread(s): {med / n * 1e3:6.2f} ms/case = {n / med:7.1f} cases/s")

        # 3. the command, every variant once per round
        variants = [(b, w) for b in backends for w in workers_list]
        header = (f"{'gzip':>7} {'workers':>7} {'rep':>3} {'wall s':>7} {'cpu s':>6} {'case/s':>6} | median per case: "
                  f"{'read':>6} {'rd cpu':>6} {'wait':>6} {'count':>6} {'write':>6} | sum: {'read':>6} {'wait':>6} "
                  f"{'count':>6} {'write':>6}")
        print()
        print(header)
        print("-" * len(header))
        walls: dict = {v: [] for v in variants}
        cpus: dict = {v: [] for v in variants}
        expected = None
        for rep in range(args.repeats):
            for backend, workers in variants:
                r = run_once(data_dir, pathlib.Path(tmp) / f"out_{backend}_{workers}", workers, args.save_labels,
                             args.threads, backend)
                if expected is None:
                    expected = r["results"]
                elif r["results"] != expected:
                    differ = [k for k in expected if expected[k] != r["results"].get(k)]
                    raise AssertionError(f"gzip={backend} workers={workers}: CASE.json differs from the first "
                                         f"variant's (timings aside) for {differ[:5]}")
                walls[(backend, workers)].append(r["wall"])
                cpus[(backend, workers)].append(r["cpu"])
                med = {k: statistics.median(r[k]) for k in STAGES}
                tot = {k: sum(r[k]) for k in STAGES}
                print(f"{backend:>7} {workers:>7} {rep:>3} {r['wall']:>7.2f} {r['cpu']:>6.2f} {n / r['wall']:>6.1f} | "
                      f"{'':>16} {med['read_s']:>6.3f} {med['read_cpu_s']:>6.3f} {med['wait_s']:>6.3f} "
                      f"{med['count_s']:>6.3f} {med['write_s']:>6.3f} | {'':>4} {tot['read_s']:>6.2f} "
                      f"{tot['wait_s']:>6.2f} {tot['count_s']:>6.2f} {tot['write_s']:>6.2f}")
        print()
        print(f"CASE.json outputs byte-identical (timings aside) across all {len(variants)} variants x "
              f"{args.repeats} rounds: yes")
        rate = {v: n / statistics.median(ws) for v, ws in walls.items()}
        zlib_serial = rate.get(("zlib", 0))
        zlib_best = max((r for (b, _), r in rate.items() if b == "zlib"), default=None)
        floor_rate = n / statistics.median(floors[cores])
        for (backend, workers), r in rate.items():
            line = (f"gzip={backend:<7} workers={workers}: {r:6.2f} cases/s (median wall {n / r:.2f} s, "
                    f"CPU {statistics.median(cpus[(backend, workers)]) / n * 1e3:5.1f} ms/case)")
            if zlib_serial:
                line += f"; {r / zlib_serial:4.2f}x zlib serial"
            if zlib_best:
                line += f"; {r / zlib_best:4.2f}x zlib at its best"
            line += f"; {r / floor_rate * 100:4.1f}% of the {cores}-thread floor"
            print(line)
        print(f"loadavg at end={tuple(round(v, 2) for v in os.getloadavg())}")
    return 0


def _installed(name: str) -> bool:
    from lesioncount import _gunzip

    try:
        _gunzip._import_backend(name)
        return True
    except ImportError:
        return False


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("isal", "zlib-ng", "nibabel", "numpy"):
        try:
            out.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    import zlib

    out.append(f"zlib {zlib.ZLIB_RUNTIME_VERSION}")
    return ", ".join(out)


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
