"""nnU-Net v2 integration: a raw dataset from the embedded phantom, nnU-Net's own fingerprinting,
planning and preprocessing, then real (CPU) training with ``nnUNetTrainerCount``.

Marked ``integration`` (``make test-integration`` runs these and the MONAI tests alone); they also
run in the default suite whenever nnunetv2 is installed (about a minute on 2 cores).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from lesioncount.nnunet import write_phantom_dataset  # noqa: E402
from lesioncount.train.phantom import count_lesions, generate_phantom  # noqa: E402

pytestmark = pytest.mark.integration

DATASET_ID = 990
DATASET = f"Dataset{DATASET_ID:03d}_LesionPhantom"
SHAPE = (16, 32, 32)
COUNT_ENV = [k for k in os.environ if k.startswith("LESIONCOUNT_NNUNET_")]


# ------------------------------------------------------------------ the raw dataset (no nnU-Net)
def test_phantom_dataset_is_nnunet_raw_format(tmp_path):
    folder = write_phantom_dataset(tmp_path, 7, name="Ph", num_cases=2, shape=SHAPE, channels=("T1c", "FLAIR"),
                                   spacing=(2.0, 1.0, 0.5))
    assert folder == tmp_path / "Dataset007_Ph"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1c", "1": "FLAIR"}
    assert meta["labels"] == {"background": 0, "lesion": 1} and meta["numTraining"] == 2
    assert meta["file_ending"] == ".nii.gz"
    for i in range(2):
        case = generate_phantom(i, shape=SHAPE, seed=0)
        lab = nib.load(str(folder / "labelsTr" / f"phantom_{i:03d}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(lab.dataobj).transpose(2, 1, 0), case.mask)
        np.testing.assert_allclose(lab.header.get_zooms(), (0.5, 1.0, 2.0))  # x, y, z
        flair = nib.load(str(folder / "imagesTr" / f"phantom_{i:03d}_0001.nii.gz"))
        np.testing.assert_allclose(np.asarray(flair.dataobj).transpose(2, 1, 0), case.image[3])  # FLAIR
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        "phantom_000_0000.nii.gz", "phantom_000_0001.nii.gz", "phantom_001_0000.nii.gz", "phantom_001_0001.nii.gz"]


@pytest.mark.parametrize("kwargs, match", [
    ({"dataset_id": 1000}, "dataset_id"), ({"name": "a b"}, "name"), ({"num_cases": 0}, "num_cases"),
    ({"channels": ("T3",)}, "channels"), ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
])
def test_phantom_dataset_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_phantom_dataset(tmp_path, **{"dataset_id": 5, **kwargs})


# ------------------------------------------------------------------------ nnU-Net itself
@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory):
    """nnUNet_raw/_preprocessed/_results in a temporary folder, the phantom written, planned and
    preprocessed by nnU-Net (what ``nnUNetv2_plan_and_preprocess -d 990 -c 3d_fullres`` does)."""
    pytest.importorskip("nnunetv2")
    root = tmp_path_factory.mktemp("nnunet")
    env = {
        "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"), "nnUNet_compile": "f", "nnUNet_n_proc_DA": "1",
        "nnUNet_def_n_proc": "1",
    }
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in COUNT_ENV:
            mp.delenv(k)
        write_phantom_dataset(root / "raw", DATASET_ID, num_cases=6, shape=SHAPE, channels=("T1c", "FLAIR"))
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints, plan_experiments, preprocess)

        extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True)
        plans = plan_experiments([DATASET_ID])
        preprocess([DATASET_ID], plans, configurations=("3d_fullres",), num_processes=(1,))
        torch.set_num_threads(threads)  # nnU-Net's planner sets it to nnUNet_n_proc_DA
        mp.setenv("nnUNet_n_proc_DA", "0")  # single-threaded data augmentation in this process
        yield {"root": root, "env": dict(env, nnUNet_n_proc_DA="0"), "plans": plans}
    torch.set_num_threads(threads)


def _trainer(nnunet_env, fold=0, dataset_json=None, **options):
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from lesioncount.nnunet import nnUNetTrainerCount
    from lesioncount.nnunet.options import COUNT_OPTIONS

    pre = pathlib.Path(os.environ["nnUNet_preprocessed"]) / DATASET
    plans = load_json(str(pre / f"{nnunet_env['plans']}.json"))
    plans["continue_training"] = False
    saved = {k: os.environ.get(k) for k in (COUNT_OPTIONS[a][0] for a in options)}
    try:
        for attr, value in options.items():
            os.environ[COUNT_OPTIONS[attr][0]] = str(value)
        return nnUNetTrainerCount(plans, "3d_fullres", fold, dataset_json or load_json(str(pre / "dataset.json")),
                                  device=torch.device("cpu"))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_nnunet_planned_the_phantom(nnunet_env):
    pre = pathlib.Path(nnunet_env["env"]["nnUNet_preprocessed"]) / DATASET
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["patch_size"] == list(SHAPE) and cfg["batch_size"] >= 2
    assert (pre / "dataset_fingerprint.json").is_file()


def test_count_trainer_trains_on_cpu(nnunet_env):
    from lesioncount.nnunet import COUNT_LOG_KEYS

    trainer = _trainer(nnunet_env, count_num_epochs=1, count_num_iterations_per_epoch=2,
                       count_num_val_iterations_per_epoch=2, count_pretrain_epochs=0, count_w1=0.5)
    assert trainer.num_epochs == 1 and trainer.num_iterations_per_epoch == 2
    trainer.run_training()

    # every count metric logged once for the epoch, next to nnU-Net's pseudo-Dice, and finite
    assert len(trainer.logger.get_value("mean_fg_dice", step=None)) == 1
    for key in COUNT_LOG_KEYS:
        values = trainer.logger.get_value(key, step=None)
        assert len(values) == 1, key
        assert np.isfinite(values[0]), (key, values)
    assert trainer.logger.get_value("count_weight", step=0) == pytest.approx(0.5)
    assert trainer.logger.get_value("train_count_loss", step=0) >= 0
    assert 0 <= trainer.logger.get_value("val_count_accuracy", step=0) <= 1
    log_text = pathlib.Path(trainer.log_file).read_text()
    assert "count term: weight 0.5" in log_text and "Pseudo dice" in log_text
    ckpt = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), map_location="cpu",
                      weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainerCount"
    assert all(k in ckpt["logging"] for k in COUNT_LOG_KEYS)

    # the count term of a real batch: finite, and its gradient reaches the network through the
    # full-resolution output only, at exactly one voxel per candidate (deep supervision untouched)
    batch = next(trainer.dataloader_train)
    assert isinstance(batch["target"], list) and len(batch["target"]) > 1  # deep supervision is on
    trainer.network.train()
    trainer.network.zero_grad(set_to_none=True)
    output = trainer.network(batch["data"])
    for o in output:
        o.retain_grad()
    # after two SGD steps the network may predict no candidate at all (then the term is 0 or
    # infeasible, without gradient): shift the lesion logit so that each item's most lesion-like
    # voxel has logit +1 (the shift is a constant: the gradient w.r.t. the output is unchanged)
    with torch.no_grad():
        fg = output[0][:, 1] - output[0][:, 0]
        shift = 1.0 - fg.amax(dim=(1, 2, 3))
    out0 = output[0] + torch.stack([torch.zeros_like(shift), shift], 1).view(-1, 2, 1, 1, 1)
    term = trainer.compute_count_term(out0, batch["target"][0])
    assert torch.isfinite(term.loss) and term.loss.requires_grad
    assert bool(torch.isfinite(term.nll).any()), (term.nll, term.result.num_lesions)
    term.loss.backward()
    grads = [p.grad for p in trainer.network.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(o.grad is None for o in output[1:])
    touched = (output[0].grad != 0).any(1).reshape(output[0].shape[0], -1)
    r = term.result
    for b in range(touched.shape[0]):
        present = r.argmax[b][r.argmax[b] >= 0]
        finite = bool(torch.isfinite(term.nll[b]))
        expected = set(present.tolist()) if finite else set()
        assert set(torch.nonzero(touched[b]).reshape(-1).tolist()) == expected
    # ground-truth counts: the label map's 18-connected lesions (independent SciPy count)
    seg = batch["target"][0][:, 0].numpy()
    assert term.counts.tolist() == [count_lesions((s == 1).astype(np.uint8), 18) for s in seg]


def test_count_weight_schedule_in_the_trainer(nnunet_env):
    trainer = _trainer(nnunet_env, count_pretrain_epochs=3, count_w1=0.01, count_w2=0.5, count_max_weight=0.05)
    assert [trainer.count_weight_at(e) for e in (0, 2)] == [0.0, 0.0]
    assert trainer.count_weight_at(3) == pytest.approx(0.01)
    assert trainer.count_weight_at(4) == pytest.approx(0.01 * np.exp(0.5))
    assert trainer.count_weight_at(10) == pytest.approx(0.05)  # capped


@pytest.mark.parametrize("options, match", [
    ({"count_w1": "abc"}, "LESIONCOUNT_NNUNET_W1"),
    ({"count_w1": "-1"}, "count_w1"),
    ({"count_connectivity": "5"}, "connectivity"),
    ({"count_labels": "tumour"}, "neither a label name"),
    ({"count_labels": "2"}, "not foreground labels"),
    ({"count_max_count": "0"}, "max_count"),
    ({"count_num_epochs": "0"}, "LESIONCOUNT_NNUNET_NUM_EPOCHS"),
])
def test_count_trainer_bad_options(nnunet_env, options, match):
    from lesioncount.nnunet import CountOptionError

    with pytest.raises(CountOptionError, match=match):
        _trainer(nnunet_env, fold=2, **options)


def test_count_trainer_labels_by_name(nnunet_env):
    trainer = _trainer(nnunet_env, fold=2, count_labels="lesion")
    assert trainer.count_settings()["lesion_channels"] == [1]


def _two_blobs():
    """(1, 1, 16, 32, 32) label map with lesions around (4, 8, 8) and (10, 20, 20), and logits with
    one candidate on each (peaks 3.0 and 2.0)."""
    seg = torch.zeros(1, 1, *SHAPE)
    seg[0, 0, 3:6, 7:10, 7:10] = 1
    seg[0, 0, 9:12, 19:22, 19:22] = 1
    logit = torch.full((1, 1, *SHAPE), -8.0)
    logit[0, 0, 4, 8, 8] = 3.0
    logit[0, 0, 10, 20, 20] = 2.0
    return seg, logit


def test_count_term_region_training_uses_the_sigmoid_logit(nnunet_env):
    from lesioncount.nnunet import CountOptionError

    meta = {"channel_names": {"0": "T1c", "1": "FLAIR"}, "labels": {"background": 0, "whole": [1, 2], "core": 2},
            "regions_class_order": [1, 2], "numTraining": 6, "file_ending": ".nii.gz"}
    with pytest.raises(CountOptionError, match="2 regions"):
        _trainer(nnunet_env, fold=3, dataset_json=meta)
    trainer = _trainer(nnunet_env, fold=3, dataset_json=meta, count_labels=0)
    assert trainer.label_manager.has_regions and trainer.count_settings()["activation"] == "sigmoid"
    seg, logit = _two_blobs()
    target = torch.cat([seg, torch.zeros_like(seg)], 1)          # region masks (B, R, ...): whole, core
    output = torch.cat([logit, torch.full_like(logit, -8.0)], 1)  # one sigmoid logit per region
    term = trainer.compute_count_term(output, target)
    assert term.counts.tolist() == [2]
    p = torch.sigmoid(torch.tensor([3.0, 2.0]))
    assert float(term.nll[0]) == pytest.approx(float(-(p[0] * p[1]).log()), rel=1e-5)
    core = _trainer(nnunet_env, fold=3, dataset_json=meta, count_labels=1).compute_count_term(output, target)
    assert core.counts.tolist() == [0] and int(core.result.num_lesions[0]) == 0


def test_count_term_ignore_label_is_masked(nnunet_env):
    meta = {"channel_names": {"0": "T1c", "1": "FLAIR"}, "labels": {"background": 0, "lesion": 1, "ignore": 2},
            "numTraining": 6, "file_ending": ".nii.gz"}
    trainer = _trainer(nnunet_env, fold=3, dataset_json=meta)
    assert trainer.label_manager.ignore_label == 2
    seg, logit = _two_blobs()
    seg[0, 0, 8:13, 18:23, 18:23] = 2  # the second lesion and its candidate lie in the ignored region
    softmax_logits = torch.cat([torch.zeros_like(logit), logit], 1)  # heads: background, lesion (not ignore)
    term = trainer.compute_count_term(softmax_logits, seg)
    assert term.counts.tolist() == [1] and int(term.result.num_lesions[0]) == 1
    p = torch.sigmoid(torch.tensor(3.0))  # softmax of (0, 3): sigmoid(3)
    assert float(term.nll[0]) == pytest.approx(float(-p.log()), rel=1e-5)


def test_nnunet_train_cli_runs_nnunet_training(nnunet_env):
    """``lesioncount nnunet-train`` = nnU-Net's run_training with -tr nnUNetTrainerCount found through
    nnUNet_extTrainer: training, checkpoint and nnU-Net's final validation of the fold."""
    env = dict(os.environ, **nnunet_env["env"])
    for k in COUNT_ENV + ["nnUNet_extTrainer"]:
        env.pop(k, None)
    cmd = [sys.executable, "-m", "lesioncount", "nnunet-train", str(DATASET_ID), "3d_fullres", "1", "-device", "cpu",
           "--num-epochs", "1", "--num-iterations-per-epoch", "1", "--num-val-iterations-per-epoch", "1",
           "--count-pretrain-epochs", "0", "--count-w1", "0.25"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = pathlib.Path(env["nnUNet_results"]) / DATASET / "nnUNetTrainerCount__nnUNetPlans__3d_fullres" / "fold_1"
    assert (out / "checkpoint_final.pth").is_file()
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert "foreground_mean" in summary
    log_text = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert "count term: weight 0.25" in log_text


def test_nnunet_train_cli_rejects_bad_option(nnunet_env):
    env = dict(os.environ, **nnunet_env["env"])
    cmd = [sys.executable, "-m", "lesioncount", "nnunet-train", str(DATASET_ID), "3d_fullres", "0", "-device", "cpu",
           "--count-w2", "fast"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--count-w2" in proc.stderr and "LESIONCOUNT_NNUNET_W2" in proc.stderr


def test_trainer_dir_is_found_by_nnunet(nnunet_env, monkeypatch):
    """The `-tr` route: nnU-Net's search of an nnUNet_extTrainer folder finds the class."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from lesioncount.nnunet import TRAINER_DIR, nnUNetTrainerCount

    proc = subprocess.run([sys.executable, "-m", "lesioncount", "nnunet-trainer-dir"], capture_output=True, text=True)
    assert proc.returncode == 0 and pathlib.Path(proc.stdout.strip()) == TRAINER_DIR
    # exactly the call nnU-Net makes for each nnUNet_extTrainer path (nnunetv2.utilities.find_objects)
    cls = recursive_find_python_class(str(TRAINER_DIR), "nnUNetTrainerCount", None, base_folder=str(TRAINER_DIR),
                                      cleanup_imports_from_base_folder=True)
    assert cls is nnUNetTrainerCount
    # nnU-Net's full search walks its own trainer package first, whose Primus trainers import timm
    # (-> torchvision); where those import, the whole name search works too
    pytest.importorskip("timm", reason="nnU-Net's full trainer search imports its Primus trainers (timm)")
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", str(TRAINER_DIR))
    assert recursive_find_trainer_class_by_name("nnUNetTrainerCount") is nnUNetTrainerCount
