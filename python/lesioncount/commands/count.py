"""``lesioncount count``: post hoc lesion count distributions for probability maps on disk.

Usage::

    lesioncount count -i PRED_DIR_OR_FILE -o OUT_DIR [--threshold 0.1] [--connectivity 18]
                      [--min-size VOXELS | --min-volume MM3] [--max-count 4] [--from-logits]
                      [--channel 1] [--mask FILE_OR_DIR] [--device cpu|cuda] [--workers N] [--threads 1]
                      [--num-parts N|auto --part-id I|auto] [--save-labels] [--save-detection-map]
                      [--overwrite | --skip-existing]

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
- ``CASE_detection.nii.gz`` with ``--save-detection-map``: the detection map
  (:func:`lesioncount.detection.detection_map`), float32 with the input's affine and shape: each
  candidate's voxels hold its existence probability p_k (the ``probability`` of its lesion-table
  row), background 0; candidates do not overlap. This is the input of picai_eval-style detection
  evaluators (which relabel it with 26-connectivity: count with ``--connectivity 26`` to get the same
  candidates). Skipped as a case in the input folder like ``CASE_labels.nii.gz``.
- ``summary.csv``: one row per case (:func:`lesioncount.report.summary_row`), in case order.
- ``lesions.csv``: one row per lesion candidate of every case (:func:`lesioncount.report.lesion_rows`:
  case, lesion id, probability, size in voxels and mm^3, argmax voxel and its world mm, centroid mm).
- ``errors.csv``: ``case, file, error`` for every case that failed (header only when none did),
  including entries that cannot be opened (dangling symbolic links, symbolic link loops).
  With ``--num-parts N`` these three are ``summary.part-I-of-N.csv`` / ``lesions.part-I-of-N.csv``
  / ``errors.part-I-of-N.csv`` plus a hidden manifest ``.lesioncount.part-I-of-N.manifest`` (the
  settings and the shard's cases), so that shards can share ``OUT_DIR``; ``lesioncount merge
  OUT_DIR`` checks them and writes ``summary.csv`` / ``lesions.csv`` / ``errors.csv``.

Data safety:

- Every file is written atomically (:func:`lesioncount.io.atomic_file`): a hidden temporary file
  ``.NAME.<pid>.<random>.tmp`` in ``OUT_DIR``, fsync'ed, then renamed over ``NAME``; a file is
  either absent, the old one or complete, never partial. Label and detection maps are written by
  the worker threads to such temporary files and renamed, with the case's JSON (the JSON last), by
  the main thread.
- One run per folder: the run holds an ``fcntl.flock`` lock on ``OUT_DIR/.lesioncount.lock``
  (removed at the end; the kernel drops it if the process dies). A second run into the same
  folder refuses at once (exit 2) naming the holder's pid and host. Shards (``--num-parts``) hold
  it shared plus their own ``.lesioncount.part-I-of-N.lock``, so the parts of one split run side
  by side but one part cannot run twice; ``merge`` and unsharded runs need it alone. (On NFS the
  lock is as good as the server's lock manager; where locking is unsupported a warning says so.)
- Summaries always describe the case files present: at the start the run removes its own earlier
  ``summary/lesions/errors`` files (a shard also the folder-level merged ones, an unsharded run
  the shards' part files and manifests) and, with ``--overwrite``, the earlier ``CASE.json`` /
  ``CASE_labels.nii.gz`` / ``CASE_detection.nii.gz`` of its cases; at the end (also after
  SIGINT/SIGTERM) it writes them from the cases it counted or kept. A case counted without
  ``--save-labels`` (``--save-detection-map``) loses an earlier label (detection) map (it would not
  match the new JSON). A run killed by SIGKILL leaves no summary, never a
  stale one; hidden temporary files of killed runs are removed by the next unsharded run.
- SIGINT (Ctrl-C) / SIGTERM (e.g. ``scancel``): the cases being counted are abandoned (their
  temporary files removed), finished cases stay, the summaries are written (the cases not
  processed are rows of ``errors.csv`` saying so) and the command exits 130 / 143 with one line on
  stderr. ``--skip-existing`` then finishes the folder.

Choices:

- ``--mask``: a file is one mask for every case (e.g. an atlas brain mask); a folder holds one mask
  per case, ``CASE.nii.gz`` / ``CASE.nii`` / ``CASE.npy``. The mask must have the case's shape,
  and, when both come with a geometry (not ``.npy``), the same affine (within 1e-3 mm).
- Existing ``CASE.json`` files: the command refuses to run (exit 2) unless ``--overwrite``
  (recompute) or ``--skip-existing`` (keep them; their rows still go into the summary) is given.
  A kept file computed with other settings (threshold, connectivity, size rule, max count, logits,
  channel, mask, baseline threshold) is not mixed into the summary: that case is reported as failed
  (exit 1) with the options that differ.
  ``summary.csv``, ``lesions.csv`` and ``errors.csv`` are always rewritten. With ``--save-labels``
  a kept case's ``CASE_labels.nii.gz`` must be readable and match its JSON (shape, affine, number
  of labels); a missing, empty, truncated or mismatched one makes the case be counted again (a note
  on stderr), so every kept case ends with its label map. Likewise with ``--save-detection-map``: a
  kept case's ``CASE_detection.nii.gz`` must be a readable float map with the JSON's shape and affine
  whose nonzero values are exactly the JSON's lesion probabilities (one value per candidate); else
  the case is counted again.
- ``--num-parts N --part-id I``: the k-th case of the sorted list goes to part ``k % N``. On a
  SLURM job array ``--num-parts auto`` (``--part-id`` then defaults to ``auto``) takes
  ``N = SLURM_ARRAY_TASK_COUNT`` and ``I = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
  SLURM_ARRAY_TASK_STEP`` (:func:`slurm_array_shard`): ``sbatch --array=0-15`` and ``--array=1-16``
  both give parts 0..15 of 16. Outside a job array (the variables unset) ``auto`` is an error
  (exit 2) that says so; so is an array that is not a uniform range (``--array=1,5,7``).
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
the other cases are still processed) or a summary file could not be written (one line on stderr);
2 bad arguments, no input cases, missing extra, unavailable device, or the output folder in use by
another run; 130 / 143 interrupted by SIGINT / SIGTERM.

Python API: :func:`lesioncount.report.count_file` returns the report of one file (the same dict as
``CASE.json``), e.g. to fan a folder out with ``concurrent.futures`` in your own script.

Example::

    lesioncount count -i nnunet_predictions/ -o counts/ --min-volume 10 --save-labels
    lesioncount count -i preds/ -o counts/ --connectivity 26 --save-detection-map   # for picai_eval
    sbatch --array=0-15 --wrap "lesioncount count -i preds/ -o counts/ --num-parts auto"  # then:
    lesioncount merge counts/
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import pathlib
import signal
import socket
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from ._options import add_count_options


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
                    "disk. Writes OUT_DIR/CASE.json per case, OUT_DIR/summary.csv, lesions.csv and errors.csv "
                    "(atomically; one run per folder; exit 130/143 on SIGINT/SIGTERM with consistent summaries).",
    )
    p.add_argument("-i", "--input", required=True, type=pathlib.Path,
                   help="a case file or a folder of them (.nii, .nii.gz, nnU-Net .npz, .npy)")
    p.add_argument("-o", "--output", required=True, type=pathlib.Path, help="output folder (created)")
    add_count_options(
        p, threshold="candidate threshold, a probability in [0, 1) even with --from-logits (default 0.1)",
        connectivity="3-D neighbourhood (default 18)", min_size="drop candidates with fewer voxels (default 0)",
        min_volume="drop candidates smaller than this many mm^3 (ceil(V / voxel volume) voxels per case)",
        max_count="M: bins 0..M-1 and 'M or more' (default 4)", from_logits="the maps hold logits, not probabilities",
        channel="lesion channel of multi-channel inputs, 0-based (default: 1 for nnU-Net .npz; a 4-D "
                "NIfTI with several volumes needs it)")
    p.add_argument("--mask", type=pathlib.Path, default=None,
                   help="region of interest: one mask file for all cases, or a folder of per-case masks CASE.nii.gz")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to count (default cpu)")
    p.add_argument("--workers", type=int, default=None,
                   help="threads each reading, decompressing and counting one case at a time (0: everything in "
                        f"the main thread; default: the usable CPU cores, {default_workers()} here)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the counting of each worker (default 1: the workers already use every "
                        "core, and counting one case takes tens of ms)")
    p.add_argument("--num-parts", type=_int_or_auto, default=1,
                   help="split the sorted case list into this many shards; 'auto': SLURM_ARRAY_TASK_COUNT of a "
                        "SLURM job array (then --part-id defaults to auto)")
    p.add_argument("--part-id", type=_int_or_auto, default=None,
                   help="process shard i: cases k with k %% num_parts == i (default 0); 'auto': "
                        "SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN (divided by SLURM_ARRAY_TASK_STEP)")
    p.add_argument("--save-labels", action="store_true", help="write OUT_DIR/CASE_labels.nii.gz (input affine)")
    p.add_argument("--save-detection-map", action="store_true",
                   help="write OUT_DIR/CASE_detection.nii.gz: each candidate's voxels hold its p_k (float32, input "
                        "affine, background 0), the detection map picai_eval-style evaluators read")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="recompute cases whose CASE.json exists")
    existing.add_argument("--skip-existing", action="store_true",
                          help="keep existing CASE.json files (their rows still go into the summary)")
    p.add_argument("--allow-missing-geometry", action="store_true",
                   help="nnU-Net .npz without its sibling CASE.nii.gz: use the identity affine instead of failing")
    add_count_options(p, baseline_threshold="threshold of the cc_count baseline (default 0.5)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no final summary line")
    p.set_defaults(func=run)


class _UsageError(Exception):
    pass


def _int_or_auto(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


_SLURM_VARS = ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN")


def slurm_array_shard(environ=None) -> tuple[int, int]:
    """``(num_parts, part_id)`` of this SLURM job-array task (``--num-parts auto --part-id auto``).

    ``num_parts = SLURM_ARRAY_TASK_COUNT`` and ``part_id = (SLURM_ARRAY_TASK_ID -
    SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP`` (step 1 when unset), so ``sbatch --array=1-8``
    and ``--array=0-14:2`` both give parts 0..7 of 8. The array must be a uniform range (``%``
    throttling is fine): ``--array=1,5,7`` cannot be mapped onto parts and is refused.

    Raises:
        ValueError: a variable is missing (not a job-array task) or inconsistent; the message
            names it and says what to pass instead.

    Example:
        >>> slurm_array_shard({"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1"})
        (8, 2)
    """
    env = os.environ if environ is None else environ
    missing = [name for name in _SLURM_VARS if not env.get(name)]
    if missing:
        raise ValueError(f"'auto' reads the SLURM job-array variables {', '.join(_SLURM_VARS)}, but "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: this is not a task of a "
                         f"SLURM job array (sbatch --array=0-N-1 ...); pass --num-parts N --part-id I instead")
    values = {}
    for name in _SLURM_VARS + ("SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_MAX"):
        if env.get(name):
            try:
                values[name] = int(env[name])
            except ValueError:
                raise ValueError(f"{name}={env[name]!r} is not an integer") from None
    count, task, low = (values[name] for name in _SLURM_VARS)
    step = values.get("SLURM_ARRAY_TASK_STEP", 1)
    if count < 1 or step < 1:
        raise ValueError(f"SLURM_ARRAY_TASK_COUNT={count} and SLURM_ARRAY_TASK_STEP={step} must be >= 1")
    high = values.get("SLURM_ARRAY_TASK_MAX", low + (count - 1) * step)
    if high != low + (count - 1) * step or (task - low) % step:
        raise ValueError(f"the SLURM job array is not a uniform range (SLURM_ARRAY_TASK_MIN={low}, "
                         f"SLURM_ARRAY_TASK_MAX={high}, SLURM_ARRAY_TASK_STEP={step}, SLURM_ARRAY_TASK_COUNT={count}), "
                         f"so task {task} cannot be mapped onto a part; submit --array=0-{count - 1}, or pass "
                         f"--num-parts N --part-id I")
    part = (task - low) // step
    if not 0 <= part < count:
        raise ValueError(f"SLURM_ARRAY_TASK_ID={task} is outside the array {low}..{high}")
    return count, part


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
    # None: not given; .npz files use channel 1, a multi-volume NIfTI is an error (io.read_probability_map)
    args.channel_given = args.channel
    if args.channel is None:
        args.channel = 1
    if args.channel < 0:
        raise _UsageError(f"--channel must be >= 0, got {args.channel}")
    if args.workers is None:
        args.workers = default_workers()
    if args.workers < 0:
        raise _UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.threads < 1:
        raise _UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.part_id is None:
        args.part_id = "auto" if args.num_parts == "auto" else 0
    if "auto" in (args.num_parts, args.part_id):
        try:
            num_parts, part_id = slurm_array_shard()
        except ValueError as exc:
            raise _UsageError(f"--num-parts/--part-id auto: {exc}") from None
        args.num_parts = num_parts if args.num_parts == "auto" else args.num_parts
        args.part_id = part_id if args.part_id == "auto" else args.part_id
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


def _read_case(path, args, shared_mask):
    """Runs in a reader thread: (volume, mask volume or None, (wall s, thread CPU s), notes).

    The map, its geometry and its mask (``shared_mask``, read once for a ``--mask`` file, or this
    case's file in a ``--mask`` folder) through :func:`lesioncount.io.read_case`.
    """
    from ..io import read_case

    t0, c0 = time.perf_counter(), time.thread_time()
    mask = shared_mask
    if args.mask is not None and args.mask.is_dir():
        mask = args.mask
    volume, mask, notes = read_case(path, channel=getattr(args, "channel_given", args.channel),
                                    missing_geometry="identity" if args.allow_missing_geometry else "error",
                                    mask=mask)
    return volume, mask, (time.perf_counter() - t0, time.thread_time() - c0), notes


class _CountedCase(NamedTuple):
    """A case counted by :func:`_process_case`, ready for the main thread to write.

    Attributes:
        report: the ``CASE.json`` object (:func:`lesioncount.report.case_report`); its ``timings_s``
            lacks only ``wait_s`` (0.0 until the main thread sets it).
        members: every member of ``report`` but ``timings_s``, already formatted as JSON text
            (:func:`lesioncount.io.format_json` at depth 1): the formatting runs in the worker.
        notes: warnings to print (a missing nnU-Net sibling: identity geometry).
        temps: ``{"labels": file or None, "detection": file or None}``, the maps' temporary files.
    """

    report: dict
    members: dict
    notes: list
    temps: dict


def _process_case(path, args, settings, shared_mask, out_dir: pathlib.Path) -> _CountedCase:
    """One case from file to report, in a worker thread (``--workers N``) or the main thread (0).

    Reads and decompresses the map (and its mask), counts, builds the report (the same as
    :func:`lesioncount.report.count_file`), formats its JSON members and writes the label map
    (``--save-labels``) and the detection map (``--save-detection-map``) to hidden temporary files.
    The main thread renames the maps and writes the JSON, in case order (:func:`_write_case`).
    Nothing large outlives the call.
    """
    from ..io import format_json
    from ..report import _count_and_write

    volume, mask, (read_s, read_cpu_s), notes = _read_case(path, args, shared_mask)
    labels_path = out_dir / f"{volume.name}_labels.nii.gz" if args.save_labels else None
    detection_path = (out_dir / f"{volume.name}_detection.nii.gz"
                      if getattr(args, "save_detection_map", False) else None)
    report, count_s, maps_s, temps = _count_and_write(volume, settings, mask, labels_path, detection_path,
                                                      commit=False)
    del volume, mask
    try:
        t0 = time.perf_counter()
        members = {key: format_json(value, 1) for key, value in report.items() if key != "timings_s"}
        write_s = maps_s + time.perf_counter() - t0  # label/detection maps + JSON formatting (not the final write)
        report["timings_s"] = {"read_s": read_s, "read_cpu_s": read_cpu_s, "wait_s": 0.0, "count_s": count_s,
                               "write_s": write_s}
    except BaseException:
        _unlink_temps(temps)
        raise
    return _CountedCase(report, members, notes, temps)


def _unlink_temps(temps: dict) -> None:
    """Remove the temporary map files of a case that is not written."""
    from ..io import unlink_if_present

    for tmp in temps.values():
        if tmp is not None:
            unlink_if_present(tmp)


def _write_json(path: pathlib.Path, text: str) -> None:
    """``text`` and a newline to ``path``, atomically (:func:`lesioncount.io.write_text`)."""
    from ..io import write_text

    write_text(path, text + "\n")


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


# ----------------------------------------------------------------------------- locking the output folder

LOCK_NAME = ".lesioncount.lock"


def _part_lock_name(part_id: int, num_parts: int) -> str:
    return f".lesioncount.part-{part_id}-of-{num_parts}.lock"


class FolderBusy(Exception):
    """Another lesioncount run holds the output folder's lock; the message names its pid."""


class FolderLock:
    """An ``fcntl.flock`` lock on a file in the output folder, held for a whole run.

    ``lesioncount count`` without ``--num-parts`` and ``lesioncount merge`` hold ``OUT_DIR/
    .lesioncount.lock`` exclusively; a shard holds it shared plus ``.lesioncount.part-I-of-N.lock``
    exclusively, so shards of one split run side by side, while a second unsharded run, a second
    copy of one shard, or a merge during shards refuse at once (:class:`FolderBusy`). The holder
    writes ``pid host command`` into its lock file (for the refusal message). The kernel drops the
    lock when the process ends, however it ends; the file is removed on release (safe: an acquirer
    re-checks that the file it locked is still the one at the path).

    Example:
        >>> import tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> with FolderLock(folder / LOCK_NAME, "count"):
        ...     try:
        ...         FolderLock(folder / LOCK_NAME, "count").acquire()
        ...     except FolderBusy as exc:
        ...         print("busy:", f"pid {os.getpid()}" in str(exc))
        busy: True
    """

    def __init__(self, path: pathlib.Path, what: str, *, shared: bool = False):
        self.path, self.what, self.shared = pathlib.Path(path), what, shared
        self.fd = None
        self.unsupported = None  # the OSError of a file system without flock

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError as exc:  # not POSIX
            self.unsupported = exc
            return self
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderBusy(self._busy_message()) from None
            except OSError as exc:  # e.g. ENOLCK / EOPNOTSUPP: a file system without locks
                os.close(fd)
                self.unsupported = exc
                return self
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                if not self.shared:
                    text = f"{os.getpid()} {socket.gethostname()} {self.what}\n".encode()
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, text, 0)
                return self
            os.close(fd)  # the holder removed the file between our open and flock: lock the new one
        raise FolderBusy(f"cannot lock {self.path}: it keeps being replaced")  # pragma: no cover

    def _busy_message(self) -> str:
        holders = _lock_holders(self.path)
        if not holders and self.path.name == LOCK_NAME:  # shared holders: the shards' part locks
            holders = [h for part in sorted(self.path.parent.glob(".lesioncount.part-*.lock"))
                       for h in _lock_holders(part, probe=True)]
        who = "; ".join(holders) if holders else "pid unknown"
        return (f"{self.path.parent} is in use by another lesioncount run ({who}; lock file {self.path.name}); "
                f"wait for it to finish, or write to another folder")

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        from ..io import unlink_if_present

        try:
            if self.shared:  # remove the file only when no other shard holds it
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return
            unlink_if_present(self.path)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _lock_holders(path: pathlib.Path, probe: bool = False) -> list[str]:
    """'pid P on HOST (WHAT)' of a lock file's holder, from its content; with ``probe``, only when
    the lock is currently held (tried with a shared non-blocking lock, released at once)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return []
    try:
        if probe:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return []  # free: nobody holds it
            except BlockingIOError:
                pass
            except OSError:
                return []
        text = os.pread(fd, 4096, 0).decode(errors="replace").split()
    finally:
        os.close(fd)
    if not text:
        return []
    pid, host, what = text[0], text[1] if len(text) > 1 else "?", " ".join(text[2:])
    return [f"pid {pid} on {host}" + (f", {what}" if what else "")]


def lock_output_folder(out_dir: pathlib.Path, what: str, part: tuple[int, int] | None = None) -> list[FolderLock]:
    """The locks of a run writing into ``out_dir`` (see :class:`FolderLock`); raises FolderBusy.

    ``part = (part_id, num_parts)`` for a shard: the folder lock shared plus the part's own lock.
    Release them with :func:`release_locks` (in reverse order).
    """
    locks = [FolderLock(out_dir / LOCK_NAME, what, shared=part is not None).acquire()]
    if part is not None:
        try:
            locks.append(FolderLock(out_dir / _part_lock_name(*part), what).acquire())
        except BaseException:
            release_locks(locks)
            raise
    return locks


def release_locks(locks: list[FolderLock]) -> None:
    for lock in reversed(locks):
        lock.release()


# ----------------------------------------------------------------------------- SIGINT / SIGTERM


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (raised in the main thread by :class:`SignalGuard`; a BaseException like
    KeyboardInterrupt, so that no `except Exception` takes it for a failed case)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class SignalGuard:
    """SIGINT/SIGTERM handlers for a command: the first signal raises :class:`Interrupted` in the
    main thread, except inside ``with guard.critical():`` blocks (a case's files being renamed,
    the summaries being written), where it is raised when the block ends. After :meth:`defer`
    (the clean-up), signals are only recorded in ``received``. Installed only in the main thread.
    """

    def __init__(self):
        self.received = None
        self._raised = False
        self._depth = 0
        self._deferred = False
        self._previous = {}

    def install(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signum
        self._maybe_raise()

    def _maybe_raise(self):
        if self.received is not None and not (self._raised or self._deferred or self._depth):
            self._raised = True
            raise Interrupted(self.received)

    @contextlib.contextmanager
    def critical(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        self._maybe_raise()

    def defer(self) -> None:
        self._deferred = True


# ----------------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    """Run ``lesioncount count``; returns the exit code (0 ok, 1 some cases failed, 2 usage error,
    130 / 143 interrupted by SIGINT / SIGTERM)."""
    guard = SignalGuard().install()
    try:
        with warnings.catch_warnings():
            # io warns about a missing nnU-Net sibling from the reader threads; the command reports it
            # itself, once per case, in order (warning filters are process-wide, so set them here).
            warnings.filterwarnings("ignore", message=r".*sibling segmentation .* not found")
            import torch

            previous_threads = torch.get_num_threads()
            try:
                if getattr(args, "threads", None) and args.threads >= 1:
                    torch.set_num_threads(args.threads)
                return _run(args, guard)
            finally:
                torch.set_num_threads(previous_threads)
    except Interrupted as exc:  # before any output was touched
        print(f"lesioncount count: interrupted by {exc.name} before counting started; nothing was written",
              file=sys.stderr)
        return 128 + exc.signum
    finally:
        guard.restore()


def _stale_outputs(out_dir: pathlib.Path, args) -> list[pathlib.Path]:
    """Summaries that this run replaces or makes stale, removed before the first case is written.

    Its own summary/errors/lesions files (rewritten at the end); for a run without ``--num-parts``
    also every shard's part files and manifests; for a shard the folder-level summary.csv,
    errors.csv and lesions.csv (a merge or an unsharded run wrote them; ``merge`` rewrites them).
    """
    suffix = _part_suffix(args)
    names = [f"{stem}{suffix}.csv" for stem in ("summary", "errors", "lesions")]
    if suffix:
        names += [f".lesioncount{suffix}.manifest", "summary.csv", "errors.csv", "lesions.csv"]
        found = [out_dir / n for n in names]
    else:
        found = [out_dir / n for n in names]
        for pattern in ("summary.part-*-of-*.csv", "errors.part-*-of-*.csv", "lesions.part-*-of-*.csv",
                        ".lesioncount.part-*-of-*.manifest"):
            found += sorted(out_dir.glob(pattern))
    return [p for p in found if os.path.lexists(p)]


def _label_map_problem(path: pathlib.Path, report: dict) -> str | None:
    """Why the label map of a kept case cannot be kept (missing, empty, unreadable, or not the one
    its CASE.json describes), or None."""
    from ..io import read_map_on_grid

    array, problem = read_map_on_grid(path, report["shape"], report["affine"], "iu", "an integer label map")
    if problem:
        return problem
    largest = int(array.max()) if array.size else 0
    if largest != report["n_candidates"] or (array.size and int(array.min()) < 0):
        return f"it holds labels up to {largest}, but the case has {report['n_candidates']} candidates"
    return None


def _detection_map_problem(path: pathlib.Path, report: dict) -> str | None:
    """Why the detection map of a kept case cannot be kept (missing, empty, unreadable, or not the
    one its CASE.json describes: a float map of the case's shape and affine whose nonzero values are
    the lesion probabilities of its lesion table, each on as many voxels as its candidates have), or None."""
    from ..io import read_map_on_grid

    array, problem = read_map_on_grid(path, report["shape"], report["affine"], "f", "a float detection map")
    if problem:
        return problem
    # each candidate's voxels hold its p_k: value -> voxel count must be p_k -> summed candidate sizes
    values, counts = np.unique(array[array != 0], return_counts=True)
    sizes: dict = collections.Counter()
    for row in report["lesions"]:
        sizes[np.float32(row["probability"])] += int(row["size_voxels"])
    expected = sorted(sizes)
    if values.size != len(expected):
        return (f"it holds {values.size} distinct nonzero value(s), but the case's {len(report['lesions'])} "
                f"candidate(s) have {len(expected)} distinct probabilities")
    if not (np.array_equal(values.astype(np.float32), np.asarray(expected, np.float32))
            and [int(c) for c in counts] == [sizes[v] for v in expected]):
        return "its values or their extents are not the lesion probabilities and sizes of the case's JSON"
    return None


def _fail(message: str) -> int:
    """Print a usage / setup error; the exit code 2."""
    print(f"lesioncount count: error: {message}", file=sys.stderr)
    return 2


def _discover_cases(args) -> tuple[list, list]:
    """Step 1, discover the inputs: ``(all_cases, cases)``, the case files of ``--input`` and this
    shard's share of them (:func:`shard`), both sorted by name.

    In an input folder the ``--mask`` file and the maps this command writes (``CASE_labels.nii.gz``
    / ``CASE_detection.nii.gz`` next to ``CASE``, or every such file when ``-o`` is the input folder)
    are not cases. Raises :class:`_UsageError` when no case is left, ``FileNotFoundError`` /
    :class:`~lesioncount.io.CaseReadError` from :func:`~lesioncount.io.find_cases`.
    """
    from ..io import case_name, find_cases

    all_cases = find_cases(args.input)
    if args.input.is_dir():
        # never count the mask or this command's own label / detection maps as cases when they sit in the
        # input folder
        skip = {args.mask.resolve()} if args.mask is not None and args.mask.is_file() else set()
        same_folder = args.output.exists() and args.output.resolve() == args.input.resolve()
        # CASE_labels.nii.gz / CASE_detection.nii.gz next to CASE is what --save-labels /
        # --save-detection-map wrote into this folder (now or in an earlier run with -o = this folder): an
        # integer label map, which a single lesion would make look like a valid 0/1 probability map, and a
        # map of p_k values, which would be counted as a (blocky) probability map
        names = {case_name(p) for p in all_cases}
        own_maps = {}
        for kind, flag in (("labels", "--save-labels"), ("detection", "--save-detection-map")):
            found = {p for p in all_cases if p.name.endswith(f"_{kind}.nii.gz")
                     and (same_folder or case_name(p)[: -len(f"_{kind}")] in names)}
            own_maps.update(dict.fromkeys(found))
            if found and not same_folder and not args.quiet:
                print(f"lesioncount count: note: skipping {len(found)} {'label' if kind == 'labels' else kind} "
                      f"map(s) written by {flag} (CASE_{kind}.nii.gz next to CASE), e.g. {min(found).name}",
                      file=sys.stderr)
        # (os.path.realpath, not Path.resolve: a symbolic link loop must reach the reader and errors.csv)
        all_cases = [p for p in all_cases if p not in own_maps
                     and not (skip and pathlib.Path(os.path.realpath(p)) in skip)]
    if not all_cases:
        raise _UsageError(f"{args.input}: no case files (.nii, .nii.gz, .npz, .npy) found")
    return all_cases, shard(all_cases, args.num_parts, args.part_id)


def _settings_from_args(args):
    """The :class:`~lesioncount.report.CountSettings` of the parsed options."""
    from ..report import CountSettings

    return CountSettings(
        threshold=args.threshold, connectivity=args.connectivity, min_size=args.min_size,
        min_volume=args.min_volume, max_count=args.max_count, from_logits=args.from_logits,
        mask=str(args.mask) if args.mask is not None else None, channel=args.channel, device=args.device,
        baseline_threshold=args.baseline_threshold,
    )


def _run(args: argparse.Namespace, guard: SignalGuard) -> int:
    """Check the options, discover the cases, lock the output folder and run :func:`_run_locked`."""
    from ..io import CaseReadError

    try:
        _validate(args)
        all_cases, cases = _discover_cases(args)
    except (_UsageError, FileNotFoundError, CaseReadError) as exc:
        return _fail(str(exc))
    settings = _settings_from_args(args)
    out_dir: pathlib.Path = args.output
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot create output folder {out_dir}: {exc}")
    sharded = args.num_parts > 1
    what = "count" + (f" part {args.part_id} of {args.num_parts}" if sharded else "")
    try:
        with guard.critical():
            locks = lock_output_folder(out_dir, what, (args.part_id, args.num_parts) if sharded else None)
    except FolderBusy as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot create the lock file in {out_dir}: {exc}")
    try:
        if locks[0].unsupported is not None and not args.quiet:
            print(f"lesioncount count: warning: cannot lock {out_dir} ({locks[0].unsupported}); a second run into "
                  f"this folder at the same time would not be detected", file=sys.stderr)
        return _run_locked(args, guard, all_cases, cases, settings, out_dir,
                           exclusive=not sharded and locks[0].unsupported is None)
    finally:
        release_locks(locks)


class _CasePaths(NamedTuple):
    """The output files of one case in the output folder."""

    json: pathlib.Path
    labels: pathlib.Path
    detection: pathlib.Path


class _Results:
    """What the run has so far, by case index: summary rows, lesion rows, errors, summed timings;
    and the progress bar its messages must not break."""

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}
        self.lesions: dict[int, list] = {}
        self.errors: dict[int, tuple[str, str, str]] = {}
        self.totals = collections.Counter()
        self.bar = None

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)  # keeps the bar intact
        else:
            print(message, file=sys.stderr)

    def add(self, index: int, report: dict) -> None:
        """A finished (or kept) case's summary and lesion rows."""
        from ..report import lesion_rows, summary_row

        self.rows[index], self.lesions[index] = summary_row(report), lesion_rows(report)

    def error(self, index: int, path: pathlib.Path, exc: BaseException) -> None:
        from ..io import CaseReadError, case_name

        if isinstance(exc, CaseReadError) and exc.path == path:
            reason = exc.reason
        elif isinstance(exc, (CaseReadError, ValueError)):
            reason = str(exc)
        else:
            reason = f"{type(exc).__name__}: {exc}"
        self.errors[index] = (case_name(path), str(path), reason)
        self.say(f"lesioncount count: {path}: {reason}")


def _run_locked(args, guard, all_cases, cases, settings, out_dir, exclusive) -> int:
    """The steps of a run on a locked output folder: prepare it, keep or count every case (load,
    mask, geometry, count, write its files), then write the summaries and print the totals."""
    from ..io import CaseReadError, case_name, read_mask

    paths = [_CasePaths(out_dir / f"{case_name(p)}.json", out_dir / f"{case_name(p)}_labels.nii.gz",
                        out_dir / f"{case_name(p)}_detection.nii.gz") for p in cases]
    existing = [p.json for p in paths if p.json.exists()]
    if existing and not (args.overwrite or args.skip_existing):
        shown = ", ".join(p.name for p in existing[:5]) + (" ..." if len(existing) > 5 else "")
        return _fail(f"{len(existing)} result(s) already in {out_dir} ({shown}); pass --overwrite to recompute "
                     f"or --skip-existing to keep them")
    shared_mask = None
    if args.mask is not None and args.mask.is_file():
        try:
            shared_mask = read_mask(args.mask)
        except CaseReadError as exc:
            return _fail(f"--mask: {exc}")
    problem = _remove_stale_outputs(args, guard, out_dir, paths, exclusive)
    if problem is not None:
        return _fail(problem)
    results = _Results()
    t_start = time.perf_counter()
    interrupted = None
    try:
        todo = _kept_cases(args, settings, cases, paths, results)
        _count_cases(args, guard, settings, shared_mask, out_dir, todo, paths, results)
    except Interrupted as exc:
        interrupted = exc.signum
    finally:
        guard.defer()  # from here on signals are only recorded: the summaries are written to the end
    interrupted = interrupted or guard.received
    failed_writes = _write_summaries(args, out_dir, all_cases, cases, settings, results, interrupted)
    return _print_totals(args, out_dir, cases, results, interrupted, failed_writes, time.perf_counter() - t_start)


def _remove_stale_outputs(args, guard, out_dir: pathlib.Path, paths: list, exclusive: bool) -> str | None:
    """Remove what this run replaces before the first case is written; the error message, or None.

    From here on the folder's summaries describe this run: the old ones go first (a run killed even
    by SIGKILL leaves no summary rather than a stale one), and they are written at the end, also
    after SIGINT/SIGTERM. With the folder to itself (``exclusive``) hidden temporary files are
    leftovers of killed runs; with ``--overwrite`` the cases' old JSON and maps go too (never an old
    label/detection map beside a new JSON).
    """
    from ..io import is_temp_name, unlink_if_present

    with guard.critical():
        stale = _stale_outputs(out_dir, args)
        if exclusive:
            stale += [p for p in out_dir.iterdir() if is_temp_name(p.name)]
        if args.overwrite:
            stale += [p for group in paths for p in group if os.path.lexists(p)]
        for path in stale:
            try:
                unlink_if_present(path)
            except IsADirectoryError:
                pass  # reported when it is written
            except OSError as exc:
                return f"cannot remove the earlier output {path}: {exc}"
    return None


def _kept_cases(args, settings, cases: list, paths: list, results: _Results) -> list:
    """Step 2a, ``--skip-existing``: keep the cases whose ``CASE.json`` (and, with ``--save-labels``
    / ``--save-detection-map``, whose maps) this run would write again; returns the cases to count,
    ``[(index, path, json path)]`` in case order."""
    from ..io import case_name
    from ..report import lesion_rows, summary_row

    save_detection = getattr(args, "save_detection_map", False)
    todo, relabel = [], []
    for index, (path, case_paths) in enumerate(zip(cases, paths)):
        if not (args.skip_existing and case_paths.json.exists()):
            todo.append((index, path, case_paths.json))
            continue
        try:
            report = json.loads(case_paths.json.read_text())
            _check_same_settings(report["settings"], settings)
            row, lesion = summary_row(report), lesion_rows(report)
        except (ValueError, KeyError, TypeError) as exc:
            results.errors[index] = (case_name(path), str(path),
                                     f"existing {case_paths.json.name} unusable: {exc}; use --overwrite")
            continue
        if args.save_labels or save_detection:
            relabel.append((index, path, report, row, lesion))
            continue
        results.rows[index], results.lesions[index] = row, lesion
        results.totals["kept"] += 1
    if not relabel:
        return todo
    redo = []  # --skip-existing --save-labels / --save-detection-map: a kept case needs complete maps
    for index, path, report, row, lesion in relabel:
        problems = []
        if args.save_labels:
            problems.append((paths[index].labels, _label_map_problem(paths[index].labels, report)))
        if save_detection:
            problems.append((paths[index].detection, _detection_map_problem(paths[index].detection, report)))
        problems = [(map_path, problem) for map_path, problem in problems if problem is not None]
        if not problems:
            results.rows[index], results.lesions[index] = row, lesion
            results.totals["kept"] += 1
        else:
            redo.append((index, path, paths[index].json))
            for map_path, problem in problems:
                results.say(f"lesioncount count: note: {map_path.name}: {problem}; counting {path.name} "
                            f"again to write it")
    return sorted(todo + redo)


def _count_cases(args, guard, settings, shared_mask, out_dir: pathlib.Path, todo: list, paths: list,
                 results: _Results) -> None:
    """Step 2b: count every case of ``todo`` (:func:`_process_case`: load, mask, geometry, count, in
    ``--workers`` threads) and write its files in case order (:func:`_write_case`). One bad case is
    an error row, not the end of the run; :class:`Interrupted` propagates after the clean-up (the
    maps of cases counted but not written are removed)."""
    from .._extras import MissingExtraError, available, require

    pool = None
    live: set = set()  # futures whose map temporary files are not yet renamed or removed
    try:
        if len(todo) > 1 and not args.quiet and available("tqdm"):
            results.bar = require("tqdm").tqdm(total=len(todo), desc="lesioncount count", unit="case",
                                               file=sys.stderr)
        workers = args.workers
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lesioncount-case") if workers > 0 else None
        pending: collections.deque = collections.deque()
        queue = iter(todo)

        def submit_next():
            item = next(queue, None)
            if item is None:
                return
            job = (item[1], args, settings, shared_mask, out_dir)
            if pool is not None:
                future = pool.submit(_process_case, *job)
                live.add(future)
                pending.append((item, future))
            else:
                pending.append((item, job))

        # 2 x workers cases queued: a worker that finishes while the main thread waits for an older
        # (slower) case starts the next one at once. Only the `workers` cases being processed hold
        # their arrays (a finished case is its report), so memory stays bounded.
        for _ in range(2 * workers if workers > 0 else 1):
            submit_next()
        while pending:
            (index, path, _), job = pending[0]
            t_wait = time.perf_counter()
            # --workers 0: the main thread processes the case, so a signal waits for its end (its
            # temporary label map must be renamed or removed); with workers it interrupts the wait
            with (guard.critical() if pool is None else contextlib.nullcontext()):
                try:
                    counted = job.result() if pool is not None else _process_case(*job)
                except MissingExtraError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one bad case must not stop the folder
                    pending.popleft()
                    live.discard(job) if pool is not None else None
                    submit_next()
                    results.error(index, path, exc)
                else:
                    wait_s = time.perf_counter() - t_wait
                    with guard.critical():  # a case's files and its summary rows go together
                        pending.popleft()
                        submit_next()
                        _write_case(index, path, counted, wait_s, paths[index], results)
                        live.discard(job) if pool is not None else None
                if results.bar is not None:
                    results.bar.update(1)
    finally:
        guard.defer()  # from here on signals are only recorded: the clean-up and the summaries run to the end
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for future in live:  # finished cases never written: their label and detection maps go
            if future.done() and not future.cancelled() and future.exception() is None:
                _unlink_temps(future.result().temps)
        if results.bar is not None:
            results.bar.close()


def _write_case(index: int, path: pathlib.Path, counted: "_CountedCase", wait_s: float, case_paths: _CasePaths,
                results: _Results) -> None:
    """Step 3, write a counted case's outputs (in the main thread, in case order): its maps renamed
    from their temporary files (an earlier run's map that this JSON does not describe is removed),
    then ``CASE.json`` with ``wait_s`` filled in; its rows go into ``results`` (or its error)."""
    from ..io import JSONText, unlink_if_present, write_json

    for message in counted.notes:
        results.say(f"lesioncount count: warning: {message}")
    report, temps = counted.report, counted.temps
    try:
        for kind, map_path in (("labels", case_paths.labels), ("detection", case_paths.detection)):
            if temps[kind] is not None:
                os.replace(temps[kind], map_path)
                temps[kind] = None
            else:  # a map left by an earlier run does not belong to this JSON
                unlink_if_present(map_path)
        report["timings_s"]["wait_s"] = wait_s
        # the members the worker formatted, and the timings, complete now
        write_json(case_paths.json, {key: report[key] if key == "timings_s" else JSONText(counted.members[key])
                                     for key in report})
    except OSError as exc:
        _unlink_temps(temps)
        results.error(index, path, exc)
    else:
        timings = report["timings_s"]
        results.add(index, report)
        results.totals.update({k: timings[k] for k in ("read_s", "wait_s", "count_s", "write_s")})
        results.totals["counted"] += 1


def _write_summaries(args, out_dir: pathlib.Path, all_cases: list, cases: list, settings, results: _Results,
                     interrupted: int | None) -> list:
    """Step 4, the run's tables: ``summary.csv``, ``lesions.csv``, ``errors.csv`` (``.part-i-of-n``
    for a shard, with its manifest), written also after SIGINT/SIGTERM (the unprocessed cases are
    error rows then); returns the files that could not be written."""
    from .._tables import write_csv
    from ..io import case_name, fsync_folder, write_json
    from ..report import lesion_fields, summary_fields

    suffix = _part_suffix(args)
    if interrupted is not None:
        name = signal.Signals(interrupted).name
        for index, path in enumerate(cases):
            if index not in results.rows and index not in results.errors:
                results.errors[index] = (case_name(path), str(path),
                                         f"not processed: the run was interrupted by {name}; run again with "
                                         f"--skip-existing to count the rest")
    rows, lesions, errors = results.rows, results.lesions, results.errors
    failed_writes = []
    outputs = [(out_dir / f"summary{suffix}.csv", summary_fields(args.max_count), [rows[i] for i in sorted(rows)]),
               (out_dir / f"lesions{suffix}.csv", lesion_fields(), [r for i in sorted(lesions) for r in lesions[i]]),
               (out_dir / f"errors{suffix}.csv", ["case", "file", "error"],
                [dict(zip(("case", "file", "error"), errors[i])) for i in sorted(errors)])]
    for path, fields, table in outputs:
        try:
            write_csv(path, fields, table)
        except OSError as exc:
            failed_writes.append(path)
            print(f"lesioncount count: error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
    if args.num_parts > 1:
        manifest = {
            "lesioncount_version": _version(), "input": str(args.input), "part_id": args.part_id,
            "num_parts": args.num_parts, "cases_total": len(all_cases), "settings": _manifest_settings(settings),
            "cases": [case_name(p) for p in cases], "files": [p.name for p in cases], "complete": interrupted is None,
            "interrupted_by": None if interrupted is None else signal.Signals(interrupted).name,
        }
        try:
            _write_json(out_dir / f".lesioncount{suffix}.manifest", json.dumps(manifest, indent=1))
        except OSError as exc:
            failed_writes.append(out_dir / f".lesioncount{suffix}.manifest")
            print(f"lesioncount count: error: cannot write the shard manifest: {exc.strerror or exc}", file=sys.stderr)
    fsync_folder(out_dir)
    return failed_writes


def _print_totals(args, out_dir: pathlib.Path, cases: list, results: _Results, interrupted: int | None,
                  failed_writes: list, elapsed: float) -> int:
    """Step 5, summarise: the closing lines on stdout / stderr; returns the exit code (0, 1 when a
    case or a summary failed, 128 + signal number when interrupted)."""
    from ..io import gzip_backend

    suffix = _part_suffix(args)
    rows, errors, totals = results.rows, results.errors, results.totals
    if interrupted is not None:
        print(f"lesioncount count: interrupted by {signal.Signals(interrupted).name}: {len(rows)} of {len(cases)} "
              f"case(s) done and listed in {out_dir / f'summary{suffix}.csv'}, the other {len(cases) - len(rows)} "
              f"in errors{suffix}.csv; run again with --skip-existing to finish", file=sys.stderr)
        return 128 + interrupted
    if not args.quiet:
        print(f"lesioncount count: {totals['counted']} of {len(cases)} case(s) counted, {len(errors)} failed, "
              f"{totals['kept']} kept from earlier runs -> {out_dir} in {elapsed:.2f} s "
              f"({max(args.workers, 1)} worker thread(s), {gzip_backend()} gzip; summed over cases: read "
              f"{totals['read_s']:.2f} s, count {totals['count_s']:.2f} s, write {totals['write_s']:.2f} s; "
              f"the main thread waited {totals['wait_s']:.2f} s)")
    if errors:
        print(f"lesioncount count: {len(errors)} case(s) failed; see {out_dir / f'errors{suffix}.csv'}", file=sys.stderr)
    return 1 if errors or failed_writes else 0


def _version() -> str:
    from .. import __version__

    return __version__


def _manifest_settings(settings) -> dict:
    """The settings that change results (what merge compares between shards)."""
    from dataclasses import asdict

    values = asdict(settings)
    del values["device"]
    return values
