"""Figures for lesion counting: count-distribution bars, reliability diagrams, accuracy vs discarded
fraction, threshold sweeps and slice overlays of the candidates with their existence probabilities.

matplotlib is imported lazily (``pip install matplotlib``, the ``[plot]`` extra). Figures are created as
``matplotlib.figure.Figure`` objects drawn by the Agg canvas, without pyplot: no global backend is
changed, nothing opens a window, and figures need no explicit closing. Every function takes an
optional ``ax`` to draw into (it then returns ``ax.figure``); without one it creates a figure.

Example:
    >>> import torch
    >>> from lesioncount import plot
    >>> fig = plot.plot_count_distribution(torch.tensor([0.1, 0.5, 0.3, 0.1, 0.0]), true_count=1)
    >>> plot.save_figure(fig, "count.png")                  # doctest: +SKIP
"""
from __future__ import annotations

import os
import pathlib
from typing import Mapping, Sequence

import numpy as np
import torch

from ._extras import require

__all__ = [
    "new_figure",
    "plot_accuracy_vs_discarded",
    "plot_count_distribution",
    "plot_froc",
    "plot_precision_recall",
    "plot_reliability_diagram",
    "plot_slice_overlay",
    "plot_threshold_sweep",
    "save_figure",
]


def _mpl():
    return require("matplotlib", "plots")


def new_figure(nrows: int = 1, ncols: int = 1, figsize=(5.0, 4.0)):
    """A pyplot-free figure on the Agg canvas and its axes.

    Returns:
        (fig, axes): ``axes`` is one Axes for a 1x1 grid, else a numpy array of Axes.

    Example:
        >>> fig, (ax1, ax2) = new_figure(1, 2, figsize=(10, 4))   # doctest: +SKIP
    """
    _mpl()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=True)
    return fig, axes


def _axes(ax, figsize=(5.0, 4.0)):
    if ax is None:
        return new_figure(figsize=figsize)
    return ax.figure, ax


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def save_figure(fig, path) -> pathlib.Path:
    """Writes ``fig`` as a PNG (creating parent folders) and releases it.

    Args:
        fig: a matplotlib Figure (from these functions or pyplot).
        path: output file; ``.png`` is appended when the name has another suffix.

    Returns:
        the path written.

    Example:
        >>> save_figure(plot_threshold_sweep([0.1, 0.5], {"acc": [0.5, 0.7]}, "accuracy"), "sweep.png")  # doctest: +SKIP
    """
    path = pathlib.Path(path)
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(os.fspath(path), format="png", dpi=110)
    if getattr(fig.canvas, "manager", None) is not None:  # a pyplot figure: drop pyplot's reference
        require("matplotlib.pyplot", "plots").close(fig)
    else:
        fig.clear()
    return path


def _bin_names(n: int) -> list[str]:
    return [str(j) for j in range(n - 1)] + [f"{n - 1}+"]


