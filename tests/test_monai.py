"""MONAI adapters, run with MONAI itself: DiceCELoss + LesionCountLoss, the cumulative metric with
decollated lists, and the dictionary transform in a MONAI Compose on MetaTensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

monai = pytest.importorskip("monai")

import lesioncount  # noqa: E402
from lesioncount import metrics as lm  # noqa: E402
from lesioncount.monai import CountDistribution, CountDistributiond, LesionCountLoss, LesionCountMetric  # noqa: E402
from lesioncount.train.phantom import count_lesions  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


def _blobs(batch=2, shape=(12, 16, 16), centers=(((3, 3, 3),), ((3, 3, 3), (8, 10, 10))), peak=4.0):
    """(B, 2, D, H, W) softmax logits with lesion blobs and the (B, 1, D, H, W) label map of them."""
    logits = torch.zeros(batch, 2, *shape)
    logits[:, 1] = -6.0
    label = torch.zeros(batch, 1, *shape)
    for b, cs in enumerate(centers[:batch]):
        for d, h, w in cs:
            logits[b, 1, d - 1:d + 2, h - 1:h + 2, w - 1:w + 2] = 1.0
            logits[b, 1, d, h, w] = peak
            label[b, 0, d - 1:d + 2, h - 1:h + 2, w - 1:w + 2] = 1
    return logits, label


def test_loss_softmax_equals_count_loss_on_the_foreground_probability():
    logits, label = _blobs()
    logits.requires_grad_(True)
    loss = LesionCountLoss(softmax=True)(logits, label)
    p_fg = logits.softmax(1)[:, 1]
    ref = lesioncount.CountLoss(max_count=4, connectivity=18)(p_fg, torch.tensor([1, 2]))
    torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and int((logits.grad.abs().sum(1) > 0).sum()) == 3  # one voxel per blob


def test_loss_combines_with_dicece_and_trains_a_monai_unet():
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4))
    _, label = _blobs(shape=(16, 32, 32))
    image = label + 0.1 * torch.randn_like(label)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    count = LesionCountLoss(softmax=True)
    out = net(image)
    c = count(out, label)
    total = dice_ce(out, label) + 0.1 * c
    total.backward()
    assert torch.isfinite(total) and math.isfinite(float(c.detach()))
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    # the count term alone also reaches the weights
    net.zero_grad()
    count(net(image), label).backward()
    assert sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None) > 0


def test_loss_targets_counts_labelmap_onehot_agree():
    logits, label = _blobs()
    loss = LesionCountLoss(softmax=True, reduction="none")
    onehot = torch.cat([1 - label, label], 1)
    a = loss(logits, label)
    torch.testing.assert_close(a, loss(logits, onehot))
    torch.testing.assert_close(a, loss(logits, torch.tensor([1, 2])))
    assert a.shape == (2,)
    s = LesionCountLoss(softmax=True, reduction="sum")(logits, label)
    torch.testing.assert_close(s, a.sum())


def test_loss_sigmoid_single_channel_and_infeasible_items():
    logits = torch.full((2, 1, 8, 8, 8), -8.0)
    logits[:, 0, 4, 4, 4] = 2.0
    mask = torch.zeros(2, 1, 8, 8, 8)
    mask[0, 0, 4, 4, 4] = 1
    mask[1, 0, 1, 1, 1] = 1
    mask[1, 0, 6, 6, 6] = 1  # 2 lesions, 1 candidate: P(C = 2) = 0
    none = LesionCountLoss(sigmoid=True, reduction="none")(logits, mask)
    assert none[0] == pytest.approx(-math.log(torch.sigmoid(torch.tensor(2.0)).item()), rel=1e-5)
    assert math.isinf(float(none[1]))
    mean = LesionCountLoss(sigmoid=True)(logits, mask)
    assert float(mean) == pytest.approx(float(none[0]), rel=1e-6)  # the infeasible item is left out of the mean


def test_loss_multiclass_softmax_lesion_union_and_channel_choice():
    torch.manual_seed(1)
    z = torch.randn(1, 3, 6, 8, 8) * 3
    union = LesionCountLoss(softmax=True, reduction="none")(z, torch.tensor([2]))
    p = z.softmax(1)[:, 1:].sum(1)
    ref = lesioncount.CountLoss(connectivity=18, reduction="none")(p, torch.tensor([2]))
    torch.testing.assert_close(union, ref, rtol=1e-4, atol=1e-5)
    only2 = LesionCountLoss(softmax=True, lesion_channels=2, reduction="none")(z, torch.tensor([2]))
    ref2 = lesioncount.CountLoss(connectivity=18, reduction="none")(z.softmax(1)[:, 2], torch.tensor([2]))
    torch.testing.assert_close(only2, ref2, rtol=1e-4, atol=1e-5)


def test_loss_2d_default_connectivity_and_other_act():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 2] = 0.9
    x[0, 0, 3, 3] = 0.8  # diagonal neighbours: one component with 8-connectivity (the 2D default)
    loss = LesionCountLoss(other_act=lambda t: t, reduction="none")
    assert float(loss(x, torch.tensor([1]))) == pytest.approx(-math.log(0.9), rel=1e-5)
    four = LesionCountLoss(connectivity=4, reduction="none")(x, torch.tensor([2]))
    assert float(four) == pytest.approx(-math.log(0.9 * 0.8), rel=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"sigmoid": True, "softmax": True}, "mutually exclusive"),
    ({"softmax": True, "other_act": torch.sigmoid}, "other_act"),
    ({"other_act": 3}, "other_act"),
    ({"reduction": "median"}, "reduction"),
    ({"threshold": 1.5}, "threshold"),
    ({"connectivity": 5}, "connectivity"),
    ({"max_count": 0}, "max_count"),
    ({"lesion_channels": [-1]}, "lesion_channels"),
])
def test_loss_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LesionCountLoss(**kwargs)


def test_loss_bad_inputs_name_the_argument():
    logits, label = _blobs()
    with pytest.raises(ValueError, match="cover every class"):
        LesionCountLoss(softmax=True, include_background=True)(logits, label)
    with pytest.raises(ValueError, match="one channel"):
        LesionCountLoss(sigmoid=True)(torch.zeros(1, 3, 4, 4, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="`input` must be channel-first"):
        LesionCountLoss(sigmoid=True)(torch.zeros(4, 4, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="`target`"):
        LesionCountLoss(softmax=True)(logits, torch.zeros(2, 1, 3, 3, 3))
    with pytest.raises(ValueError, match="`target` has 3 channels"):
        LesionCountLoss(softmax=True)(logits, torch.zeros(2, 3, *logits.shape[2:]))
    with pytest.raises(ValueError, match="lesion_channels"):
        LesionCountLoss(softmax=True, lesion_channels=5)(logits, label)
    with pytest.raises(ValueError, match="whole numbers"):
        LesionCountLoss(softmax=True)(logits, torch.tensor([0.5, 1.0]))


def test_metric_matches_count_metrics_and_accepts_decollated_lists():
    logits, label = _blobs()
    probs = logits.softmax(1)
    metric = LesionCountMetric(metric_name=list(lm.COUNT_METRIC_NAMES))
    pmf = metric(probs, label)
    assert pmf.shape == (2, 5)
    metric(list(probs), list(label))  # decollated channel-first items, as after decollate_batch
    got = dict(zip(lm.COUNT_METRIC_NAMES, metric.aggregate()))
    r = lesioncount.count_distribution(probs[:, 1], max_count=4)
    counts = torch.tensor([1, 2])
    ref = lm.count_metrics(torch.cat([r.pmf, r.pmf]), torch.cat([counts, counts]),
                           expected_count=torch.cat([r.expected_count, r.expected_count]),
                           log_pmf=torch.cat([r.log_pmf, r.log_pmf]))
    for k in lm.COUNT_METRIC_NAMES:
        torch.testing.assert_close(got[k].double(), ref[k].double(), rtol=1e-5, atol=1e-6, msg=k)
    assert float(metric.aggregate("accuracy")) == 1.0
    metric.reset()
    with pytest.raises(ValueError, match="at least one call"):
        metric.aggregate()


def test_metric_with_counts_and_softmax_flag():
    logits, _ = _blobs()
    metric = LesionCountMetric(metric_name="count_mae", softmax=True)
    metric(logits, torch.tensor([1, 1]))  # item 1 has 2 candidates of p ~ 0.98: expected count ~ 2
    mae = float(metric.aggregate())
    r = lesioncount.count_distribution(logits.softmax(1)[:, 1], max_count=4)
    assert mae == pytest.approx(float((r.expected_count - torch.tensor([1.0, 1.0])).abs().mean()), rel=1e-5)
    with pytest.raises(ValueError, match="metric_name"):
        LesionCountMetric(metric_name="dice")
    with pytest.raises(ValueError, match="`y`"):
        metric(logits)


def test_dict_transform_in_monai_post_processing():
    from monai.data import MetaTensor, decollate_batch
    from monai.transforms import Activationsd, Compose

    logits, label = _blobs()
    batch = {"pred": MetaTensor(logits, affine=torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0]))), "label": label}
    post = Compose([Activationsd(keys="pred", softmax=True),
                    CountDistributiond(keys="pred", save_labels=True)])
    items = [post(d) for d in decollate_batch(batch)]
    for b, d in enumerate(items):
        r = lesioncount.count_distribution(logits.softmax(1)[b:b + 1, 1], max_count=4)
        torch.testing.assert_close(d["pred_count_pmf"], r.pmf[0], rtol=1e-5, atol=1e-6)
        assert d["pred_count_pmf"].shape == (5,) and d["pred_count_pmf"].sum() == pytest.approx(1.0, abs=1e-5)
        assert int(d["pred_count_most_likely"]) == b + 1
        assert d["pred_count_labels"].shape == (1, *logits.shape[2:])
        assert int(d["pred_count_labels"].max()) == b + 1
        assert d["pred_count_lesion_probs"].shape == (b + 1,)
        assert count_lesions(d["label"][0].numpy().astype(np.uint8), 18) == b + 1
        assert not isinstance(d["pred_count_pmf"], MetaTensor)


def test_array_transform_and_bad_inputs():
    probs = torch.zeros(2, 8, 16, 16)
    probs[1, 2, 2, 2] = 0.8
    out = CountDistribution()(probs.numpy())
    torch.testing.assert_close(out["pmf"], torch.tensor([0.2, 0.8, 0.0, 0.0, 0.0]))
    assert int(out["argmax"][0]) == 2 * 256 + 2 * 16 + 2
    with pytest.raises(ValueError, match="`img` must be one channel-first item"):
        CountDistribution()(torch.zeros(8, 16))
    with pytest.raises(TypeError, match="postfix"):
        CountDistributiond(keys="pred", postfix=3)
    d = CountDistributiond(keys=["pred", "other"], allow_missing_keys=True)({"pred": probs})
    assert "pred_count_pmf" in d and "other_count_pmf" not in d
