"""The 3D UNet used to produce lesion probability maps (logits) from multi-sequence MRI.

Architecture (as in the paper's experiments: a 5-level 3D UNet with 32 base filters):

- ``levels`` resolution levels with ``base_filters * 2**l`` feature maps at level ``l``
  (32, 64, 128, 256, 512 by default).
- Every level (encoder and decoder) has one *double-conv block*:
  ``Conv3d 3x3x3 -> InstanceNorm3d(affine=True) -> LeakyReLU(0.01) -> Dropout3d(p)``
  ``-> Conv3d 3x3x3 -> InstanceNorm3d(affine=True) -> LeakyReLU(0.01)``.
  Dropout (channel-wise ``Dropout3d``) sits between the two convolutions of every block, so each
  block's output is never dropped directly before a skip connection or the final 1x1x1 conv.
  ``dropout=0`` removes the dropout layers entirely.
  The convolutions carry no bias: the instance norm subtracts the per-channel mean straight
  afterwards, so a bias would be cancelled exactly, and the norm's affine shift takes its role.
- Downsampling: ``MaxPool3d(2)`` (parameter-free, halves D, H and W). Max-pooling was chosen over a
  strided convolution because small lesions are a few voxels wide and max-pooling keeps a single
  bright voxel's response through every level, and because it keeps the parameter count at the
  classic UNet figure.
- Upsampling: ``ConvTranspose3d(kernel 2, stride 2, with bias)`` from ``f_{l+1}`` to ``f_l``
  channels, concatenated with the encoder's level-``l`` output (skip connection), then a
  double-conv block ``2 f_l -> f_l``.
- Head: ``Conv3d 1x1x1`` (with bias) to ``out_channels`` logits (no sigmoid).

Parameter count (``f_l = base_filters * 2**l``, ``C = in_channels``, ``O = out_channels``, ``L = levels``)::

    block(a, b) = 27*a*b + 27*b*b + 4*b                    # two convs + two affine norms
    total = block(C, f_0) + sum_{l=1}^{L-1} block(f_{l-1}, f_l)              # encoder
          + sum_{l=0}^{L-2} [8*f_{l+1}*f_l + f_l + block(2*f_l, f_l)]         # up-conv + decoder
          + O*f_0 + O                                                        # head

which is 22,581,729 for the defaults ``UNet3D(5, 1, 32, 5)`` (:func:`unet3d_parameter_count`).

Example:
    >>> import torch
    >>> from lesioncount.train.model import UNet3D
    >>> net = UNet3D(in_channels=5, out_channels=1, base_filters=8, levels=3).eval()
    >>> net(torch.zeros(2, 5, 8, 16, 16)).shape
    torch.Size([2, 1, 8, 16, 16])
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

__all__ = ["UNet3D", "DoubleConv3d", "unet3d_parameter_count"]


class DoubleConv3d(nn.Sequential):
    """Two ``3x3x3 conv -> InstanceNorm3d(affine) -> LeakyReLU(0.01)`` units, ``Dropout3d`` between them.

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)`` (padding 1 keeps the size).

    Example:
        >>> import torch
        >>> DoubleConv3d(2, 4, dropout=0.0)(torch.zeros(1, 2, 4, 4, 4)).shape
        torch.Size([1, 4, 4, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.1) -> None:
        layers: List[nn.Module] = [
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout3d(dropout))
        layers += [
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        ]
        super().__init__(*layers)


def unet3d_parameter_count(
    in_channels: int = 5, out_channels: int = 1, base_filters: int = 32, levels: int = 5
) -> int:
    """Closed-form number of trainable parameters of ``UNet3D(in_channels, out_channels, base_filters, levels)``.

    Independent of the module code (used by the tests to check the construction).

    Example:
        >>> unet3d_parameter_count()
        22581729
    """

    def block(a: int, b: int) -> int:
        return 27 * a * b + 27 * b * b + 4 * b

    f = [base_filters * 2**level for level in range(levels)]
    total = block(in_channels, f[0])
    total += sum(block(f[level - 1], f[level]) for level in range(1, levels))
    total += sum(8 * f[level + 1] * f[level] + f[level] + block(2 * f[level], f[level]) for level in range(levels - 1))
    total += out_channels * f[0] + out_channels
    return total


class UNet3D(nn.Module):
    """5-level 3D UNet mapping multi-sequence MRI to per-voxel lesion logits.

    Args:
        in_channels: input sequences ``C`` (5: T1, T1c, T2, FLAIR, PD).
        out_channels: output channels (1: lesion logit).
        base_filters: feature maps at full resolution; level ``l`` has ``base_filters * 2**l``.
        levels: number of resolution levels (>= 1); ``levels - 1`` poolings.
        dropout: ``Dropout3d`` probability inside every double-conv block (0 disables).

    Shapes:
        ``forward(x)``: ``x`` is ``(B, in_channels, D, H, W)`` float with ``D, H, W`` divisible by
        ``2**(levels-1)`` (16 by default); returns logits ``(B, out_channels, D, H, W)``.

    Example:
        >>> import torch
        >>> net = UNet3D(base_filters=4, levels=3)
        >>> net(torch.randn(1, 5, 4, 8, 12)).shape
        torch.Size([1, 1, 4, 8, 12])
        >>> net(torch.randn(1, 5, 4, 8, 10))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ValueError: UNet3D: spatial size (4, 8, 10) must be divisible by 4 ...
    """

    def __init__(
        self,
        in_channels: int = 5,
        out_channels: int = 1,
        base_filters: int = 32,
        levels: int = 5,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("base_filters", base_filters), ("levels", levels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNet3D: {name} must be a positive int, got {value!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"UNet3D: dropout must be in [0, 1), got {dropout!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_filters = base_filters
        self.levels = levels
        self.dropout = float(dropout)
        filters = [base_filters * 2**level for level in range(levels)]
        self.filters = filters

        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in filters:
            self.encoders.append(DoubleConv3d(previous, width, dropout))
            previous = width
        self.pool = nn.MaxPool3d(kernel_size=2, stride=2)
        # decoder level l (from levels-2 down to 0): up-conv f_{l+1} -> f_l, then block 2 f_l -> f_l
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(levels - 1)):
            self.upsamplers.append(nn.ConvTranspose3d(filters[level + 1], filters[level], kernel_size=2, stride=2))
            self.decoders.append(DoubleConv3d(2 * filters[level], filters[level], dropout))
        self.head = nn.Conv3d(filters[0], out_channels, kernel_size=1)

    @property
    def size_multiple(self) -> int:
        """Every spatial dimension of the input must be a multiple of this (``2**(levels-1)``)."""
        return 2 ** (self.levels - 1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, D, H, W)`` with sizes divisible by
        :attr:`size_multiple`.

        Example:
            >>> UNet3D(levels=2).check_input(torch.zeros(1, 5, 2, 4, 6))
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"UNet3D: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 5:
            raise ValueError(
                f"UNet3D: input must be 5-D (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet3D: input has {x.shape[1]} channels, the model expects in_channels={self.in_channels} "
                f"(shape {tuple(x.shape)})")
        spatial = tuple(int(s) for s in x.shape[2:])
        multiple = self.size_multiple
        if any(s == 0 or s % multiple for s in spatial):
            raise ValueError(
                f"UNet3D: spatial size {spatial} must be divisible by {multiple} = 2**(levels-1) with "
                f"levels={self.levels}; crop or pad the volume (e.g. to "
                f"{tuple(max(multiple, -(-s // multiple) * multiple) for s in spatial)})")
        if self.levels > 1 and all(s == multiple for s in spatial):
            raise ValueError(
                f"UNet3D: spatial size {spatial} leaves a single voxel at the bottleneck "
                f"(levels={self.levels}); instance norm needs more than one voxel: use at least "
                f"{2 * multiple} voxels along one axis")
        if not x.is_floating_point():
            raise TypeError(f"UNet3D: input must be a floating-point tensor, got {x.dtype}")

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The encoder's output at every level, shallowest first (the last is the bottleneck)."""
        self.check_input(x)
        skips: List[torch.Tensor] = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        return skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D, H, W)`` -> logits ``(B, out_channels, D, H, W)``."""
        skips = self.encode(x)
        x = skips.pop()
        for upsample, decoder in zip(self.upsamplers, self.decoders):
            x = upsample(x)
            x = decoder(torch.cat([skips.pop(), x], dim=1))
        return self.head(x)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"filters={self.filters}, dropout={self.dropout}")
