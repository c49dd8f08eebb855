"""Count uncertainty of the baselines and paired comparisons (the paper's Appendix C.4-C.5, Table 1).

- :func:`mc_dropout_count_pmf`: connected components made probabilistic with Monte-Carlo dropout
  (the paper: 50 samples, threshold tau = 0.5): the histogram, over ``num_samples`` forward passes
  with dropout active, of the number of connected components of ``p > tau``, over the count bins
  0 .. M-1, M+.
- :func:`accuracy_after_discarding`: count accuracy after discarding the most (Fig. C.4, right) or
  the least (left) uncertain fraction of cases, by any uncertainty score (the pmf's entropy).
- :func:`paired_comparison`: exact McNemar test and a paired bootstrap interval of the accuracy
  difference of two models scored on the same cases.

Example:
    >>> import torch
    >>> from lesioncount.train.uncertainty import accuracy_after_discarding
    >>> correct = torch.tensor([True, False, True, True]); entropy = torch.tensor([0.1, 0.9, 0.5, 0.2])
    >>> accuracy_after_discarding(correct, entropy, [0.0, 0.25], most_uncertain=True).tolist()
    [0.75, 1.0]
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .._validation import DEFAULT_CONNECTIVITY

__all__ = ["accuracy_after_discarding", "mc_dropout_count_pmf", "paired_comparison"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@torch.no_grad()
def mc_dropout_count_pmf(model: nn.Module, image: torch.Tensor, *, num_samples: int = 50, threshold: float = 0.5,
                         connectivity: int = DEFAULT_CONNECTIVITY[3], max_count: int = 4, seed: int = 0) -> torch.Tensor:
    """MC-dropout connected-components count distribution (float64, rows sum to 1).

    The model runs in eval mode with only its dropout layers switched to training behaviour;
    ``num_samples`` forward passes, each counted with :func:`lesioncount.cc_count` at ``threshold``;
    the pmf is the share of samples per bin (counts >= M in the bin M). The dropout masks come from
    ``seed`` (the caller's random stream is left untouched). The model's modes are restored.

    Shapes: ``image`` (B, C, D, H, W) -> (B, M+1).

    Example:
        >>> from lesioncount.train.model import UNet3D
        >>> net = UNet3D(base_filters=2, levels=2, dropout=0.5)
        >>> pmf = mc_dropout_count_pmf(net, torch.randn(2, 5, 4, 8, 8), num_samples=4)
        >>> pmf.shape, bool(torch.allclose(pmf.sum(1), torch.ones(2, dtype=torch.float64)))
        (torch.Size([2, 5]), True)
    """
    import lesioncount

    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"`num_samples` must be an int >= 1, got {num_samples!r}")
    if not 0 <= float(threshold) < 1:
        raise ValueError(f"`threshold` must be a probability in [0, 1), got {threshold!r}")
    dropouts = [m for m in model.modules() if isinstance(m, _DROPOUT) and m.p > 0]
    if not dropouts:
        raise ValueError("mc_dropout_count_pmf: the model has no dropout layer with p > 0, so every sample would "
                         "be the same (train it with dropout > 0)")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in dropouts:
        m.train()
    counts = torch.zeros(image.shape[0], max_count + 1, dtype=torch.float64)
    devices = [image.device] if image.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for _ in range(num_samples):
                logits = model(image).float()
                c = lesioncount.cc_count(logits, threshold=threshold, connectivity=connectivity, from_logits=True)
                counts += torch.nn.functional.one_hot(c.long().cpu().clamp(0, max_count), max_count + 1).double()
    finally:
        for m, mode in modes.items():
            m.training = mode
    return counts / num_samples


def accuracy_after_discarding(correct, uncertainty, fractions, most_uncertain: bool = True) -> torch.Tensor:
    """Accuracy of the cases kept after discarding a fraction ordered by ``uncertainty``.

    For each fraction f, ``min(floor(f N), N - 1)`` cases are dropped: those with the highest
    uncertainty (``most_uncertain=True``; ties: the earlier case first) or the lowest
    (``most_uncertain=False``). A well-ranked uncertainty gives a rising curve when the most
    uncertain are dropped and a falling one when the least uncertain are.

    Args:
        correct: (N,) bool, whether each case's count is right.
        uncertainty: (N,) scores (e.g. the entropy of the count pmf).
        fractions: (F,) in [0, 1).

    Returns:
        (F,) float64 accuracies.

    Example:
        >>> accuracy_after_discarding(torch.tensor([1, 0, 1, 1]).bool(), torch.tensor([0.1, 0.9, 0.5, 0.2]),
        ...                           [0.0, 0.25, 0.5], most_uncertain=False).tolist()
        [0.75, 0.6666666666666666, 0.5]
    """
    c = torch.as_tensor(correct).reshape(-1).bool().cpu()
    u = torch.as_tensor(uncertainty).reshape(-1).double().cpu()
    if c.shape != u.shape or c.numel() == 0:
        raise ValueError(f"`correct` and `uncertainty` must be equal-length non-empty (N,) tensors, got "
                         f"{tuple(c.shape)} and {tuple(u.shape)}")
    fr = torch.as_tensor(fractions, dtype=torch.float64).reshape(-1)
    if fr.numel() == 0 or not bool(((fr >= 0) & (fr < 1)).all()):
        raise ValueError(f"`fractions` must be a non-empty list of values in [0, 1), got {fr.tolist()}")
    n = c.numel()
    order = torch.sort(u, descending=most_uncertain, stable=True).indices
    ordered = c[order].double()
    suffix = torch.flip(torch.cumsum(torch.flip(ordered, [0]), 0), [0])
    drop = torch.floor(fr * n + 1e-9).long().clamp(0, n - 1)
    return suffix[drop] / (n - drop).double()


def _mcnemar_exact(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def paired_comparison(correct_a, correct_b, *, num_bootstrap: int = 10000, seed: int = 0) -> dict:
    """Paired comparison of two models' per-case correctness on the same cases.

    Returns a dict: ``accuracy_a``, ``accuracy_b``, ``difference`` (a - b), ``a_only`` (cases a gets
    right and b wrong), ``b_only``, ``mcnemar_p`` (exact two-sided binomial test on the discordant
    cases) and ``ci_low`` / ``ci_high`` (95% paired bootstrap interval of the difference, seeded).

    Example:
        >>> r = paired_comparison(torch.tensor([1, 1, 1, 0]).bool(), torch.tensor([0, 0, 1, 0]).bool())
        >>> r["a_only"], r["b_only"], r["mcnemar_p"]
        (2, 0, 0.5)
    """
    a = torch.as_tensor(correct_a).reshape(-1).bool().cpu()
    b = torch.as_tensor(correct_b).reshape(-1).bool().cpu()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"`correct_a` and `correct_b` must be equal-length non-empty (N,) tensors, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    diff = (a.double() - b.double())
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.numel(), (num_bootstrap, a.numel()), generator=g)
    boot = diff[idx].mean(1)
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"accuracy_a": float(a.double().mean()), "accuracy_b": float(b.double().mean()),
            "difference": float(diff.mean()), "a_only": a_only, "b_only": b_only,
            "mcnemar_p": _mcnemar_exact(a_only, b_only), "ci_low": low, "ci_high": high}
