"""Parametric count-head baselines of the paper (Section 4.2, Appendix B): a count classifier on the
shared UNet, trained multi-task with the segmentation loss.

Three models, all built on the same :class:`~lesioncount.train.model.UNet3D` and differing only in
where the count network reads from:

- ``bottleneck``: the UNet's bottleneck representation (output of the deepest encoder block,
  ``filters[-1]`` channels at ``1 / 2**(levels-1)`` resolution); a *shallow* count network of 3 blocks.
- ``multihead``: the representation after the second-to-last decoder block (``decoders[-2]``:
  ``filters[1]`` channels at half resolution); a *deep* count network (7 conv layers). The paper
  trains this head at learning rate 1e-5 (:func:`parameter_groups`).
- ``downstream``: the segmentation output (the voxel probabilities ``sigmoid(logits)``, one channel
  at full resolution); a *deep* count network.

Count network (fully convolutional): a *block* is ``ReLU -> Conv3d 3x3x3 -> AvgPool3d(2) ->
Dropout3d`` (no dropout in the last block); the deep variant adds one more ``ReLU -> Conv3d 3x3x3``
at the start of every block. Three blocks, then ``ReLU -> Conv3d 1x1x1`` to the ``M + 1`` count
classes (0 .. M-1 and M+) and a global average over space: 3 + 1 conv layers (shallow; the paper's
"3 blocks") or 6 + 1 = 7 (deep; the paper's "7 layers"). Average pooling halves every dimension
that is at least 2 (a dimension already at 1 voxel is kept), so the head works at any input size.
Counts are classes with cross-entropy (:func:`head_count_loss`); the count distribution of a head
model is ``softmax`` of its count logits, over the same bins as
:func:`lesioncount.count_distribution`, so every metric, plot and the attack
(:mod:`lesioncount.train.attack`) apply to all models alike.

Choices the paper does not state, made here: the head width (``count_head_filters``, default 32),
3x3x3 kernels with padding 1, the head's dropout = the UNet's ``dropout``, and the Downstream input
being the probabilities rather than the logits.

Example:
    >>> import torch
    >>> from lesioncount.train.count_heads import CountHeadUNet
    >>> net = CountHeadUNet("bottleneck", base_filters=4, levels=3, head_filters=8).eval()
    >>> seg, count_logits = net(torch.randn(2, 5, 8, 16, 16), with_count=True)
    >>> seg.shape, count_logits.shape
    (torch.Size([2, 1, 8, 16, 16]), torch.Size([2, 5]))
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import DEFAULT_CONNECTIVITY
from .model import UNet3D

__all__ = [
    "HEAD_MODELS",
    "MODEL_TYPES",
    "CountHeadUNet",
    "CountNetwork3d",
    "build_model",
    "has_count_head",
    "head_count_loss",
    "model_count_log_pmf",
    "parameter_groups",
    "unwrap",
]

HEAD_MODELS = ("bottleneck", "multihead", "downstream")
MODEL_TYPES = ("unet",) + HEAD_MODELS
# the paper's learning rate of the Multi-Head count head (Appendix B)
MULTIHEAD_HEAD_LR = 1e-5


class _HalvingAvgPool3d(nn.Module):
    """Average pooling with kernel / stride 2 along every dimension of size >= 2 (size-1 dims kept)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = [2 if s >= 2 else 1 for s in x.shape[2:]]
        if kernel == [1, 1, 1]:
            return x
        return F.avg_pool3d(x, kernel_size=kernel, stride=kernel)