def plot_count_distribution(pmf, true_count: int | None = None, ax=None, title: str | None = None):
    """Bar chart of one count distribution P(C = 0..M-1), P(C >= M); the true count's bar is marked.

    Args:
        pmf: (M+1,) or (1, M+1) probabilities (tensor or array).
        true_count: the true number of lesions (>= M marks the tail bar), or None.
        ax: Axes to draw into (default: a new figure).
        title: figure title (default "Count distribution").

    Returns:
        the Figure.

    Example:
        >>> fig = plot_count_distribution(torch.tensor([[0.1, 0.5, 0.3, 0.1, 0.0]]), true_count=2)
    """
    p = _to_numpy(pmf, "pmf").astype(np.float64)
    if p.ndim == 2 and p.shape[0] == 1:
        p = p[0]
    if p.ndim != 1 or p.shape[0] < 2:
        raise ValueError(f"`pmf` must have shape (M+1,) or (1, M+1) with M >= 1, got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("`pmf` contains NaN or infinite values")
    fig, ax = _axes(ax)
    n = p.shape[0]
    names = _bin_names(n)
    colors = ["#4c72b0"] * n
    bars = ax.bar(np.arange(n), p, color=colors, edgecolor="black", linewidth=0.6)
    if true_count is not None:
        if int(true_count) < 0:
            raise ValueError(f"`true_count` must be >= 0, got {true_count}")
        tb = min(int(true_count), n - 1)
        bars[tb].set_color("#dd8452")
        bars[tb].set_edgecolor("black")
        bars[tb].set_linewidth(2.0)
        ax.annotate(f"true count: {true_count}", (tb, p[tb]), xytext=(0, 14), textcoords="offset points",
                    ha="center", va="bottom", fontsize=9, fontweight="bold", color="#b5541c")
    for j, v in enumerate(p):
        ax.text(j, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(n), names)
    ax.set_xlabel("lesion count")
    ax.set_ylabel("probability")
    ax.set_ylim(0, max(1.0, float(p.max())) * 1.18)
    ax.set_title(title if title is not None else "Count distribution")
    return fig


def plot_reliability_diagram(pmf, target, max_count: int | None = None, n_bins: int = 10, ax=None,
                             label: str | None = None):
    """Reliability diagram of count distributions: per confidence bin, accuracy of the most likely
    count bin against the mean confidence, with the number of items in each bin; ECE in the title.

    Bins are those of :func:`lesioncount.metrics.reliability_bins` (= torchmetrics); the extra bin of
    confidence exactly 1.0 (one-hot predictions such as the cc_count baseline) is drawn as a narrow
    bar just right of 1.

    Args:
        pmf: (N, M+1) count distributions (a hard baseline as a one-hot pmf).
        target: (N,) true counts.
        max_count: M, checked against ``pmf`` when given.
        n_bins: equal-width confidence bins.
        ax: Axes to draw into.
        label: method name for the title.

    Returns:
        the Figure.

    Example:
        >>> pmf = torch.softmax(torch.randn(20, 5), 1); target = torch.randint(0, 6, (20,))
        >>> fig = plot_reliability_diagram(pmf, target, n_bins=5, label="ours")
    """
    from .metrics import reliability_bins

    r = reliability_bins(pmf, target, n_bins=n_bins, max_count=max_count)
    fig, ax = _axes(ax)
    width = 1.0 / n_bins
    count = r["count"].cpu().numpy()
    acc = r["accuracy"].cpu().numpy()
    conf = r["confidence"].cpu().numpy()
    left = np.append(r["lower"].cpu().numpy()[:-1], 1.0)
    widths = np.append(np.full(n_bins, width), width / 3)
    filled = count > 0
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
    ax.bar(left[filled], acc[filled], width=widths[filled], align="edge", color="#4c72b0",
           edgecolor="black", linewidth=0.6, label="accuracy")
    ax.bar(left[filled], conf[filled] - acc[filled], bottom=acc[filled], width=widths[filled], align="edge",
           facecolor="none", hatch="///", edgecolor="#c44e52", linewidth=0.8, label="gap to mean confidence")
    for x, w, a, c, k in zip(left[filled], widths[filled], acc[filled], conf[filled], count[filled]):
        ax.text(x + w / 2, max(a, c) + 0.01, f"n={int(k)}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xlim(0, 1 + width / 3 + 0.01)
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("confidence of the most likely count bin")
    ax.set_ylabel("accuracy")
    name = f"{label}\n" if label else ""  # the label on its own line: long names would clip the title
    ax.set_title(f"{name}ECE = {float(r['ece']):.4f}, MCE = {float(r['mce']):.4f} (N = {int(count.sum())})", fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    return fig


def plot_accuracy_vs_discarded(fractions, accuracies: Mapping[str, Sequence[float]], ax=None):
    """Count accuracy against the fraction of most uncertain items discarded, one line per method.

    Args:
        fractions: (F,) discarded fractions in [0, 1).
        accuracies: method name -> (F,) accuracies (e.g. from ``metrics.accuracy_vs_discarded``).
        ax: Axes to draw into.

    Returns:
        the Figure.

    Example:
        >>> fig = plot_accuracy_vs_discarded([0, 0.1, 0.2], {"count distribution": [0.7, 0.75, 0.8]})
    """
    return _line_plot(fractions, accuracies, "fraction of most uncertain cases discarded", "count accuracy",
                      "Accuracy vs discarded fraction", ax)


def plot_threshold_sweep(thresholds, values: Mapping[str, Sequence[float]], ylabel: str, ax=None):
    """A metric against the candidate/segmentation threshold, one line per method.

    Args:
        thresholds: (T,) thresholds.
        values: series name -> (T,) values.
        ylabel: name of the metric.
        ax: Axes to draw into.

    Returns:
        the Figure.

    Example:
        >>> fig = plot_threshold_sweep([0.1, 0.5, 0.9], {"ours": [0.8, 0.7, 0.5], "cc_count": [0.3, 0.6, 0.5]}, "accuracy")
    """
    return _line_plot(thresholds, values, "threshold", ylabel, f"{ylabel} vs threshold", ax)


def plot_froc(curves: Mapping[str, Mapping], ax=None, max_fp: float = 8.0):
    """FROC curves (lesion sensitivity against false positives per scan, log x axis), one per method.

    Args:
        curves: name -> a :func:`lesioncount.detection.froc` dict (``fps_per_image``, ``sensitivity``,
            ``fp_rates``, ``sensitivities``, ``cpm``); the CPM points are marked and the CPM is in the legend.
        ax: Axes to draw into.
        max_fp: right end of the x axis.

    Returns:
        the Figure.

    Example:
        >>> from lesioncount.detection import froc
        >>> fig = plot_froc({"p_k": froc([0.9, 0.5, 0.2], [True, False, True], n_targets=3, n_images=2)})
    """
    if not curves:
        raise ValueError("nothing to plot: no FROC curve given")
    fig, ax = _axes(ax)
    for name, c in curves.items():
        x = _to_numpy(c["fps_per_image"], name).astype(np.float64)
        y = _to_numpy(c["sensitivity"], name).astype(np.float64)
        line, = ax.step(x, y, where="post", label=f"{name} (CPM {float(c['cpm']):.3f})")
        ax.plot(_to_numpy(c["fp_rates"], name), _to_numpy(c["sensitivities"], name), "o", color=line.get_color(), ms=4)
    ax.set_xscale("symlog", linthresh=0.125)
    ax.set_xlim(0, max_fp)
    ticks = [0.0] + [0.125 * 2 ** i for i in range(12) if 0.125 * 2 ** i <= max_fp]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title("FROC")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_precision_recall(curves: Mapping[str, Mapping], ax=None):
    """Lesion-level precision-recall curves, one per method; AP in the legend.

    Args:
        curves: name -> a :func:`lesioncount.detection.precision_recall_curve` dict (``precision``,
            ``recall``), with an optional ``ap``.
        ax: Axes to draw into.

    Returns:
        the Figure.

    Example:
        >>> from lesioncount.detection import precision_recall_curve
        >>> fig = plot_precision_recall({"p_k": precision_recall_curve([0.9, 0.5], [True, False], n_targets=2)})
    """
    if not curves:
        raise ValueError("nothing to plot: no precision-recall curve given")
    fig, ax = _axes(ax)
    for name, c in curves.items():
        r = np.r_[0.0, _to_numpy(c["recall"], name).astype(np.float64)]
        p = _to_numpy(c["precision"], name).astype(np.float64)
        p = np.r_[p[:1] if p.size else [1.0], p]
        label = f"{name} (AP {float(c['ap']):.3f})" if "ap" in c else name
        ax.step(r, p, where="pre", label=label)
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("lesion recall")
    ax.set_ylabel("lesion precision")
    ax.set_title("Precision-recall (score p_k)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _line_plot(x, series, xlabel, ylabel, title, ax):
    xs = _to_numpy(x, "x").astype(np.float64).reshape(-1)
    if not series:
        raise ValueError("nothing to plot: no series given")
    fig, ax = _axes(ax)
    markers = "os^Dvx+"
    for i, (name, ys) in enumerate(series.items()):
        y = _to_numpy(ys, name).astype(np.float64).reshape(-1)
        if y.shape != xs.shape:
            raise ValueError(f"series {name!r} has {y.shape[0]} values for {xs.shape[0]} x positions")
        ax.plot(xs, y, marker=markers[i % len(markers)], label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels of a nonzero label with a 4-neighbour of another label (or the image border)."""
    padded = np.pad(labels, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(labels.shape, dtype=bool)
    for shifted in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        edge |= shifted != centre
    return edge & (labels != 0)


def plot_slice_overlay(image2d, labels2d, lesion_probs: Mapping[int, float], ax=None,
                       positions: Mapping[int, tuple[float, float]] | None = None, title: str | None = None,
                       origin: str = "upper", cmap: str = "gray", window: tuple[float, float] | None = None,
                       aspect: float = 1.0):
    """One slice with the outline of every candidate and its existence probability p_k written next to it.

    Outlines are the boundary pixels of each label (one pass over the slice, no per-candidate mask),
    coloured by p_k. The text goes at ``positions[k]`` when given (e.g. the candidate's argmax voxel
    when it lies in this slice), else at the top-right corner of the candidate's bounding box.

    Args:
        image2d: (H, W) image (or probability map) shown in grey; 1st-99th percentile window.
        labels2d: (H, W) integer candidate label map (0 = background).
        lesion_probs: label id -> p_k; labels in the slice without an entry are outlined in grey
            with "?" (never silently dropped).
        ax: Axes to draw into.
        positions: label id -> (row, col) in the displayed array.
        title: axes title.
        origin: "upper" (row 0 at the top) or "lower", as in ``imshow``.
        cmap: colormap of the image.
        window: (low, high) grey-value window; default the 1st and 99th percentiles (use (0, 1)
            for a probability map).
        aspect: height / width of one pixel (row spacing / column spacing, for anisotropic voxels).

    Returns:
        the Figure.

    Example:
        >>> img = torch.rand(32, 32); lab = torch.zeros(32, 32, dtype=torch.int32); lab[4:9, 5:10] = 3
        >>> fig = plot_slice_overlay(img, lab, {3: 0.82})
    """
    mpl = _mpl()
    from scipy import ndimage

    img = _to_numpy(image2d, "image2d").astype(np.float64)
    lab = _to_numpy(labels2d, "labels2d")
    if img.ndim != 2 or lab.shape != img.shape:
        raise ValueError(f"`image2d` and `labels2d` must be 2-D with the same shape, got {img.shape} and {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise TypeError(f"`labels2d` must be an integer label map, got {lab.dtype}")
    fig, ax = _axes(ax, figsize=(6.0, 6.0))
    if window is not None:
        lo, hi = (float(v) for v in window)
    else:
        finite = img[np.isfinite(img)]
        lo, hi = (float(v) for v in np.percentile(finite, [1, 99])) if finite.size else (0.0, 1.0)
        if hi <= lo:
            lo, hi = (float(finite.min()), float(finite.max()) + 1e-6) if finite.size else (0.0, 1.0)
    ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, origin=origin, interpolation="nearest", aspect=aspect)

    present = np.unique(lab[lab != 0])
    prob_of = np.full(int(lab.max()) + 1 if lab.size else 1, np.nan)
    for k in present:
        if int(k) in lesion_probs:
            prob_of[k] = float(lesion_probs[int(k)])
    edge = _boundaries(lab)
    colormap = mpl.colormaps["autumn_r"]
    rgba = np.zeros(lab.shape + (4,))
    edge_probs = prob_of[lab[edge]]
    colours = colormap(np.nan_to_num(edge_probs, nan=0.0))
    colours[np.isnan(edge_probs)] = (0.6, 0.6, 0.6, 1.0)
    rgba[edge] = colours
    ax.imshow(rgba, origin=origin, interpolation="nearest", aspect=aspect)
    norm = mpl.colors.Normalize(0, 1)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=colormap), ax=ax, fraction=0.046, pad=0.04,
                 label="candidate existence probability $p_k$")

    boxes = ndimage.find_objects(lab.astype(np.int64)) if present.size else []
    for k in present:
        k = int(k)
        if positions is not None and k in positions:
            row, col = positions[k]
            offset = (6, 6)
        else:
            box = boxes[k - 1]
            row = box[0].start if origin == "upper" else box[0].stop - 1
            col, offset = box[1].stop - 1, (4, 4)
        text = f"{prob_of[k]:.2f}" if np.isfinite(prob_of[k]) else "?"
        ax.annotate(text, (col, row), xytext=offset, textcoords="offset points", fontsize=8, color="black",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else f"{present.size} candidate(s) in this slice")
    return fig
