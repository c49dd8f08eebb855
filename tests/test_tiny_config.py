"""configs/tiny_cpu.yaml, the README's "a minute on a CPU" run, learns something a newcomer can see."""
from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_cpu_config_shows_a_meaningful_validation_figure(tmp_path):
    pytest.importorskip("yaml")
    from lesioncount.train.config import TrainConfig, load_config_file
    from lesioncount.train.loop import train

    values = load_config_file(ROOT / "configs" / "tiny_cpu.yaml")
    config = TrainConfig.from_dict({**values, "progress": False})
    config.out_dir = str(tmp_path / "run")
    result = train(config)
    last = result.history[-1]
    # not the all-zero validation of an untrained network: lesions are segmented and counts are right
    assert last["val_seg_f1"] > 0.4, result.history
    assert last["val_count_accuracy"] > 0.0, result.history
    assert result.best_metric == max(r["val_seg_f1"] for r in result.history)
