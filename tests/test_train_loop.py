"""Training loop: config resolution, the count term, an end-to-end tiny run, resume, post-hoc mode.

All runs are tiny (16x32x32 phantoms, a 3-level UNet with 4 base filters, one thread) and share one
module-scoped set of runs, so the whole file takes a few seconds of CPU.
"""
from __future__ import annotations

import argparse
import csv
import math
import pathlib
import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from lesioncount import cli
from lesioncount.train import loop
from lesioncount.train.config import (ConfigError, TrainConfig, add_train_arguments, config_from_args,
                                      load_config_file)

TINY = dict(data="phantom", num_train=4, num_val=2, num_test=2, shape=(16, 32, 32), base_filters=4, levels=3,
            batch_size=2, epochs=2, pretrain_epochs=1, device="cpu", progress=False, seed=0,
            # PyTorch's default head init: an untrained net then has many candidates above 0.1, so the
            # 2-epoch runs exercise the count term (with the 0.01 prior it would see almost none)
            output_prior=None)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


def _read_metrics(out: pathlib.Path) -> list[dict]:
    with (out / "metrics.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _weights(path: pathlib.Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------

def test_count_weight_schedule_is_the_papers():
    cfg = TrainConfig()  # paper defaults: w1 = 0.001, w2 = 0.06, 20 pre-training epochs
    assert [cfg.count_weight_at(e) for e in range(20)] == [0.0] * 20
    for e in (20, 21, 50, 99):
        assert cfg.count_weight_at(e) == pytest.approx(0.001 * math.exp(0.06 * (e - 20)), rel=1e-12)
    post_hoc = TrainConfig(post_hoc_only=True)
    assert all(post_hoc.count_weight_at(e) == 0.0 for e in range(200))


def test_yaml_config_flags_override_and_errors(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("epochs: 7\nbase-filters: 8\nlevels: 3\nshape: [16, 32, 32]\ncount_weight: 0.5\n")
    cfg = config_from_args(_parse(["--config", str(cfg_file), "-o", str(tmp_path / "o"), "--epochs", "3",
                                   "--no-augment"]))
    assert (cfg.epochs, cfg.base_filters, cfg.levels, cfg.shape, cfg.count_weight, cfg.augment) == \
        (3, 8, 3, (16, 32, 32), 0.5, False)
    assert cfg.lr == 1e-4 and cfg.pos_weight == 3.0 and cfg.max_count == 4  # untouched defaults

    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("epocs: 3\n")
    with pytest.raises(ConfigError, match=r"bad_key\.yaml: unknown setting 'epocs'"):
        load_config_file(bad_key)
    bad_value = tmp_path / "bad_value.yaml"
    bad_value.write_text("levels: 5\nshape: [16, 32, 40]\n")
    with pytest.raises(ConfigError, match=r"bad_value\.yaml.*`shape`.*divisible by 2\*\*\(levels-1\) = 16"):
        config_from_args(_parse(["--config", str(bad_value)]))
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("epochs: [3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config_file(not_yaml)
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config_file(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="`data_dir` is required"):
        TrainConfig(data="nnunet")
    with pytest.raises(ConfigError, match="`amp` must be one of"):
        config_from_args(argparse.Namespace(amp="fp8"))


def test_cli_rejects_bad_flags_with_exit_code_2(tmp_path, capsys):
    assert cli.main(["train", "-o", str(tmp_path / "x"), "--epochs", "0"]) == 2
    assert "`epochs` must be an int >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["train", "-o", str(tmp_path / "x"), "--resume"]) == 2
    assert "last.pt not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the count term against an independent float64 computation
# ------------------------------------------------------------------------------------------------

def _reference_count_nll(logits: np.ndarray, count: int, threshold=0.1, max_count=4) -> float:
    """SciPy components of sigmoid > threshold (18-conn.), p_k = max, Poisson-binomial DP in float64."""
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    labels, k = ndi.label(probs > threshold, structure=ndi.generate_binary_structure(3, 2))
    p = ndi.maximum(probs, labels, index=np.arange(1, k + 1)) if k else np.zeros(0)
    pmf = np.zeros(k + 1)
    pmf[0] = 1.0
    for pk in p:
        pmf[1:] = pmf[1:] * (1 - pk) + pmf[:-1] * pk
        pmf[0] *= 1 - pk
    binned = np.concatenate([pmf[:max_count], [pmf[max_count:].sum()]]) if k >= max_count else \
        np.concatenate([pmf, np.zeros(max_count + 1 - len(pmf))])
    prob = binned[min(count, max_count)]
    return -math.log(prob) if prob > 0 else math.inf


def test_count_loss_term_matches_float64_reference_and_skips_infeasible_items():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 1, 8, 12, 12, generator=gen) * 2 - 6.0  # a handful of candidates each
    logits[2] = -9.0
    logits[2, 0, 2, 3, 3] = logits[2, 0, 6, 8, 9] = 1.5  # two candidates but three lesions: P(C=3) = 0
    counts = torch.tensor([1, 6, 3])  # 6 -> tail bin "4+"
    refs = [_reference_count_nll(logits[b, 0].numpy(), int(counts[b])) for b in range(3)]
    assert math.isfinite(refs[0]) and math.isfinite(refs[1]) and math.isinf(refs[2])
    logits.requires_grad_(True)
    loss, nll = loop.count_loss_term(logits, counts, threshold=0.1, connectivity=18, max_count=4)
    for b in range(3):
        if math.isinf(refs[b]):
            assert math.isinf(float(nll[b]))
        else:
            assert float(nll[b]) == pytest.approx(refs[b], rel=1e-5)
    finite = [r for r in refs if math.isfinite(r)]
    assert float(loss.detach()) == pytest.approx(sum(finite) / len(finite), rel=1e-5)  # mean over feasible items
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert int((logits.grad != 0).sum()) > 0
    # one voxel per candidate carries the gradient
    num_candidates = sum(ndi.label(torch.sigmoid(logits[b, 0]).detach().numpy() > 0.1,
                                   structure=ndi.generate_binary_structure(3, 2))[1] for b in range(3) if math.isfinite(refs[b]))
    assert int((logits.grad != 0).sum()) == num_candidates


def test_count_loss_gradient_reaches_the_unet_weights():
    from lesioncount.train.model import UNet3D

    torch.manual_seed(0)
    net = UNet3D(in_channels=5, base_filters=4, levels=3, dropout=0.0)
    x = torch.randn(2, 5, 16, 32, 32)
    loss, nll = loop.count_loss_term(net(x), torch.tensor([0, 1]))
    assert torch.isfinite(nll).all()
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(int((g != 0).any()) for g in grads) == len(grads)  # every tensor of weights gets a gradient


def test_segmentation_loss_is_weighted_bce():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    expected = -(3 * math.log(torch.sigmoid(torch.tensor(2.0))) + math.log(1 - torch.sigmoid(torch.tensor(-1.0)))
                 + 3 * math.log(torch.sigmoid(torch.tensor(0.5)))) / 3
    assert float(loop.segmentation_loss(logits, mask, pos_weight=3.0)) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# end-to-end runs (shared)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs: straight (via the CLI + YAML), 1 epoch + resume, count term off, post hoc only."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("train")
    out = {}
    yaml_file = root / "tiny.yaml"
    yaml_file.write_text("\n".join(f"{k}: {list(v) if isinstance(v, tuple) else 'null' if v is None else v}"
                                   for k, v in TINY.items())
                         + "\nepochs: 9\n")  # --epochs 2 on the command line overrides the file
    out["straight"] = root / "straight"
    assert cli.main(["train", "--config", str(yaml_file), "-o", str(out["straight"]), "--epochs", "2",
                     "--no-progress"]) == 0

    out["resumed"] = root / "resumed"
    loop.train(TrainConfig(out_dir=str(out["resumed"]), **{**TINY, "epochs": 1}))
    out["after_one_epoch"] = _weights(out["resumed"] / "last.pt")
    out["metrics_one_epoch"] = _read_metrics(out["resumed"])
    loop.train(TrainConfig(out_dir=str(out["resumed"]), **TINY), resume="last")

    out["workers"] = root / "workers"  # persistent DataLoader workers: same augmentation, same result
    loop.train(TrainConfig(out_dir=str(out["workers"]), **{**TINY, "num_workers": 2}))

    out["no_count"] = root / "no_count"
    loop.train(TrainConfig(out_dir=str(out["no_count"]), **{**TINY, "count_weight": 0.0}))

    out["post_hoc"] = root / "post_hoc"
    calls = []
    original = loop.count_loss_term
    loop.count_loss_term = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        loop.train(TrainConfig(out_dir=str(out["post_hoc"]), **{**TINY, "post_hoc_only": True}))
    finally:
        loop.count_loss_term = original
    out["post_hoc_calls"] = len(calls)
    return out


def test_end_to_end_run_writes_everything_and_uses_the_count_term(runs):
    out = runs["straight"]
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.csv", "last.pt", "best.pt", "tb"}
    assert list((out / "tb").glob("events.out.tfevents.*"))
    saved = load_config_file(out / "config.yaml")
    assert saved["epochs"] == 2 and saved["base_filters"] == 4 and saved["shape"] == [16, 32, 32]
    rows = _read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # epoch 1: segmentation only; epoch 2: the count term with weight w1 * exp(0)
    assert float(rows[0]["count_weight"]) == 0.0 and rows[0]["count_loss"] == ""
    assert float(rows[1]["count_weight"]) == pytest.approx(1e-3)
    count_loss = float(rows[1]["count_loss"])
    assert math.isfinite(count_loss) and count_loss > 0
    assert float(rows[1]["train_loss"]) > float(rows[1]["seg_loss"])  # loss = seg + w * count
    for r in rows:
        for key in ("train_loss", "seg_loss", "val_seg_f1", "val_count_accuracy", "lr", "epoch_time_s"):
            assert math.isfinite(float(r[key])), key
        assert 0 <= float(r["val_seg_f1"]) <= 1 and 0 <= float(r["val_count_accuracy"]) <= 1
    assert float(rows[1]["lr"]) == pytest.approx(1e-4 * 0.995)
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2 and last["scheduler"]["last_epoch"] == 2
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * 0.995 ** 2)
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    best_row = max(rows, key=lambda r: float(r["val_seg_f1"]))  # first maximum wins (strict improvement)
    assert best["epoch"] == int(best_row["epoch"])
    assert best["best_metric"] == pytest.approx(float(best_row["val_seg_f1"]))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(runs):
    _assert_same_weights(_weights(runs["straight"] / "last.pt"), _weights(runs["resumed"] / "last.pt"))
    a = torch.load(runs["straight"] / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(runs["resumed"] / "last.pt", map_location="cpu", weights_only=False)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    straight, resumed = _read_metrics(runs["straight"]), _read_metrics(runs["resumed"])
    assert len(resumed) == 2  # the resumed run appended its epoch to the kept first row
    for ra, rb in zip(straight, resumed):
        for key in ("train_loss", "seg_loss", "count_loss", "count_weight", "val_seg_f1", "val_count_accuracy"):
            assert ra[key] == rb[key], key
    assert resumed[0] == runs["metrics_one_epoch"][0]


def test_dataloader_workers_do_not_change_the_result(runs):
    _assert_same_weights(_weights(runs["straight"] / "last.pt"), _weights(runs["workers"] / "last.pt"))


def test_the_count_term_changes_the_weights(runs):
    """Same seed, same data: identical runs but for the count weight must end with different weights
    (the resume test shows runs are bitwise reproducible, so the difference is the count gradient)."""
    with_count = _weights(runs["straight"] / "last.pt")
    without = _weights(runs["no_count"] / "last.pt")
    differing = [k for k in with_count if not torch.equal(with_count[k], without[k])]
    assert differing
    rows = _read_metrics(runs["no_count"])
    assert all(float(r["count_weight"]) == 0.0 and r["count_loss"] == "" for r in rows)


def test_post_hoc_only_never_uses_the_count_term(runs):
    assert runs["post_hoc_calls"] == 0
    rows = _read_metrics(runs["post_hoc"])
    assert len(rows) == 2
    assert all(float(r["count_weight"]) == 0.0 and r["count_loss"] == "" for r in rows)
    # validation still reports the count accuracy of the post-hoc count distribution
    assert all(0 <= float(r["val_count_accuracy"]) <= 1 for r in rows)
    # segmentation-only training: exactly the run with count weight 0
    _assert_same_weights(_weights(runs["post_hoc"] / "last.pt"), _weights(runs["no_count"] / "last.pt"))


def test_existing_run_is_not_overwritten_and_resume_checks_settings(runs):
    out = runs["straight"]
    with pytest.raises(ConfigError, match="already holds a run"):
        loop.Trainer(TrainConfig(out_dir=str(out), **TINY))
    with pytest.raises(ConfigError, match=r"cannot resume with different settings \(base_filters: 4 -> 8"):
        loop.train(TrainConfig(out_dir=str(out), **{**TINY, "base_filters": 8, "epochs": 3}), resume="last")
    # nothing left to do: returns at once without touching the checkpoint
    before = (out / "last.pt").stat().st_mtime_ns
    result = loop.train(TrainConfig(out_dir=str(out), **TINY), resume="last")
    assert result.last_epoch == 2 and (out / "last.pt").stat().st_mtime_ns == before


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_resume_restores_rng_states_when_training_on_a_non_cpu_device(runs, monkeypatch):
    """Resuming on a GPU: the RNG states in last.pt must reach torch.set_rng_state / numpy as CPU
    tensors. Reading the checkpoint with map_location=<training device> moved them to the GPU, and
    torch.set_rng_state then raised "RNG state must be a torch.ByteTensor". The meta device stands
    in for CUDA here (it has the same effect: the tensors are not CPU ByteTensors)."""
    reference_state = torch.get_rng_state()
    try:
        ctx = loop.DistContext(device=torch.device("meta"))
        trainer = loop.Trainer(TrainConfig(out_dir=str(runs["straight"]), **{**TINY, "epochs": 3}), ctx,
                               resume="last")
        saved = torch.load(runs["straight"] / "last.pt", map_location="cpu", weights_only=True)
        assert trainer.start_epoch == 2
        assert torch.equal(torch.get_rng_state(), saved["rng"][0]["torch"])  # restored, on the CPU
        assert np.array_equal(np.random.get_state()[1], saved["rng"][0]["numpy"][1].numpy().astype(np.uint32))
    finally:
        torch.set_rng_state(reference_state)


def test_metrics_writer_warns_once_without_tensorboard(tmp_path, monkeypatch):
    from lesioncount import _extras

    real_require = _extras.require

    def fake_require(module, purpose=""):
        if module == "torch.utils.tensorboard":
            raise _extras.MissingExtraError("tensorboard is needed for TensorBoard logging but is not installed")
        return real_require(module, purpose)

    monkeypatch.setattr(_extras, "require", fake_require)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer = loop._MetricsWriter(tmp_path, start_epoch=0)
        writer.write({"epoch": 1, "train_loss": 0.5, "seg_loss": 0.5, "count_weight": 0.0, "val_seg_f1": 0.25,
                      "val_count_accuracy": 0.5, "lr": 1e-4, "epoch_time_s": 1.0})
        writer.write({"epoch": 2, "train_loss": 0.4, "seg_loss": 0.3, "count_loss": 2.0, "count_weight": 0.001,
                      "val_seg_f1": 0.5, "val_count_accuracy": 0.5, "lr": 1e-4, "epoch_time_s": 1.0})
        writer.close()
    messages = [str(w.message) for w in caught if "tensorboard" in str(w.message)]
    assert len(messages) == 1 and "metrics.csv only" in messages[0]
    rows = _read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0]["count_loss"] == "" and rows[1]["count_loss"] == "2.0"
    assert not (tmp_path / "tb").exists()


def test_module_entry_point_and_help():
    from lesioncount.train.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_shipped_configs_are_valid():
    configs = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    resolved = {p.name: TrainConfig(**load_config_file(p)) for p in configs}
    assert resolved["phantom_post_hoc.yaml"].post_hoc_only and not resolved["phantom_multitask.yaml"].post_hoc_only
    paper = resolved["phantom_multitask.yaml"]
    assert (paper.base_filters, paper.levels, paper.dropout, paper.pos_weight, paper.pretrain_epochs,
            paper.count_weight, paper.count_weight_growth, paper.max_count, paper.lr, paper.weight_decay,
            paper.lr_gamma) == (32, 5, 0.1, 3.0, 20, 1e-3, 0.06, 4, 1e-4, 1e-5, 0.995)


def test_bf16_autocast_step_keeps_the_count_term_in_float32():
    from lesioncount.train.model import UNet3D

    torch.manual_seed(0)
    net = UNet3D(in_channels=5, base_filters=4, levels=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    image, mask = torch.randn(2, 5, 16, 32, 32), (torch.rand(2, 1, 16, 32, 32) > 0.95).float()
    before = [p.detach().clone() for p in net.parameters()]
    out = loop.train_step(net, opt, image, mask, torch.tensor([1, 2]), count_weight=0.5, amp_dtype=torch.bfloat16)
    assert out.loss.dtype == out.seg_loss.dtype == out.count_loss.dtype == torch.float32
    assert torch.isfinite(out.loss) and out.count_nll.dtype == torch.float32
    assert float(out.loss) == pytest.approx(float(out.seg_loss) + 0.5 * float(out.count_loss), rel=1e-6)
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="`counts` are needed"):
        loop.train_step(net, opt, image, mask, None, count_weight=0.5)


def test_nnunet_folder_trains_with_its_channel_count(tmp_path):
    """A 2-sequence nnU-Net raw folder: the UNet takes 2 input channels, the checkpoint records it."""
    nib = pytest.importorskip("nibabel")
    import json

    root = tmp_path / "Dataset001_Tiny"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        lab = np.zeros((32, 32, 16), np.uint8)  # NIfTI (x, y, z) -> (D, H, W) = (16, 32, 32)
        lab[4 + 4 * i:6 + 4 * i, 10:12, 5:7] = 1
        for c in range(2):
            img = rng.normal(size=lab.shape).astype(np.float32) + 3 * lab + 5
            nib.save(nib.Nifti1Image(img, np.eye(4)), root / "imagesTr" / f"case{i:03d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "labelsTr" / f"case{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "FLAIR"},
                                                   "labels": {"background": 0, "lesion": 1}, "numTraining": 4,
                                                   "file_ending": ".nii.gz"}))
    out = tmp_path / "run"
    result = loop.train(TrainConfig(out_dir=str(out), **{**TINY, "data": "nnunet", "data_dir": str(root),
                                                        "num_train": 0, "num_val": 1, "num_test": 1, "epochs": 1,
                                                        "pretrain_epochs": 0}))
    assert result.last_epoch == 1
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["in_channels"] == 2 and ckpt["model"]["encoders.0.0.weight"].shape[1] == 2
    assert math.isfinite(float(_read_metrics(out)[0]["count_loss"]))


