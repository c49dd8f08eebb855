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


# ------------------------------------------- nnU-Net's own commands and lesioncount nnunet-predict
MODEL_FOLD = "4"
TEST_CASES = ("phantom_001", "phantom_003", "phantom_005")
NNUNET_COMMANDS_REASON = ("nnU-Net's own train/predict commands search nnU-Net's trainer package, whose Primus "
                          "trainers import timm -> torchvision (make test-integration builds .venv-integration)")


def _nnunet_commands_available() -> bool:
    """True where nnU-Net's trainer search imports (timm with a torchvision matching torch)."""
    try:
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - PyPI's torchvision beside a CPU torch fails with RuntimeError
        return False
    return True


def _require_nnunet_commands():
    if not _nnunet_commands_available():
        if os.environ.get("LESIONCOUNT_REQUIRE_NNUNET_COMMANDS") == "1":
            pytest.fail(NNUNET_COMMANDS_REASON)
        pytest.skip(NNUNET_COMMANDS_REASON)


def _bin(name: str) -> str:
    path = pathlib.Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def _run(cmd, env, timeout=900):
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def nnunet_model(nnunet_env):
    """A count-trainer model of fold 4 (2 iterations): trained by the real ``nnUNetv2_train -tr
    nnUNetTrainerCount`` (trainer found through ``nnUNet_extTrainer``) where nnU-Net's trainer search
    imports, else by ``lesioncount nnunet-train``; plus a folder of test images (3 cases)."""
    from lesioncount.nnunet import TRAINER_DIR

    env = dict(os.environ, **nnunet_env["env"])
    for k in COUNT_ENV:
        env.pop(k, None)
    env.update(nnUNet_extTrainer=str(TRAINER_DIR), LESIONCOUNT_NNUNET_NUM_EPOCHS="1",
               LESIONCOUNT_NNUNET_ITERATIONS_PER_EPOCH="2", LESIONCOUNT_NNUNET_VAL_ITERATIONS_PER_EPOCH="1",
               LESIONCOUNT_NNUNET_PRETRAIN_EPOCHS="0")
    real = _nnunet_commands_available()
    if real:
        cmd = [_bin("nnUNetv2_train"), DATASET_ID, "3d_fullres", MODEL_FOLD, "-tr", "nnUNetTrainerCount", "-device", "cpu"]
    else:
        cmd = [sys.executable, "-m", "lesioncount", "nnunet-train", DATASET_ID, "3d_fullres", MODEL_FOLD, "-device", "cpu"]
    _run(cmd, env)
    root = nnunet_env["root"]
    images = root / "imagesTs"
    images.mkdir(exist_ok=True)
    raw = root / "raw" / DATASET
    for case in TEST_CASES:
        for p in (raw / "imagesTr").glob(f"{case}_*.nii.gz"):
            (images / p.name).write_bytes(p.read_bytes())
    labels = root / "labelsTs"
    labels.mkdir(exist_ok=True)
    for case in TEST_CASES:
        (labels / f"{case}.nii.gz").write_bytes((raw / "labelsTr" / f"{case}.nii.gz").read_bytes())
    env.pop("LESIONCOUNT_NNUNET_NUM_EPOCHS")
    return {"env": env, "images": images, "labels": labels, "root": root, "trained_by_nnunet": real}


def _predict_cmd(images, out, *extra):
    return [sys.executable, "-m", "lesioncount", "nnunet-predict", "-i", images, "-o", out, "-d", DATASET_ID,
            "-c", "3d_fullres", "-f", MODEL_FOLD, "-device", "cpu", "--disable_progress_bar", *extra]


def _reports(folder: pathlib.Path) -> dict:
    """CASE.json files of a folder, without their timings."""
    out = {}
    for case in TEST_CASES:
        report = json.loads((folder / f"{case}.json").read_text())
        assert set(report["timings_s"]) and all(v >= 0 for v in report["timings_s"].values())
        report.pop("timings_s")
        out[case] = report
    return out


def _summary(path: pathlib.Path) -> list:
    import csv

    with open(path) as f:
        return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in csv.DictReader(f)]


