"""``lesioncount merge``: combine the shards of ``lesioncount count --num-parts N`` into one result.

Usage::

    lesioncount merge OUT_DIR [-q]

``lesioncount count --num-parts N --part-id I -o OUT_DIR`` (or ``--num-parts auto --part-id auto``
in a SLURM job array) writes, per shard, ``summary.part-I-of-N.csv``, ``errors.part-I-of-N.csv``,
``lesions.part-I-of-N.csv`` and a hidden manifest ``.lesioncount.part-I-of-N.manifest`` (JSON: the
settings, the input, the shard's cases, whether it ran to the end). ``merge`` checks them and
writes the folder-level ``summary.csv``, ``errors.csv`` and ``lesions.csv``, rows in the order of
the whole sorted case list (as one unsharded run would have them). The part files are kept, so
merging again gives byte-identical files (idempotent); every file is written atomically.

Refused (exit 2, nothing written), with a message naming the files or cases at fault:

- no part files in OUT_DIR, or part files of different N (e.g. a stale ``-of-4`` beside ``-of-3``);
- a missing shard: any of ``summary/errors.part-I-of-N.csv`` or the manifest absent for some I in
  0..N-1 (and ``lesions.part-I-of-N.csv`` when other shards have one);
- overlapping shards: a case in two shards' outputs, or in a shard's CSV but not its manifest;
- shards that are not parts of one split: a different number of cases in total, case lists that do
  not interleave into one sorted list, or different settings (threshold, connectivity, size rule,
  max count, logits, channel, mask, baseline threshold);
- another lesioncount run holding the folder (merge takes the folder lock like an unsharded
  ``count``; shards still running hold it shared).

A shard that was interrupted (SIGINT/SIGTERM) merges: its unprocessed cases are rows of its
errors file, so they are in ``errors.csv``; merge says so. Exit codes: 0 merged and every case
counted; 1 merged, some cases failed (listed in ``errors.csv``), or a file could not be written;
2 refused.

Example (SLURM)::

    sbatch --array=0-15 --wrap "lesioncount count -i preds/ -o counts/ --num-parts auto --part-id auto"
    lesioncount merge counts/      # after the array finished (e.g. sbatch --dependency=afterany:JOBID)
"""
from __future__ import annotations

import argparse
import csv
import json
import pathlib
import re
import sys

_PART_RE = re.compile(r"^(summary|errors|lesions)\.part-(\d+)-of-(\d+)\.csv$|^\.lesioncount\.part-(\d+)-of-(\d+)\.manifest$")
_KINDS = ("summary", "errors", "lesions", "manifest")


def register(subparsers) -> None:
    """Add the ``merge`` subcommand."""
    p = subparsers.add_parser(
        "merge",
        help="combine the shards of 'count --num-parts N' into summary.csv, errors.csv, lesions.csv",
        description="Check the shard outputs of 'lesioncount count --num-parts N' in OUT_DIR (all N present, no "
                    "case twice, same settings) and write OUT_DIR/summary.csv, errors.csv and lesions.csv.",
    )
    p.add_argument("output", type=pathlib.Path, metavar="OUT_DIR", help="the shards' output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no final summary line")
    p.set_defaults(func=run)


class MergeError(Exception):
    """The shards cannot be merged; the message says which files or cases and why."""


def _file_name(kind: str, part: int, num_parts: int) -> str:
    if kind == "manifest":
        return f".lesioncount.part-{part}-of-{num_parts}.manifest"
    return f"{kind}.part-{part}-of-{num_parts}.csv"