def test_output_prior_sets_the_head_bias_and_none_keeps_the_default_init(tmp_path):
    trainer = loop.Trainer(TrainConfig(out_dir=str(tmp_path / "prior"), **{**TINY, "output_prior": 0.01}))
    bias = trainer.model.head.bias.detach()
    assert torch.allclose(torch.sigmoid(bias.double()), torch.full_like(bias.double(), 0.01), atol=1e-7)
    trainer = loop.Trainer(TrainConfig(out_dir=str(tmp_path / "default"), **{**TINY, "output_prior": None}))
    assert abs(float(trainer.model.head.bias)) < 1.0  # PyTorch's uniform init, bounded by 1/sqrt(fan_in)
    with pytest.raises(ConfigError, match="output_prior"):
        TrainConfig(**{**TINY, "output_prior": 1.5})


# ------------------------------------------------------------------------------------------------
# fixed-length epochs (samples_per_epoch)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, samples", [(3, 7), (10, 4), (4, 4), (1, 5)])
def test_fixed_length_sampler_draws_whole_passes_cut_to_length(size, samples):
    sampler = loop.FixedLengthSampler(size, samples, seed=3)
    sampler.set_epoch(2)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == samples
    counts = np.bincount(drawn, minlength=size)
    assert counts.max() - counts.min() <= 1  # as even as the length allows
    assert drawn == list(sampler)  # the same epoch draws the same indices
    sampler.set_epoch(3)
    if size > 2:
        assert list(sampler) != drawn  # another epoch, another shuffle


