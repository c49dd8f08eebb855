"""Metrics for lesion counts and segmentations.

Counts are scored as a classification over the bins 0, 1, ..., M-1 and a tail bin "M or more"
(default M = 4: bins 0, 1, 2, 3, 4+, as in Schroeter et al. 2022). A predicted count distribution
is a ``pmf`` of shape (N, M+1) (``CountResult.pmf``); a hard prediction is an integer count per item
(``CountResult.most_likely_count`` or the ``cc_count`` baseline).

Conventions (all functions):

* Targets are raw lesion counts (N,) (int, or whole-numbered float); counts >= M fall in bin M.
* Precision, recall and F1 are class-averaged ("macro") over the M+1 bins with the torchmetrics
  convention: a bin that occurs in neither the predictions nor the targets (TP + FP + FN = 0) is left
  out of the average; a bin that occurs but is never correctly predicted scores 0 (zero division -> 0).
* Calibration errors are top-label: the confidence of an item is the probability of its most likely
  bin, the item is "correct" when that bin is the target bin. Confidences are grouped into
  ``n_bins`` equal-width bins [k/n, (k+1)/n); torchmetrics puts a confidence of exactly 1.0 in an
  extra bin of its own, and :func:`reliability_bins` does the same, so ECE = sum_b frac_b |acc_b -
  conf_b| and MCE = max_b |acc_b - conf_b| can be read off the returned bins.
* A pmf computed in floating point can leave [0, 1] by rounding (1 + 1e-16); it is clamped into
  [0, 1] before use (so that torchmetrics does not mistake it for logits). Values further than
  ``1e-3`` outside, or rows not summing to 1 within ``1e-2``, are rejected as not being a pmf.

torchmetrics is needed only for the calibration errors and :class:`CountMetric`; everything else is
plain torch. ``import lesioncount.metrics`` never needs it: ``CountMetric`` is created on first
access and raises :class:`~lesioncount._extras.MissingExtraError` naming the ``eval`` extra when
torchmetrics is missing.

Example:
    >>> import torch
    >>> from lesioncount import metrics
    >>> pmf = torch.tensor([[0.7, 0.2, 0.1, 0.0, 0.0], [0.1, 0.3, 0.6, 0.0, 0.0]])
    >>> metrics.count_accuracy(pmf.argmax(1), torch.tensor([0, 1]))
    tensor(0.5000, dtype=torch.float64)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._extras import require

__all__ = [
    "COUNT_METRIC_NAMES",
    "accuracy_vs_discarded",
    "count_accuracy",
    "count_bins",
    "count_calibration_errors",
    "count_confusion_matrix",
    "count_metrics",
    "count_precision_recall_f1",
    "discarded_counts",
    "expected_count_from_pmf",
    "pmf_entropy",
    "reliability_bins",
    "VoxelStats",
    "segmentation_f1",
    "voxel_calibration_errors",
]

#: Keys of the dict returned by :func:`count_metrics` and ``CountMetric.compute()``.
COUNT_METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "ece", "mce", "count_mae", "nll", "infeasible")

_PMF_RANGE_TOL = 1e-3
_PMF_SUM_TOL = 1e-2


# ----------------------------------------------------------------------------------------- checks
def _check_max_count(max_count, name: str = "max_count") -> int:
    if isinstance(max_count, bool) or not isinstance(max_count, int):
        raise TypeError(f"`{name}` must be an int, got {max_count!r}")
    if max_count < 1:
        raise ValueError(f"`{name}` must be >= 1 (bins 0..M-1 and 'M or more'), got {max_count}")
    return max_count


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"`n_bins` must be an int >= 1, got {n_bins!r}")
    return n_bins


def _as_counts(counts, name: str) -> torch.Tensor:
    """(N,) int64 from a tensor/sequence of non-negative whole numbers."""
    if not isinstance(counts, torch.Tensor):
        counts = torch.as_tensor(counts)
    if counts.dim() == 0:
        counts = counts.reshape(1)
    if counts.dim() != 1:
        raise ValueError(f"`{name}` must be a 1-D tensor of counts (N,), got shape {tuple(counts.shape)}")
    if counts.dtype == torch.bool:
        raise TypeError(f"`{name}` must hold integer counts, got a bool tensor")
    if counts.is_floating_point():
        if counts.numel() and not bool(torch.isfinite(counts).all()):
            raise ValueError(f"`{name}` counts must be finite")
        if counts.numel() and bool((counts != counts.round()).any()):
            raise ValueError(f"`{name}` counts must be whole numbers")
        counts = counts.round()
    elif counts.is_complex():
        raise TypeError(f"`{name}` must hold integer counts, got {counts.dtype}")
    counts = counts.to(torch.int64)
    if counts.numel() and bool((counts < 0).any()):
        raise ValueError(f"`{name}` counts must be >= 0, got minimum {int(counts.min())}")
    return counts


def _check_pair(pred: torch.Tensor, target: torch.Tensor, pred_name: str = "pred") -> None:
    if pred.shape[0] != target.shape[0]:
        raise ValueError(
            f"`{pred_name}` and `target` must hold one entry per item, got {pred.shape[0]} and {target.shape[0]}"
        )
    if pred.shape[0] == 0:
        raise ValueError("no items: metrics of an empty set are undefined")


def _check_pmf(pmf, max_count=None, name: str = "pmf") -> tuple[torch.Tensor, int]:
    """Validates a (N, M+1) pmf and returns it clamped into [0, 1] (detached), and M."""
    if not isinstance(pmf, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (N, M+1), got {type(pmf).__name__}")
    if pmf.dim() != 2 or pmf.shape[1] < 2:
        raise ValueError(
            f"`{name}` must have shape (N, M+1) with M >= 1 (bins 0..M-1 and 'M or more'), got {tuple(pmf.shape)}"
        )
    if not pmf.is_floating_point():
        raise TypeError(f"`{name}` must be a floating tensor of probabilities, got {pmf.dtype}")
    M = pmf.shape[1] - 1
    if max_count is not None and _check_max_count(max_count) != M:
        raise ValueError(
            f"`{name}` has {pmf.shape[1]} bins, i.e. max_count = {M}, but max_count={max_count} was given"
        )
    pmf = pmf.detach()
    if pmf.numel():
        if not bool(torch.isfinite(pmf).all()):
            raise ValueError(f"`{name}` contains NaN or infinite values")
        lo, hi = (float(v) for v in torch.aminmax(pmf))
        if lo < -_PMF_RANGE_TOL or hi > 1 + _PMF_RANGE_TOL:
            raise ValueError(
                f"`{name}` must hold probabilities in [0, 1] (a count distribution, not logits), got values "
                f"in [{lo:.6g}, {hi:.6g}]"
            )
        worst = float((pmf.sum(1, dtype=torch.float64) - 1).abs().max())
        if worst > _PMF_SUM_TOL:
            raise ValueError(f"each row of `{name}` must sum to 1 (a count distribution); worst row is off by {worst:.3g}")
    return pmf.clamp(0.0, 1.0), M


def _tm_classification():
    return require("torchmetrics", "count and voxel calibration errors (ECE/MCE)").functional.classification


# ------------------------------------------------------------------------------------ hard counts
def count_bins(counts, max_count: int = 4) -> torch.Tensor:
    """Bin index of each count: min(count, M); bin M stands for "M or more".

    Args:
        counts: (N,) non-negative integer counts (tensor or sequence).
        max_count: M.

    Returns:
        (N,) int64 in 0..M.

    Example:
        >>> count_bins(torch.tensor([0, 3, 4, 7]), max_count=4)
        tensor([0, 3, 4, 4])
    """
    return _as_counts(counts, "counts").clamp_max(_check_max_count(max_count))


def count_accuracy(pred, target, max_count: int = 4) -> torch.Tensor:
    """Fraction of items whose predicted count bin equals the target bin.

    Args:
        pred: (N,) predicted counts (e.g. ``pmf.argmax(1)`` or ``cc_count(...)``).
        target: (N,) true counts.
        max_count: M; counts >= M are all "M or more" (5 and 7 agree when M = 4).

    Returns:
        scalar float64 tensor in [0, 1].

    Example:
        >>> count_accuracy(torch.tensor([0, 2, 5]), torch.tensor([0, 1, 9]))  # 5 and 9 are both 4+
        tensor(0.6667, dtype=torch.float64)
    """
    p, t = count_bins(pred, max_count), count_bins(target, max_count)
    _check_pair(p, t)
    return (p == t).to(torch.float64).mean()


def count_confusion_matrix(pred, target, max_count: int = 4) -> torch.Tensor:
    """Confusion matrix over count bins: entry [i, j] = number of items with target bin i, predicted bin j.

    Args:
        pred, target: (N,) counts.
        max_count: M.

    Returns:
        (M+1, M+1) int64.

    Example:
        >>> count_confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), max_count=2)
        tensor([[1, 1, 0],
                [0, 1, 0],
                [0, 0, 0]])
    """
    M = _check_max_count(max_count)
    p, t = count_bins(pred, M), count_bins(target, M)
    _check_pair(p, t)
    return torch.bincount(t * (M + 1) + p, minlength=(M + 1) ** 2).reshape(M + 1, M + 1)


def count_precision_recall_f1(pred, target, max_count: int = 4, average: str = "macro") -> dict[str, torch.Tensor]:
    """Class-averaged (macro) precision, recall and F1 over the count bins 0..M-1, M+.

    Per bin c: precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN), each 0 when its
    denominator is 0. The macro average is taken over the bins that occur at least once in ``pred``
    or ``target`` (TP+FP+FN > 0); bins absent from both are left out (torchmetrics convention, so
    a perfect prediction scores 1 even when some bins never occur).

    Args:
        pred, target: (N,) counts.
        max_count: M.
        average: "macro" (scalars) or "none" (per-bin (M+1,) tensors, including absent bins as 0).

    Returns:
        {"precision", "recall", "f1"}: float64 scalars (or (M+1,) with average="none").

    Example:
        >>> # bins used: 0 (TP 1, FN 1) and 1 (TP 1, FP 1); bins 2, 3, 4+ are absent and ignored
        >>> r = count_precision_recall_f1(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]))
        >>> r["precision"], r["recall"], r["f1"]
        (tensor(0.7500, dtype=torch.float64), tensor(0.7500, dtype=torch.float64), tensor(0.6667, dtype=torch.float64))
    """
    if average not in ("macro", "none"):
        raise ValueError(f"`average` must be 'macro' or 'none', got {average!r}")
    cm = count_confusion_matrix(pred, target, max_count).to(torch.float64)
    tp = cm.diagonal()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp

    def safe_div(num, den):
        return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))

    scores = {
        "precision": safe_div(tp, tp + fp),
        "recall": safe_div(tp, tp + fn),
        "f1": safe_div(2 * tp, 2 * tp + fp + fn),
    }
    if average == "none":
        return scores
    present = (tp + fp + fn) > 0  # at least one item, since N >= 1
    return {k: v[present].mean() for k, v in scores.items()}


# ----------------------------------------------------------------------------- distributions
def pmf_entropy(pmf) -> torch.Tensor:
    """Entropy in nats of each row of a count pmf (0 log 0 = 0).

    Args:
        pmf: (N, M+1).

    Returns:
        (N,) in the pmf's dtype.

    Example:
        >>> pmf_entropy(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    p, _ = _check_pmf(pmf)
    plogp = torch.where(p > 0, p * p.clamp_min(torch.finfo(p.dtype).tiny).log(), torch.zeros_like(p))
    return 0.0 - plogp.sum(1)  # 0 - x, not -x: no negative zeros


def expected_count_from_pmf(pmf) -> torch.Tensor:
    """Expected count bin sum_j j P(bin j), the tail bin counted as M (so a lower bound of E[C]).

    Use ``CountResult.expected_count`` (sum of the candidate probabilities) for the exact E[C].

    Args:
        pmf: (N, M+1).

    Returns:
        (N,) float.

    Example:
        >>> expected_count_from_pmf(torch.tensor([[0.5, 0.25, 0.25]]))  # 0*0.5 + 1*0.25 + 2*0.25
        tensor([0.7500])
    """
    p, M = _check_pmf(pmf)
    return p @ torch.arange(M + 1, dtype=p.dtype, device=p.device)


def reliability_bins(pmf, target, n_bins: int = 10, max_count: int | None = None) -> dict[str, torch.Tensor]:
    """Top-label reliability statistics per confidence bin, binned exactly like torchmetrics.

    The confidence of item i is max_j pmf[i, j]; it is correct when argmax_j pmf[i, j] is the target
    bin. Bin b < n_bins holds confidences in [b/n, (b+1)/n); bin n_bins holds confidence exactly 1.0
    (torchmetrics' convention; one-hot predictions such as the cc_count baseline all land there).
    Confidences are compared in float32, as torchmetrics does.

    Args:
        pmf: (N, M+1) count distributions.
        target: (N,) true counts.
        n_bins: number of equal-width bins over [0, 1].
        max_count: M, checked against ``pmf`` when given.

    Returns:
        dict with (n_bins+1,) tensors: ``lower``/``upper`` bin edges (the last bin is [1, 1]),
        ``count`` (items per bin, int64), ``confidence`` and ``accuracy`` (means per bin, 0 where empty),
        and the scalars ``ece`` = sum_b count_b/N |accuracy_b - confidence_b| and ``mce`` = max_b of
        the same over non-empty bins.

    Example:
        >>> pmf = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> r = reliability_bins(pmf, torch.tensor([0, 1, 1]), n_bins=2)
        >>> r["count"].tolist(), [round(a, 4) for a in r["accuracy"].tolist()]  # [0,.5), [.5,1), {1}
        ([0, 3, 0], [0.0, 0.6667, 0.0])
    """
    p, M = _check_pmf(pmf, max_count)
    t = count_bins(target, M)
    _check_pair(p, t, "pmf")
    n_bins = _check_n_bins(n_bins)
    conf, pred = p.max(dim=1)
    conf = conf.float()
    correct = (pred == t.to(pred.device)).float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=conf.device)
    index = torch.bucketize(conf, edges, right=True) - 1  # same rule as torchmetrics
    count = torch.bincount(index, minlength=n_bins + 1)
    conf_sum = torch.zeros(n_bins + 1, dtype=torch.float32, device=conf.device).scatter_add_(0, index, conf)
    acc_sum = torch.zeros(n_bins + 1, dtype=torch.float32, device=conf.device).scatter_add_(0, index, correct)
    denom = count.clamp_min(1).float()
    confidence = torch.where(count > 0, conf_sum / denom, 0.0)
    accuracy = torch.where(count > 0, acc_sum / denom, 0.0)
    gap = (accuracy - confidence).abs()
    return {
        "lower": edges,
        "upper": torch.cat([edges[1:], edges[-1:]]),
        "count": count,
        "confidence": confidence,
        "accuracy": accuracy,
        "ece": (gap * count.float() / count.sum()).sum(),
        "mce": gap[count > 0].max(),
    }


