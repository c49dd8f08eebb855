"""Public functional ops: :func:`label`, :func:`region_max`, :func:`poisson_binomial`.

Each runs the compiled kernel for the input's device when there is one and the pure torch/SciPy
reference (:mod:`lesioncount._reference`) otherwise, with identical results.
"""
from __future__ import annotations

import math

import torch

from . import _ops, _pmf_large, _reference
from ._validation import (
    MAX_SIZE_ARGUMENT,
    canonical_spatial,
    check_bool,
    check_connectivity,
    check_label_dtype,
    check_nonneg_int,
    check_not_meta,
    check_same_device,
    check_threshold,
    outside_transforms,
    plain_values,
    require_static_under_vmap,
    tracing,
)

__all__ = ["label", "region_max", "poisson_binomial"]


def _use_compiled(tensor: torch.Tensor) -> bool:
    if _ops.compiled(tensor.device):
        return True
    _ops.warn_fallback()
    return False


def label(input: torch.Tensor, threshold: float = 0.1, connectivity: int = 18, min_size: int = 0):
    """Connected components of ``input > threshold``, per batch item, numbered like SciPy.

    Args:
        input: (B, H, W) for 2D, or (B, D, H, W) / (B, 1, D, H, W) for 3D; bool, uint8, float16,
            bfloat16, float32 or float64. Any strides.
        threshold: foreground is ``float64(input) > threshold`` (strict, as in the paper).
        connectivity: neighbour count: 4 or 8 in 2D; 6, 18 or 26 in 3D (default 18, the paper's).
        min_size: components with fewer voxels become background; the rest are renumbered.

    Returns:
        ``(labels, num)``: labels has the spatial shape of ``input`` (the singleton channel of a 5D
        input is dropped), int32 (int64 when one item has >= 2**31 voxels), 0 for background and
        1..K in raster order of each component's first voxel, exactly as ``scipy.ndimage.label``;
        ``num`` is int64 (B,) with K per item.

    Example:
        >>> import torch, lesioncount
        >>> x = torch.zeros(1, 1, 5); x[0, 0, [0, 1, 3]] = 0.9
        >>> labels, num = lesioncount.label(x, 0.5, connectivity=8)
        >>> labels.tolist(), num.tolist()
        ([[[1, 1, 0, 2, 0]]], [2])
    """
    x = canonical_spatial(input)
    check_label_dtype(x)
    rank = x.dim() - 1
    check_connectivity(connectivity, rank)
    threshold = check_threshold(threshold, probability=False)
    check_nonneg_int(min_size, "min_size")
    if _use_compiled(x):
        labels, num = torch.ops.lesioncount.label(x, threshold, connectivity, min_size)
        if x.is_floating_point() and not tracing():
            # The CUDA labeler cannot raise without a host sync: it marks an item containing NaN
            # with num = -1 (and all-zero labels). This assertion turns that into an error instead
            # of a silent wrong answer: on the GPU asynchronously (a device-side assertion, at the
            # next synchronising call; safe under CUDA-graph capture), on the CPU at once (where
            # the kernel has raised already, so it never fires).
            torch._assert_async((num >= 0).all(), "label: `input` contains NaN")
        return labels, num
    x = plain_values(x, "label")  # SciPy reads the values: peel torch.func's wrappers
    with outside_transforms():
        if not tracing() and x.is_floating_point() and x.numel() and bool(torch.isnan(x).any()):
            raise ValueError("`input` contains NaN")
        return _reference.label(x, threshold, connectivity, min_size)


