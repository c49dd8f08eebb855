"""The robustness attack (entropy maximisation under a budget), SR / AD, MC-dropout connected
components as a count distribution, the uncertainty curves and the paired statistics."""
from __future__ import annotations

import math

import pytest
import torch

from lesioncount.train.attack import AttackConfig, attack_count_entropy, attack_scores, entropy_from_log_pmf
from lesioncount.train.count_heads import CountHeadUNet
from lesioncount.train.model import UNet3D
from lesioncount.train.uncertainty import accuracy_after_discarding, mc_dropout_count_pmf, paired_comparison

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _detector() -> torch.nn.Module:
    """logit = 8 x - 4: a voxel at 1 is a confident lesion (p = 0.982), background 0 is p = 0.018."""
    net = torch.nn.Conv3d(1, 1, kernel_size=1)
    with torch.no_grad():
        net.weight.fill_(8.0)
        net.bias.fill_(-4.0)
    return net.eval()


def _two_lesions(batch: int = 2) -> torch.Tensor:
    x = torch.zeros(batch, 1, 6, 12, 12)
    x[:, 0, 1, 2, 2] = 1.0
    x[:, 0, 4, 9, 9] = 1.0
    return x


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_attack_stays_within_its_budget(norm):
    torch.manual_seed(0)
    net = CountHeadUNet("downstream", base_filters=2, levels=2, head_filters=2)
    x = torch.randn(3, 5, 4, 8, 8)
    cfg = AttackConfig(epsilon=0.3, steps=4, step_size=0.2, noise_init=0.5, norm=norm, lam=0.0)
    res = attack_count_entropy(net, x, cfg)
    flat = res.delta.flatten(1)
    measured = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    assert torch.allclose(measured, res.delta_norm)
    assert bool((measured <= 0.3 * (1 + 1e-5)).all())
    # the steps are longer than the budget: the projection is what keeps it (the norm reaches it)
    assert bool((measured >= 0.3 * (1 - 1e-3)).all())


def test_attack_raises_the_entropy_on_a_constructed_case():
    """Two confident single-voxel lesions (count 2 with P 0.96): lowering one of them to x = 0.5
    (an l2 change of 0.5) makes its probability 0.5, the most uncertain count distribution."""
    net = _detector()
    x = _two_lesions()
    res = attack_count_entropy(net, x, AttackConfig(epsilon=0.5, lam=0.0, steps=10, threshold=0.1))
    assert bool((res.clean_entropy < 0.2).all())
    assert bool((res.attacked_entropy > res.clean_entropy + 0.4).all())
    assert bool((res.attacked_entropy > 0.6).all())  # log 2 = 0.693 for one uncertain candidate
    assert bool((res.delta_norm <= 0.5 + 1e-6).all())
    # the change sits on the lesion voxels (the count distribution's gradient reaches the region maxima):
    # almost all of the l2 energy, the rest is the initial noise
    lesion = x > 0
    assert float(res.delta[lesion].pow(2).sum()) > 0.95 * float(res.delta.pow(2).sum())
    assert bool((res.delta[lesion] < 0).all())  # the confident lesions are dimmed


def test_attack_without_steps_or_budget_barely_changes_anything():
    net = _detector()
    x = _two_lesions(1)
    res = attack_count_entropy(net, x, AttackConfig(steps=0, noise_init=1e-4))
    assert float((res.attacked_entropy - res.clean_entropy).abs().max()) < 1e-3


def test_attack_leaves_the_model_alone_and_is_seeded():
    torch.manual_seed(0)
    net = CountHeadUNet("bottleneck", base_filters=2, levels=2, head_filters=2).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 5, 4, 8, 8)
    cfg = AttackConfig(steps=2, seed=3)
    a = attack_count_entropy(net, x, cfg)
    assert net.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    b = attack_count_entropy(net, x, cfg)
    assert torch.equal(a.delta, b.delta)
    c = attack_count_entropy(net, x, AttackConfig(steps=2, seed=4))
    assert not torch.equal(a.delta, c.delta)
    # case i draws from (seed, index_offset + i): batching does not change a case's noise
    single = attack_count_entropy(net, x[1:], AttackConfig(steps=0, seed=3), index_offset=1)
    both = attack_count_entropy(net, x, AttackConfig(steps=0, seed=3))
    assert torch.equal(single.delta[0], both.delta[1])


def test_attack_accepts_any_differentiable_count_model():
    weight = torch.tensor([[3.0], [0.0], [-3.0]])

    def count_fn(image):  # a toy count model: logits linear in the mean intensity
        return torch.log_softmax(image.flatten(1).mean(1, keepdim=True) @ weight.T, dim=1)

    x = torch.ones(2, 1, 2, 2, 2)
    res = attack_count_entropy(torch.nn.Identity(), x, AttackConfig(epsilon=4.0, lam=0.0, steps=20),
                               count_fn=count_fn)
    assert res.attacked_log_pmf.shape == (2, 3)
    assert bool((res.attacked_entropy > res.clean_entropy + 0.5).all())


