"""The paper's robustness evaluation: an adversarial attack on the count distribution (Section 4.2).

For a frozen model that yields a count distribution ``p(C | x)`` over the bins 0 .. M-1, M+ (this
method's count distribution of a UNet, or the softmax of a parametric count head:
:func:`lesioncount.train.count_heads.model_count_log_pmf`), the attack looks, per test case, for a
small perturbation ``delta`` of the input that maximises the entropy of the predicted count
distribution::

    maximise  J(delta) = H(p(C | x + delta)) - lambda * ||delta||_2^2     subject to  ||delta|| <= epsilon

starting from small Gaussian noise (``noise_init``, seeded) and taking ``steps`` normalised gradient
ascent steps of size ``step_size`` (l2: ``delta += step_size * g / ||g||_2``; linf:
``delta += step_size * sign(g)``), each followed by the projection onto the ``epsilon`` ball
(``norm="l2"``: the l2 norm over all channels and voxels of one case; ``"linf"``: the largest
absolute change of one voxel). The attacked prediction is the most likely count of
``p(C | x + delta)`` for the final ``delta``.

Scores (:func:`attack_scores`): **SR** (success rate) = share of cases whose most likely count
changes under the attack; **AD** (accuracy drop) = count accuracy on the clean inputs minus the count
accuracy under attack (both as fractions; the paper reports percentage points).

Parameters the paper states: epsilon = 0.5, an l2 penalty weighted by lambda, random noise init,
gradient-based optimisation of the entropy. Not stated (defaults here): the norm of epsilon (l2),
lambda (0.01), the number of steps (10), the step size (epsilon / 4) and the noise scale (1e-3 per
voxel).

Example:
    >>> import torch
    >>> from lesioncount.train.count_heads import CountHeadUNet
    >>> from lesioncount.train.attack import AttackConfig, attack_count_entropy
    >>> net = CountHeadUNet("bottleneck", base_filters=2, levels=2, head_filters=2)
    >>> res = attack_count_entropy(net, torch.randn(2, 5, 4, 8, 8), AttackConfig(steps=2))
    >>> bool((res.delta_norm <= 0.5 + 1e-5).all()), res.attacked_log_pmf.shape
    (True, torch.Size([2, 5]))
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch

from .._validation import DEFAULT_CONNECTIVITY

__all__ = ["AttackConfig", "AttackResult", "attack_count_entropy", "attack_scores", "entropy_from_log_pmf",
           "replace_counting"]

NORMS = ("l2", "linf")


@dataclass
class AttackConfig:
    """Settings of :func:`attack_count_entropy` (see the module docstring for the objective).

    Attributes:
        epsilon: radius of the perturbation budget (paper: 0.5) in ``norm``.
        lam: lambda, weight of the squared-l2 penalty ``lambda * ||delta||_2^2`` in the objective.
        steps: gradient ascent steps (0: the initial noise only).
        step_size: ascent step length; None = ``epsilon / 4``.
        noise_init: standard deviation of the Gaussian initial noise per voxel (then projected).
        norm: ``"l2"`` (per case over all channels and voxels) or ``"linf"``.
        seed: seed of the initial noise; case ``i`` of a call draws from ``seed`` and
            ``index_offset + i``, so results do not depend on the batch size.
        threshold, connectivity, max_count: the count distribution of a plain UNet (this method).

    Example:
        >>> AttackConfig(epsilon=1.0).resolved_step_size()
        0.25
    """

    epsilon: float = 0.5
    lam: float = 0.01
    steps: int = 10
    step_size: float | None = None
    noise_init: float = 1e-3
    norm: str = "l2"
    seed: int = 0
    threshold: float = 0.1
    connectivity: int = DEFAULT_CONNECTIVITY[3]
    max_count: int = 4

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"AttackConfig: `{name}` must be {what}, got {getattr(self, name)!r}")

        def num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(num(self.epsilon) and self.epsilon > 0, "epsilon", "a number > 0")
        need(num(self.lam) and self.lam >= 0, "lam", "a number >= 0")
        need(isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 0, "steps",
             "an int >= 0")
        need(self.step_size is None or (num(self.step_size) and self.step_size > 0), "step_size",
             "a number > 0 or None")
        need(num(self.noise_init) and self.noise_init >= 0, "noise_init", "a number >= 0")
        need(self.norm in NORMS, "norm", f"one of {NORMS}")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "an int >= 0")

    def resolved_step_size(self) -> float:
        """``step_size``, or ``epsilon / 4`` when it is None."""
        return float(self.step_size) if self.step_size is not None else self.epsilon / 4

    def to_dict(self) -> dict:
        """Plain dict of the settings (for reports)."""
        out = asdict(self)
        out["step_size"] = self.resolved_step_size()
        return out


def replace_counting(config: AttackConfig, threshold: float, connectivity: int, max_count: int) -> AttackConfig:
    """A copy of ``config`` whose count distribution settings are those of an evaluation.

    Example:
        >>> replace_counting(AttackConfig(), 0.2, 26, 3).threshold
        0.2
    """
    return dataclasses.replace(config, threshold=float(threshold), connectivity=int(connectivity),
                               max_count=int(max_count))


class AttackResult(NamedTuple):
    """Output of :func:`attack_count_entropy` (B cases, M+1 bins), all detached.

    ``delta`` (B, C, D, H, W) the final perturbation; ``delta_norm`` (B,) its norm in the config's
    ``norm``; ``clean_log_pmf`` / ``attacked_log_pmf`` (B, M+1); ``clean_entropy`` /
    ``attacked_entropy`` (B,) in nats.
    """

    delta: torch.Tensor
    delta_norm: torch.Tensor
    clean_log_pmf: torch.Tensor
    attacked_log_pmf: torch.Tensor
    clean_entropy: torch.Tensor
    attacked_entropy: torch.Tensor


def entropy_from_log_pmf(log_pmf: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of ``log_pmf`` (B, K), differentiable; zero-probability bins
    (``-inf``) contribute 0 and no NaN gradient.

    Example:
        >>> entropy_from_log_pmf(torch.log(torch.tensor([[0.5, 0.5, 0.0]])))
        tensor([0.6931])
    """
    p = log_pmf.exp()
    return -(p * log_pmf.clamp_min(-1e4)).sum(dim=1)