def region_max(input: torch.Tensor, labels: torch.Tensor, num_regions: int | None = None):
    """Per-region maximum and the flat index of the first voxel reaching it (fused, one pass).

    Args:
        input: (B, ...) floating values (probabilities or logits); a (B, 1, D, H, W) input is
            treated as (B, D, H, W).
        labels: int32/int64 of the same spatial shape, 0 = background, regions 1..num_regions.
        num_regions: number of output columns R; ``None`` uses ``labels.max()`` (one host sync).
            Pass it (e.g. ``num.max()`` computed once, or a static bound) to avoid the sync.

    Returns:
        ``(values, argmax)``, both (B, R): column r-1 is region r. ``values`` has input's dtype,
        ``argmax`` is int64 flat index into one item's (spatial, C-order) volume; ties go to the
        smallest index; absent regions get value 0 and argmax -1. Differentiable in ``input``: the
        gradient of each value flows to its argmax voxel only.

    Example:
        >>> import torch, lesioncount
        >>> x = torch.tensor([[0.2, 0.9, 0.4, 0.7]]); lab = torch.tensor([[1, 1, 0, 2]], dtype=torch.int32)
        >>> lesioncount.region_max(x, lab)
        (tensor([[0.9000, 0.7000]]), tensor([[1, 3]]))
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError("`labels` must be a torch.Tensor")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"`input` must be a torch.Tensor, got {type(input).__name__}")
    check_not_meta(input, "input")
    x = input.squeeze(1) if input.dim() == 5 and input.shape[1] == 1 else input
    lab = labels.squeeze(1) if labels.dim() == 5 and labels.shape[1] == 1 else labels
    check_same_device(("input", x), ("labels", lab))
    if x.dim() < 1:
        raise ValueError("`input` must have a batch dimension")
    if lab.shape != x.shape:
        raise ValueError(f"`labels` must have the shape of `input` {tuple(x.shape)}, got {tuple(lab.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"`input` must be a floating tensor, got {x.dtype}")
    if lab.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`labels` must be int32 or int64, got {lab.dtype}")
    if num_regions is None:
        require_static_under_vmap("num_regions", "the number of regions")
        num_regions = int(lab.max()) if lab.numel() else 0
    check_nonneg_int(num_regions, "num_regions", maximum=MAX_SIZE_ARGUMENT)
    if _use_compiled(x):
        return _ops.region_max_op(x, lab, num_regions)
    return _reference.region_max(x, lab, num_regions)


def _region_topk(x: torch.Tensor, labels: torch.Tensor, k: int, connectivity: int):
    """``(values, argmax, ids)`` of the ``k`` regions with the largest maxima per item (ties: the
    smaller label), in label order, padded with value 0, argmax -1, id 0: static shape, no host
    sync. Arguments are checked by the caller (count_distribution)."""
    if _use_compiled(x):
        return _ops.region_topk_op(x, labels, k)
    return _reference.region_topk(x, labels, k, _ops.max_components(x.shape[1:], connectivity))


def poisson_binomial(probs: torch.Tensor, max_count: int | None = None, log: bool = False,
                     from_logits: bool = False) -> torch.Tensor:
    """Distribution of the number of successes of independent Bernoulli(p_k), truncated.

    Args:
        probs: (B, K) success probabilities in [0, 1] (or logits with ``from_logits=True``). Zero
            padding (p = 0, or logit -inf) is exact: it changes no count.
        max_count: M; output bins are 0..M-1 plus a tail bin P(C >= M). ``None`` uses M = K (the
            full distribution; the last bin is then P(C = K)).
        log: return the log-pmf, from a log-space dynamic program that stays exact where the pmf
            underflows (400 candidates at p = 0.999 give log P(C=0) = 400 log 0.001).
        from_logits: read ``probs`` as logits z (p = sigmoid(z)); exact for saturated logits.

    Returns:
        (B, M+1) pmf (or log-pmf) in ``probs``' dtype, accumulated in float64. Differentiable in
        ``probs``; O(K*M) time.

    Example:
        >>> import torch, lesioncount
        >>> lesioncount.poisson_binomial(torch.tensor([[0.5189, 0.7840]]), max_count=4)
        tensor([[0.1039, 0.4893, 0.4068, 0.0000, 0.0000]])
    """
    if not isinstance(probs, torch.Tensor):
        raise TypeError("`probs` must be a torch.Tensor")
    check_not_meta(probs, "probs")
    if probs.dim() != 2:
        raise ValueError(f"`probs` must have shape (B, K), got {probs.dim()} dimensions {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"`probs` must be a floating tensor, got {probs.dtype}")
    if max_count is None:
        max_count = probs.shape[1]
    check_nonneg_int(max_count, "max_count", maximum=MAX_SIZE_ARGUMENT)
    check_bool(log, "log")
    check_bool(from_logits, "from_logits")
    if not tracing() and _pmf_large.use_large_path(probs.shape[1], max_count, log):
        # many candidates and bins (the full pmf of a noisy map): the O(K log^2 K) product tree
        # instead of the O(K*M) DP, to float64 accuracy (lesioncount._pmf_large)
        return _pmf_large.full_pmf_large(probs, max_count, log, from_logits)
    compiled = _use_compiled(probs)
    # The compiled kernels reject NaN and out-of-range values themselves while reading them (on CUDA
    # through a device-side assertion, without a host sync).
    if not tracing() and probs.numel() and not compiled:
        if bool(torch.isnan(probs).any()):
            raise ValueError("`probs` contains NaN")
        if not from_logits and (bool((probs < 0).any()) or bool((probs > 1).any())):
            raise ValueError("`probs` must lie in [0, 1] (pass from_logits=True for logits)")
    if compiled:
        return _ops.poisson_binomial_op(probs, max_count, bool(log), bool(from_logits))
    out = _reference.poisson_binomial(probs, max_count, log, from_logits)
    if log:
        # A bin with log P = -inf has no finite derivative: like the kernels, pass it gradient 0
        # (autograd through the reference's log(0) paths would give arbitrary finite values).
        out = torch.where(out == -math.inf, out.detach(), out)
    return out