def test_nnunet_own_commands_then_count_equals_nnunet_predict(nnunet_model, tmp_path):
    """The README's route with nnU-Net's own commands: ``nnUNetv2_train -tr nnUNetTrainerCount``
    (the fixture), ``nnUNetv2_predict -tr nnUNetTrainerCount --save_probabilities``, ``lesioncount
    count`` on its output; ``lesioncount nnunet-predict`` writes the same CASE.json and summary.csv
    (timings aside), with and without the .npz."""
    _require_nnunet_commands()
    assert nnunet_model["trained_by_nnunet"]
    env, images = nnunet_model["env"], nnunet_model["images"]
    pred = tmp_path / "pred"
    _run([_bin("nnUNetv2_predict"), "-i", images, "-o", pred, "-d", DATASET_ID, "-c", "3d_fullres", "-f", MODEL_FOLD,
          "-tr", "nnUNetTrainerCount", "-device", "cpu", "--save_probabilities", "-npp", "1", "-nps", "1",
          "--disable_progress_bar"], env)
    assert sorted(p.name for p in pred.glob("*.npz")) == [f"{c}.npz" for c in TEST_CASES]
    counts = tmp_path / "counts"
    _run([sys.executable, "-m", "lesioncount", "count", "-i", pred, "-o", counts, "--workers", "0"], env)
    expected = _reports(counts)
    assert all(r["file"] == str(pred / f"{c}.npz") for c, r in expected.items())

    # in memory, with the .npz asked for: the same reports (file included), the same .npz and segmentation
    ours = tmp_path / "ours_npz"
    _run(_predict_cmd(images, ours, "--save_probabilities", "-npp", "1", "-nps", "1", "--count-output", ours / "c"), env)
    got = _reports(ours / "c")
    for case in TEST_CASES:
        got[case]["file"] = got[case]["file"].replace(str(ours), str(pred))
    assert got == expected
    assert _summary(ours / "c" / "summary.csv") == _summary(counts / "summary.csv")
    for case in TEST_CASES:
        a = np.load(pred / f"{case}.npz")["probabilities"]
        b = np.load(ours / f"{case}.npz")["probabilities"]
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.asarray(nib.load(str(pred / f"{case}.nii.gz")).dataobj),
                                      np.asarray(nib.load(str(ours / f"{case}.nii.gz")).dataobj))

    # no .npz (the default), everything in this process (-npp 0 -nps 0): same reports but `file`
    plain = tmp_path / "ours"
    _run(_predict_cmd(images, plain, "-npp", "0", "-nps", "0"), env)
    assert not list(plain.glob("*.npz")) and not list(plain.glob("*.pkl"))
    got = _reports(plain)
    for case in TEST_CASES:
        assert got[case].pop("file") == str(plain / f"{case}.nii.gz")
        expected[case].pop("file")
    assert got == expected
    assert _summary(plain / "summary.csv") == _summary(counts / "summary.csv")
    assert (plain / "errors.csv").read_text().strip() == "case,file,error"

    # lesioncount evaluate on nnU-Net's output, in the same environment (torchmetrics -> torchvision imports)
    _run([sys.executable, "-m", "lesioncount", "evaluate", "-p", pred, "-g", nnunet_model["labels"], "-o",
          tmp_path / "eval", "-q"], env)
    assert (tmp_path / "eval" / "report.md").is_file()
    rows = _summary(tmp_path / "eval" / "per_case.csv")
    assert sorted({r["case"] for r in rows}) == list(TEST_CASES)