def test_attack_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="`epsilon`"):
        AttackConfig(epsilon=0)
    with pytest.raises(ValueError, match="`norm`"):
        AttackConfig(norm="l1")
    with pytest.raises(ValueError, match="`steps`"):
        AttackConfig(steps=-1)
    with pytest.raises(ValueError, match="`image`"):
        attack_count_entropy(_detector(), torch.zeros(2, 1, 2, 2, 2, dtype=torch.int64))


def test_sr_and_ad_on_a_hand_made_example():
    clean = torch.tensor([0, 1, 2, 4, 3])
    attacked = torch.tensor([0, 2, 2, 3, 3])
    target = torch.tensor([0, 1, 3, 9, 3])  # 9 lesions: the 4+ bin
    s = attack_scores(clean, attacked, target, max_count=4)
    # changed: cases 1 and 3 -> SR 2/5; correct clean: 0, 1, 3, 4 (4/5); attacked: 0, 4 (2/5)
    assert s == pytest.approx({"success_rate": 0.4, "accuracy_clean": 0.8, "accuracy_attacked": 0.4,
                               "accuracy_drop": 0.4})
    with pytest.raises(ValueError, match="equal-length"):
        attack_scores(clean, attacked[:3], target)


def test_entropy_from_log_pmf_handles_zero_bins_without_nan_gradients():
    log_pmf = torch.log(torch.tensor([[0.25, 0.75, 0.0]])).requires_grad_(True)
    h = entropy_from_log_pmf(log_pmf)
    assert h.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    h.sum().backward()
    assert torch.isfinite(log_pmf.grad).all()


# ----------------------------------------------------------------------------------------------
# MC dropout and the uncertainty curves
# ----------------------------------------------------------------------------------------------

def test_mc_dropout_yields_a_proper_count_distribution():
    torch.manual_seed(0)
    net = UNet3D(in_channels=1, base_filters=4, levels=2, dropout=0.5)
    with torch.no_grad():
        net.head.bias.fill_(-1.0)
    x = torch.randn(3, 1, 4, 8, 8)
    net.eval()
    rng_before = torch.get_rng_state()
    pmf = mc_dropout_count_pmf(net, x, num_samples=20, threshold=0.5, max_count=4, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's stream is untouched
    assert pmf.shape == (3, 5) and pmf.dtype == torch.float64
    assert bool((pmf >= 0).all()) and torch.allclose(pmf.sum(1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(pmf * 20, (pmf * 20).round())  # shares of 20 samples
    assert not any(m.training for m in net.modules())  # modes restored
    net.train()
    mc_dropout_count_pmf(net, x, num_samples=2)
    assert all(m.training for m in net.modules())
    net.eval()
    # dropout makes the samples differ: at least one case is not one-hot
    assert bool((pmf.max(1).values < 1).any())
    assert torch.equal(pmf, mc_dropout_count_pmf(net, x, num_samples=20, threshold=0.5, max_count=4, seed=7))
    # the same passes without dropout are one deterministic count: the pmf is one-hot at cc_count
    import lesioncount

    det = UNet3D(in_channels=1, base_filters=4, levels=2, dropout=0.0)
    with pytest.raises(ValueError, match="no dropout"):
        mc_dropout_count_pmf(det, x)
    net.eval()
    with torch.no_grad():
        cc = lesioncount.cc_count(net(x), threshold=0.5, from_logits=True)
    one = mc_dropout_count_pmf(net, x, num_samples=1, threshold=0.5, seed=7)
    assert bool((one.max(1).values == 1).all())
    with pytest.raises(ValueError, match="num_samples"):
        mc_dropout_count_pmf(net, x, num_samples=0)
    assert cc.shape == (3,)


def test_accuracy_after_discarding_most_and_least_uncertain():
    correct = torch.tensor([True, False, True, True, False])
    entropy = torch.tensor([0.1, 0.9, 0.3, 0.2, 0.8])
    most = accuracy_after_discarding(correct, entropy, [0.0, 0.2, 0.4, 0.6], most_uncertain=True)
    least = accuracy_after_discarding(correct, entropy, [0.0, 0.2, 0.4, 0.6], most_uncertain=False)
    assert most.tolist() == pytest.approx([0.6, 0.75, 1.0, 1.0])
    assert least.tolist() == pytest.approx([0.6, 0.5, 1 / 3, 0.0])
    with pytest.raises(ValueError, match="fractions"):
        accuracy_after_discarding(correct, entropy, [1.0])


def test_paired_comparison_mcnemar_and_bootstrap():
    a = torch.tensor([1] * 10 + [1] * 5 + [0] * 5, dtype=torch.bool)
    b = torch.tensor([1] * 10 + [0] * 5 + [0] * 5, dtype=torch.bool)
    r = paired_comparison(a, b, num_bootstrap=2000)
    assert (r["a_only"], r["b_only"]) == (5, 0)
    assert r["mcnemar_p"] == pytest.approx(2 / 32)  # two-sided exact binomial on 5 vs 0
    assert r["difference"] == pytest.approx(0.25)
    assert 0.0 <= r["ci_low"] <= 0.25 <= r["ci_high"] <= 0.6
    same = paired_comparison(a, a)
    assert same["mcnemar_p"] == 1.0 and same["ci_low"] == same["ci_high"] == 0.0