def count_calibration_errors(pmf, target, max_count: int | None = None, n_bins: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected and maximum calibration error (top-label) of count distributions, via torchmetrics.

    ECE = torchmetrics multiclass calibration error with norm "l1", MCE with norm "max", over the
    M+1 count bins; ``pmf`` is clamped into [0, 1] first. A hard prediction (e.g. the cc_count
    baseline) is scored as a one-hot pmf: ``F.one_hot(count_bins(pred), M+1).double()``.

    Args:
        pmf: (N, M+1) count distributions.
        target: (N,) true counts (>= M -> tail bin).
        max_count: M, checked against ``pmf`` when given (``None``: read from ``pmf``).
        n_bins: confidence bins over [0, 1].

    Returns:
        (ece, mce): float32 scalar tensors.

    Example:
        >>> pmf = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> count_calibration_errors(pmf, torch.tensor([0, 1, 1]), n_bins=2)  # |2/3 - 0.7333|
        (tensor(0.0667), tensor(0.0667))
    """
    p, M = _check_pmf(pmf, max_count)
    t = count_bins(target, M).to(p.device)
    _check_pair(p, t, "pmf")
    n_bins = _check_n_bins(n_bins)
    F = _tm_classification()
    ece = F.multiclass_calibration_error(p, t, num_classes=M + 1, n_bins=n_bins, norm="l1")
    mce = F.multiclass_calibration_error(p, t, num_classes=M + 1, n_bins=n_bins, norm="max")
    return ece, mce


def accuracy_vs_discarded(pmf, target, fractions, max_count: int | None = None) -> torch.Tensor:
    """Count accuracy after discarding the most uncertain items (highest entropy of the pmf).

    For each fraction f, the ``floor(f * N)`` items of highest entropy are dropped (ties: the earlier
    item is dropped first, a stable order) and the accuracy of the most likely bin is computed on the
    remaining items. A well-ranked uncertainty gives an increasing curve.

    Args:
        pmf: (N, M+1) count distributions.
        target: (N,) true counts.
        fractions: sequence (F,) of fractions in [0, 1) (at least one item is always kept).
        max_count: M, checked against ``pmf`` when given.

    Returns:
        (F,) float64 accuracies.

    Example:
        >>> pmf = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4]])
        >>> accuracy_vs_discarded(pmf, torch.tensor([0, 1, 1, 1]), [0.0, 0.25, 0.5])
        tensor([0.5000, 0.6667, 1.0000], dtype=torch.float64)
    """
    p, M = _check_pmf(pmf, max_count)
    t = count_bins(target, M).to(p.device)
    _check_pair(p, t, "pmf")
    fr = torch.as_tensor(fractions, dtype=torch.float64).reshape(-1)
    if fr.numel() == 0:
        raise ValueError("`fractions` must not be empty")
    if not bool(((fr >= 0) & (fr < 1)).all()):
        raise ValueError(f"`fractions` must lie in [0, 1), got {fr.tolist()}")
    n = p.shape[0]
    order = torch.sort(pmf_entropy(p), descending=True, stable=True).indices
    correct = (p.argmax(1) == t)[order].to(torch.float64).cpu()
    # accuracy of the suffix order[k:], for every k
    suffix_correct = torch.flip(torch.cumsum(torch.flip(correct, [0]), 0), [0])
    drop = discarded_counts(n, fr)
    return suffix_correct[drop] / (n - drop).to(torch.float64)


def discarded_counts(n: int, fractions) -> torch.Tensor:
    """Number of items :func:`accuracy_vs_discarded` drops for each fraction: min(floor(f n), n - 1).

    Args:
        n: number of items (>= 1).
        fractions: (F,) fractions in [0, 1).

    Returns:
        (F,) int64.

    Example:
        >>> discarded_counts(10, [0.0, 0.25, 0.5, 0.99])
        tensor([0, 2, 5, 9])
    """
    fr = torch.as_tensor(fractions, dtype=torch.float64).reshape(-1)
    return torch.floor(fr * n + 1e-9).to(torch.int64).clamp(0, max(n - 1, 0))


def count_metrics(pmf, target, max_count: int | None = None, n_bins: int = 10,
                  expected_count: torch.Tensor | None = None,
                  log_pmf: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All count metrics of a set of count distributions (functional twin of ``CountMetric``).

    Args:
        pmf: (N, M+1) count distributions (``CountResult.pmf``).
        target: (N,) true counts.
        max_count: M, checked against ``pmf`` when given.
        n_bins: confidence bins for ECE/MCE.
        expected_count: (N,) exact expected counts (``CountResult.expected_count``); the MAE is then
            |E[C] - target| with the raw target. ``None``: :func:`expected_count_from_pmf` against the
            target clamped to M (both on the binned scale).
        log_pmf: (N, M+1) log-probabilities (``CountResult.log_pmf``, exact where the pmf underflows);
            ``None``: log of the clamped pmf (-log 0 = inf when the target bin has probability 0).

    Returns:
        dict keyed by :data:`COUNT_METRIC_NAMES`: ``accuracy`` (of the most likely bin), macro
        ``precision``/``recall``/``f1``, ``ece``, ``mce``, ``count_mae`` (mean absolute error of the
        expected count), ``nll`` (mean -log P(C = target bin) over the feasible items) and
        ``infeasible`` (fraction of items whose target bin has probability exactly 0; the rule of
        :func:`lesioncount.count_nll_terms`); scalar tensors.

    Example:
        >>> pmf = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]])
        >>> m = count_metrics(pmf, torch.tensor([0, 1]), n_bins=5)
        >>> float(m["accuracy"]), round(float(m["count_mae"]), 4)
        (1.0, 0.1)
    """
    p, M = _check_pmf(pmf, max_count)
    t = _as_counts(target, "target").to(p.device)
    _check_pair(p, t, "pmf")
    abs_err, nll = _per_item_errors(p, t, M, expected_count, log_pmf)
    return _metrics_from_items(p, t, abs_err, nll, M, n_bins)


