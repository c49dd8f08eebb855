"""Shared pieces of the framework adapters (``lesioncount.nnunet``, ``lesioncount.monai``).

Framework networks output channel-first maps ``(B, C, [D,] H, W)``: softmax logits over mutually
exclusive classes (channel 0 = background), or one sigmoid logit per (possibly overlapping) region,
or probabilities after an activation. The paper's method needs one lesion map per item. This module
turns such an output into the lesion *logit* (exact, in log space) or probability, turns a framework
target (label map, one-hot / multi-label mask, or plain counts) into ground-truth counts with the
same threshold / connectivity / min-size rule, and computes the count term.

Nothing here imports nnU-Net or MONAI.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .counting import CountResult, cc_count, count_distribution
from ._validation import (  # noqa: F401
    DEFAULT_CONNECTIVITY,
    check_connectivity,
    check_count_options,
    check_nonneg_int,
    check_threshold,
    default_connectivity,
)
from .losses import _reduce, count_nll_terms

__all__ = [
    "ACTIVATIONS",
    "CountTerm",
    "count_term",
    "default_connectivity",
    "lesion_map",
    "resolve_channels",
    "target_counts",
]

ACTIVATIONS = ("softmax", "sigmoid", "none")


def _check_output(output, name: str = "input") -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor (B, C, [D,] H, W), got {type(output).__name__}")
    if output.dim() not in (4, 5):
        raise ValueError(
            f"`{name}` must be channel-first (B, C, H, W) or (B, C, D, H, W), got shape {tuple(output.shape)}"
        )
    if not output.is_floating_point():
        raise TypeError(f"`{name}` must be a floating tensor (logits or probabilities), got {output.dtype}")
    return output


def resolve_channels(num_channels: int, channels, include_background: bool, activation: str,
                     name: str = "lesion_channels") -> tuple[int, ...]:
    """The output channels whose union is "lesion".

    ``channels`` given: those (validated). Otherwise every channel, minus channel 0 (background) when
    ``include_background`` is False and there is more than one channel (MONAI's convention: a single
    channel is never dropped).

    Example:
        >>> resolve_channels(3, None, include_background=False, activation="softmax")
        (1, 2)
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if channels is None:
        if include_background or num_channels == 1:
            chosen = tuple(range(num_channels))
        else:
            chosen = tuple(range(1, num_channels))
    else:
        if isinstance(channels, int) and not isinstance(channels, bool):
            channels = (channels,)
        try:
            chosen = tuple(channels)
        except TypeError:
            raise TypeError(f"`{name}` must be an int or a sequence of ints, got {channels!r}") from None
        if not chosen:
            raise ValueError(f"`{name}` must name at least one channel")
        for c in chosen:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_channels:
                raise ValueError(f"`{name}` must hold channel indices in [0, {num_channels}), got {channels!r}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"`{name}` has repeated channels: {channels!r}")
        chosen = tuple(sorted(chosen))
    if activation == "softmax" and len(chosen) == num_channels:
        raise ValueError(
            f"with softmax, the lesion channels {chosen} cover every class, so P(lesion) = 1 everywhere; "
            f"leave the background out (include_background=False) or pass `{name}`"
        )
    if activation == "sigmoid" and len(chosen) > 1:
        raise ValueError(
            f"with sigmoid, the lesion map must be one channel (regions may overlap, their union is not "
            f"defined by the logits); got channels {chosen}: pass `{name}` with one channel"
        )
    return chosen


def lesion_map(output: torch.Tensor, channels: Sequence[int], activation: str) -> tuple[torch.Tensor, bool]:
    """One lesion map (B, [D,] H, W) per item from a channel-first output, in float32 or float64.

    - ``"softmax"``: the lesion logit ``logsumexp(z[sel]) - logsumexp(z[rest])`` = logit of
      sum of the selected softmax probabilities, exact for saturated logits. Returns ``from_logits=True``.
    - ``"sigmoid"``: the selected channel's logit (``from_logits=True``).
    - ``"none"``: probabilities; several selected channels are summed (mutually exclusive classes,
      e.g. a softmax output) and clamped to [0, 1] (``from_logits=False``).

    Shapes: ``output`` (B, C, [D,] H, W) -> (B, [D,] H, W).

    Example:
        >>> z = torch.tensor([[[[0.0]], [[2.0]], [[1.0]]]])       # (1, 3, 1, 1): background + 2 classes
        >>> x, from_logits = lesion_map(z, (1, 2), "softmax")
        >>> round(float(torch.sigmoid(x)), 4) == round(float(z.softmax(1)[0, 1:].sum()), 4)
        True
    """
    output = _check_output(output)
    x = output.float() if output.dtype != torch.float64 else output
    sel = list(channels)
    if activation == "softmax":
        rest = [c for c in range(x.shape[1]) if c not in channels]
        pos = x[:, sel[0]] if len(sel) == 1 else torch.logsumexp(x[:, sel], dim=1)
        neg = x[:, rest[0]] if len(rest) == 1 else torch.logsumexp(x[:, rest], dim=1)
        return pos - neg, True
    if activation == "sigmoid":
        return x[:, sel[0]], True
    p = x[:, sel[0]] if len(sel) == 1 else x[:, sel].sum(1).clamp(0.0, 1.0)
    return p, False


def target_counts(target, *, num_channels: int, channels: Sequence[int], spatial_shape, threshold: float,
                  connectivity: int, min_size: int, mask: torch.Tensor | None = None,
                  name: str = "target") -> torch.Tensor:
    """Ground-truth lesion counts (B,) int64 from a framework target.

    ``target`` may be:

    - (B,) integer counts (used as they are);
    - a label map (B, 1, [D,] H, W) of class indices: lesion = a voxel whose class is one of
      ``channels`` (with one output channel: lesion = value > 0.5, a binary mask);
    - a one-hot or multi-label mask (B, C, [D,] H, W) with C = ``num_channels``: lesion = any of
      the ``channels`` set (> 0.5).

    The lesion mask (restricted to ``mask`` when given) is labelled with the same threshold,
    connectivity and min-size rule as the prediction (:func:`lesioncount.cc_count`).

    Example:
        >>> y = torch.zeros(1, 1, 8, 8, 8); y[0, 0, 1, 1, 1] = 1; y[0, 0, 5, 5, 5] = 1
        >>> target_counts(y, num_channels=2, channels=(1,), spatial_shape=(8, 8, 8), threshold=0.1,
        ...               connectivity=18, min_size=0)
        tensor([2])
    """
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target)
    spatial_shape = tuple(spatial_shape)
    if target.dim() == 1:
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"`{name}` counts must be integers, got {target.dtype}")
        if target.is_floating_point():
            if bool((target != target.round()).any()):
                raise ValueError(f"`{name}` counts must be whole numbers")
            target = target.round()
        counts = target.to(torch.int64)
        if counts.numel() and bool((counts < 0).any()):
            raise ValueError(f"`{name}` counts must be >= 0, got {counts.tolist()}")
        return counts
    if target.dim() != len(spatial_shape) + 2 or tuple(target.shape[2:]) != spatial_shape:
        raise ValueError(
            f"`{name}` must be (B,) counts, a label map (B, 1, *spatial) or a one-hot mask (B, C, *spatial) with "
            f"spatial shape {spatial_shape}, got shape {tuple(target.shape)}"
        )
    if target.shape[1] == 1 and num_channels > 1:
        labels = target[:, 0]
        if labels.is_floating_point():
            labels = labels.round()
        labels = labels.to(torch.int64)
        fg = torch.isin(labels, torch.tensor(list(channels), dtype=torch.int64, device=labels.device))
    elif target.shape[1] == 1:
        fg = target[:, 0] > 0.5
    elif target.shape[1] == num_channels:
        fg = (target[:, list(channels)] > 0.5).any(1)
    else:
        raise ValueError(
            f"`{name}` has {target.shape[1]} channels; expected 1 (a label map) or {num_channels} (one-hot, like "
            f"the output), shape {tuple(target.shape)}"
        )
    if mask is not None:
        fg = fg & mask.to(device=fg.device, dtype=torch.bool)
    return cc_count(fg.to(torch.float32), threshold=threshold, connectivity=connectivity, min_size=min_size)


