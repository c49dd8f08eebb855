"""Count loss: negative log-likelihood of the true lesion count under the count distribution."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._validation import DEFAULT_CONNECTIVITY, check_bool, check_count_options, connectivity_text
from .counting import count_distribution

__all__ = ["CountLoss", "CountNLL", "count_nll", "count_nll_terms", "count_weight_schedule"]

_REDUCTIONS = ("mean", "sum", "none")


def count_weight_schedule(epoch: int, w1: float = 1e-3, w2: float = 0.06, pretrain_epochs: int = 0,
                          max_weight: float | None = None) -> float:
    """The paper's count-loss weight: 0 before ``pretrain_epochs``, then ``w1 * exp(w2 * (epoch - pretrain_epochs))``.

    Epochs count from 0. ``max_weight`` caps the weight (``None``: uncapped, as in the paper, whose
    runs were short; over nnU-Net's 1000 epochs an uncapped weight would reach ~1e20).

    Example:
        >>> from lesioncount import count_weight_schedule
        >>> count_weight_schedule(4, pretrain_epochs=5), count_weight_schedule(5, pretrain_epochs=5)
        (0.0, 0.001)
        >>> count_weight_schedule(500, pretrain_epochs=5, max_weight=1.0)
        1.0
    """
    for name, value in (("w1", w1), ("w2", w2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}")
    if w1 < 0:
        raise ValueError(f"`w1` must be >= 0, got {w1}")
    for name, value in (("epoch", epoch), ("pretrain_epochs", pretrain_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be an int >= 0, got {value!r}")
    if max_weight is not None and (isinstance(max_weight, bool) or not isinstance(max_weight, (int, float))
                                   or not max_weight >= 0):
        raise ValueError(f"`max_weight` must be None or a number >= 0, got {max_weight!r}")
    if epoch < pretrain_epochs or w1 == 0:
        return 0.0
    exponent = w2 * (epoch - pretrain_epochs)
    weight = math.inf if exponent > 700 else w1 * math.exp(exponent)
    if max_weight is not None:
        weight = min(weight, float(max_weight))
    return float(weight)


def _check_target(target, log_pmf: torch.Tensor) -> torch.Tensor:
    """(B,) int64 counts on ``log_pmf``'s device; every message names ``target``.

    The value checks read the data, so they run where that costs no device sync: on a CPU target
    (the usual case, counts come from the data loader). A target already on the GPU gets a
    device-side assertion for negative counts instead.
    """
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target)
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"`target` counts must be integers, got {target.dtype}")
    compiling = torch.compiler.is_compiling()
    if not compiling and target.numel() and target.device.type == "cpu":
        values = target.detach().double()
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"`target` counts must be finite numbers, got {target.reshape(-1).tolist()[:8]}")
        if bool((values != values.round()).any()):
            raise ValueError("`target` counts must be whole numbers")
        if bool((values < 0).any()):
            raise ValueError(f"`target` counts must be >= 0, got {target.reshape(-1).tolist()[:8]}")
        if bool((values >= 2.0**62).any()):
            raise ValueError(f"`target` counts must be below 2**62, got {values.max().item():.3g}")
    if target.is_floating_point():
        target = target.round()
    target = target.reshape(-1).to(device=log_pmf.device, dtype=torch.int64, non_blocking=True)
    if target.shape[0] != log_pmf.shape[0]:
        raise ValueError(f"`target` must hold one count per batch item ({log_pmf.shape[0]}), got {target.shape[0]}")
    if target.device.type != "cpu" and target.numel() and not compiling:
        torch._assert_async((target >= 0).all(), "`target` counts must be >= 0")
    return target


class CountNLL(NamedTuple):
    """Per-item count NLL with the infeasible-target rule (:func:`count_nll_terms`).

    Attributes:
        nll: (B,) -log P(C = target); +inf where infeasible (no gradient flows from those items).
        infeasible: (B,) bool, True where P(C = target) is exactly 0 under the count distribution.
    """

    nll: torch.Tensor
    infeasible: torch.Tensor


def count_nll_terms(log_pmf: torch.Tensor, target) -> CountNLL:
    """-log P(C = target) per item and which items are infeasible: THE rule every count loss uses.

    An item is *infeasible* when its count distribution gives the true count probability exactly
    0: more true lesions than candidates (what a young network produces on its first batches), or
    fewer than the candidates that are certain (probability exactly 1, e.g. a float32 sigmoid
    saturated above a logit of ~16.7; with ``from_logits=True`` the log-space distribution keeps
    such probabilities below 1). Its NLL is +inf and no gradient can lower it (no candidate exists
    whose probability could be raised: the segmentation loss has to create it), so it is kept out of
    the gradient: the returned ``nll`` is +inf there with a zero gradient, never NaN.

    Args:
        log_pmf: (B, M+1) log-pmf (e.g. :attr:`CountResult.log_pmf`); bin M is "M or more".
        target: (B,) true counts (ints, or whole floats); counts >= M are scored on the tail bin.

    Returns:
        :class:`CountNLL` ``(nll, infeasible)``, both (B,).

    Example:
        >>> import torch, lesioncount
        >>> log_pmf = torch.log(torch.tensor([[0.3, 0.7, 0.0], [0.2, 0.5, 0.3]]))   # M = 2
        >>> lesioncount.count_nll_terms(log_pmf, torch.tensor([2, 2]))
        CountNLL(nll=tensor([   inf, 1.2040]), infeasible=tensor([ True, False]))
    """
    if not isinstance(log_pmf, torch.Tensor) or log_pmf.dim() != 2 or log_pmf.shape[1] < 1:
        raise ValueError(f"`log_pmf` must be a (B, M+1) tensor, got "
                         f"{tuple(log_pmf.shape) if isinstance(log_pmf, torch.Tensor) else type(log_pmf).__name__}")
    target = _check_target(target, log_pmf)
    max_count = log_pmf.shape[1] - 1
    picked = log_pmf.gather(1, target.clamp_max(max_count).unsqueeze(1)).squeeze(1)
    infeasible = picked == -math.inf
    # torch.where sends no gradient into the branch it does not take: the -inf entries' gradient
    # stays 0 instead of the backward kernels' convention leaking into an inf * 0 = NaN.
    nll = torch.where(infeasible, torch.full((), math.inf, dtype=picked.dtype, device=picked.device), -picked)
    return CountNLL(nll, infeasible)


def _reduce(terms: CountNLL, reduction: str, ignore_infeasible: bool) -> torch.Tensor:
    nll = terms.nll
    if not ignore_infeasible or reduction == "none":
        if reduction == "mean":
            return nll.mean()
        return nll.sum() if reduction == "sum" else nll
    kept = torch.where(terms.infeasible, torch.zeros((), dtype=nll.dtype, device=nll.device), nll)
    total = kept.sum()
    if reduction == "sum":
        return total
    # mean over the feasible items, without a host sync (0 when none is feasible)
    return total / (~terms.infeasible).sum().clamp_min(1).to(nll.dtype)


def count_nll(log_pmf: torch.Tensor, target, reduction: str = "mean", ignore_infeasible: bool = True) -> torch.Tensor:
    """-log P(C = target) from a (B, M+1) log-pmf; targets >= M fall in the tail bin M.

    Infeasible items (P(C = target) = 0 exactly, see :func:`count_nll_terms`) are left out of the
    ``"mean"`` (the mean runs over the feasible items; 0 when there is none) and the ``"sum"``, and
    carry no gradient; ``reduction="none"`` returns +inf for them (with a zero gradient).
    ``ignore_infeasible=False`` keeps the strict NLL: the mean or sum is then +inf.

    Example:
        >>> import torch, lesioncount
        >>> log_pmf = torch.log(torch.tensor([[0.1, 0.5, 0.4]]))
        >>> lesioncount.count_nll(log_pmf, torch.tensor([5]))  # 5 >= M=2: tail bin
        tensor(0.9163)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_infeasible, bool):
        raise TypeError(f"`ignore_infeasible` must be a bool, got {ignore_infeasible!r}")
    return _reduce(count_nll_terms(log_pmf, target), reduction, ignore_infeasible)


