"""The one writer of tables and evaluation reports: CSV tables, markdown tables and ``report.md``.

Used by ``lesioncount evaluate`` (:mod:`lesioncount.commands.evaluate`), ``lesioncount
evaluate-model`` (:mod:`lesioncount.train.evaluation`), ``lesioncount lidc-study`` and, for its
``summary.csv`` / ``lesions.csv`` / ``errors.csv``, ``lesioncount count``. Every file is written
atomically (:func:`lesioncount.io.atomic_file`).

Cells (:func:`format_cell` for markdown, :func:`write_csv` for CSV): ``None`` is an empty cell;
a float is written in full in CSV (``repr``: it reads back to the same number) and with 4 decimals
in markdown; NaN is written as ``nan`` (default) or as the caller's text (``evaluate-model``: an
empty CSV cell and ``n/a`` in markdown, its long-standing format); infinities as ``inf`` / ``-inf``.

The method names of the two evaluators are kept here, spelled as their outputs have always had
them (tests and the docs read them): ``lesioncount evaluate`` writes the identifier
:data:`COUNT_DISTRIBUTION_ID` in ``metrics.csv``; ``evaluate-model`` writes the label
:data:`COUNT_DISTRIBUTION` (``count distribution (tau=0.1)``) as the docs' tables do. Both name
the cc_count baseline :data:`CC_COUNT`.

Example:
    >>> markdown_table([{"method": "cc_count", "accuracy": 0.8125, "nll": None}], ["method", "accuracy", "nll"])
    ['| method | accuracy | nll |', '|---|---|---|', '| cc_count | 0.8125 |  |']
"""
from __future__ import annotations

import csv
import math
import pathlib
from typing import Iterable, Mapping, Sequence

__all__ = ["CC_COUNT", "COUNT_DISTRIBUTION", "COUNT_DISTRIBUTION_ID", "format_cell", "markdown_table",
           "write_csv", "write_markdown"]

#: This method, as ``evaluate-model``'s tables and the docs name it.
COUNT_DISTRIBUTION = "count distribution"
#: This method in ``lesioncount evaluate``'s ``metrics.csv`` (an identifier: no space).
COUNT_DISTRIBUTION_ID = "count_distribution"
#: The thresholded connected-component baseline (:func:`lesioncount.cc_count`).
CC_COUNT = "cc_count"


def format_cell(value, *, nan: str = "nan", none: str = "", digits: int = 4) -> str:
    """One markdown cell: ``None`` -> ``none``, NaN -> ``nan``, a finite float with ``digits``
    decimals, an infinity as ``inf`` / ``-inf``, anything else ``str(value)``.

    Example:
        >>> format_cell(0.123456), format_cell(float("nan"), nan="n/a"), format_cell(float("inf")), format_cell(3)
        ('0.1235', 'n/a', 'inf', '3')
    """
    if value is None:
        return none
    if isinstance(value, float):
        if math.isnan(value):
            return nan
        return f"{value:.{digits}f}" if math.isfinite(value) else str(float(value))
    return str(value)


def markdown_table(rows: Iterable[Mapping], columns: Sequence[str], *, header: Sequence[str] | None = None,
                   nan: str = "nan", none: str = "") -> list[str]:
    """A markdown table of ``rows`` (dicts) over ``columns``, one line per row.

    Args:
        rows: dicts holding (at least) the keys ``columns``; a missing key is an empty cell.
        columns: the keys, in order; also the header unless ``header`` is given.
        header: the column titles (as many as ``columns``).
        nan, none: the text of a NaN and of a ``None`` cell (:func:`format_cell`).

    Returns:
        the header line, the ``|---|`` line and one line per row (2 + N lines).

    Example:
        >>> markdown_table([{"t": "0.1", "f1": 0.5}], ["t", "f1"], header=["threshold", "F1"])
        ['| threshold | F1 |', '|---|---|', '| 0.1 | 0.5000 |']
    """
    header = list(columns) if header is None else list(header)
    if len(header) != len(columns):
        raise ValueError(f"`header` must name the {len(columns)} columns, got {len(header)} titles")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_cell(row.get(c), nan=nan, none=none) for c in columns) + " |" for row in rows]
    return lines


def write_csv(path, columns: Sequence[str], rows: Iterable[Mapping], *, nan: str = "nan") -> pathlib.Path:
    """Write ``rows`` (dicts) as a CSV table with the header ``columns``, atomically.

    Keys outside ``columns`` are ignored, missing keys and ``None`` are empty cells, floats are
    written in full (``repr``), NaN as ``nan`` (or the given text: ``""`` for an empty cell).

    Args:
        path: the CSV file (its folder must exist).
        columns: the header, in order.
        rows: one dict per line.

    Returns:
        ``path``.

    Example:
        >>> import tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
        >>> _ = write_csv(p, ["a", "b"], [{"a": 0.1, "b": None}, {"a": float("nan"), "b": 2}], nan="")
        >>> p.read_text().splitlines()
        ['a,b', '0.1,', ',2']
    """
    from .io import atomic_file

    def cell(value):
        if value is None:
            return ""
        if isinstance(value, float):
            return nan if math.isnan(value) else repr(float(value))
        return value

    path = pathlib.Path(path)
    with atomic_file(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: cell(row.get(k)) for k in columns})
    return path


def write_markdown(path, lines: Sequence[str]) -> pathlib.Path:
    """Write ``lines`` as a markdown file (``report.md``), atomically, ending in one newline.

    Example:
        >>> import tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "report.md"
        >>> write_markdown(p, ["# title", "", "text", ""]).read_text()
        '# title\\n\\ntext\\n'
    """
    from .io import atomic_file

    path = pathlib.Path(path)
    text = "\n".join(lines)
    with atomic_file(path) as fh:
        fh.write(text if text.endswith("\n") else text + "\n")
    return path
