"""lesioncount.plot: every figure is written as a readable, non-blank PNG; what is drawn matches
independent computations (reliability title = torchmetrics ECE, outlines = SciPy boundaries, p_k text
at the given positions); bad input and the missing-extra message."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("matplotlib")

from lesioncount import metrics, plot  # noqa: E402
from lesioncount._extras import MissingExtraError  # noqa: E402

torch.set_num_threads(1)


def _read_png(path):
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > 1000
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[0] >= 200 and img.shape[1] >= 200
    assert float(img[..., :3].std()) > 0.01  # not blank
    return img


def test_count_distribution_bar_chart(tmp_path):
    pmf = torch.tensor([[0.1, 0.5, 0.3, 0.08, 0.02]])
    fig = plot.plot_count_distribution(pmf, true_count=6, title="case 7")
    ax = fig.axes[0]
    assert ax.get_title() == "case 7"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3", "4+"]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx(pmf[0].tolist())
    widths = [p.get_linewidth() for p in ax.patches]
    assert widths.index(max(widths)) == 4  # true count 6 marks the "4+" bar
    assert any("true count: 6" in t.get_text() for t in ax.texts)
    _read_png(plot.save_figure(fig, tmp_path / "counts.png"))


def test_reliability_diagram_title_is_the_torchmetrics_ece(tmp_path):
    g = torch.Generator().manual_seed(1)
    pmf = torch.softmax(torch.randn(50, 5, generator=g, dtype=torch.float64) * 2, 1)
    target = torch.randint(0, 6, (50,), generator=g)
    fig, axes = plot.new_figure(1, 2, figsize=(10, 4))
    plot.plot_reliability_diagram(pmf, target, n_bins=10, ax=axes[0], label="ours")
    onehot = F.one_hot(target.clamp_max(4).flip(0), 5).double()
    plot.plot_reliability_diagram(onehot, target, n_bins=10, ax=axes[1], label="baseline")
    ece, mce = metrics.count_calibration_errors(pmf, target, n_bins=10)
    assert axes[0].get_title().startswith(f"ours\nECE = {float(ece):.4f}, MCE = {float(mce):.4f} (N = 50)")
    ece_b, _ = metrics.count_calibration_errors(onehot, target, n_bins=10)
    assert f"ECE = {float(ece_b):.4f}" in axes[1].get_title()
    # one bar pair per non-empty bin, item counts written on the bars
    bins = metrics.reliability_bins(pmf, target, n_bins=10)
    n_texts = sorted(int(t.get_text()[2:]) for t in axes[0].texts)
    assert n_texts == sorted(int(c) for c in bins["count"] if c > 0)
    _read_png(plot.save_figure(fig, tmp_path / "reliability"))  # .png appended


def test_line_plots(tmp_path):
    fig = plot.plot_accuracy_vs_discarded([0.0, 0.1, 0.2], {"ours": [0.6, 0.7, 0.8], "other": [0.5, 0.5, 0.6]})
    lines = fig.axes[0].get_lines()
    assert [list(l.get_ydata()) for l in lines] == [[0.6, 0.7, 0.8], [0.5, 0.5, 0.6]]
    _read_png(plot.save_figure(fig, tmp_path / "discard.png"))
    fig = plot.plot_threshold_sweep(np.array([0.1, 0.5, 0.9]), {"f1": torch.tensor([0.2, 0.4, 0.3])}, "F1")
    assert fig.axes[0].get_ylabel() == "F1"
    _read_png(plot.save_figure(fig, tmp_path / "sub" / "sweep.png"))
    with pytest.raises(ValueError, match="2 values for 3 x positions"):
        plot.plot_threshold_sweep([0.1, 0.5, 0.9], {"f1": [0.2, 0.4]}, "F1")


def test_slice_overlay_outlines_and_probability_texts(tmp_path):
    from scipy import ndimage

    rng = np.random.default_rng(0)
    image = rng.random((40, 50))
    labels = np.zeros((40, 50), np.int32)
    labels[4:9, 5:10] = 3
    labels[20:30, 20:35] = 1
    labels[22:25, 22:25] = 0          # a hole: it has an inner outline too
    labels[35:38, 45:50] = 2          # touches the image border; no probability given
    fig = plot.plot_slice_overlay(image, labels, {1: 0.93, 3: 0.125}, positions={1: (25.0, 30.0)})
    ax = fig.axes[0]
    overlay = ax.images[1].get_array()
    drawn = np.asarray(overlay)[..., 3] > 0
    # independent boundary: label pixels not in the 4-connected erosion of their own label
    expected = np.zeros_like(drawn)
    cross = ndimage.generate_binary_structure(2, 1)
    for k in (1, 2, 3):
        region = labels == k
        expected |= region & ~ndimage.binary_erosion(region, cross, border_value=0)
    np.testing.assert_array_equal(drawn, expected)
    texts = {t.get_text(): t.xy for t in ax.texts}
    assert set(texts) == {"0.93", "0.12", "?"}
    assert texts["0.93"] == (30.0, 25.0)    # (x=col, y=row) of the given position
    assert texts["0.12"] == (9, 4)          # top-right corner of label 3's box
    _read_png(plot.save_figure(fig, tmp_path / "overlay.png"))
    with pytest.raises(TypeError, match="integer label map"):
        plot.plot_slice_overlay(image, labels.astype(float), {})
    with pytest.raises(ValueError, match="same shape"):
        plot.plot_slice_overlay(image, labels[:10], {})


def test_bad_pmf_for_bar_chart():
    with pytest.raises(ValueError, match=r"shape \(M\+1,\)"):
        plot.plot_count_distribution(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="true_count"):
        plot.plot_count_distribution(torch.tensor([0.5, 0.5]), true_count=-1)


def test_missing_matplotlib_names_the_plot_extra(monkeypatch):
    import importlib

    from lesioncount import _extras

    real = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(_extras.importlib, "import_module", fake_import)
    with pytest.raises(MissingExtraError, match=r"pip install --no-build-isolation '\.\[plot\]'"):
        plot.plot_threshold_sweep([0.1], {"a": [1.0]}, "x")
