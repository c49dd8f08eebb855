"""Tests for lesioncount.train.model.UNet3D: shapes, input checks, gradients, parameter count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lesioncount.train.model import UNet3D, unet3d_parameter_count


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize("levels,shape", [(1, (3, 5, 7)), (2, (4, 6, 8)), (3, (8, 16, 12)), (4, (8, 16, 24))])
def test_output_shape_non_cubic(levels, shape):
    torch.manual_seed(0)
    net = UNet3D(in_channels=5, out_channels=2, base_filters=4, levels=levels)
    out = net(torch.randn(2, 5, *shape))
    assert out.shape == (2, 2, *shape)
    assert out.dtype == torch.float32


def test_default_configuration():
    net = UNet3D()
    assert net.filters == [32, 64, 128, 256, 512]
    assert net.size_multiple == 16
    # every level (5 encoder + 4 decoder blocks) has 2 convs with affine instance norm and LeakyReLU(0.01)
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(norms) == 18 and all(m.affine for m in norms)
    slopes = {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.01}
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout3d)]
    assert len(drops) == 9 and all(m.p == 0.1 for m in drops)
    assert sum(isinstance(m, nn.MaxPool3d) for m in net.modules()) == 1  # shared, parameter-free
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose3d)]
    assert [(m.in_channels, m.out_channels) for m in ups] == [(512, 256), (256, 128), (128, 64), (64, 32)]
    assert net.head.kernel_size == (1, 1, 1) and net.head.out_channels == 1
    assert not any(isinstance(m, nn.Dropout3d) for m in UNet3D(dropout=0.0).modules())


def test_parameter_count_hand_computed():
    # levels=2, C=1, base 2, O=1, counted by hand from the layer list:
    # enc0: conv 27*1*2=54, norm 4, conv 27*2*2=108, norm 4          -> 170
    # enc1: conv 27*2*4=216, norm 8, conv 27*4*4=432, norm 8         -> 664
    # up:   convT 8*4*2=64 + bias 2                                   -> 66
    # dec0: conv 27*4*2=216, norm 4, conv 27*2*2=108, norm 4         -> 332
    # head: 1*2 + 1                                                   -> 3
    net = UNet3D(in_channels=1, out_channels=1, base_filters=2, levels=2)
    assert _num_params(net) == 170 + 664 + 66 + 332 + 3 == 1235
    assert unet3d_parameter_count(1, 1, 2, 2) == 1235


@pytest.mark.parametrize("cfg", [(5, 1, 32, 5), (1, 1, 8, 1), (3, 2, 6, 3), (5, 1, 16, 4)])
def test_parameter_count_formula(cfg):
    assert _num_params(UNet3D(*cfg)) == unet3d_parameter_count(*cfg)


def test_default_parameter_count_value():
    assert _num_params(UNet3D()) == 22_581_729


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 5, 8, 16, 10), r"\(8, 16, 10\) must be divisible by 4"),
        ((1, 5, 6, 16, 16), r"divisible by 4"),
        ((1, 3, 8, 16, 16), r"3 channels.*in_channels=5"),
        ((5, 8, 16, 16), r"5-D"),
        ((1, 5, 4, 4, 4), r"single voxel at the bottleneck"),
    ],
)
def test_bad_input_shapes(shape, match):
    net = UNet3D(base_filters=2, levels=3)
    with pytest.raises(ValueError, match=match):
        net(torch.zeros(shape))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="levels"):
        UNet3D(levels=0)
    with pytest.raises(ValueError, match="dropout"):
        UNet3D(dropout=1.0)
    with pytest.raises(TypeError, match="floating-point"):
        UNet3D(base_filters=2, levels=2)(torch.zeros(1, 5, 4, 4, 4, dtype=torch.int64))


def test_gradient_reaches_every_parameter_and_input():
    torch.manual_seed(1)
    net = UNet3D(in_channels=2, base_filters=4, levels=3, dropout=0.0)
    x = torch.randn(2, 2, 8, 8, 12, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8, 12) > 0.8).float()
    loss = nn.functional.binary_cross_entropy_with_logits(net(x), target)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    torch.manual_seed(2)
    net = UNet3D(in_channels=5, base_filters=4, levels=3, dropout=0.5)
    x = torch.randn(1, 5, 8, 8, 8)
    net.eval()
    with torch.no_grad():
        a, b = net(x), net(x)
    assert torch.equal(a, b)
    # same seed -> same initial weights -> same eval output
    torch.manual_seed(2)
    twin = UNet3D(in_channels=5, base_filters=4, levels=3, dropout=0.5).eval()
    with torch.no_grad():
        assert torch.equal(twin(x), a)
    net.train()
    with torch.no_grad():
        c, d = net(x), net(x)
    assert not torch.equal(c, d)