def _read_csv(path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MergeError(f"cannot read {path}: {exc}") from None
    if not rows:
        raise MergeError(f"{path} is empty (no header)")
    return rows[0], rows[1:]


def _shorten(items, limit: int = 8) -> str:
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


def merge_shards(out_dir: pathlib.Path) -> dict:
    """Check the shard files in ``out_dir`` and return the merged tables (nothing is written).

    Returns:
        dict with ``num_parts``, ``summary`` (header, rows), ``errors`` (header, rows),
        ``lesions`` ((header, rows) or None when the shards wrote no lesions files) and
        ``interrupted`` (part ids of shards that did not run to the end).

    Raises:
        MergeError: see the module docstring.

    Example:
        >>> merged = merge_shards(pathlib.Path("counts"))          # doctest: +SKIP
        >>> merged["num_parts"], len(merged["summary"][1])        # doctest: +SKIP
        (4, 120)
    """
    found: dict[tuple[str, int, int], pathlib.Path] = {}
    for path in out_dir.iterdir():
        match = _PART_RE.match(path.name)
        if match:
            if match.group(1):
                found[(match.group(1), int(match.group(2)), int(match.group(3)))] = path
            else:
                found[("manifest", int(match.group(4)), int(match.group(5)))] = path
    if not found:
        raise MergeError(f"no shard outputs (summary.part-I-of-N.csv) in {out_dir}; run 'lesioncount count "
                         f"--num-parts N --part-id I -o {out_dir}' for I = 0..N-1 first")
    counts = sorted({n for _, _, n in found})
    if len(counts) > 1:
        by_n = {n: sorted(p.name for (_, _, m), p in found.items() if m == n) for n in counts}
        raise MergeError("shards of different --num-parts in " + str(out_dir) + ": "
                         + "; ".join(f"N={n}: {_shorten(names, 4)}" for n, names in by_n.items())
                         + "; remove the files of the stale split")
    num_parts = counts[0]
    bad_ids = sorted({i for _, i, _ in found if i >= num_parts})
    if bad_ids:
        raise MergeError(f"part ids {bad_ids} are not below N={num_parts}")
    with_lesions = any(kind == "lesions" for kind, _, _ in found)
    required = ("summary", "errors", "manifest") + (("lesions",) if with_lesions else ())
    missing = [_file_name(kind, i, num_parts) for i in range(num_parts) for kind in required
               if (kind, i, num_parts) not in found]
    if missing:
        parts = sorted({int(re.search(r"part-(\d+)-of", name).group(1)) for name in missing})
        raise MergeError(f"missing shard outputs in {out_dir}: {_shorten(missing)}; run 'lesioncount count "
                         f"--num-parts {num_parts} --part-id I -o {out_dir}' for part(s) {_shorten(parts)} "
                         f"(with --skip-existing to keep finished cases)")

    manifests = []
    for i in range(num_parts):
        path = found[("manifest", i, num_parts)]
        try:
            manifest = json.loads(path.read_text())
            cases, files = list(manifest["cases"]), list(manifest["files"])
            total, settings = int(manifest["cases_total"]), manifest["settings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MergeError(f"shard manifest {path.name} unreadable ({type(exc).__name__}: {exc}); run part {i} "
                             f"again") from None
        if manifest.get("part_id") != i or manifest.get("num_parts") != num_parts or len(files) != len(cases):
            raise MergeError(f"shard manifest {path.name} does not describe part {i} of {num_parts}")
        manifests.append((cases, files, total, settings, manifest))

    differ = []
    for key in sorted(set().union(*(m[3] for m in manifests))):
        values = [m[3].get(key, "missing") for m in manifests]
        if any(v != values[0] for v in values):
            differ.append(f"{key}: " + ", ".join(f"part {i} {v!r}" for i, v in enumerate(values)))
    if differ:
        raise MergeError("the shards were counted with different settings (" + "; ".join(differ)
                         + "); count the odd part(s) again with the same options and --overwrite")
    totals = sorted({m[2] for m in manifests})
    if len(totals) > 1:
        raise MergeError("the shards split different case lists: " + ", ".join(
            f"part {i} of {m[2]} cases" for i, m in enumerate(manifests)) + "; were they run on the same input?")
    total = totals[0]
    # shard I holds the cases k of the sorted list with k % N == I: its j-th case is case I + j N
    index_of: dict[str, int] = {}
    part_of: dict[str, int] = {}
    order: dict[int, str] = {}
    for i, (cases, files, _, _, _) in enumerate(manifests):
        expected = len(range(i, total, num_parts))
        if len(cases) != expected:
            raise MergeError(f"part {i} lists {len(cases)} cases, but part {i} of {num_parts} of {total} cases "
                             f"has {expected}")
        for j, (case, file) in enumerate(zip(cases, files)):
            if case in part_of:
                raise MergeError(f"overlapping shards: case {case!r} is in part {part_of[case]} and part {i}")
            part_of[case], index_of[case] = i, i + j * num_parts
            order[i + j * num_parts] = file
    names = [order[k] for k in range(total)]
    if names != sorted(names):
        raise MergeError("the shards' case lists do not interleave into one sorted list (run on different inputs "
                         "or different file sets?); count all parts again")

    def merge_table(kind: str, case_column: int = 0, one_row_per_case: bool = True):
        header, merged, seen = None, [], {}
        for i in range(num_parts):
            path = found[(kind, i, num_parts)]
            part_header, rows = _read_csv(path)
            if header is None:
                header = part_header
            elif part_header != header:
                raise MergeError(f"{path.name} has the columns {_shorten(part_header, 6)}, "
                                 f"{_file_name(kind, 0, num_parts)} has {_shorten(header, 6)}")
            for row in rows:
                if len(row) != len(header):
                    raise MergeError(f"{path.name}: a row with {len(row)} fields under a header of {len(header)}")
                case = row[case_column]
                if part_of.get(case) != i:
                    where = "no shard's manifest" if case not in part_of else f"part {part_of[case]}'s manifest"
                    raise MergeError(f"overlapping shards: {path.name} lists case {case!r}, which is in {where}")
                if one_row_per_case:
                    if case in seen:
                        raise MergeError(f"case {case!r} is listed twice ({path.name} and {seen[case]})")
                    seen[case] = path.name
                merged.append((index_of[case], len(merged), row))
        merged.sort(key=lambda item: item[:2])
        return header, [row for _, _, row in merged], seen

    summary_header, summary_rows, in_summary = merge_table("summary")
    errors_header, error_rows, in_errors = merge_table("errors")
    both = sorted(set(in_summary) & set(in_errors), key=index_of.get)
    if both:
        raise MergeError(f"case(s) {_shorten(both)} are both counted and failed in the shards' files")
    absent = sorted(set(part_of) - set(in_summary) - set(in_errors), key=index_of.get)
    if absent:
        raise MergeError(f"case(s) {_shorten(absent)} are in the shards' manifests but neither in their summary nor "
                         f"their errors files (a shard written by another lesioncount version?); count those parts "
                         f"again")
    lesions = merge_table("lesions", one_row_per_case=False)[:2] if with_lesions else None
    if lesions is not None:
        without_report = sorted({row[0] for row in lesions[1]} - set(in_summary))
        if without_report:
            raise MergeError(f"lesions files list case(s) {_shorten(without_report)} that are not in any summary")
    interrupted = [i for i, m in enumerate(manifests) if not m[4].get("complete", False)]
    return {"num_parts": num_parts, "summary": (summary_header, summary_rows), "errors": (errors_header, error_rows),
            "lesions": lesions, "interrupted": interrupted,
            "interrupted_by": {i: manifests[i][4].get("interrupted_by") for i in interrupted}}


def _write_csv(path: pathlib.Path, header, rows) -> None:
    from ..io import atomic_file

    with atomic_file(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def run(args: argparse.Namespace) -> int:
    """Run ``lesioncount merge``; returns the exit code (0 merged, 1 merged with failed cases, 2 refused)."""
    from .count import FolderBusy, lock_output_folder, release_locks

    out_dir: pathlib.Path = args.output

    def fail(message: str) -> int:
        print(f"lesioncount merge: error: {message}", file=sys.stderr)
        return 2

    if not out_dir.is_dir():
        return fail(f"{out_dir}: no such folder")
    try:
        locks = lock_output_folder(out_dir, "merge")
    except FolderBusy as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot create the lock file in {out_dir}: {exc}")
    try:
        try:
            merged = merge_shards(out_dir)
        except MergeError as exc:
            return fail(str(exc))
        outputs = [("summary.csv", merged["summary"]), ("errors.csv", merged["errors"])]
        if merged["lesions"] is not None:
            outputs.append(("lesions.csv", merged["lesions"]))
        failed = False
        for name, (header, rows) in outputs:
            try:
                _write_csv(out_dir / name, header, rows)
            except OSError as exc:
                failed = True
                print(f"lesioncount merge: error: cannot write {out_dir / name}: {exc.strerror or exc}",
                      file=sys.stderr)
    finally:
        release_locks(locks)
    n_counted, n_failed = len(merged["summary"][1]), len(merged["errors"][1])
    for i in merged["interrupted"]:
        print(f"lesioncount merge: warning: part {i} of {merged['num_parts']} was interrupted "
              f"({merged['interrupted_by'][i] or 'unknown signal'}); its unprocessed cases are in errors.csv "
              f"(count it again with --skip-existing, then merge again)", file=sys.stderr)
    if not args.quiet:
        print(f"lesioncount merge: {merged['num_parts']} shard(s), {n_counted + n_failed} case(s): {n_counted} "
              f"counted, {n_failed} failed -> {', '.join(str(out_dir / name) for name, _ in outputs)}")
    return 1 if failed or n_failed else 0