def _norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def _project(delta: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = torch.clamp(epsilon / n, max=1.0).view(-1, *([1] * (delta.dim() - 1)))
    return delta * scale


def attack_count_entropy(model: torch.nn.Module, image: torch.Tensor, config: AttackConfig | None = None, *,
                         count_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         index_offset: int = 0) -> AttackResult:
    """Entropy-maximising attack on the count distribution of ``model`` (frozen, eval mode).

    Args:
        model: a UNet (count distribution at ``config.threshold``) or a count-head model; its
            parameters are not changed and get no ``.grad``; its train/eval mode is restored.
        image: (B, C, D, H, W) clean inputs.
        config: :class:`AttackConfig` (defaults: epsilon 0.5 in l2, lambda 0.01, 10 steps).
        count_fn: optional ``image -> log_pmf (B, M+1)`` replacing the model's own count
            distribution (any differentiable count model).
        index_offset: dataset index of ``image[0]`` (seeds the initial noise per case).

    Returns:
        :class:`AttackResult`; ``delta_norm <= epsilon`` always holds.

    Example:
        >>> res = attack_count_entropy(unet, image, AttackConfig(steps=5))          # doctest: +SKIP
        >>> (res.attacked_entropy >= res.clean_entropy).float().mean()            # doctest: +SKIP
    """
    from .count_heads import model_count_log_pmf

    config = config or AttackConfig()
    if not isinstance(image, torch.Tensor) or image.dim() < 2 or not image.is_floating_point():
        raise ValueError(f"`image` must be a floating-point (B, C, ...) tensor, got "
                         f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}")
    if count_fn is None:
        def count_fn(x: torch.Tensor) -> torch.Tensor:
            return model_count_log_pmf(model, x, threshold=config.threshold, connectivity=config.connectivity,
                                       max_count=config.max_count)[0]
    was_training = model.training
    model.eval()
    try:
        image = image.detach()
        noise = torch.empty_like(image)
        for i in range(image.shape[0]):
            g = torch.Generator(device="cpu").manual_seed(config.seed * 1_000_003 + index_offset + i)
            noise[i] = torch.randn(image.shape[1:], generator=g, dtype=torch.float32).to(image)
        with torch.no_grad():
            clean_log_pmf = count_fn(image).float()
        delta = _project(noise * config.noise_init, config.epsilon, config.norm)
        alpha = config.resolved_step_size()
        view = (-1,) + (1,) * (image.dim() - 1)
        for _ in range(config.steps):
            delta = delta.detach().requires_grad_(True)
            with torch.enable_grad():
                log_pmf = count_fn(image + delta).float()
                objective = entropy_from_log_pmf(log_pmf) - config.lam * delta.flatten(1).pow(2).sum(1)
                (grad,) = torch.autograd.grad(objective.sum(), delta)
            with torch.no_grad():
                if config.norm == "l2":
                    step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
                else:
                    step = grad.sign()
                delta = _project(delta + alpha * step, config.epsilon, config.norm)
        delta = delta.detach()
        with torch.no_grad():
            attacked_log_pmf = count_fn(image + delta).float()
        return AttackResult(delta=delta, delta_norm=_norm(delta, config.norm), clean_log_pmf=clean_log_pmf,
                            attacked_log_pmf=attacked_log_pmf, clean_entropy=entropy_from_log_pmf(clean_log_pmf),
                            attacked_entropy=entropy_from_log_pmf(attacked_log_pmf))
    finally:
        model.train(was_training)


def attack_scores(clean_pred, attacked_pred, target, max_count: int = 4) -> dict:
    """SR and AD of an attack from the most likely counts before and after it.

    Args:
        clean_pred, attacked_pred: (N,) most likely count bins (0 .. M) without / with the attack.
        target: (N,) true counts (>= M scored as the bin M).

    Returns:
        dict of floats: ``success_rate`` (share of cases whose prediction changed),
        ``accuracy_clean``, ``accuracy_attacked`` and ``accuracy_drop`` (clean - attacked), all in [0, 1]
        (``accuracy_drop`` in [-1, 1]).

    Example:
        >>> attack_scores(torch.tensor([0, 1, 2, 4]), torch.tensor([0, 2, 2, 3]), torch.tensor([0, 1, 3, 6]))
        {'success_rate': 0.5, 'accuracy_clean': 0.75, 'accuracy_attacked': 0.25, 'accuracy_drop': 0.5}
    """
    clean = torch.as_tensor(clean_pred).reshape(-1).long().cpu()
    attacked = torch.as_tensor(attacked_pred).reshape(-1).long().cpu()
    t = torch.as_tensor(target).reshape(-1).long().cpu().clamp(0, max_count)
    if not (clean.shape == attacked.shape == t.shape) or clean.numel() == 0:
        raise ValueError(f"`clean_pred`, `attacked_pred` and `target` must be equal-length non-empty (N,) tensors, "
                         f"got {tuple(clean.shape)}, {tuple(attacked.shape)}, {tuple(t.shape)}")
    acc_clean = float((clean == t).double().mean())
    acc_attacked = float((attacked == t).double().mean())
    return {"success_rate": float((clean != attacked).double().mean()), "accuracy_clean": acc_clean,
            "accuracy_attacked": acc_attacked, "accuracy_drop": acc_clean - acc_attacked}
