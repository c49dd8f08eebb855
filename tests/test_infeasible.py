"""One rule for infeasible count targets (P(C = target) = 0 exactly), the same in every count loss:
CountLoss / count_nll, lesioncount.monai.LesionCountLoss, the adapters' count term (nnU-Net trainer)
and lesioncount train's count_loss_term; and the argument checks of CountLoss."""

from __future__ import annotations

import math

import pytest
import torch

import lesioncount as lc
from lesioncount._adapters import count_term
from lesioncount.train.loop import count_loss_term


def _batch():
    """Three items, one candidate each (logit 1.5 at one voxel): true counts 1 (feasible),
    3 (infeasible: one candidate) and 0 (feasible)."""
    logits = torch.full((3, 1, 6, 10, 10), -8.0, dtype=torch.float64)
    logits[:, 0, 3, 5, 5] = 1.5
    return logits, torch.tensor([1, 3, 0])


def _expected():
    p = torch.sigmoid(torch.tensor(1.5, dtype=torch.float64))
    return torch.stack([-p.log(), torch.tensor(math.inf, dtype=torch.float64), -(1 - p).log()])


def test_count_loss_default_leaves_infeasible_items_out():
    logits, target = _batch()
    logits.requires_grad_(True)
    loss_fn = lc.CountLoss(max_count=4, from_logits=True)
    loss = loss_fn(logits, target)
    nll = _expected()
    torch.testing.assert_close(loss, (nll[0] + nll[2]) / 2)  # mean over the two feasible items
    assert loss_fn.last_infeasible.tolist() == [False, True, False]
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0


def test_every_count_loss_follows_the_same_rule():
    from lesioncount.monai import LesionCountLoss

    logits, target = _batch()
    nll = _expected()
    mean, total = (nll[0] + nll[2]) / 2, nll[0] + nll[2]
    torch.testing.assert_close(lc.CountLoss(from_logits=True)(logits, target), mean)
    torch.testing.assert_close(lc.CountLoss(from_logits=True, reduction="sum")(logits, target), total)
    torch.testing.assert_close(LesionCountLoss(sigmoid=True)(logits, target), mean)
    torch.testing.assert_close(LesionCountLoss(sigmoid=True, reduction="sum")(logits, target), total)
    torch.testing.assert_close(count_term(logits[:, 0], True, target).loss, mean)
    loss, per_item = count_loss_term(logits.float(), target)
    torch.testing.assert_close(loss.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_item.double(), nll, rtol=1e-5, atol=1e-6)
    for none in (lc.CountLoss(from_logits=True, reduction="none")(logits, target),
                 LesionCountLoss(sigmoid=True, reduction="none")(logits, target)):
        torch.testing.assert_close(none, nll)


def test_strict_nll_and_none_reduction_never_give_nan_gradients():
    logits, target = _batch()
    logits.requires_grad_(True)
    strict = lc.CountLoss(from_logits=True, ignore_infeasible=False)(logits, target)
    assert strict == math.inf
    per_item = lc.CountLoss(from_logits=True, reduction="none")(logits, target)
    (grad,) = torch.autograd.grad(torch.where(torch.isfinite(per_item), per_item, 0).sum(), logits)
    assert torch.isfinite(grad).all() and grad[1].abs().sum() == 0


def test_an_all_infeasible_batch_gives_zero_loss_and_zero_gradient():
    logits, _ = _batch()
    logits.requires_grad_(True)
    loss = lc.CountLoss(from_logits=True)(logits, torch.tensor([5, 7, 2]))
    assert float(loss) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_a_certain_candidate_makes_a_zero_count_infeasible():
    # probabilities (not logits): a float32 sigmoid saturates to exactly 1.0, so P(C = 0) = 0
    probs = torch.zeros(1, 4, 8, 8)
    probs[0, 1, 1, 1] = torch.sigmoid(torch.tensor(20.0))
    assert float(probs[0, 1, 1, 1]) == 1.0
    terms = lc.count_nll_terms(lc.count_distribution(probs, max_count=2).log_pmf, torch.tensor([0]))
    assert terms.infeasible.tolist() == [True] and terms.nll.tolist() == [math.inf]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(threshold=2.0), ValueError, "threshold"),
    (dict(threshold=float("nan")), ValueError, "threshold"),
    (dict(connectivity=7), ValueError, "connectivity"),
    (dict(connectivity=None), ValueError, "connectivity"),
    (dict(min_size=-1), ValueError, "min_size"),
    (dict(min_size=1.5), TypeError, "min_size"),
    (dict(from_logits="no"), TypeError, "from_logits"),
    (dict(from_logits=1), TypeError, "from_logits"),
    (dict(ignore_infeasible="yes"), TypeError, "ignore_infeasible"),
    (dict(max_count=2**63), ValueError, "max_count"),
    (dict(max_count=-1), ValueError, "max_count"),
    (dict(max_count=True), ValueError, "max_count"),
    (dict(max_lesions=2**40), ValueError, "max_lesions"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_count_loss_checks_every_argument_in_its_constructor(kwargs, error, match):
    with pytest.raises(error, match=match):
        lc.CountLoss(**kwargs)


@pytest.mark.parametrize("target,match", [
    (torch.tensor([math.inf, 1.0]), "finite"),
    (torch.tensor([math.nan, 1.0]), "finite"),
    (torch.tensor([1e30, 1.0]), "below 2\\*\\*62"),
    (torch.tensor([-1, 1]), ">= 0"),
    (torch.tensor([1.5, 1.0]), "whole numbers"),
    (torch.tensor([True, False]), "integers"),
    (torch.tensor([1, 2, 3]), "one count per batch item"),
])
def test_bad_targets_are_named(target, match):
    log_pmf = torch.log(torch.tensor([[0.1, 0.5, 0.4], [0.2, 0.5, 0.3]]))
    with pytest.raises((ValueError, TypeError), match=match):
        lc.count_nll(log_pmf, target)


def test_functions_reject_out_of_range_sizes_and_truthy_flags():
    x = torch.rand(1, 4, 8, 8)
    with pytest.raises(ValueError, match="max_count"):
        lc.count_distribution(x, max_count=2**63)
    with pytest.raises(ValueError, match="max_count"):
        lc.poisson_binomial(torch.rand(1, 3), 2**40)
    with pytest.raises(TypeError, match="from_logits"):
        lc.count_distribution(x, from_logits="no")
    with pytest.raises(TypeError, match="log"):
        lc.poisson_binomial(torch.rand(1, 3), 2, log="yes")
