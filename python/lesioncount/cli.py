"""Command line: ``lesioncount demo | count | merge | evaluate | plot | train | evaluate-model``.

``demo`` lives here; every other subcommand is a module in ``lesioncount.commands`` that defines
``register(subparsers)`` and is discovered automatically.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .commands._options import add_count_options


def _format_pmf(pmf, max_count: int) -> str:
    names = [f"P({j})" for j in range(max_count)] + [f"P({max_count}+)"]
    return "  ".join(f"{n}={v:.3f}" for n, v in zip(names, pmf))


def _count_name(count: int, max_count: int) -> str:
    return f"{max_count}+" if count >= max_count else str(count)


def demo_verdict(pmf, true_count: int, cc_counts: dict, max_count: int) -> str:
    """One line comparing the count distribution and the ``cc_count`` baseline with the true count.

    Args:
        pmf: (M+1,) count distribution of one item (bins 0..M-1 and "M or more").
        true_count: the item's true number of lesions.
        cc_counts: threshold -> thresholded connected-component count of the item.
        max_count: M.

    Returns:
        e.g. ``"distribution right: most likely 2 (P=0.41), true count 2; cc_count right at tau 0.3, 0.5"``.

    Example:
        >>> demo_verdict([0.1, 0.6, 0.3, 0.0, 0.0], 1, {0.1: 3, 0.5: 1}, 4)
        'distribution right: most likely 1 (P=0.60 for the true count 1); cc_count right at tau 0.5, wrong at 0.1 (3)'
    """
    pmf = [float(v) for v in pmf]
    mode = max(range(len(pmf)), key=lambda j: pmf[j])
    true_bin = min(int(true_count), max_count)
    true_name = _count_name(int(true_count), max_count)
    if mode == true_bin:
        dist = f"distribution right: most likely {true_name} (P={pmf[mode]:.2f} for the true count {true_name})"
    else:
        dist = (f"distribution off by {abs(mode - true_bin)}: most likely {_count_name(mode, max_count)} "
                f"(P={pmf[mode]:.2f}); the true count {true_name} has P={pmf[true_bin]:.2f}")
    right = [t for t, c in cc_counts.items() if int(c) == int(true_count)]
    wrong = [f"{t} ({int(c)})" for t, c in cc_counts.items() if int(c) != int(true_count)]
    if not right:
        cc = "cc_count wrong at every tau: " + ", ".join(wrong)
    elif not wrong:
        cc = "cc_count right at every tau"
    else:
        cc = "cc_count right at tau " + ", ".join(str(t) for t in right) + ", wrong at " + ", ".join(wrong)
    return f"{dist}; {cc}"


def _demo_figure(path, probs, result, true_counts, cc_counts, cc_tau):
    """2 x B figure: maximum projection of each map with its candidates outlined, and its count pmf."""
    import numpy as np

    from . import plot

    B = probs.shape[0]
    fig, axes = plot.new_figure(2, B, figsize=(3.2 * B, 6.4))
    axes = np.asarray(axes).reshape(2, B)
    for b in range(B):
        p = probs[b].numpy()
        depth = p.argmax(axis=0)
        mip = np.take_along_axis(p, depth[None], axis=0)[0]
        lab = np.take_along_axis(result.labels[b].numpy(), depth[None], axis=0)[0]
        ax = axes[0, b]
        ax.imshow(mip, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
        edge = plot._boundaries(lab)
        rgba = np.zeros(lab.shape + (4,))
        rgba[edge] = (0.2, 0.9, 1.0, 1.0)
        ax.imshow(rgba, interpolation="nearest")
        spatial = tuple(result.labels.shape[1:])
        for k in range(result.lesion_probs.shape[1]):
            pk = float(result.lesion_probs[b, k])
            if int(result.lesion_ids[b, k]) == 0 or pk < 0.2:
                continue
            _, row, col = np.unravel_index(int(result.argmax[b, k]), spatial)
            ax.annotate(f"{pk:.2f}", (col, row), xytext=(5, 5), textcoords="offset points", fontsize=8,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"item {b}: true count {int(true_counts[b])}\n{int(result.num_lesions[b])} candidates "
                     f"(p_k >= 0.2 written)", fontsize=9)
        ax = axes[1, b]
        plot.plot_count_distribution(result.pmf[b], true_count=int(true_counts[b]), ax=ax,
                                     title=f"E[C] = {float(result.expected_count[b]):.2f}")
        cc = min(int(cc_counts[cc_tau][b]), result.max_count)
        ax.axvline(cc, color="#55a868", linestyle="--", linewidth=1.5, label=f"cc_count (tau={cc_tau})")
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("lesioncount demo: maximum projection of each probability map with its candidates (top), "
                 "count distribution vs true count and the cc_count baseline (bottom)", fontsize=10)
    return plot.save_figure(fig, path)


def run_demo(args: argparse.Namespace) -> int:
    from . import cc_count, count_distribution, count_nll, has_ops
    from ._extras import available
    from .synthetic import demo_batch

    probs, true_counts = demo_batch()
    B = probs.shape[0]
    print(f"lesioncount demo: {B} synthetic probability maps of {tuple(probs.shape[1:])} with known lesion counts "
          f"(embedded generator, seeded)")
    print(f"compiled ops: {'yes' if has_ops() else 'no (pure torch/SciPy fallback)'}; "
          f"threshold={args.threshold}, connectivity={args.connectivity}, max_count={args.max_count}")
    print(f"count distribution: the candidates are the connected components of the map above tau={args.threshold}; "
          f"each exists with probability p_k = its peak; the count is Poisson-binomial over them.")
    print("cc_count: the usual baseline: threshold the map at tau and count its connected components "
          "(one number, no uncertainty; shown for several tau).")
    probs.requires_grad_(True)
    t0 = time.perf_counter()
    result = count_distribution(probs, threshold=args.threshold, connectivity=args.connectivity,
                                max_count=args.max_count)
    loss = count_nll(result.log_pmf, true_counts)  # the one count-loss rule (lesioncount.count_nll_terms)
    loss.backward()
    elapsed = time.perf_counter() - t0
    result = result._replace(**{f: getattr(result, f).detach() for f in ("pmf", "log_pmf", "lesion_probs", "expected_count", "entropy")})
    nonzero = int((probs.grad != 0).sum())
    probs = probs.detach()
    baseline_thresholds = (0.1, 0.3, 0.5, 0.7, 0.9)
    baselines = {t: cc_count(probs, threshold=t, connectivity=args.connectivity) for t in baseline_thresholds}
    right_dist = right_cc = 0
    for b in range(B):
        t = int(true_counts[b])
        pmf = result.pmf[b].tolist()
        cc_b = {tau: int(baselines[tau][b]) for tau in baseline_thresholds}
        ps = sorted((float(result.lesion_probs[b, k]) for k in range(result.lesion_probs.shape[1])
                     if int(result.lesion_ids[b, k]) != 0), reverse=True)
        print()
        print(f"== item {b}: true count {t}; {int(result.num_lesions[b])} candidates, p_k = "
              + (", ".join(f"{p:.2f}" for p in ps) if ps else "none"))
        print(f"   count distribution: {_format_pmf(pmf, result.max_count)}  (E[C] = {float(result.expected_count[b]):.2f})")
        print("   cc_count: " + ", ".join(f"tau={tau}: {c}" for tau, c in cc_b.items()))
        print(f"   verdict: {demo_verdict(pmf, t, cc_b, result.max_count)}")
        right_dist += int(int(result.most_likely_count[b]) == min(t, result.max_count))
        right_cc += int(cc_b[0.5] == t)
    print()
    print(f"summary: the most likely count is right for {right_dist}/{B} items, cc_count at tau=0.5 for {right_cc}/{B}; "
          f"the distribution also says how sure it is (P of each count)")
    print(f"count loss (mean -log P(C = true count)) = {float(loss.detach()):.4f}; forward+backward {elapsed * 1e3:.1f} ms; "
          f"gradient reaches {nonzero} voxels (one per candidate)")
    if args.figure:
        if available("matplotlib"):
            path = _demo_figure(args.figure, probs, result, true_counts, baselines, 0.5)
            print(f"figure: {path.resolve()}")
        else:
            print("figure: not written, matplotlib is not installed (pip install matplotlib)")
    return 0


def version_text() -> str:
    """``lesioncount --version``: the package version (installed metadata), torch's version, and
    whether the compiled ops and their CUDA kernels are loaded (with the reason when they are not).

    Example:
        >>> print(version_text())   # doctest: +SKIP
        lesioncount 0.1.0 (torch 2.13.0+cpu, Python 3.11.7)
        compiled ops: loaded (.../lesioncount/_C.so)
        CUDA kernels: no (this torch is a CPU-only build)
    """
    import importlib.metadata
    import platform

    from . import _ops

    try:
        version = importlib.metadata.version("lesioncount")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__ as version

        version = f"{version} (not installed: no package metadata)"
    lines = [f"lesioncount {version} (torch {torch.__version__}, Python {platform.python_version()})"]
    info = _ops.build_info()
    if info["ops"]:
        import importlib.util

        spec = importlib.util.find_spec("lesioncount._C")
        lines.append(f"compiled ops: loaded ({spec.origin if spec else '?'}; stable ABI, built against torch "
                     f"{info['built_against_torch'] or '?'}, loads on torch >= {info['stable_abi_target'] or '?'})")
    else:
        lines.append(f"compiled ops: not loaded, the pure torch/SciPy fallback runs ({info['ops_error']})")
    if info["cuda_ops"]:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        cuda = (f"loaded (built with CUDA {info['cuda_version']} for {info['cuda_architectures']}; torch CUDA "
                f"{torch.version.cuda}; {gpus} GPU{'s' if gpus != 1 else ''} visible)")
    else:
        cuda = f"no ({info['cuda_ops_error']})"
    lines.append(f"CUDA kernels: {cuda}")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lesioncount", description="Probabilistic lesion counting.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of lesioncount and torch, and whether the compiled ops and "
                             "CUDA kernels are loaded")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="count lesions on an embedded synthetic batch (no input needed)")
    add_count_options(demo, threshold="", connectivity="", max_count="")
    demo.add_argument("--figure", default="lesioncount-demo.png", metavar="PNG",
                      help="where to write the demo's figure (default: lesioncount-demo.png in the current "
                           "folder; '' for none)")
    demo.set_defaults(func=run_demo)
    import importlib
    import pkgutil

    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv=None) -> int:
    from ._extras import MissingExtraError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MissingExtraError as exc:
        print(f"lesioncount {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
