"""lesioncount.CountLoss: the negative log-likelihood of the observed lesion count."""

from __future__ import annotations

import math

import pytest
import torch

import lesioncount as lc
from conftest import blobs_volume, make_rng, random_probs


def _volume(dtype=torch.float64):
    centers = [(2, 2, 2), (2, 2, 7), (6, 6, 3), (7, 2, 7)]
    a = blobs_volume((10, 9, 10), centers, [0.9, 0.55, 0.35, 0.7])
    b = blobs_volume((10, 9, 10), centers[:2], [0.6, 0.3])
    c = torch.zeros_like(a)
    return torch.cat([a, b, c], dim=0).to(dtype)


@pytest.mark.parametrize("max_count", [1, 2, 4, 6])
def test_equals_negative_log_pmf_with_tail(max_count):
    x = _volume()
    targets = torch.tensor([3, 7, 0])
    res = lc.count_distribution(x, max_count=max_count)
    loss = lc.CountLoss(max_count=max_count, reduction="none")(x, targets)
    assert loss.shape == (3,)
    idx = targets.clamp(max=max_count)
    exp = -res.log_pmf.gather(1, idx.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(loss, exp, rtol=1e-12, atol=1e-12)
    # the tail bin: any count >= max_count gives the same loss
    big = lc.CountLoss(max_count=max_count, reduction="none")(x, torch.tensor([max_count, 100, max_count + 3]))
    torch.testing.assert_close(big, -res.log_pmf[:, max_count], rtol=1e-12, atol=1e-12)


def test_reductions():
    x = _volume()
    t = torch.tensor([2, 1, 0])
    none = lc.CountLoss(reduction="none")(x, t)
    torch.testing.assert_close(lc.CountLoss(reduction="mean")(x, t), none.mean())
    torch.testing.assert_close(lc.CountLoss(reduction="sum")(x, t), none.sum())
    assert lc.CountLoss()(x, t).dim() == 0  # default reduction is mean
    with pytest.raises((ValueError, RuntimeError), match="reduction"):
        lc.CountLoss(reduction="median")


def test_from_logits_matches_probabilities():
    x = _volume()
    z = torch.logit(x.clamp(1e-5, 1 - 1e-5))
    t = torch.tensor([4, 2, 1])
    a = lc.CountLoss(from_logits=True, reduction="none")(z, t)
    b = lc.CountLoss(reduction="none")(torch.sigmoid(z), t)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_backward_and_finite_for_impossible_counts():
    x = _volume().requires_grad_(True)
    t = torch.tensor([0, 2, 3])  # item 2 has no candidates: P(C = 3) = 0
    loss = lc.CountLoss(max_count=4, reduction="none")(x, t)
    assert torch.isfinite(loss[:2]).all()
    assert loss[2] == math.inf or loss[2] > 100  # P(C = 3) = 0 with no candidates
    x.grad = None
    loss[:2].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert int((x.grad != 0).sum()) == 6  # one voxel per candidate (4 + 2)


def test_backward_float32_random_volume():
    x, _ = random_probs(make_rng(3), (2, 8, 8, 8), 0.1, dtype=torch.float32)
    x.requires_grad_(True)
    t = torch.tensor([1, 3])
    loss = lc.CountLoss(max_count=4, connectivity=26, max_lesions=16)(x, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert bool((x.grad != 0).any())


def test_options_forwarded():
    x, _ = random_probs(make_rng(4), (2, 7, 8, 9), 0.2, dtype=torch.float64)
    t = torch.tensor([3, 1])
    for kw in (dict(threshold=0.3), dict(connectivity=6), dict(min_size=3), dict(max_lesions=2)):
        loss = lc.CountLoss(max_count=4, reduction="none", **kw)(x, t)
        res = lc.count_distribution(x, max_count=4, **kw)
        torch.testing.assert_close(loss, -res.log_pmf.gather(1, t.clamp(max=4).unsqueeze(1)).squeeze(1))


def test_is_module_and_target_dtypes():
    loss = lc.CountLoss()
    assert isinstance(loss, torch.nn.Module)
    x = _volume()
    a = loss(x, torch.tensor([1, 1, 0]))
    b = loss(x, torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(a, b)


def test_many_near_certain_lesions_loss_finite():
    # 200 isolated voxels at 0.9999 in a 2D image: -log P(C = 0) = 200 * -log(1e-4)
    x = torch.zeros(1, 40, 40, dtype=torch.float64)
    x[0, ::4, ::2] = 0.9999
    n = int((x > 0).sum())
    x.requires_grad_(True)
    loss = lc.CountLoss(max_count=4, connectivity=4, reduction="sum")(x, torch.tensor([0]))
    torch.testing.assert_close(loss.detach(), torch.tensor(-n * math.log(1e-4), dtype=torch.float64), rtol=1e-9, atol=0)
    loss.backward()
    assert torch.isfinite(x.grad).all()