class CountNetwork3d(nn.Module):
    """Fully convolutional count classifier ``(B, C, D, H, W) -> (B, num_classes)`` logits.

    Args:
        in_channels: channels of the representation it reads.
        num_classes: count classes (``max_count + 1``: 0 .. M-1 and M+).
        filters: width of every hidden convolution.
        deep: two ``ReLU -> Conv3d`` per block (7 conv layers in all) instead of one (4).
        blocks: number of pooling blocks (3 in the paper).
        dropout: ``Dropout3d`` after the pooling of every block but the last.

    Example:
        >>> CountNetwork3d(16, 5, filters=8)(torch.randn(2, 16, 2, 4, 4)).shape
        torch.Size([2, 5])
        >>> sum(isinstance(m, nn.Conv3d) for m in CountNetwork3d(1, 5, deep=True).modules())
        7
    """

    def __init__(self, in_channels: int, num_classes: int, filters: int = 32, deep: bool = False,
                 blocks: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("filters", filters),
                            ("blocks", blocks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CountNetwork3d: {name} must be a positive int, got {value!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"CountNetwork3d: dropout must be in [0, 1), got {dropout!r}")
        layers: List[nn.Module] = []
        previous = in_channels
        for b in range(blocks):
            for _ in range(2 if deep else 1):
                layers += [nn.ReLU(), nn.Conv3d(previous, filters, kernel_size=3, padding=1)]
                previous = filters
            layers.append(_HalvingAvgPool3d())
            if dropout > 0 and b < blocks - 1:
                layers.append(nn.Dropout3d(dropout))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.ReLU(), nn.Conv3d(previous, num_classes, kernel_size=1))
        self.deep = deep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D, H, W)`` -> count logits ``(B, num_classes)`` (global spatial mean)."""
        return self.classifier(self.features(x)).mean(dim=(2, 3, 4))


class CountHeadUNet(nn.Module):
    """A :class:`UNet3D` with a parametric count head (``bottleneck``, ``multihead`` or ``downstream``).

    ``forward(x)`` returns the segmentation logits ``(B, 1, D, H, W)`` exactly like the plain UNet
    (so segmentation metrics and checkpoints' consumers need nothing else);
    ``forward(x, with_count=True)`` returns ``(logits, count_logits)`` with count logits
    ``(B, max_count + 1)`` over the bins 0 .. M-1, M+. The count head reads the shared UNet's
    features, so the count loss trains the UNet too.

    Args:
        kind: ``"bottleneck"``, ``"multihead"`` or ``"downstream"``.
        in_channels, out_channels, base_filters, levels, dropout: as :class:`UNet3D`.
        max_count: M (classes 0 .. M-1 and M+).
        head_filters: width of the count network.

    Example:
        >>> net = CountHeadUNet("downstream", base_filters=4, levels=3, head_filters=4)
        >>> net(torch.randn(1, 5, 8, 16, 16)).shape
        torch.Size([1, 1, 8, 16, 16])
    """

    has_count_head = True

    def __init__(self, kind: str, in_channels: int = 5, out_channels: int = 1, base_filters: int = 32,
                 levels: int = 5, dropout: float = 0.1, max_count: int = 4, head_filters: int = 32) -> None:
        super().__init__()
        if kind not in HEAD_MODELS:
            raise ValueError(f"CountHeadUNet: kind must be one of {HEAD_MODELS}, got {kind!r}")
        if kind == "multihead" and levels < 3:
            raise ValueError("CountHeadUNet: kind='multihead' reads the second-to-last decoder block and needs "
                             f"levels >= 3 (a decoder with two blocks), got levels={levels}")
        if not isinstance(max_count, int) or isinstance(max_count, bool) or max_count < 1:
            raise ValueError(f"CountHeadUNet: max_count must be an int >= 1, got {max_count!r}")
        self.kind = kind
        self.max_count = max_count
        self.unet = UNet3D(in_channels=in_channels, out_channels=out_channels, base_filters=base_filters,
                           levels=levels, dropout=dropout)
        if kind == "bottleneck":
            channels, deep = self.unet.filters[-1], False
        elif kind == "multihead":
            channels, deep = self.unet.filters[1], True
        else:
            channels, deep = out_channels, True
        # the head's initial weights are drawn from a fork of the global stream, which is left where the
        # UNet left it: dropout during the segmentation-only epochs then matches a plain UNet's run bit for bit
        with torch.random.fork_rng(devices=[]):
            self.count_head = CountNetwork3d(channels, max_count + 1, filters=head_filters, deep=deep,
                                             dropout=dropout)

    # the UNet's attributes that callers use (checks, sizes)
    @property
    def in_channels(self) -> int:
        return self.unet.in_channels

    @property
    def head(self) -> nn.Module:
        """The UNet's 1x1x1 output convolution (as :attr:`UNet3D.head`)."""
        return self.unet.head

    def forward(self, x: torch.Tensor, with_count: bool = False):
        """``x`` (B, C, D, H, W) -> logits (B, 1, D, H, W), or ``(logits, count_logits (B, M+1))``."""
        unet = self.unet
        skips = unet.encode(x)
        features = None
        x = skips.pop()
        if self.kind == "bottleneck":
            features = x
        last = len(unet.decoders) - 1
        for i, (upsample, decoder) in enumerate(zip(unet.upsamplers, unet.decoders)):
            x = upsample(x)
            x = decoder(torch.cat([skips.pop(), x], dim=1))
            if self.kind == "multihead" and i == last - 1:
                features = x
        logits = unet.head(x)
        if not with_count:
            return logits
        if self.kind == "downstream":
            features = torch.sigmoid(logits)
        return logits, self.count_head(features)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, max_count={self.max_count}"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or ``model``)."""
    return getattr(model, "module", model)


def has_count_head(model: nn.Module) -> bool:
    """True for a :class:`CountHeadUNet` (also wrapped in DDP).

    Example:
        >>> has_count_head(UNet3D(base_filters=2, levels=2)), has_count_head(CountHeadUNet("bottleneck", levels=2))
        (False, True)
    """
    return bool(getattr(unwrap(model), "has_count_head", False))


def build_model(config, in_channels: int) -> nn.Module:
    """The network of a training run: :class:`UNet3D` for ``config.model == "unet"``, else a
    :class:`CountHeadUNet`. The UNet is built first and its output bias set to
    ``logit(config.output_prior)``, so every model of one seed starts from the same UNet weights.

    Example:
        >>> from lesioncount.train.config import TrainConfig
        >>> cfg = TrainConfig(model="multihead", base_filters=4, levels=3, shape=(8, 16, 16))
        >>> type(build_model(cfg, 5)).__name__
        'CountHeadUNet'
    """
    kind = getattr(config, "model", "unet")
    if kind not in MODEL_TYPES:
        raise ValueError(f"`model` must be one of {MODEL_TYPES}, got {kind!r}")
    unet_kwargs = dict(in_channels=in_channels, out_channels=1, base_filters=config.base_filters,
                       levels=config.levels, dropout=config.dropout)
    if kind == "unet":
        model = UNet3D(**unet_kwargs)
    else:
        # the CountHeadUNet creates its UNet before its head: same initial UNet weights as "unet"
        model = CountHeadUNet(kind, max_count=config.max_count, head_filters=config.count_head_filters,
                              **unet_kwargs)
    if config.output_prior is not None:
        with torch.no_grad():
            model.head.bias.fill_(math.log(config.output_prior / (1.0 - config.output_prior)))
    return model


def head_learning_rate(config) -> float:
    """Learning rate of the count head: ``count_head_lr`` when set, else 1e-5 for ``multihead`` (the
    paper's) and ``lr`` for the others.

    Example:
        >>> from lesioncount.train.config import TrainConfig
        >>> head_learning_rate(TrainConfig(model="multihead")), head_learning_rate(TrainConfig(model="bottleneck"))
        (1e-05, 0.0001)
    """
    if getattr(config, "count_head_lr", None) is not None:
        return float(config.count_head_lr)
    return MULTIHEAD_HEAD_LR if getattr(config, "model", "unet") == "multihead" else float(config.lr)


def parameter_groups(model: nn.Module, config) -> list:
    """Optimiser parameter groups: the UNet at ``config.lr``, a count head at :func:`head_learning_rate`.

    Example:
        >>> from lesioncount.train.config import TrainConfig
        >>> cfg = TrainConfig(model="multihead", base_filters=2, levels=3)
        >>> [g["lr"] for g in parameter_groups(build_model(cfg, 5), cfg)]
        [0.0001, 1e-05]
    """
    model = unwrap(model)
    if not has_count_head(model):
        return [{"params": list(model.parameters()), "lr": float(config.lr)}]
    return [{"params": list(model.unet.parameters()), "lr": float(config.lr)},
            {"params": list(model.count_head.parameters()), "lr": head_learning_rate(config)}]


def head_count_loss(count_logits: torch.Tensor, counts: torch.Tensor, max_count: int = 4):
    """Cross-entropy of the count classes (the paper's head loss), in float32.

    Shapes: ``count_logits`` (B, M+1), ``counts`` (B,) true counts (>= M scored as the class M+).
    Returns ``(loss, nll)``: the batch-mean cross-entropy and the detached per-item ``-log P(C = count)``
    (always finite), matching :func:`lesioncount.train.loop.count_loss_term`'s outputs.

    Example:
        >>> loss, nll = head_count_loss(torch.zeros(2, 5), torch.tensor([0, 7]))
        >>> round(float(loss), 4), [round(v, 4) for v in nll.tolist()]
        (1.6094, [1.6094, 1.6094])
    """
    counts = torch.as_tensor(counts)
    if counts.dim() != 1 or counts.shape[0] != count_logits.shape[0] or counts.dtype.is_floating_point:
        raise ValueError(f"`counts` must be a (B,) integer tensor with B = {count_logits.shape[0]}, got "
                         f"{tuple(counts.shape)} {counts.dtype}")
    if count_logits.dim() != 2 or count_logits.shape[1] != max_count + 1:
        raise ValueError(f"`count_logits` must be (B, max_count + 1) = (B, {max_count + 1}), got "
                         f"{tuple(count_logits.shape)}")
    target = counts.to(count_logits.device).long().clamp(0, max_count)
    with torch.autocast(device_type=count_logits.device.type, enabled=False):
        nll = F.cross_entropy(count_logits.float(), target, reduction="none")
    return nll.mean(), nll.detach()


def model_count_log_pmf(model: nn.Module, image: torch.Tensor, *, threshold: float = 0.1,
                        connectivity: int = DEFAULT_CONNECTIVITY[3], max_count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The count distribution of any model of this package, differentiable in ``image``.

    A :class:`CountHeadUNet` gives ``log_softmax`` of its count logits; a plain UNet the log-pmf of
    :func:`lesioncount.count_distribution` of its logits at ``threshold`` (this method).

    Shapes: ``image`` (B, C, D, H, W) -> ``(log_pmf (B, M+1), seg_logits (B, 1, D, H, W))``.

    Example:
        >>> net = CountHeadUNet("bottleneck", base_filters=2, levels=2, head_filters=2).eval()
        >>> with torch.no_grad():
        ...     log_pmf, _ = model_count_log_pmf(net, torch.randn(1, 5, 4, 8, 8))
        >>> round(float(log_pmf.exp().sum()), 5)
        1.0
    """
    if has_count_head(model):
        logits, count_logits = model(image, with_count=True)
        return F.log_softmax(count_logits.float(), dim=1), logits
    import lesioncount

    logits = model(image).float()
    result = lesioncount.count_distribution(logits, threshold=threshold, connectivity=connectivity,
                                            max_count=max_count, from_logits=True)
    return result.log_pmf, logits
