"""``lesioncount count``: post hoc lesion count distributions for probability maps on disk.

Usage::

    lesioncount count -i PRED_DIR_OR_FILE -o OUT_DIR [--threshold 0.1] [--connectivity 18]
                      [--min-size VOXELS | --min-volume MM3] [--max-count 4] [--from-logits]
                      [--channel 1] [--mask FILE_OR_DIR] [--device cpu|cuda] [--workers N] [--threads 1]
                      [--num-parts N --part-id I] [--save-labels] [--overwrite | --skip-existing]

Inputs are what :func:`lesioncount.io.find_cases` lists: NIfTI maps, nnU-Net v2 ``CASE.npz``
probabilities (geometry from the sibling ``CASE.nii.gz``) and ``.npy`` arrays.

Outputs in ``OUT_DIR``:

- ``CASE.json``: the case report (:func:`lesioncount.report.case_report`): settings, count pmf,
  expected / most likely count, entropy, 90% credible interval, cc_count baseline at 0.5, the
  lesion table (probability, argmax voxel, size, centroid, bounding box; voxel and mm coordinates)
  and the timings of the case: ``read_s`` (wall time of reading + decompressing, in its worker
  thread), ``read_cpu_s`` (CPU time of that thread: read_s >> read_cpu_s means the worker waited
  for a core or the GIL), ``wait_s`` (how long the main thread, which writes the results in case
  order, waited for this case), ``count_s``, ``write_s``.
- ``CASE_labels.nii.gz`` with ``--save-labels``: the candidate label map, with the input's affine
  (ids as in the lesion table). Such files in the input folder (OUT_DIR = input folder, now or in
  an earlier run) are not counted as cases: ``CASE_labels.nii.gz`` is skipped when ``CASE`` is a case.
- ``summary.csv``: one row per case (:func:`lesioncount.report.summary_row`), in case order.
- ``errors.csv``: ``case, file, error`` for every case that failed (header only when none did).
  With ``--num-parts N`` these two are ``summary.part-I-of-N.csv`` / ``errors.part-I-of-N.csv``,
  so that shards can share ``OUT_DIR``.

Choices:

- ``--mask``: a file is one mask for every case (e.g. an atlas brain mask); a folder holds one mask
  per case, ``CASE.nii.gz`` / ``CASE.nii`` / ``CASE.npy``. The mask must have the case's shape,
  and, when both come with a geometry (not ``.npy``), the same affine (within 1e-3 mm).
- Existing ``CASE.json`` files: the command refuses to run (exit 2) unless ``--overwrite``
  (recompute) or ``--skip-existing`` (keep them; their rows still go into the summary) is given.
  A kept file computed with other settings (threshold, connectivity, size rule, max count, logits,
  channel, mask, baseline threshold) is not mixed into the summary: that case is reported as failed
  (exit 1) with the options that differ.
  ``summary.csv`` and ``errors.csv`` are always rewritten.
- ``--workers N`` (default: the number of CPU cores this process may use): N threads each take a
  case through read, decompress, count, report and label map, while the main thread writes the
  ``CASE.json`` files and the progress bar in case order. ``.nii.gz`` files are inflated by ISA-L
  (``isal``, in the ``[io]`` extra), else zlib-ng, else zlib, in GIL-free calls, and counting runs
  in torch ops that release the GIL, so the threads really use N cores and a folder runs about N
  times faster than with ``--workers 0`` (everything in the main thread). At most N cases are
  being processed, and hold their arrays, at any time; at most N more are queued.
  ``LESIONCOUNT_GZIP=isal|zlib-ng|zlib`` forces a decompression library (all give identical data).
  ``--threads`` (default 1) sets torch's intra-op threads of each worker's counting: with one case
  per core, more threads only oversubscribe the cores.
- ``--min-volume V``: converted per case to ``ceil(V / voxel_volume)`` voxels.
- nnU-Net ``.npz`` without its sibling segmentation: the case fails, unless
  ``--allow-missing-geometry`` (identity affine, 1 mm voxels, with a warning).
- Progress bar (tqdm, stderr) for more than one case when tqdm is installed; without tqdm, or
  with ``--quiet``, no bar.

Exit codes: 0 every case counted; 1 some cases failed (reported on stderr and in ``errors.csv``,
the other cases are still processed); 2 bad arguments, no input cases, missing extra or
unavailable device.

Example::

    lesioncount count -i nnunet_predictions/ -o counts/ --min-volume 10 --save-labels
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import os
import pathlib
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def default_workers() -> int:
    """The default ``--workers``: the CPU cores this process may run on (its affinity mask).

    Example:
        >>> default_workers() >= 1
        True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def register(subparsers) -> None:
    """Add the ``count`` subcommand."""
    p = subparsers.add_parser(
        "count",
        help="count distributions of probability maps on disk (NIfTI, nnU-Net .npz, .npy)",
        description="Per-case lesion count distributions, baselines and lesion tables for probability maps on "
                    "disk. Writes OUT_DIR/CASE.json per case, OUT_DIR/summary.csv and OUT_DIR/errors.csv.",
    )
    p.add_argument("-i", "--input", required=True, type=pathlib.Path,
                   help="a case file or a folder of them (.nii, .nii.gz, nnU-Net .npz, .npy)")
    p.add_argument("-o", "--output", required=True, type=pathlib.Path, help="output folder (created)")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="candidate threshold, a probability in [0, 1) even with --from-logits (default 0.1)")
    p.add_argument("--connectivity", type=int, default=18, choices=(6, 18, 26), help="3-D neighbourhood (default 18)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--min-size", type=int, default=0, help="drop candidates with fewer voxels (default 0)")
    size.add_argument("--min-volume", type=float, default=None,
                      help="drop candidates smaller than this many mm^3 (ceil(V / voxel volume) voxels per case)")
    p.add_argument("--max-count", type=int, default=4, help="M: bins 0..M-1 and 'M or more' (default 4)")
    p.add_argument("--from-logits", action="store_true", help="the maps hold logits, not probabilities")
    p.add_argument("--channel", type=int, default=1,
                   help="lesion channel of multi-channel inputs (nnU-Net .npz, 4-D NIfTI) (default 1)")
    p.add_argument("--mask", type=pathlib.Path, default=None,
                   help="region of interest: one mask file for all cases, or a folder of per-case masks CASE.nii.gz")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to count (default cpu)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads each reading, decompressing and counting one case at a time (0: everything in "
                        f"the main thread; default: the usable CPU cores, {default_workers()} here)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the counting of each worker (default 1: the workers already use every "
                        "core, and counting one case takes tens of ms)")
    p.add_argument("--num-parts", type=int, default=1, help="split the sorted case list into this many shards")
    p.add_argument("--part-id", type=int, default=0, help="process shard i: cases k with k %% num_parts == i")
    p.add_argument("--save-labels", action="store_true", help="write OUT_DIR/CASE_labels.nii.gz (input affine)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="recompute cases whose CASE.json exists")
    existing.add_argument("--skip-existing", action="store_true",
                          help="keep existing CASE.json files (their rows still go into the summary)")
    p.add_argument("--allow-missing-geometry", action="store_true",
                   help="nnU-Net .npz without its sibling CASE.nii.gz: use the identity affine instead of failing")
    p.add_argument("--baseline-threshold", type=float, default=0.5,
                   help="threshold of the cc_count baseline (default 0.5)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no final summary line")
    p.set_defaults(func=run)


class _UsageError(Exception):
    pass


def _validate(args) -> None:
    if not (0.0 <= args.threshold < 1.0) or math.isnan(args.threshold):
        raise _UsageError(f"--threshold must be a probability in [0, 1), got {args.threshold}")
    if not (0.0 <= args.baseline_threshold < 1.0):
        raise _UsageError(f"--baseline-threshold must be in [0, 1), got {args.baseline_threshold}")
    if args.min_size < 0:
        raise _UsageError(f"--min-size must be >= 0 voxels, got {args.min_size}")
    if args.min_volume is not None and not (math.isfinite(args.min_volume) and args.min_volume >= 0):
        raise _UsageError(f"--min-volume must be a finite number >= 0 (mm^3), got {args.min_volume}")
    if args.max_count < 1:
        raise _UsageError(f"--max-count must be >= 1, got {args.max_count}")
    if args.channel < 0:
        raise _UsageError(f"--channel must be >= 0, got {args.channel}")
    if args.workers is None:
        args.workers = default_workers()
    if args.workers < 0:
        raise _UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.threads < 1:
        raise _UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.num_parts < 1:
        raise _UsageError(f"--num-parts must be >= 1, got {args.num_parts}")
    if not 0 <= args.part_id < args.num_parts:
        raise _UsageError(f"--part-id must satisfy 0 <= part_id < num_parts ({args.num_parts}), got {args.part_id}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise _UsageError("--device cuda: CUDA is not available (no GPU, or torch built without CUDA); "
                              "use --device cpu")
    if args.mask is not None and not args.mask.exists():
        raise _UsageError(f"--mask {args.mask}: no such file or folder")


def shard(cases: list, num_parts: int, part_id: int) -> list:
    """Cases of shard ``part_id``: the k-th case of the sorted list goes to part ``k % num_parts``.

    Example:
        >>> shard(["a", "b", "c", "d", "e"], 2, 1)
        ['b', 'd']
    """
    return cases[part_id::num_parts]


def _mask_for_case(mask_dir: pathlib.Path, name: str) -> pathlib.Path:
    from ..io import CaseReadError

    for suffix in (".nii.gz", ".nii", ".npy"):
        candidate = mask_dir / (name + suffix)
        if candidate.is_file():
            return candidate
    raise CaseReadError(mask_dir / (name + ".nii.gz"), f"no mask for case {name!r} in {mask_dir} "
                        f"(looked for {name}.nii.gz, {name}.nii, {name}.npy)")


def _has_geometry(path: pathlib.Path) -> bool:
    return not path.name.lower().endswith(".npy")


def _check_mask(volume, mask) -> None:
    if tuple(mask.data.shape) != tuple(volume.data.shape):
        raise ValueError(f"mask {mask.path} has shape {tuple(mask.data.shape)} but {volume.path.name} has shape "
                         f"{tuple(volume.data.shape)}")
    if _has_geometry(mask.path) and _has_geometry(volume.path) and not np.allclose(
            mask.affine, volume.affine, rtol=1e-5, atol=1e-3):
        raise ValueError(f"mask {mask.path} and {volume.path.name} have different affines "
                         f"(mask {np.round(mask.affine, 4).tolist()} vs {np.round(volume.affine, 4).tolist()}); "
                         f"resample the mask to the prediction grid")


def _read_case(path, args, shared_mask):
    """Runs in a reader thread: (volume, mask volume or None, (wall s, thread CPU s), notes)."""
    from ..io import _nnunet_sibling, read_mask, read_probability_map

    t0, c0 = time.perf_counter(), time.thread_time()
    volume = read_probability_map(path, channel=args.channel,
                                  missing_geometry="identity" if args.allow_missing_geometry else "error")
    notes = []
    if path.name.lower().endswith(".npz") and _nnunet_sibling(path) is None:
        notes.append(f"{path}: sibling segmentation {volume.name}.nii.gz not found; identity affine (1 mm voxels) used")
    mask = shared_mask
    if args.mask is not None and args.mask.is_dir():
        mask = read_mask(_mask_for_case(args.mask, volume.name))
    return volume, mask, (time.perf_counter() - t0, time.thread_time() - c0), notes


# stands for wait_s in the JSON text a worker formats; the main thread fills it in when it writes
_WAIT_PLACEHOLDER = '"@wait_s@"'


def _process_case(path, args, settings, shared_mask, out_dir: pathlib.Path):
    """One case from file to report, in a worker thread (``--workers N``) or the main thread (0).

    Reads and decompresses the map (and its mask), counts, builds the report and writes the label
    map (``--save-labels``); returns ``(report, JSON text, notes)``. The text holds
    :data:`_WAIT_PLACEHOLDER` for ``wait_s``; the main thread writes it, in case order. Nothing
    large outlives the call: the arrays are freed when it returns.
    """
    from ..report import case_report, count_volume

    volume, mask, (read_s, read_cpu_s), notes = _read_case(path, args, shared_mask)
    t0 = time.perf_counter()
    if mask is not None:
        _check_mask(volume, mask)
    counted = count_volume(volume, settings, mask=None if mask is None else mask.data)
    report = case_report(volume, counted, settings)
    count_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.save_labels:
        from ..io import write_label_map

        write_label_map(out_dir / f"{volume.name}_labels.nii.gz", counted.result.labels[0].numpy(), volume.affine)
    del volume, mask, counted
    report["timings_s"] = {"read_s": read_s, "read_cpu_s": read_cpu_s, "wait_s": 0.0, "count_s": count_s,
                           "write_s": 0.0}
    text = _format_json(report)
    write_s = time.perf_counter() - t0  # label map + JSON formatting (not the final small write)
    report["timings_s"]["write_s"] = write_s
    text = text.replace('"wait_s": 0.0', f'"wait_s": {_WAIT_PLACEHOLDER}', 1)
    return report, text.replace('"write_s": 0.0', f'"write_s": {json.dumps(write_s)}', 1), notes


def _format_json(report, level: int = 0) -> str:
    """Indented JSON (1 space per level) with lists of scalars (numbers, short strings) kept on one line.

    Built from the structure, not by editing ``json.dumps`` output, so strings holding brackets or
    commas (a case file ``scan[1,2].nii.gz``) are written unchanged.

    Example:
        >>> print(_format_json({"pmf": [0.5, 0.5], "case": "a[1,2]", "t": {"x": 1}}))
        {
         "pmf": [0.5, 0.5],
         "case": "a[1,2]",
         "t": {
          "x": 1
         }
        }
    """
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(report, dict):
        if not report:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {_format_json(v, level + 1)}" for k, v in report.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(report, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in report):
            return json.dumps(list(report))  # "[1, 2]": one line
        return "[\n" + ",\n".join(inner + _format_json(v, level + 1) for v in report) + "\n" + pad + "]"
    return json.dumps(report)


def _write_json(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


# settings of a kept CASE.json that must equal this run's for --skip-existing (device and workers do
# not change results; min_size_voxels is per case with --min-volume, so it is compared only without it)
_RESULT_SETTINGS = ("threshold", "connectivity", "max_count", "from_logits", "channel", "baseline_threshold",
                    "min_volume_mm3")
_OPTION_OF = {"threshold": "--threshold", "connectivity": "--connectivity", "max_count": "--max-count",
              "from_logits": "--from-logits", "channel": "--channel", "baseline_threshold": "--baseline-threshold",
              "min_volume_mm3": "--min-volume", "min_size_voxels": "--min-size", "mask": "--mask"}


def _check_same_settings(stored: dict, settings) -> None:
    """ValueError naming every option whose value differs between a kept report and this run."""
    current = {"threshold": settings.threshold, "connectivity": settings.connectivity,
               "max_count": settings.max_count, "from_logits": settings.from_logits, "channel": settings.channel,
               "baseline_threshold": settings.baseline_threshold, "min_volume_mm3": settings.min_volume}
    keys = list(_RESULT_SETTINGS)
    if settings.min_volume is None:
        current["min_size_voxels"] = settings.min_size
        keys.append("min_size_voxels")
    differ = [f"{_OPTION_OF[k]} {stored.get(k, 'missing')!r} (now {current[k]!r})" for k in keys
              if stored.get(k, "missing") != current[k]]
    old_mask, new_mask = stored.get("mask", "missing"), settings.mask
    same_mask = old_mask == new_mask or (isinstance(old_mask, str) and new_mask is not None
                                         and pathlib.Path(old_mask).resolve() == pathlib.Path(new_mask).resolve())
    if not same_mask:
        differ.append(f"--mask {old_mask!r} (now {new_mask!r})")
    if differ:
        raise ValueError("it was computed with other settings: " + ", ".join(differ))


def _part_suffix(args) -> str:
    return "" if args.num_parts == 1 else f".part-{args.part_id}-of-{args.num_parts}"


def run(args: argparse.Namespace) -> int:
    """Run ``lesioncount count``; returns the exit code (0 ok, 1 some cases failed, 2 usage error)."""
    with warnings.catch_warnings():
        # io warns about a missing nnU-Net sibling from the reader threads; the command reports it
        # itself, once per case, in order (warning filters are process-wide, so set them here).
        warnings.filterwarnings("ignore", message=r".*sibling segmentation .* not found")
        import torch

        previous_threads = torch.get_num_threads()
        try:
            if getattr(args, "threads", None) and args.threads >= 1:
                torch.set_num_threads(args.threads)
            return _run(args)
        finally:
            torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace) -> int:
    from .._extras import MissingExtraError, available, require
    from ..io import CaseReadError, case_name, find_cases, gzip_backend, read_mask
    from ..report import CountSettings, summary_fields, summary_row

    def fail(message: str) -> int:
        print(f"lesioncount count: error: {message}", file=sys.stderr)
        return 2

    try:
        _validate(args)
        all_cases = find_cases(args.input)
    except (_UsageError, FileNotFoundError, CaseReadError) as exc:
        return fail(str(exc))
    if args.input.is_dir():
        # never count the mask or this command's own label maps as cases when they sit in the input folder
        skip = {args.mask.resolve()} if args.mask is not None and args.mask.is_file() else set()
        same_folder = args.output.exists() and args.output.resolve() == args.input.resolve()
        # CASE_labels.nii.gz next to CASE is what --save-labels wrote into this folder (now or in an earlier
        # run with -o = this folder): an integer label map, which a single lesion would make look like a
        # valid 0/1 probability map
        names = {case_name(p) for p in all_cases}
        own_labels = {p for p in all_cases if p.name.endswith("_labels.nii.gz")
                      and (same_folder or case_name(p)[: -len("_labels")] in names)}
        if own_labels and not same_folder and not args.quiet:
            print(f"lesioncount count: note: skipping {len(own_labels)} label map(s) written by --save-labels "
                  f"(CASE_labels.nii.gz next to CASE), e.g. {min(own_labels).name}", file=sys.stderr)
        all_cases = [p for p in all_cases if p.resolve() not in skip and p not in own_labels]
    if not all_cases:
        return fail(f"{args.input}: no case files (.nii, .nii.gz, .npz, .npy) found")
    cases = shard(all_cases, args.num_parts, args.part_id)
    settings = CountSettings(
        threshold=args.threshold, connectivity=args.connectivity, min_size=args.min_size,
        min_volume=args.min_volume, max_count=args.max_count, from_logits=args.from_logits,
        mask=str(args.mask) if args.mask is not None else None, channel=args.channel, device=args.device,
        baseline_threshold=args.baseline_threshold,
    )
    out_dir: pathlib.Path = args.output
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return fail(f"cannot create output folder {out_dir}: {exc}")
    json_paths = [out_dir / f"{case_name(p)}.json" for p in cases]
    existing = [p for p in json_paths if p.exists()]
    if existing and not (args.overwrite or args.skip_existing):
        shown = ", ".join(p.name for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
        return fail(f"{len(existing)} result(s) already in {out_dir} ({shown}); pass --overwrite to recompute "
                    f"or --skip-existing to keep them")
    shared_mask = None
    if args.mask is not None and args.mask.is_file():
        try:
            shared_mask = read_mask(args.mask)
        except CaseReadError as exc:
            return fail(f"--mask: {exc}")

    rows: dict[int, dict] = {}
    errors: list[tuple[str, str, str]] = []
    totals = collections.Counter()
    todo = []
    for index, (path, json_path) in enumerate(zip(cases, json_paths)):
        if args.skip_existing and json_path.exists():
            try:
                report = json.loads(json_path.read_text())
                _check_same_settings(report["settings"], settings)
                rows[index] = summary_row(report)
                totals["kept"] += 1
            except (ValueError, KeyError, TypeError) as exc:
                errors.append((case_name(path), str(path), f"existing {json_path.name} unusable: {exc}; use --overwrite"))
            continue
        todo.append((index, path, json_path))

    bar = None
    if len(todo) > 1 and not args.quiet and available("tqdm"):
        bar = require("tqdm").tqdm(total=len(todo), desc="lesioncount count", unit="case", file=sys.stderr)
    def say(message: str) -> None:
        if bar is not None:
            bar.write(message, file=sys.stderr)  # keeps the bar intact
        else:
            print(message, file=sys.stderr)

    def report_error(path, exc):
        if isinstance(exc, CaseReadError) and exc.path == path:
            reason = exc.reason
        elif isinstance(exc, (CaseReadError, ValueError)):
            reason = str(exc)
        else:
            reason = f"{type(exc).__name__}: {exc}"
        errors.append((case_name(path), str(path), reason))
        say(f"lesioncount count: {path}: {reason}")

    t_start = time.perf_counter()
    workers = args.workers
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lesioncount-case") if workers > 0 else None
    pending: collections.deque = collections.deque()
    queue = iter(todo)

    def submit_next():
        item = next(queue, None)
        if item is None:
            return
        job = (item[1], args, settings, shared_mask, out_dir)
        pending.append((item, pool.submit(_process_case, *job) if pool is not None else job))

    try:
        # 2 x workers cases queued: a worker that finishes while the main thread waits for an older
        # (slower) case starts the next one at once. Only the `workers` cases being processed hold
        # their arrays (a finished case is its report), so memory stays bounded.
        for _ in range(2 * workers if workers > 0 else 1):
            submit_next()
        while pending:
            (index, path, json_path), job = pending.popleft()
            t_wait = time.perf_counter()
            try:
                report, text, notes = job.result() if pool is not None else _process_case(*job)
            except MissingExtraError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad case must not stop the folder
                submit_next()
                report_error(path, exc)
            else:
                wait_s = time.perf_counter() - t_wait
                submit_next()
                for message in notes:
                    say(f"lesioncount count: warning: {message}")
                try:
                    report["timings_s"]["wait_s"] = wait_s
                    _write_json(json_path, text.replace(_WAIT_PLACEHOLDER, json.dumps(wait_s), 1))
                except OSError as exc:
                    report_error(path, exc)
                else:
                    timings = report["timings_s"]
                    rows[index] = summary_row(report)
                    totals.update({k: timings[k] for k in ("read_s", "wait_s", "count_s", "write_s")})
                    totals["counted"] += 1
            if bar is not None:
                bar.update(1)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()

    suffix = _part_suffix(args)
    with open(out_dir / f"summary{suffix}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=summary_fields(args.max_count))
        writer.writeheader()
        for index in sorted(rows):
            writer.writerow(rows[index])
    with open(out_dir / f"errors{suffix}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "file", "error"])
        writer.writerows(errors)
    elapsed = time.perf_counter() - t_start
    if not args.quiet:
        print(f"lesioncount count: {totals['counted']} of {len(cases)} case(s) counted, {len(errors)} failed, "
              f"{totals['kept']} kept from earlier runs -> {out_dir} in {elapsed:.2f} s "
              f"({max(args.workers, 1)} worker thread(s), {gzip_backend()} gzip; summed over cases: read "
              f"{totals['read_s']:.2f} s, count {totals['count_s']:.2f} s, write {totals['write_s']:.2f} s; "
              f"the main thread waited {totals['wait_s']:.2f} s)")
    if errors:
        print(f"lesioncount count: {len(errors)} case(s) failed; see {out_dir / f'errors{suffix}.csv'}", file=sys.stderr)
        return 1
    return 0
