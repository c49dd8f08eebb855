"""The count options shared by the subcommands, and the argparse types that check numbers.

:func:`add_count_options` adds ``--threshold``, ``--connectivity``, ``--min-size`` /
``--min-volume`` (mutually exclusive), ``--max-count``, ``--from-logits``, ``--channel`` and
``--baseline-threshold`` to a parser or argument group, with the defaults of
:class:`lesioncount.report.CountSettings` and the connectivities of
:data:`lesioncount._validation.CONNECTIVITIES` (3-D). Every subcommand keeps its own help texts
(passed in); ``checked=True`` parses with the types below, which reject a bad value at parse time
(exit code 2, argparse's ``argument --NAME:`` message), ``checked=False`` leaves the check to the
subcommand (plain ``int`` / ``float``).

(A module whose name starts with ``_`` is not a subcommand: ``cli.build_parser`` skips it.)

Example:
    >>> p = argparse.ArgumentParser()
    >>> add_count_options(p, threshold="candidate threshold", connectivity="", max_count="M")
    >>> a = p.parse_args(["--connectivity", "26"]); (a.threshold, a.connectivity, a.max_count)
    (0.1, 26, 4)
"""
from __future__ import annotations

import argparse
import math

from .._validation import CONNECTIVITIES, DEFAULT_CONNECTIVITY

__all__ = ["add_count_options", "float_list", "probability", "bounded", "positive_int", "nonneg_int",
           "nonneg_float"]


def float_list(text: str, lo: float, hi: float, hi_open: bool = True) -> tuple[float, ...]:
    """Comma-separated numbers in [lo, hi) (``hi_open``) or [lo, hi], sorted and deduplicated.

    argparse prefixes the messages with "argument --NAME:", so they do not repeat the name.

    Example:
        >>> float_list("0.5,0.1,0.5", 0.0, 1.0)
        (0.1, 0.5)
    """
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    for v in values:
        ok = lo <= v < hi if hi_open else lo <= v <= hi
        if not ok or math.isnan(v):
            raise argparse.ArgumentTypeError(f"{v} is outside [{lo}, {hi}{')' if hi_open else ']'}")
    return tuple(sorted(set(values)))


def probability(text: str) -> float:
    """An argparse ``type``: one probability in [0, 1).

    Example:
        >>> probability("0.25")
        0.25
    """
    if "," in text:
        raise argparse.ArgumentTypeError(f"expected one number, got {text!r}")
    return float_list(text, 0.0, 1.0)[0]


def bounded(cast, minimum, what: str):
    """An argparse ``type`` parsing ``cast(text)`` and requiring a finite value >= ``minimum``.

    Example:
        >>> bounded(int, 1, "an integer")("3")
        3
    """

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(v) and v >= minimum):
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}, got {text}")
        return v

    return parse


positive_int = bounded(int, 1, "an integer")
nonneg_int = bounded(int, 0, "an integer")
nonneg_float = bounded(float, 0, "a finite number")


def add_count_options(parser, *, threshold: str | None = None, connectivity: str | None = None,
                      min_size: str | None = None, min_volume: str | None = None, max_count: str | None = None,
                      from_logits: str | None = None, channel: str | None = None, channel_default: int | None = None,
                      baseline_threshold: str | None = None, checked: bool = False) -> None:
    """Add the shared count options to ``parser`` (an ``ArgumentParser`` or an argument group).

    Each keyword is the help text of its option; an option whose keyword is None is not added
    (``""``: added without a help text). ``min_size`` and ``min_volume`` go together into a
    mutually exclusive group. Flags, destinations and defaults are the same for every subcommand:

    ========================  ===========================  =====================================
    flag                      default                      type (``checked=False`` / ``True``)
    ========================  ===========================  =====================================
    ``--threshold``           0.1                          float / :func:`probability`
    ``--connectivity``        18, choices 6, 18, 26        int
    ``--min-size``            0                            int / :data:`nonneg_int`
    ``--min-volume``          None                         float / :data:`nonneg_float`
    ``--max-count``           4                            int / :data:`positive_int`
    ``--from-logits``         False (store_true)
    ``--channel``             ``channel_default`` (None)   int / :data:`nonneg_int`
    ``--baseline-threshold``  0.5                          float
    ========================  ===========================  =====================================

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_count_options(p, min_size="voxels", min_volume="mm^3", checked=True)
        >>> p.parse_args(["--min-volume", "3"]).min_volume
        3.0
    """
    from ..report import CountSettings

    d = CountSettings()

    def with_help(text: str) -> dict:
        return {"help": text} if text else {}

    if threshold is not None:
        parser.add_argument("--threshold", type=probability if checked else float, default=d.threshold,
                            **with_help(threshold))
    if connectivity is not None:
        parser.add_argument("--connectivity", type=int, default=DEFAULT_CONNECTIVITY[3], choices=CONNECTIVITIES[3],
                            **with_help(connectivity))
    if min_size is not None or min_volume is not None:
        size = parser.add_mutually_exclusive_group()
        if min_size is not None:
            size.add_argument("--min-size", type=nonneg_int if checked else int, default=d.min_size,
                              **with_help(min_size))
        if min_volume is not None:
            size.add_argument("--min-volume", type=nonneg_float if checked else float, default=d.min_volume,
                              **with_help(min_volume))
    if max_count is not None:
        parser.add_argument("--max-count", type=positive_int if checked else int, default=d.max_count,
                            **with_help(max_count))
    if from_logits is not None:
        parser.add_argument("--from-logits", action="store_true", **with_help(from_logits))
    if channel is not None:
        parser.add_argument("--channel", type=nonneg_int if checked else int, default=channel_default,
                            **with_help(channel))
    if baseline_threshold is not None:
        parser.add_argument("--baseline-threshold", type=float, default=d.baseline_threshold,
                            **with_help(baseline_threshold))
