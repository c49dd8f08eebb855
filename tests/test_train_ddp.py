"""DDP path of the training loop: 2 CPU processes (Gloo) launched by torchrun on a tiny run.

Checks that the run finishes, that only rank 0 wrote files and printed, and that the result equals a
single-process run on the same data: with dropout off, 2 ranks x batch 1 see exactly the batches of
1 process x batch 2 (DistributedSampler, and FixedLengthSampler with ``samples_per_epoch``, interleave
the same draw) and DDP averages the
gradients of the per-rank mean losses, so weights agree up to float summation order, and the
all-reduced validation metrics agree.
"""
from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from lesioncount.train import loop
from lesioncount.train.config import TrainConfig

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with Gloo is not available")

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = dict(epochs=2, pretrain_epochs=1, num_train=4, num_val=3, num_test=2, shape=(16, 32, 32), base_filters=4,
             levels=3, dropout=0.0, device="cpu", seed=0)


def _rows(out: pathlib.Path) -> list[dict]:
    with (out / "metrics.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("samples_per_epoch", [0, 6], ids=["one-pass", "fixed-length"])
def test_torchrun_two_cpu_processes_match_a_single_process_run(tmp_path, samples_per_epoch):
    flags = {**FLAGS, "samples_per_epoch": samples_per_epoch}
    ddp_out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "lesioncount.train", "-o", str(ddp_out), "--batch-size", "1", "--no-progress"]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "python")}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    # rank 0 alone prints ...
    assert proc.stdout.count("epoch 1/2:") == 1 and proc.stdout.count("epoch 2/2:") == 1
    assert proc.stdout.count("done: best validation") == 1
    # ... and writes: exactly the expected files, one row per epoch, no leftovers of atomic saves
    assert sorted(p.name for p in ddp_out.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.csv", "tb"]
    assert len(list((ddp_out / "tb").glob("events.out.tfevents.*"))) == 1
    ddp_rows = _rows(ddp_out)
    assert [r["epoch"] for r in ddp_rows] == ["1", "2"]
    ddp_ckpt = torch.load(ddp_out / "last.pt", map_location="cpu", weights_only=False)
    assert ddp_ckpt["world_size"] == 2 and len(ddp_ckpt["rng"]) == 2  # every rank's RNG state, for resume

    torch.set_num_threads(1)
    single_out = tmp_path / "single"
    loop.train(TrainConfig(out_dir=str(single_out), batch_size=2, progress=False, **flags))
    single_ckpt = torch.load(single_out / "last.pt", map_location="cpu", weights_only=False)
    # Adam divides by sqrt(v): where a gradient is ~0, summation-order noise can flip single steps of
    # size lr, so the bound on any weight is 2 * lr * steps; a genuinely different run moves most weights
    # by ~lr * steps, while here the typical difference is float noise.
    steps = FLAGS["epochs"] * (samples_per_epoch or FLAGS["num_train"]) // 2
    assert {int(s["step"]) for s in single_ckpt["optimizer"]["state"].values()} == {steps}
    assert {int(s["step"]) for s in ddp_ckpt["optimizer"]["state"].values()} == {steps}
    diffs = torch.cat([(ddp_ckpt["model"][k] - v).abs().flatten() for k, v in single_ckpt["model"].items()
                       if v.is_floating_point()])
    assert float(diffs.max()) <= 2 * 1e-4 * steps
    assert float(diffs.mean()) < 2e-5 and float(diffs.median()) < 1e-5
    for a, b in zip(ddp_rows, _rows(single_out)):
        assert float(a["count_weight"]) == float(b["count_weight"])
        assert float(a["val_seg_f1"]) == pytest.approx(float(b["val_seg_f1"]), rel=1e-2)
        for key in ("train_loss", "seg_loss", "val_count_nll"):  # val_count_nll is empty if all are infeasible
            assert (a[key] == b[key] == "") or float(a[key]) == pytest.approx(float(b[key]), rel=1e-4), key
    assert float(ddp_rows[0]["val_seg_f1"]) == pytest.approx(float(_rows(single_out)[0]["val_seg_f1"]), rel=1e-6)
    assert float(ddp_rows[1]["count_loss"]) == pytest.approx(float(_rows(single_out)[1]["count_loss"]), rel=1e-4)
