"""`lesioncount demo` (verdict per item, cc_count explained, one PNG figure) and `make demo`'s own small venv."""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

from lesioncount._extras import available
from lesioncount.cli import demo_verdict, main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_prints_a_verdict_per_item_and_explains_cc_count(tmp_path, capsys):
    figure = tmp_path / "figs" / "demo.png"
    assert main(["demo", "--figure", str(figure)]) == 0
    out = capsys.readouterr().out
    items = re.findall(r"^== item (\d+): true count (\d+)", out, flags=re.M)
    verdicts = re.findall(r"^   verdict: distribution (right|off by \d+).*; cc_count .*$", out, flags=re.M)
    assert len(items) == 4 and len(verdicts) == 4, out
    assert re.search(r"^cc_count: .*threshold the map at tau and count its connected components", out, flags=re.M)
    assert re.search(r"^summary: the most likely count is right for \d/4 items, cc_count at tau=0.5 for \d/4", out,
                     flags=re.M)
    if available("matplotlib"):
        assert f"figure: {figure.resolve()}" in out
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "figure: not written, matplotlib is not installed" in out


def test_demo_without_figure_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--figure", ""]) == 0
    assert "figure:" not in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_demo_verdict_right_and_wrong():
    assert demo_verdict([0.1, 0.6, 0.3, 0.0, 0.0], 1, {0.1: 3, 0.5: 1}, 4) == (
        "distribution right: most likely 1 (P=0.60 for the true count 1); cc_count right at tau 0.5, wrong at 0.1 (3)")
    # the tail bin "4+" holds the true count 6; cc_count never right
    assert demo_verdict([0.0, 0.1, 0.2, 0.6, 0.1], 6, {0.1: 2, 0.5: 3}, 4) == (
        "distribution off by 1: most likely 3 (P=0.60); the true count 4+ has P=0.10; "
        "cc_count wrong at every tau: 0.1 (2), 0.5 (3)")
    assert demo_verdict([0.9, 0.1], 0, {0.5: 0}, 1).endswith("cc_count right at every tau")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_uses_its_own_small_venv_and_build_dir():
    """`make demo` must not install the test/framework requirements nor share .venv or build/{wheel_tag}."""
    dry = subprocess.run(["make", "-n", "-B", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "requirements-dev.txt" not in dry and "nnunet" not in dry.lower() and "monai" not in dry.lower()
    assert ".venv-demo/bin/python -m venv" not in dry  # the venv is created with the system python
    install = [line for line in dry.splitlines() if "pip install" in line and "torch==" in line]
    assert install and " -q" not in install[0], dry  # progress shown
    for package in ("numpy", "matplotlib", "scikit-build-core", "ninja"):
        assert package in install[0]
    assert "build-dir='build/demo-{wheel_tag}'" in dry and " -e " not in dry, dry
    assert ".venv-demo/bin/lesioncount demo --figure out/demo.png" in dry