def _per_item_errors(p, t, M, expected_count, log_pmf):
    """(N,) |expected count - target| and (N,) -log P(target bin), float64."""
    n = p.shape[0]
    if expected_count is not None:
        e = torch.as_tensor(expected_count).detach().reshape(-1).to(device=p.device, dtype=torch.float64)
        if e.shape[0] != n:
            raise ValueError(f"`expected_count` must hold one value per item ({n}), got {e.shape[0]}")
        abs_err = (e - t.to(torch.float64)).abs()
    else:
        e = p.to(torch.float64) @ torch.arange(M + 1, dtype=torch.float64, device=p.device)
        abs_err = (e - t.clamp_max(M).to(torch.float64)).abs()
    from .losses import count_nll_terms  # the one NLL rule (tail bin M, +inf where infeasible)

    if log_pmf is not None:
        if not isinstance(log_pmf, torch.Tensor) or log_pmf.shape != p.shape:
            raise ValueError(f"`log_pmf` must have the shape of `pmf` {tuple(p.shape)}")
        log_p = log_pmf.detach().to(device=p.device, dtype=torch.float64)
    else:
        log_p = p.to(torch.float64).log()
    return abs_err, count_nll_terms(log_p, t).nll


def _metrics_from_items(p, t, abs_err, nll, M, n_bins) -> dict[str, torch.Tensor]:
    pred = p.argmax(1)
    out = {"accuracy": count_accuracy(pred, t, M)}
    out.update(count_precision_recall_f1(pred, t, M))
    out["ece"], out["mce"] = count_calibration_errors(p, t, M, n_bins)
    out["count_mae"] = abs_err.mean()
    # the infeasible-target rule of lesioncount.count_nll_terms: items whose target bin has
    # probability exactly 0 (NLL +inf) are left out of the mean and reported as a fraction
    infeasible = torch.isinf(nll)
    feasible_nll = nll[~infeasible]
    out["nll"] = feasible_nll.mean() if feasible_nll.numel() else nll.new_tensor(math.nan)
    out["infeasible"] = infeasible.to(torch.float64).mean() if nll.numel() else nll.new_tensor(math.nan)
    return {k: out[k] for k in COUNT_METRIC_NAMES}


