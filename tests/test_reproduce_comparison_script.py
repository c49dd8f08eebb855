"""docs/reproduce_comparison.sh and docs/comparison_summary.py, end to end at a tiny size.

The documented command sequence of the count-method comparison (docs/REPRODUCTION.md) trains five
models per data source and seed, evaluates each group (Table 1 with the attack and MC dropout, Table
C.2 on the full runs' test cases) and pools the seeds into the docs' tables. This runs all of it with
2-epoch models on 16x32x32 phantoms (80 s on the 2-core machine with two other jobs running),
including the resume rule: a second call retrains nothing.
"""
from __future__ import annotations

import csv
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("post_hoc", "multitask", "bottleneck", "multihead", "downstream")
TINY = """data: phantom
num_train: {num_train}
num_val: 2
num_test: 4
shape: [16, 32, 32]
base_filters: 4
levels: 3
count_head_filters: 4
epochs: 2
pretrain_epochs: 1
samples_per_epoch: 4
batch_size: 2
lr: 0.003
augment: false
device: cpu
amp: none
output_prior: null
"""


def _run_script(tmp_path: pathlib.Path, out: pathlib.Path) -> str:
    full, low = tmp_path / "full.yaml", tmp_path / "low.yaml"
    full.write_text(TINY.format(num_train=8))
    low.write_text(TINY.format(num_train=2))
    env = {**os.environ, "CONFIG": str(full), "LOW_CONFIG": str(low), "SOURCES": "phantom", "SEEDS": "0 1",
           "LOW_SEEDS": "0", "JOBS": "2", "ATTACK_STEPS": "2", "MC_SAMPLES": "3", "NICE": "0",
           "PYTHON": sys.executable, "LESIONCOUNT": f"{sys.executable} -m lesioncount"}
    done = subprocess.run(["bash", str(ROOT / "docs" / "reproduce_comparison.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((out / "logs").glob("*.log")))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    return done.stdout


def test_comparison_script_trains_evaluates_and_summarises(tmp_path):
    out = tmp_path / "cmp"
    stdout = _run_script(tmp_path, out)
    for group in ("phantom_s0", "phantom_s1", "phantom_low_s0"):
        for model in MODELS:
            assert (out / group / model / "best.pt").is_file(), (group, model)
        with (out / f"{group}_eval" / "table1.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert {r["model"] for r in rows} == set(MODELS), group
        attacked = [r for r in rows if r["attack_sr"] not in ("", None)]
        # Table 1 groups carry the attack for every model's main method; Table C.2 groups none
        assert (len(attacked) == len(MODELS)) == (group != "phantom_low_s0"), group
    # the low-data group is scored on the full runs' test cases (cases after 8 train + 2 val)
    with (out / "phantom_low_s0_eval" / "per_case.csv").open() as fh:
        low_cases = {r["case"] for r in csv.DictReader(fh)}
    with (out / "phantom_s0_eval" / "per_case.csv").open() as fh:
        full_cases = {r["case"] for r in csv.DictReader(fh)}
    assert low_cases == full_cases and len(full_cases) == 4
    assert "== " in stdout and "Table 1" in stdout

    # rerun: every model is finished, nothing is trained again
    again = _run_script(tmp_path, out)
    assert "train " not in again and again.count("skip ") == 15

    summary = subprocess.run([sys.executable, str(ROOT / "docs" / "comparison_summary.py"), "--table", "1",
                              str(out / "phantom_s0_eval"), str(out / "phantom_s1_eval")],
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert summary.returncode == 0, summary.stderr
    text = summary.stdout
    assert "mean over 2 seed(s)" in text and "| bottleneck | | paper | 87.6 |" in text
    for model in MODELS:
        assert f"| {model} |" in text, model
    paired = [line for line in text.splitlines() if line.startswith("| bottleneck | main |")]
    assert len(paired) == 1  # pooled over the two seeds: 8 cases
    low = subprocess.run([sys.executable, str(ROOT / "docs" / "comparison_summary.py"), "--table", "C.2",
                          str(out / "phantom_low_s0_eval")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert low.returncode == 0 and "| multitask | | paper | 86 |" in low.stdout, low.stderr
