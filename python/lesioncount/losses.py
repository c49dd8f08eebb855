"""Count loss: negative log-likelihood of the true lesion count under the count distribution."""
from __future__ import annotations

import math

import torch

from .counting import count_distribution

__all__ = ["CountLoss", "count_nll", "count_weight_schedule"]

_REDUCTIONS = ("mean", "sum", "none")


def count_weight_schedule(epoch: int, w1: float = 1e-3, w2: float = 0.06, pretrain_epochs: int = 0,
                          max_weight: float | None = None) -> float:
    """The paper's count-loss weight: 0 before ``pretrain_epochs``, then ``w1 * exp(w2 * (epoch - pretrain_epochs))``.

    Epochs count from 0. ``max_weight`` caps the weight (``None``: uncapped, as in the paper, whose
    runs were short; over nnU-Net's 1000 epochs an uncapped weight would reach ~1e20).

    Example:
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


def count_nll(log_pmf: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-log P(C = target) from a (B, M+1) log-pmf; targets >= M fall in the tail bin M.

    Example:
        >>> log_pmf = torch.log(torch.tensor([[0.1, 0.5, 0.4]]))
        >>> lesioncount.count_nll(log_pmf, torch.tensor([5]))  # 5 >= M=2: tail bin
        tensor(0.9163)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target, device=log_pmf.device)
    if target.dtype.is_floating_point:
        if not torch.compiler.is_compiling() and bool((target != target.round()).any()):
            raise ValueError("`target` counts must be whole numbers")
        target = target.round().long()
    target = target.reshape(-1).to(device=log_pmf.device, dtype=torch.int64)
    if target.shape[0] != log_pmf.shape[0]:
        raise ValueError(f"`target` must hold one count per batch item ({log_pmf.shape[0]}), got {target.shape[0]}")
    if not torch.compiler.is_compiling() and target.numel() and bool((target < 0).any()):
        raise ValueError("`target` counts must be >= 0")
    max_count = log_pmf.shape[1] - 1
    loss = -log_pmf.gather(1, target.clamp_max(max_count).unsqueeze(1)).squeeze(1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class CountLoss(torch.nn.Module):
    """-log P(C = c) for integer lesion counts c, through the whole map -> count distribution.

    MONAI-style: ``from_logits`` (apply a sigmoid, in log space) and ``reduction``.

    Args:
        max_count: M; bins 0..M-1 and a tail "M or more" (paper: 4, i.e. bins 0,1,2,3,4+). Counts
            >= M are scored on the tail bin.
        from_logits: the network output holds logits (recommended: exact in log space).
        reduction: "mean" | "sum" | "none".
        threshold, connectivity, min_size, max_lesions: as in :func:`count_distribution`.

    Shapes: ``input`` (B, [1,] D, H, W) or (B, H, W); ``target`` (B,) integer counts. Output: scalar,
    or (B,) with reduction="none".

    Example:
        >>> loss_fn = lesioncount.CountLoss(max_count=4, from_logits=True)
        >>> logits = torch.randn(2, 1, 16, 32, 32, requires_grad=True)
        >>> loss = loss_fn(logits, torch.tensor([1, 3])); loss.backward()
    """

    def __init__(self, max_count: int = 4, from_logits: bool = False, reduction: str = "mean",
                 threshold: float = 0.1, connectivity: int = 18, min_size: int = 0,
                 max_lesions: int | None = None):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 0:
            raise ValueError(f"`max_count` must be an int >= 0, got {max_count!r}")
        self.max_count = max_count
        self.from_logits = from_logits
        self.reduction = reduction
        self.threshold = threshold
        self.connectivity = connectivity
        self.min_size = min_size
        self.max_lesions = max_lesions

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
        return count_nll(result.log_pmf, target, self.reduction)

    def extra_repr(self) -> str:
        return (f"max_count={self.max_count}, from_logits={self.from_logits}, reduction={self.reduction!r}, "
                f"threshold={self.threshold}, connectivity={self.connectivity}")
