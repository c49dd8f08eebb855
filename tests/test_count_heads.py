"""The paper's parametric count-head baselines (Bottleneck, Multi-Head, Downstream): architecture,
gradients into the shared UNet, parameter groups, config / CLI selection, and a short CPU training run
of every model (post hoc, multi-task, the three heads) scored by evaluate-model.
"""
from __future__ import annotations

import argparse
import csv

import pytest
import torch

from lesioncount import cli
from lesioncount.train import evaluation, loop
from lesioncount.train.config import ConfigError, TrainConfig, add_train_arguments, config_from_args
from lesioncount.train.count_heads import (HEAD_MODELS, CountHeadUNet, CountNetwork3d, build_model, has_count_head,
                                           head_count_loss, model_count_log_pmf, parameter_groups)
from lesioncount.train.model import UNet3D

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(data="phantom", num_train=4, num_val=2, num_test=4, shape=(16, 32, 32), base_filters=4, levels=3,
            batch_size=2, epochs=2, pretrain_epochs=1, device="cpu", progress=False, seed=0, output_prior=None,
            count_head_filters=4)


@pytest.mark.parametrize("kind", HEAD_MODELS)
@pytest.mark.parametrize("levels", [3, 4])
def test_head_output_shapes_and_segmentation_equals_the_plain_unet(kind, levels):
    torch.manual_seed(0)
    net = CountHeadUNet(kind, in_channels=5, base_filters=4, levels=levels, max_count=4, head_filters=6).eval()
    x = torch.randn(3, 5, 16, 32, 32)
    seg, count_logits = net(x, with_count=True)
    assert seg.shape == (3, 1, 16, 32, 32)
    assert count_logits.shape == (3, 5)
    assert torch.isfinite(count_logits).all()
    plain = UNet3D(in_channels=5, base_filters=4, levels=levels).eval()
    plain.load_state_dict(net.unet.state_dict())
    assert torch.equal(net(x), plain(x))  # forward without the head: exactly the UNet's logits
    assert torch.equal(seg, plain(x))


def test_head_reads_the_representation_the_paper_names():
    """Bottleneck: deepest encoder output; Multi-Head: second-to-last decoder block; Downstream: the
    segmentation probabilities. Checked by the channel count the head's first conv expects."""
    f = 4
    first_conv = {k: next(m for m in CountHeadUNet(k, base_filters=f, levels=4).count_head.modules()
                          if isinstance(m, torch.nn.Conv3d)) for k in HEAD_MODELS}
    assert first_conv["bottleneck"].in_channels == f * 8
    assert first_conv["multihead"].in_channels == f * 2
    assert first_conv["downstream"].in_channels == 1
    # shallow head: 3 blocks of one conv + the classifier = 4 convs; deep: 3 x 2 + 1 = 7 layers
    convs = {k: sum(isinstance(m, torch.nn.Conv3d) for m in CountHeadUNet(k, levels=3).count_head.modules())
             for k in HEAD_MODELS}
    assert convs == {"bottleneck": 4, "multihead": 7, "downstream": 7}
    # dropout after every block but the last
    head = CountNetwork3d(8, 5, filters=4, dropout=0.1)
    kinds = [type(m).__name__ for m in head.features]
    assert kinds.count("Dropout3d") == 2 and kinds[-1] != "Dropout3d"
    assert not any(isinstance(m, torch.nn.Dropout3d) for m in CountNetwork3d(8, 5, dropout=0.0).modules())


def test_downstream_head_sees_the_sigmoid_of_the_logits():
    torch.manual_seed(0)
    net = CountHeadUNet("downstream", base_filters=2, levels=3, head_filters=3).eval()
    x = torch.randn(2, 5, 8, 16, 16)
    _, count_logits = net(x, with_count=True)
    assert torch.allclose(count_logits, net.count_head(torch.sigmoid(net(x))))