# ---------------------------------------------------------------------------------- voxels
def _check_voxel_pair(probs, target_mask):
    if not isinstance(probs, torch.Tensor) or not isinstance(target_mask, torch.Tensor):
        raise TypeError("`probs` and `target_mask` must be torch.Tensors")
    if probs.shape != target_mask.shape:
        raise ValueError(
            f"`probs` {tuple(probs.shape)} and `target_mask` {tuple(target_mask.shape)} must have the same shape"
        )
    if not probs.is_floating_point():
        raise TypeError(f"`probs` must be a floating tensor of probabilities, got {probs.dtype}")
    if probs.numel() == 0:
        raise ValueError("`probs` is empty")
    t = target_mask.detach()
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError("`target_mask` must be binary (0/1 or bool)")
        t = t != 0
    return probs.detach(), t


def segmentation_f1(probs, target_mask, threshold: float = 0.5, reduction: str = "global",
                    empty_score: float = 1.0) -> torch.Tensor:
    """Voxel-wise F1 (Dice) of ``probs > threshold`` against a binary mask.

    Dice = 2 TP / (2 TP + FP + FN). With reduction "global" all voxels are pooled; "none"/"mean"
    compute one score per item along dim 0. Where prediction and mask are both empty the score is
    ``empty_score`` (default 1: perfect agreement; pass ``float('nan')`` to flag such items).

    Args:
        probs: (B, ...) probabilities (any shape).
        target_mask: same shape, bool or 0/1.
        threshold: strict threshold, as in :func:`lesioncount.label`.
        reduction: "global" | "mean" | "none".

    Returns:
        float64 scalar, or (B,) with reduction="none".

    Example:
        >>> probs = torch.tensor([[0.9, 0.8, 0.1, 0.0]]); mask = torch.tensor([[1, 0, 1, 0]])
        >>> segmentation_f1(probs, mask)                      # TP 1, FP 1, FN 1 -> 2/4
        tensor(0.5000, dtype=torch.float64)
    """
    if reduction not in ("global", "mean", "none"):
        raise ValueError(f"`reduction` must be 'global', 'mean' or 'none', got {reduction!r}")
    p, t = _check_voxel_pair(probs, target_mask)
    pred = p > float(threshold)
    if reduction == "global":
        pred, t = pred.reshape(1, -1), t.reshape(1, -1)
    else:
        pred, t = pred.reshape(pred.shape[0], -1), t.reshape(t.shape[0], -1)
    tp = (pred & t).sum(1, dtype=torch.float64)
    fp = (pred & ~t).sum(1, dtype=torch.float64)
    fn = (~pred & t).sum(1, dtype=torch.float64)
    den = 2 * tp + fp + fn
    score = torch.where(den > 0, 2 * tp / den.clamp_min(1), torch.full_like(den, float(empty_score)))
    if reduction == "global":
        return score[0]
    return score.mean() if reduction == "mean" else score


