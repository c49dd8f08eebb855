"""Lesion count distributions (the paper's method) and the thresholded connected-component baseline."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _ops
from ._validation import (
    MAX_SIZE_ARGUMENT,
    canonical_spatial,
    check_bool,
    check_connectivity,
    check_nonneg_int,
    check_same_device,
    check_threshold,
    check_values,
    require_static_under_vmap,
)
from .ops import _region_topk, label, poisson_binomial, region_max

__all__ = ["CountResult", "count_distribution", "cc_count"]


class CountResult(NamedTuple):
    """Output of :func:`count_distribution` (B items, K candidate columns, M = ``max_count``).

    Attributes:
        pmf: (B, M+1) P(C = 0..M-1) and the tail P(C >= M).
        log_pmf: (B, M+1) log of ``pmf``, exact where ``pmf`` underflows.
        lesion_probs: (B, K) existence probability p_k of each candidate (max over its component);
            0 in padding columns.
        lesion_ids: (B, K) int64 label of each column in ``labels`` (0 in padding columns).
        num_lesions: (B,) int64 number of candidates found (before any ``max_lesions`` cut).
        labels: candidate label map, spatial shape of the input (int32, or int64 for huge items).
        argmax: (B, K) int64 flat voxel index of each candidate's maximum (-1 in padding columns):
            the single voxel that carries the candidate's gradient.
        truncated: (B,) bool, True where ``max_lesions`` dropped candidates.
        expected_count: (B,) E[C] = sum of lesion_probs (over the kept candidates).
        entropy: (B,) entropy of ``pmf`` in nats.
        max_count: M.
    """

    pmf: torch.Tensor
    log_pmf: torch.Tensor
    lesion_probs: torch.Tensor
    lesion_ids: torch.Tensor
    num_lesions: torch.Tensor
    labels: torch.Tensor
    argmax: torch.Tensor
    truncated: torch.Tensor
    expected_count: torch.Tensor
    entropy: torch.Tensor
    max_count: int

    @property
    def most_likely_count(self) -> torch.Tensor:
        """(B,) int64 mode of ``pmf`` (the value M stands for "M or more")."""
        return self.pmf.argmax(dim=1)


def _logit(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    return math.log(p) - math.log1p(-p)


def _prepare(input, threshold, connectivity, from_logits, mask):
    x = canonical_spatial(input)
    if not x.is_floating_point():
        raise TypeError(f"`input` must be a floating tensor of probabilities or logits, got {x.dtype}")
    check_connectivity(connectivity, x.dim() - 1)
    threshold = check_threshold(threshold, probability=True)
    # The label kernels check the values in their own first pass (label(check_probabilities=True)):
    # the CPU one NaN and [0, 1], the CUDA one [0, 1] and NaN for probabilities (a device-side
    # assertion, no extra pass). CUDA logits keep this pass: the CUDA labeler only marks NaN (num = -1).
    if not (_ops.compiled(x.device) and (x.device.type == "cpu" or not from_logits)):
        check_values(x, probabilities=not from_logits)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError("`mask` must be a torch.Tensor")
        check_same_device(("input", x), ("mask", mask))
        m = mask.squeeze(1) if mask.dim() == x.dim() + 1 and mask.shape[1] == 1 else mask
        if m.shape != x.shape and m.shape != x.shape[1:]:
            raise ValueError(
                f"`mask` must have the shape of `input` {tuple(x.shape)} or of one item "
                f"{tuple(x.shape[1:])}, got {tuple(mask.shape)}"
            )
        fill = -math.inf if from_logits else 0.0
        x = torch.where(m.to(torch.bool), x, torch.full((), fill, dtype=x.dtype, device=x.device))
    label_threshold = _logit(threshold) if from_logits else threshold
    return x, label_threshold


def count_distribution(
    input: torch.Tensor,
    threshold: float = 0.1,
    connectivity: int = 18,
    min_size: int = 0,
    max_count: int | None = None,
    from_logits: bool = False,
    mask: torch.Tensor | None = None,
    max_lesions: int | None = None,
) -> CountResult:
    """Probability distribution of the lesion count, differentiable in ``input`` (Schroeter et al. 2022).

    Candidates are the connected components of ``input > threshold``; each exists with probability
    p_k = its maximum; the count is Poisson-binomial over the candidates.

    Args:
        input: (B, H, W), (B, D, H, W) or (B, 1, D, H, W) probabilities in [0, 1], or logits with
            ``from_logits=True``; float16/bfloat16/float32/float64, any strides.
        threshold: candidate threshold, a probability in [0, 1) even with logits (paper: 0.1).
        connectivity: 4/8 (2D), 6/18/26 (3D); paper: 18.
        min_size: drop candidates with fewer voxels.
        max_count: M; bins 0..M-1 plus a tail "M or more". ``None``: M = K, the exact distribution.
        from_logits: ``input`` holds logits; the count distribution is then computed from the logits
            in log space (exact for saturated logits).
        mask: bool/0-1 mask (B, ...) or (...) of one item; voxels outside it are ignored.
        max_lesions: static number of candidate columns K (for torch.compile / CUDA graphs: no
            host sync). Keeps the ``max_lesions`` most probable candidates per item and sets
            ``truncated`` where more were found; never drops silently. ``None``: all candidates, at
            the cost of one host sync to learn K.

    Returns:
        :class:`CountResult`.

    Example:
        >>> import torch, lesioncount
        >>> probs = torch.zeros(1, 8, 16, 16); probs[0, 2, 3, 3] = 0.5189; probs[0, 6, 12, 12] = 0.7840
        >>> r = lesioncount.count_distribution(probs, max_count=4)
        >>> r.pmf  # P(C=0), P(C=1), P(C=2), P(C=3), P(C>=4)
        tensor([[0.1039, 0.4893, 0.4068, 0.0000, 0.0000]])
    """
    check_nonneg_int(min_size, "min_size")
    check_nonneg_int(max_count, "max_count", allow_none=True, maximum=MAX_SIZE_ARGUMENT)
    check_nonneg_int(max_lesions, "max_lesions", allow_none=True, maximum=MAX_SIZE_ARGUMENT)
    check_bool(from_logits, "from_logits")
    x, label_threshold = _prepare(input, threshold, connectivity, from_logits, mask)
    batch = x.shape[0]
    if _ops.compiled(x.device):
        try:
            labels, num = torch.ops.lesioncount.label(x.detach(), label_threshold, connectivity, min_size,
                                                      not from_logits)
        except RuntimeError:
            # The kernel checks values in its own pass and can only say "out of range"; the Python
            # check (one more pass, only after a failure) names the likely cause (a 0..255 image,
            # a label map, logits) in a ValueError.
            check_values(x, probabilities=not from_logits)
            raise
    else:
        labels, num = label(x.detach(), label_threshold, connectivity, min_size)

    if max_lesions is None:
        require_static_under_vmap("max_lesions", "the number of candidates")
        lowest, num_regions = torch.stack([num.min(), num.max()]).tolist() if batch > 0 else (0, 0)  # the one host sync
        if lowest < 0:  # the CUDA labeler reports NaN input as num = -1 (it cannot raise without a sync)
            raise ValueError("`input` contains NaN")
        values, argmax = region_max(x, labels, num_regions)
        ids = torch.arange(1, num_regions + 1, device=x.device, dtype=torch.int64).expand(batch, -1)
        truncated = torch.zeros(batch, dtype=torch.bool, device=x.device)
    else:
        # One pass, static (B, max_lesions) output, per-item work proportional to the regions found.
        values, argmax, ids = _region_topk(x, labels, max_lesions, connectivity)
        truncated = num > max_lesions

    present = argmax >= 0
    ids = torch.where(present, ids, 0)
    compute_dtype = torch.promote_types(values.dtype, torch.float32)
    values = values.to(compute_dtype)
    if from_logits:
        dp_input = torch.where(present, values, torch.full((), -math.inf, dtype=compute_dtype, device=x.device))
        lesion_probs = torch.sigmoid(dp_input)
    else:
        dp_input = torch.where(present, values, 0)
        lesion_probs = dp_input
    M = dp_input.shape[1] if max_count is None else max_count
    log_pmf = poisson_binomial(dp_input, M, log=True, from_logits=from_logits)
    # The pmf comes from the linear-space DP, not from exp(log_pmf): a bin whose probability is
    # exactly 0 (P(C = 0) once a candidate has p = 1) still has the nonzero derivative of eq. 3
    # (dP(C=0)/dp_1 = -prod_{k>1} (1 - p_k)), which exp(-inf) would turn into 0.
    pmf = poisson_binomial(dp_input, M, log=False, from_logits=from_logits)
    entropy = -torch.where(pmf > 0, pmf * log_pmf, torch.zeros((), dtype=pmf.dtype, device=pmf.device)).sum(1)
    return CountResult(
        pmf=pmf,
        log_pmf=log_pmf,
        lesion_probs=lesion_probs,
        lesion_ids=ids,
        num_lesions=num,
        labels=labels,
        argmax=argmax,
        truncated=truncated,
        expected_count=lesion_probs.sum(1),
        entropy=entropy,
        max_count=M,
    )


def cc_count(input: torch.Tensor, threshold: float = 0.5, connectivity: int = 18, min_size: int = 0,
             from_logits: bool = False) -> torch.Tensor:
    """Thresholded connected-component count: the baseline the paper compares against.

    Args:
        input: (B, H, W), (B, D, H, W) or (B, 1, D, H, W) probabilities (or logits with
            ``from_logits=True``; ``threshold`` stays a probability).
        threshold: a voxel is lesion when its probability is > threshold.
        connectivity, min_size: as in :func:`label`.

    Returns:
        (B,) int64 number of components per item.

    Example:
        >>> import torch, lesioncount
        >>> lesioncount.cc_count(torch.rand(2, 8, 32, 32), threshold=0.99, connectivity=26)
        tensor([...])
    """
    x = canonical_spatial(input)
    threshold = check_threshold(threshold, probability=True)
    check_bool(from_logits, "from_logits")
    if x.is_floating_point():
        check_values(x, probabilities=not from_logits)
    t = _logit(threshold) if from_logits else threshold
    return label(x, t, connectivity, min_size)[1]