class CountTerm(NamedTuple):
    """Result of :func:`count_term`.

    Attributes:
        loss: scalar, mean NLL over the feasible items (0 when none is; differentiable).
        nll: (B,) detached -log P(C = count); +inf where the count is infeasible (P = 0 exactly,
            e.g. more true lesions than candidates: see :func:`lesioncount.count_nll_terms`).
        counts: (B,) int64 ground-truth counts.
        result: the :class:`~lesioncount.CountResult` (pmf etc., attached to the graph).
    """

    loss: torch.Tensor
    nll: torch.Tensor
    counts: torch.Tensor
    result: CountResult


def count_term(x: torch.Tensor, from_logits: bool, counts: torch.Tensor, *, threshold: float = 0.1,
               connectivity: int = DEFAULT_CONNECTIVITY[3], min_size: int = 0, max_count: int = 4, max_lesions: int | None = None,
               mask: torch.Tensor | None = None) -> CountTerm:
    """The paper's count term on one lesion map per item, outside any autocast region.

    The infeasible-target rule of :func:`lesioncount.count_nll_terms` (one rule for every count
    loss): items whose true count has probability 0 (e.g. more true lesions than candidates) have
    NLL +inf, no gradient, and are left out of the mean.

    Shapes: ``x`` (B, [D,] H, W) logits (``from_logits``) or probabilities; ``counts`` (B,).

    Example:
        >>> x = torch.full((2, 4, 8, 8), -9.0); x[:, 1, 2, 2] = 2.0
        >>> term = count_term(x, True, torch.tensor([1, 2]))
        >>> term.nll      # item 1: 2 true lesions, 1 candidate
        tensor([0.1269,    inf])
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        result = count_distribution(x, threshold=threshold, connectivity=connectivity, min_size=min_size,
                                    max_count=max_count, from_logits=from_logits, mask=mask,
                                    max_lesions=max_lesions)
        counts = counts.to(device=result.log_pmf.device, dtype=torch.int64)
        if counts.shape != (x.shape[0],):
            raise ValueError(f"`counts` must be (B,) with B = {x.shape[0]}, got {tuple(counts.shape)}")
        terms = count_nll_terms(result.log_pmf, counts)
        loss = _reduce(terms, "mean", True)
    return CountTerm(loss, terms.nll.detach(), counts, result)


def resolve_connectivity(connectivity, spatial_rank: int) -> int:
    """``connectivity`` checked against the spatial rank, or the default for that rank when None."""
    if connectivity is None:
        return default_connectivity(spatial_rank)
    return check_connectivity(connectivity, spatial_rank)