def voxel_calibration_errors(probs, target_mask, n_bins: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxel-wise calibration of a probability map: torchmetrics binary calibration error.

    Every voxel is one prediction of P(lesion); ECE (norm "l1") and MCE (norm "max") compare, per
    confidence bin, the mean probability with the fraction of lesion voxels. ``probs`` is clamped
    into [0, 1] first (values further than 1e-3 outside are rejected).

    Args:
        probs: (...) probabilities.
        target_mask: same shape, bool or 0/1.
        n_bins: equal-width bins over [0, 1].

    Returns:
        (ece, mce): float32 scalar tensors.

    Example:
        >>> probs = torch.tensor([0.25, 0.25, 0.55, 0.75, 0.75]); mask = torch.tensor([0, 0, 1, 1, 1])
        >>> voxel_calibration_errors(probs, mask, n_bins=2)
        (tensor(0.2900), tensor(0.3167))
    """
    p, t = _check_voxel_pair(probs, target_mask)
    n_bins = _check_n_bins(n_bins)
    if not bool(torch.isfinite(p).all()):
        raise ValueError("`probs` contains NaN or infinite values")
    lo, hi = (float(v) for v in torch.aminmax(p))
    if lo < -_PMF_RANGE_TOL or hi > 1 + _PMF_RANGE_TOL:
        raise ValueError(f"`probs` must hold probabilities in [0, 1] (apply a sigmoid to logits), got [{lo:.6g}, {hi:.6g}]")
    p = p.clamp(0.0, 1.0).reshape(-1)
    t = t.reshape(-1).to(torch.int64)
    F = _tm_classification()
    ece = F.binary_calibration_error(p, t, n_bins=n_bins, norm="l1")
    mce = F.binary_calibration_error(p, t, n_bins=n_bins, norm="max")
    return ece, mce


@dataclass
class VoxelStats:
    """Voxel-wise confusion counts at ``threshold`` and calibration bins, accumulated over batches.

    The streaming form of :func:`segmentation_f1` (reduction "global") and
    :func:`voxel_calibration_errors`: one batch at a time, so a whole test split never has to sit
    in memory. The calibration bins are those of torchmetrics' binary calibration error: ``n_bins``
    equal-width bins of the probability (compared in float32, ``bucketize(right=True)``) plus one
    bin for probability exactly 1.0; per bin the number of voxels, the sum of probabilities and the
    number of lesion voxels (float64 sums).

    Example:
        >>> stats = VoxelStats(threshold=0.5, n_bins=2)
        >>> stats.update(torch.tensor([0.25, 0.25, 0.55, 0.75, 0.75]), torch.tensor([0, 0, 1, 1, 1]))
        >>> [round(v, 4) for v in stats.calibration_errors()]
        [0.29, 0.3167]
    """

    threshold: float = 0.5
    n_bins: int = 10
    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0
    bin_count: torch.Tensor | None = None
    bin_confidence: torch.Tensor | None = None
    bin_positive: torch.Tensor | None = None

    def update(self, probs: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch: ``probs`` (...) in [0, 1] (e.g. (B, 1, D, H, W)) and a binary ``mask`` of the
        same shape; the sums stay on the host (float64)."""
        p = probs.detach().float().reshape(-1)
        t = (mask.detach() > 0.5).reshape(-1)
        pred = p > self.threshold
        sums = torch.stack([(pred & t).sum(), (pred & ~t).sum(), (~pred & t).sum()]).tolist()
        self.tp += sums[0]
        self.fp += sums[1]
        self.fn += sums[2]
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=torch.float32, device=p.device)
        index = torch.bucketize(p.clamp(0, 1), edges, right=True) - 1
        n = self.n_bins + 1
        count = torch.bincount(index, minlength=n).to(torch.float64).cpu()
        conf = torch.zeros(n, dtype=torch.float64, device=p.device).index_add_(0, index, p.double()).cpu()
        pos = torch.bincount(index, weights=t.double(), minlength=n).cpu()
        if self.bin_count is None:
            self.bin_count, self.bin_confidence, self.bin_positive = count, conf, pos
        else:
            self.bin_count += count
            self.bin_confidence += conf
            self.bin_positive += pos

    def f1(self) -> float:
        """Voxel-wise F1 (Dice) 2TP / (2TP + FP + FN); 1.0 when prediction and mask are both empty."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator > 0 else 1.0

    def calibration_errors(self) -> tuple[float, float]:
        """(ECE, MCE): sum_b frac_b |pos_b - conf_b| and max_b |pos_b - conf_b| over the bins."""
        if self.bin_count is None or float(self.bin_count.sum()) == 0:
            return float("nan"), float("nan")
        count = self.bin_count
        safe = count.clamp_min(1)
        gap = torch.where(count > 0, (self.bin_positive / safe - self.bin_confidence / safe).abs(), 0.0)
        return float((gap * count / count.sum()).sum()), float(gap.max())


# ------------------------------------------------------------------------------- CountMetric
def _build_count_metric():
    torchmetrics = require("torchmetrics", "CountMetric (accumulated count metrics, DDP-synced)")
    from torchmetrics.utilities import dim_zero_cat

    from .counting import CountResult

    class CountMetric(torchmetrics.Metric):
        """Accumulated count metrics over batches, synchronised across DDP processes (torchmetrics).

        States (lists of 1-D float64 tensors, ``dist_reduce_fx="cat"``): the per-item pmf, the target
        count, the absolute error of the expected count and the NLL; O(items) memory, a few numbers
        per item. A process that saw no items still takes part in the sync. ``compute()`` returns the same dict as
        :func:`count_metrics` on the concatenation of every update of every process.

        Args:
            max_count: M (bins 0..M-1, M+); every pmf passed to ``update`` must have M+1 columns.
            n_bins: confidence bins for ECE/MCE.
            **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``dist_sync_on_step``, ``process_group``).

        ``update(pmf, target, expected_count=None, log_pmf=None)``: ``pmf`` (B, M+1) or a
        :class:`~lesioncount.CountResult` (then its ``pmf``, ``log_pmf`` and exact ``expected_count``
        are used); ``target`` (B,) counts. Mixing updates with and without ``expected_count`` mixes the
        two MAE definitions of :func:`count_metrics`; pass it always or never.

        Example:
            >>> metric = CountMetric(max_count=4)                # doctest: +SKIP
            >>> metric.update(count_distribution(probs, max_count=4), counts)   # doctest: +SKIP
            >>> metric.compute()["f1"]                           # doctest: +SKIP
        """

        is_differentiable = False
        higher_is_better = None
        full_state_update = False

        def __init__(self, max_count: int = 4, n_bins: int = 10, **kwargs):
            super().__init__(**kwargs)
            self.max_count = _check_max_count(max_count)
            self.n_bins = _check_n_bins(n_bins)
            # List states of flat 1-D tensors in the metric's dtype (float64 here): torchmetrics syncs
            # them with one all_gather each, and a process that saw no items contributes an empty
            # 1-D tensor of that dtype, which only matches when every state is 1-D in that dtype.
            # Counts are whole numbers, exact in float64 up to 2**53.
            for name in ("pmf", "target", "abs_count_error", "nll"):
                self.add_state(name, default=[], dist_reduce_fx="cat")
            self.set_dtype(torch.float64)

        def update(self, pmf, target, expected_count=None, log_pmf=None) -> None:
            if isinstance(pmf, CountResult):
                if expected_count is None:
                    expected_count = pmf.expected_count
                if log_pmf is None:
                    log_pmf = pmf.log_pmf
                pmf = pmf.pmf
            p, M = _check_pmf(pmf, self.max_count)
            t = _as_counts(target, "target").to(p.device)
            if p.shape[0] != t.shape[0]:
                raise ValueError(f"`pmf` and `target` must hold one entry per item, got {p.shape[0]} and {t.shape[0]}")
            abs_err, nll = _per_item_errors(p, t, M, expected_count, log_pmf)
            for name, value in (("pmf", p), ("target", t), ("abs_count_error", abs_err), ("nll", nll)):
                getattr(self, name).append(value.reshape(-1).to(device=self.device, dtype=self.dtype))

        def compute(self) -> dict[str, torch.Tensor]:
            def cat(state):
                return dim_zero_cat(state).reshape(-1) if (not isinstance(state, list) or state) else None

            p = cat(self.pmf)
            if p is None or p.numel() == 0:
                raise ValueError("CountMetric.compute() needs at least one update() with items")
            p = p.reshape(-1, self.max_count + 1)
            t = cat(self.target).round().to(torch.int64)
            return _metrics_from_items(p, t, cat(self.abs_count_error).to(torch.float64),
                                       cat(self.nll).to(torch.float64), self.max_count, self.n_bins)

    CountMetric.__module__ = __name__
    CountMetric.__qualname__ = "CountMetric"
    return CountMetric


def __getattr__(name: str):
    if name == "CountMetric":
        cls = _build_count_metric()
        globals()["CountMetric"] = cls  # later lookups (and pickling for DDP spawn) find the class directly
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