def test_readme_monai_snippet_in_the_same_environment():
    """The README's MONAI block runs (stand-ins for the user's logits and labels)."""
    pytest.importorskip("monai")
    _require_nnunet_commands()
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = readme.read_text().split("```python\n")[1:]
    block = next(b.split("```")[0] for b in blocks if "from lesioncount.monai import" in b)
    standins = ("import torch\ntorch.manual_seed(0)\n"
                "logits = torch.randn(2, 2, 8, 16, 16); label = (torch.rand(2, 1, 8, 16, 16) > 0.97).long()\n"
                "val_logits = torch.randn(2, 2, 8, 16, 16); val_label = (torch.rand(2, 1, 8, 16, 16) > 0.97).long()\n")
    check = ("\nimport math\nassert math.isfinite(float(loss)), loss\n"
             "assert all(math.isfinite(float(v)) for v in (accuracy, f1, ece))\n"
             "assert abs(float(items[0]['pred_count_pmf'].sum()) - 1) < 1e-5\nprint('MONAI snippet ok')\n")
    proc = subprocess.run([sys.executable, "-c", standins + block + check], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "MONAI snippet ok" in proc.stdout, proc.stderr[-4000:]


def test_nnunet_predict_counts_in_memory(nnunet_model, tmp_path):
    """``lesioncount nnunet-predict`` (also where nnU-Net's own commands cannot import): the segmentation,
    a CASE.json per case equal to `lesioncount count` on its --save_probabilities output, no .npz by default,
    shards, --continue_prediction and its settings check."""
    env, images = nnunet_model["env"], nnunet_model["images"]
    env = {k: v for k, v in env.items() if k != "nnUNet_extTrainer"}  # our trainer is resolved directly
    out = tmp_path / "pred"
    _run(_predict_cmd(images, out, "-npp", "0", "-nps", "1", "--save_probabilities", "--max-count", "3",
                      "--save-labels"), env)
    counts = tmp_path / "counts"
    _run([sys.executable, "-m", "lesioncount", "count", "-i", out, "-o", counts, "--max-count", "3"], env)
    expected = _reports(counts)
    assert _reports(out) == expected
    assert _summary(out / "summary.csv") == _summary(counts / "summary.csv")
    assert sorted(p.name for p in out.glob("*_labels.nii.gz")) == [f"{c}_labels.nii.gz" for c in TEST_CASES]
    assert expected[TEST_CASES[0]]["settings"]["max_count"] == 3

    # shard 1 of 2: the second case only; no .npz
    part = tmp_path / "part"
    _run(_predict_cmd(images, part, "-npp", "0", "-nps", "0", "-num_parts", "2", "-part_id", "1",
                      "--max-count", "3"), env)
    assert sorted(p.name for p in part.glob("*.nii.gz")) == [f"{TEST_CASES[1]}.nii.gz"]
    assert not list(part.glob("*.npz"))
    rows = _summary(part / "summary.part-1-of-2.csv")
    assert [r["case"] for r in rows] == [TEST_CASES[1]]
    assert rows == [r for r in _summary(counts / "summary.csv") if r["case"] == TEST_CASES[1]]

    # --continue_prediction keeps a case that is predicted and counted, and refuses one counted otherwise
    before = (part / f"{TEST_CASES[1]}.json").read_text()
    proc = _run(_predict_cmd(images, part, "-npp", "0", "-nps", "0", "-num_parts", "2", "-part_id", "1",
                             "--max-count", "3", "--continue_prediction"), env)
    assert "1 of 1 case(s) already predicted and counted" in proc.stdout
    assert (part / f"{TEST_CASES[1]}.json").read_text() == before
    proc = subprocess.run([str(c) for c in _predict_cmd(images, part, "-npp", "0", "-nps", "0", "-num_parts", "2",
                                                         "-part_id", "1", "--continue_prediction")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "max_count 3 (now 4)" in (part / "errors.part-1-of-2.csv").read_text()


@pytest.mark.parametrize("extra, match", [
    (["--threshold", "1.5"], "--threshold must be a probability"),
    (["--channel", "2"], "--channel 2 out of range: the model predicts 2 channels"),
    (["-part_id", "2", "-num_parts", "2"], "-part_id must satisfy"),
    (["-f", "3"], "no checkpoint_final.pth for fold(s) [3]"),
])
def test_nnunet_predict_rejects_bad_arguments(nnunet_model, tmp_path, extra, match):
    proc = subprocess.run([str(c) for c in _predict_cmd(nnunet_model["images"], tmp_path / "o", *extra)],
                          env=nnunet_model["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert match in proc.stderr


def test_nnunet_predict_count_options_match_count():
    """nnunet-predict's counting options have count's names and defaults."""
    from lesioncount.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    count, predict = sub.choices["count"], sub.choices["nnunet-predict"]
    names = ["threshold", "connectivity", "min_size", "min_volume", "max_count", "channel", "baseline_threshold",
             "save_labels"]
    defaults = lambda p: {a.dest: (a.default, a.choices, a.option_strings) for a in p._actions if a.dest in names}  # noqa: E731
    ours, theirs = defaults(predict), defaults(count)
    assert len(theirs) == len(names)
    # count's --channel default None reads nnU-Net .npz files as channel 1 (and records 1 in CASE.json)
    assert ours.pop("channel") == (1, None, ["--channel"]) and theirs.pop("channel")[0] in (None, 1)
    assert ours == theirs