class CountLoss(torch.nn.Module):
    """-log P(C = c) for integer lesion counts c, through the whole map -> count distribution.

    MONAI-style: ``from_logits`` (apply a sigmoid, in log space) and ``reduction``.

    Args:
        max_count: M; bins 0..M-1 and a tail "M or more" (paper: 4, i.e. bins 0,1,2,3,4+). Counts
            >= M are scored on the tail bin.
        from_logits: the network output holds logits (recommended: exact in log space).
        reduction: "mean" | "sum" | "none".
        threshold, connectivity, min_size, max_lesions: as in :func:`count_distribution`.
        ignore_infeasible: items whose true count has probability exactly 0 (more true lesions than
            candidates, as on a young network's first batches; see :func:`count_nll_terms`) are left
            out of "mean"/"sum" and carry no gradient, so the loss stays finite (default). False:
            the strict NLL, +inf for such a batch.

    All arguments are checked here, in the constructor. After each call, ``last_infeasible`` holds
    the (B,) bool mask of the infeasible items (a device tensor: reading it for logging, e.g.
    ``loss_fn.last_infeasible.sum()``, costs no sync until you print it).

    Shapes: ``input`` (B, [1,] D, H, W) or (B, H, W); ``target`` (B,) integer counts. Output: scalar,
    or (B,) with reduction="none" (+inf for infeasible items).

    Example:
        >>> import torch, lesioncount
        >>> loss_fn = lesioncount.CountLoss(max_count=4, from_logits=True)
        >>> logits = torch.full((2, 1, 16, 32, 32), -5.0); logits[:, 0, 8, 16, 16] = 1.0
        >>> _ = logits.requires_grad_(True)
        >>> loss = loss_fn(logits, torch.tensor([1, 3]))   # item 1: 3 lesions, 1 candidate: infeasible
        >>> loss, loss_fn.last_infeasible
        (tensor(0.3133, grad_fn=<DivBackward0>), tensor([False,  True]))
        >>> loss.backward()
    """

    def __init__(self, max_count: int = 4, from_logits: bool = False, reduction: str = "mean",
                 threshold: float = 0.1, connectivity: int = DEFAULT_CONNECTIVITY[3], min_size: int = 0,
                 max_lesions: int | None = None, ignore_infeasible: bool = True):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
        if connectivity is None:
            raise ValueError(f"`connectivity` must be one of {connectivity_text()}, got None")
        self.threshold, self.connectivity, self.min_size, self.max_count, self.max_lesions = check_count_options(
            threshold, connectivity, min_size, max_count, max_lesions)
        self.from_logits = check_bool(from_logits, "from_logits")
        self.ignore_infeasible = check_bool(ignore_infeasible, "ignore_infeasible")
        self.reduction = reduction
        self.last_infeasible: torch.Tensor | None = None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        result = count_distribution(
            input,
            threshold=self.threshold,
            connectivity=self.connectivity,
            min_size=self.min_size,
            max_count=self.max_count,
            from_logits=self.from_logits,
            max_lesions=self.max_lesions,
        )
        terms = count_nll_terms(result.log_pmf, target)
        self.last_infeasible = terms.infeasible.detach()
        return _reduce(terms, self.reduction, self.ignore_infeasible)

    def extra_repr(self) -> str:
        return (f"max_count={self.max_count}, from_logits={self.from_logits}, reduction={self.reduction!r}, "
                f"threshold={self.threshold}, connectivity={self.connectivity}, "
                f"ignore_infeasible={self.ignore_infeasible}")