@pytest.mark.parametrize("kind", HEAD_MODELS)
def test_count_gradients_reach_the_shared_unet(kind):
    torch.manual_seed(1)
    net = CountHeadUNet(kind, base_filters=4, levels=3, head_filters=4, dropout=0.0)
    _, count_logits = net(torch.randn(2, 5, 8, 16, 16), with_count=True)
    loss, nll = head_count_loss(count_logits, torch.tensor([1, 6]))
    loss.backward()
    assert nll.shape == (2,) and torch.isfinite(nll).all()
    grad = {n: p.grad for n, p in net.named_parameters()}
    # the first encoder convolution feeds every representation the heads read
    assert grad["unet.encoders.0.0.weight"] is not None and grad["unet.encoders.0.0.weight"].abs().sum() > 0
    decoder_grads = [g for n, g in grad.items() if n.startswith("unet.decoders.") and g is not None]
    head_grad = grad["unet.head.weight"]
    if kind == "bottleneck":  # the decoder is not on the path to the bottleneck head
        assert all(g.abs().sum() == 0 for g in decoder_grads)
        assert head_grad is None or head_grad.abs().sum() == 0
    elif kind == "multihead":  # decoders[-2] is; the last decoder block and the output conv are not
        assert grad["unet.decoders.0.0.weight"].abs().sum() > 0
        assert grad["unet.decoders.1.0.weight"] is None or grad["unet.decoders.1.0.weight"].abs().sum() == 0
    else:  # downstream: the whole UNet, output conv included
        assert head_grad.abs().sum() > 0 and grad["unet.decoders.1.0.weight"].abs().sum() > 0


def test_head_count_loss_is_cross_entropy_with_a_tail_class():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0, 3.0]])
    loss, nll = head_count_loss(logits, torch.tensor([0, 9]))
    expected = -torch.log_softmax(logits, 1)[[0, 1], [0, 4]]
    assert torch.allclose(nll, expected) and torch.isclose(loss, expected.mean())
    with pytest.raises(ValueError, match="count_logits"):
        head_count_loss(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="counts"):
        head_count_loss(torch.zeros(2, 5), torch.tensor([0.0, 1.0]))


def test_parameter_groups_put_the_multihead_head_at_1e_5():
    cfg = TrainConfig(model="multihead", lr=3e-4, base_filters=2, levels=3)
    model = build_model(cfg, 5)
    groups = parameter_groups(model, cfg)
    assert [g["lr"] for g in groups] == [3e-4, 1e-5]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(model="bottleneck", lr=3e-4, base_filters=2, levels=3)
    assert [g["lr"] for g in parameter_groups(build_model(cfg, 5), cfg)] == [3e-4, 3e-4]
    cfg = TrainConfig(model="downstream", lr=3e-4, count_head_lr=2e-3, base_filters=2, levels=3)
    assert [g["lr"] for g in parameter_groups(build_model(cfg, 5), cfg)] == [3e-4, 2e-3]
    assert len(parameter_groups(build_model(TrainConfig(base_filters=2, levels=3), 5), TrainConfig())) == 1


def test_every_model_starts_from_the_same_unet_weights():
    base = dict(base_filters=2, levels=3, output_prior=0.01)
    torch.manual_seed(5)
    plain = build_model(TrainConfig(**base), 5).state_dict()
    for kind in HEAD_MODELS:
        torch.manual_seed(5)
        model = build_model(TrainConfig(model=kind, **base), 5)
        assert has_count_head(model)
        for name, value in model.unet.state_dict().items():
            assert torch.equal(value, plain[name]), (kind, name)


def test_model_selection_on_the_config_and_the_command_line():
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    cfg = config_from_args(p.parse_args(["-o", "r", "--model", "multihead", "--count-head-filters", "8",
                                         "--count-head-lr", "2e-5"]))
    assert (cfg.model, cfg.count_head_filters, cfg.count_head_lr) == ("multihead", 8, 2e-5)
    assert TrainConfig.from_dict({"model": "downstream"}).model == "downstream"
    with pytest.raises(ConfigError, match="`model` must be one of"):
        TrainConfig(model="resnet")
    with pytest.raises(ConfigError, match="post_hoc_only"):
        TrainConfig(model="bottleneck", post_hoc_only=True)
    with pytest.raises(ConfigError, match="levels"):
        TrainConfig(model="multihead", levels=2, shape=(16, 32, 32))
    with pytest.raises(SystemExit):
        p.parse_args(["-o", "r", "--model", "resnet"])


def test_model_count_log_pmf_of_a_unet_is_the_count_distribution():
    import lesioncount

    net = UNet3D(base_filters=2, levels=2).eval()
    x = torch.randn(2, 5, 4, 8, 8)
    with torch.no_grad():
        log_pmf, logits = model_count_log_pmf(net, x, threshold=0.2, max_count=3)
        ref = lesioncount.count_distribution(net(x), threshold=0.2, max_count=3, from_logits=True)
    assert torch.equal(logits, net(x)) and torch.allclose(log_pmf, ref.log_pmf)


