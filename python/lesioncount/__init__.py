"""lesioncount: differentiable lesion count distributions from segmentation probability maps.

Implements "Segmentation-Consistent Probabilistic Lesion Counting" (Schroeter, Myers-Colet, Arnold,
Arbel, MIDL 2022) as fast PyTorch custom ops with pure torch/SciPy fallbacks.

Example:
    >>> import torch, lesioncount
    >>> probs = torch.rand(2, 1, 32, 64, 64) ** 8            # (B, 1, D, H, W) probabilities
    >>> result = lesioncount.count_distribution(probs, threshold=0.1, max_count=4)
    >>> result.pmf.shape                                      # P(C=0..3), P(C>=4)
    torch.Size([2, 5])
"""
from ._ops import build_info, has_cuda_ops, has_ops
from .counting import CountResult, cc_count, count_distribution
from .losses import CountLoss, CountNLL, count_nll, count_nll_terms, count_weight_schedule
from .ops import label, poisson_binomial, region_max

__version__ = "0.1.0"

__all__ = [
    "CountLoss",
    "CountNLL",
    "CountResult",
    "cc_count",
    "count_distribution",
    "count_nll",
    "count_nll_terms",
    "count_weight_schedule",
    "has_ops",
    "has_cuda_ops",
    "build_info",
    "label",
    "poisson_binomial",
    "region_max",
]
