"""Framework-independent pieces of the nnU-Net / MONAI adapters: lesion maps from channel-first
outputs, ground-truth counts from framework targets, the count term, the weight schedule, and the
errors when an extra is missing."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from lesioncount import count_weight_schedule
from lesioncount._adapters import count_term, lesion_map, resolve_channels, target_counts
from lesioncount._extras import MissingExtraError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_softmax_lesion_logit_is_exact_for_saturated_logits():
    z = torch.tensor([[0.0, 40.0, -5.0], [3.0, -60.0, -70.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    z = z.T.reshape(1, 3, 3, 1)  # (B=1, C=3, H=3, W=1)
    x, from_logits = lesion_map(z, (1, 2), "softmax")
    assert from_logits and x.shape == (1, 3, 1)
    p = torch.softmax(z, 1)[:, 1:].sum(1)
    torch.testing.assert_close(torch.sigmoid(x), p)
    # logit of P(fg) when P(fg) underflows in probability space: still finite and exact
    assert x[0, 1, 0].item() == pytest.approx(math.log(math.exp(-60.0) + math.exp(-70.0)) - 3.0, rel=1e-12)


def test_probability_channels_are_summed_and_sigmoid_takes_one_channel():
    p = torch.tensor([0.5, 0.3, 0.2]).reshape(1, 3, 1, 1)
    x, from_logits = lesion_map(p, (1, 2), "none")
    assert not from_logits and x.item() == pytest.approx(0.5)
    x, from_logits = lesion_map(torch.full((1, 2, 2, 2), 1.5), (1,), "sigmoid")
    assert from_logits and torch.equal(x, torch.full((1, 2, 2), 1.5))


@pytest.mark.parametrize("args, match", [
    ((3, None, True, "softmax"), "cover every class"),
    ((3, None, False, "sigmoid"), "one channel"),
    ((3, [3], False, "none"), r"in \[0, 3\)"),
    ((3, [1, 1], False, "none"), "repeated"),
    ((3, [], False, "none"), "at least one"),
    ((3, "x", False, "none"), "channel indices"),
    ((3, None, False, "tanh"), "activation"),
])
def test_resolve_channels_errors(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        resolve_channels(*args)


def test_resolve_channels_defaults():
    assert resolve_channels(1, None, False, "sigmoid") == (0,)  # a single channel is never dropped
    assert resolve_channels(4, None, False, "softmax") == (1, 2, 3)
    assert resolve_channels(4, [3, 1], False, "softmax") == (1, 3)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_target_counts_match_scipy_for_label_maps_and_one_hot(rng, connectivity):
    labels = rng.integers(0, 3, size=(3, 6, 7, 8)) * (rng.random((3, 6, 7, 8)) < 0.15)
    structure = ndi.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    lesion = np.isin(labels, [1, 2])
    expected = [ndi.label(lesion[b], structure)[1] for b in range(3)]
    t = torch.from_numpy(labels).float().unsqueeze(1)
    kw = dict(num_channels=3, channels=(1, 2), spatial_shape=(6, 7, 8), threshold=0.1,
              connectivity=connectivity, min_size=0)
    assert target_counts(t, **kw).tolist() == expected
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(labels), 3).permute(0, 4, 1, 2, 3).float()
    assert target_counts(one_hot, **kw).tolist() == expected
    only2 = [ndi.label(labels[b] == 2, structure)[1] for b in range(3)]
    assert target_counts(t, **dict(kw, channels=(2,))).tolist() == only2


def test_target_counts_min_size_mask_and_counts():
    t = torch.zeros(1, 1, 5, 5, 5)
    t[0, 0, 0, 0, 0] = 1
    t[0, 0, 3:5, 3:5, 3:5] = 1
    kw = dict(num_channels=1, channels=(0,), spatial_shape=(5, 5, 5), threshold=0.1, connectivity=26)
    assert target_counts(t, min_size=0, **kw).tolist() == [2]
    assert target_counts(t, min_size=2, **kw).tolist() == [1]
    mask = torch.ones(1, 5, 5, 5, dtype=torch.bool)
    mask[0, 3:, 3:, 3:] = False
    assert target_counts(t, min_size=0, mask=mask, **kw).tolist() == [1]
    assert target_counts(torch.tensor([3, 0]), min_size=0, **kw).tolist() == [3, 0]
    with pytest.raises(ValueError, match=">= 0"):
        target_counts(torch.tensor([-1]), min_size=0, **kw)
    with pytest.raises(ValueError, match="spatial shape"):
        target_counts(torch.zeros(1, 1, 4, 4, 4), min_size=0, **kw)


def test_count_term_averages_the_feasible_items():
    x = torch.full((3, 4, 8, 8), -9.0, dtype=torch.float64)
    x[:, 1, 2, 2] = 2.0
    x.requires_grad_(True)
    term = count_term(x, True, torch.tensor([1, 2, 0]), max_count=4)
    p = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))
    assert math.isinf(term.nll[1])
    torch.testing.assert_close(term.nll[[0, 2]], torch.stack([-p.log(), -(1 - p).log()]))
    torch.testing.assert_close(term.loss, (term.nll[0] + term.nll[2]) / 2)  # infeasible item left out of the mean
    term.loss.backward()
    assert int((x.grad != 0).sum()) == 2 and x.grad[1].abs().sum() == 0  # infeasible item: no gradient


def test_count_weight_schedule():
    assert count_weight_schedule(0) == pytest.approx(1e-3)
    assert count_weight_schedule(19, pretrain_epochs=20) == 0.0
    assert count_weight_schedule(30, pretrain_epochs=20) == pytest.approx(1e-3 * math.exp(0.6))
    assert count_weight_schedule(20_000, pretrain_epochs=20) == math.inf
    assert count_weight_schedule(20_000, pretrain_epochs=20, max_weight=2.0) == 2.0
    assert count_weight_schedule(5, w1=0.0) == 0.0
    for kwargs, match in [({"w1": -1.0}, "w1"), ({"w2": math.nan}, "w2"), ({"epoch": -1}, "epoch"),
                          ({"pretrain_epochs": 1.5}, "pretrain_epochs"), ({"max_weight": -1}, "max_weight")]:
        with pytest.raises(ValueError, match=match):
            count_weight_schedule(**{"epoch": 3, **kwargs})


@pytest.mark.parametrize("module, extra", [("lesioncount.nnunet.trainer", "nnunet"), ("lesioncount.monai", "monai")])
def test_missing_framework_names_the_extra(monkeypatch, module, extra):
    dist = "nnunetv2" if extra == "nnunet" else "monai"
    monkeypatch.setitem(sys.modules, dist, None)  # import of it fails
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(MissingExtraError, match=rf"lesioncount\[{extra}\]"):
        __import__(module)


def test_nnunet_train_cli_without_nnunet_exits_2(monkeypatch, capsys):
    from lesioncount.cli import main

    monkeypatch.setitem(sys.modules, "nnunetv2", None)
    assert main(["nnunet-train", "990", "3d_fullres", "0"]) == 2
    assert "lesioncount[nnunet]" in capsys.readouterr().err