# ----------------------------------------------------------------------------------------------
# a short CPU training run of every model, then evaluate-model with the attack and MC dropout
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("heads")
    runs = {}
    for name, extra in (("post_hoc", {"post_hoc_only": True}), ("multitask", {}),
                        *((k, {"model": k}) for k in HEAD_MODELS)):
        runs[name] = root / name
        runs[name + "_result"] = loop.train(TrainConfig(out_dir=str(runs[name]), **{**TINY, **extra}))
    runs["root"] = root
    return runs


def test_short_training_run_of_every_model(trained):
    for kind in HEAD_MODELS:
        result = trained[kind + "_result"]
        rows = result.history
        assert [r["count_weight"] for r in rows] == [0.0, 0.001]
        assert rows[0]["count_loss"] is None and 0 < rows[1]["count_loss"] < 10
        assert rows[1]["count_infeasible"] == 0.0  # a softmax never gives a count probability 0
        assert result.best_epoch == 2  # selected only among epochs that trained the head
        model, config, _ = evaluation.load_model(trained[kind] / "best.pt")
        assert config.model == kind and has_count_head(model)
    # the heads train with the same UNet and schedule: after the segmentation-only epoch their UNet
    # equals the post hoc run's UNet, and the count epoch changes both the UNet and the head
    for kind in HEAD_MODELS:
        ckpt = torch.load(trained[kind] / "last.pt", weights_only=True)
        assert ckpt["epoch"] == 2
    post = torch.load(trained["post_hoc"] / "last.pt", weights_only=True)["model"]
    for kind in HEAD_MODELS:
        head_unet = {k.removeprefix("unet."): v for k, v in
                     torch.load(trained[kind] / "last.pt", weights_only=True)["model"].items() if k.startswith("unet.")}
        assert any(not torch.equal(head_unet[k], post[k]) for k in post), kind


def test_head_runs_match_the_plain_unet_during_segmentation_only_epochs(tmp_path):
    one = {**TINY, "epochs": 1}
    loop.train(TrainConfig(out_dir=str(tmp_path / "unet"), **one))
    plain = torch.load(tmp_path / "unet" / "last.pt", weights_only=True)["model"]
    for kind in ("bottleneck", "downstream"):
        loop.train(TrainConfig(out_dir=str(tmp_path / kind), model=kind, **one))
        state = torch.load(tmp_path / kind / "last.pt", weights_only=True)["model"]
        for name, value in plain.items():
            assert torch.equal(state["unet." + name], value), (kind, name)


def test_evaluate_model_scores_every_model_with_attack_and_mc_dropout(trained, tmp_path):
    out = tmp_path / "eval"
    argv = ["evaluate-model", "--device", "cpu", "--no-plots", "--attack", "--attack-steps", "2",
            "--mc-samples", "4", "--paper-table", "1", "-o", str(out)]
    for name in ("post_hoc", "bottleneck", "multihead", "downstream", "multitask"):
        argv += ["--checkpoint", f"{name}={trained[name] / 'best.pt'}"]
    assert cli.main(argv) == 0
    with (out / "table1.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    methods = {(r["model"], r["method"]) for r in rows}
    for kind in HEAD_MODELS:
        assert (kind, "count head") in methods
    assert ("post_hoc", "MC-dropout cc_count (n=4, tau=0.5)") in methods
    main_rows = [r for r in rows if r["method"] in ("count head", "count distribution (tau=0.1)")]
    assert len(main_rows) == 5
    for r in main_rows:
        assert 0.0 <= float(r["attack_sr"]) <= 1.0 and -1.0 <= float(r["attack_ad"]) <= 1.0
    with (out / "paired.csv").open() as fh:
        paired = list(csv.DictReader(fh))
    assert {r["model"] for r in paired} >= {"post_hoc", "bottleneck", "multihead", "downstream"}
    assert all(r["reference"] == "multitask" for r in paired)
    with (out / "uncertainty.csv").open() as fh:
        unc = list(csv.DictReader(fh))
    assert {r["discarded"] for r in unc} == {"most", "least"}
    report = (out / "report.md").read_text()
    assert "Paper's Table 1 beside ours" in report and "| bottleneck | paper | 87.6000" in report