def test_fixed_length_sampler_splits_one_draw_over_ranks():
    whole = loop.FixedLengthSampler(5, 9, seed=1)
    ranks = [loop.FixedLengthSampler(5, 9, num_replicas=2, rank=r, seed=1) for r in range(2)]
    for s in [whole, *ranks]:
        s.set_epoch(4)
    assert [len(s) for s in ranks] == [5, 5]  # 9 rounded up to a multiple of 2
    merged = [i for pair in zip(*[list(s) for s in ranks]) for i in pair]
    assert merged[:9] == list(whole)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        loop.FixedLengthSampler(5, 0)
    with pytest.raises(ValueError, match="dataset_size"):
        loop.FixedLengthSampler(0, 3)


def test_samples_per_epoch_sets_the_steps_per_epoch(tmp_path):
    with pytest.raises(ConfigError, match="samples_per_epoch"):
        TrainConfig(**TINY, samples_per_epoch=-1)
    assert config_from_args(_parse(["-o", "r", "--samples-per-epoch", "6"])).samples_per_epoch == 6
    config = TrainConfig(**{**TINY, "num_train": 2, "epochs": 1}, samples_per_epoch=6, out_dir=str(tmp_path / "r"))
    loop.train(config)
    state = torch.load(tmp_path / "r" / "last.pt", map_location="cpu", weights_only=False)["optimizer"]["state"]
    steps = {int(s["step"]) for s in state.values()}
    assert steps == {3}  # 6 draws of the 2 cases, batch size 2 (one pass would be 1 step)


def test_checkpoint_without_samples_per_epoch_resumes_as_one_pass_per_epoch(runs, tmp_path):
    """A last.pt written before `samples_per_epoch` existed was trained with one pass per epoch: it
    resumes under 0 and refuses a fixed epoch length."""
    out = tmp_path / "old"
    out.mkdir()
    ckpt = torch.load(runs["resumed"] / "last.pt", map_location="cpu", weights_only=False)
    del ckpt["config"]["samples_per_epoch"]
    torch.save(ckpt, out / "last.pt")
    with pytest.raises(ConfigError, match=r"samples_per_epoch: 0 -> 6"):
        loop.train(TrainConfig(out_dir=str(out), **{**TINY, "epochs": 3}, samples_per_epoch=6), resume="last")
    result = loop.train(TrainConfig(out_dir=str(out), **{**TINY, "epochs": 3}), resume="last")
    assert result.last_epoch == 3
