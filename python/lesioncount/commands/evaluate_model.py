"""``lesioncount evaluate-model``: score trained checkpoints on a test split (the paper's Table 1, C.1).

Example:
    lesioncount evaluate-model --checkpoint post_hoc=runs/ph/best.pt --checkpoint multitask=runs/mt/best.pt \\
        -o eval/
    # the paper's comparison (Table 1): the count-head baselines too, the attack and MC-dropout CC
    lesioncount evaluate-model --checkpoint post_hoc=... --checkpoint bottleneck=... --checkpoint multihead=... \\
        --checkpoint downstream=... --checkpoint multitask=... --attack --mc-samples 50 --paper-table 1 -o eval/
"""
from __future__ import annotations

import argparse
import pathlib
import sys

HELP = "evaluate trained checkpoints on the test split: count accuracy/F1/ECE/MCE, segmentation F1/ECE/MCE, plots"


def _parse_checkpoints(values: list[str]) -> dict:
    checkpoints: dict[str, pathlib.Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            path = value
            candidate = pathlib.Path(value)
            name = candidate.parent.name or candidate.stem
        if not name or not path:
            raise ValueError(f"--checkpoint {value!r}: expected NAME=PATH or PATH")
        base, k = name, 2
        while name in checkpoints:
            name, k = f"{base}_{k}", k + 1
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--checkpoint {value!r}: {path} not found")
        checkpoints[name] = path
    return checkpoints


def register(subparsers) -> None:
    """Add the ``evaluate-model`` subcommand."""
    from ..train.config import add_data_arguments

    parser = subparsers.add_parser("evaluate-model", help=HELP, description=HELP + ". Data settings default "
                                   "to those of the first checkpoint's training run; the flags override them.")
    parser.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]PATH",
                        help="a checkpoint (best.pt/last.pt) to evaluate, optionally named; repeat to compare")
    parser.add_argument("-o", "--out-dir", required=True, help="folder for report.md, CSV tables and PNG figures")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="which split to score (default test)")
    add_data_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="inference batch size (default: training's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                        help="mixed precision for the forward pass on GPU (default auto)")
    parser.add_argument("--count-threshold", type=float, default=None,
                        help="candidate threshold of the count distribution (default: training's, paper 0.1)")
    parser.add_argument("--baseline-threshold", type=float, default=0.5,
                        help="threshold of the cc_count baseline (default 0.5)")
    parser.add_argument("--seg-threshold", type=float, default=0.5, help="threshold of the voxel-wise F1 (default 0.5)")
    parser.add_argument("--n-bins", type=int, default=10, help="calibration bins (default 10)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG figures")
    g = parser.add_argument_group("attack (SR / AD; lesioncount.train.attack)")
    g.add_argument("--attack", action="store_true",
                   help="run the entropy-maximising attack on every case's count distribution")
    g.add_argument("--attack-epsilon", type=float, default=0.5, help="perturbation budget (default 0.5, the paper's)")
    g.add_argument("--attack-lambda", type=float, default=0.01, help="weight of the squared-l2 penalty (default 0.01)")
    g.add_argument("--attack-steps", type=int, default=10, help="gradient ascent steps (default 10)")
    g.add_argument("--attack-step-size", type=float, default=None, help="step length (default epsilon / 4)")
    g.add_argument("--attack-noise", type=float, default=1e-3, help="std of the initial noise (default 1e-3)")
    g.add_argument("--attack-norm", choices=("l2", "linf"), default="l2", help="norm of the budget (default l2)")
    g.add_argument("--attack-seed", type=int, default=0, help="seed of the initial noise (default 0)")
    g = parser.add_argument_group("uncertainty and tables")
    g.add_argument("--mc-samples", type=int, default=0,
                   help="MC-dropout samples of the probabilistic cc_count baseline (paper 50; default 0 = off)")
    g.add_argument("--mc-threshold", type=float, default=0.5, help="threshold of the MC-dropout cc_count (default 0.5)")
    g.add_argument("--paper-table", choices=("1", "C.2"), default=None,
                   help="put the paper's Table 1 (full data) or Table C.2 (1%% data) beside ours (models matched by "
                        "name: post_hoc, bottleneck, multihead, downstream, multitask)")
    g.add_argument("--reference", default=None, metavar="NAME",
                   help="model the others are compared with, paired (default multitask when given, else the first)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the report, print Table 1. Returns the exit code."""
    from ..train.config import ConfigError
    from ..train.evaluation import DATA_KEYS, evaluate_checkpoints, write_report

    try:
        checkpoints = _parse_checkpoints(args.checkpoint)
        for name in ("batch_size", "n_bins", "num_workers"):
            value = getattr(args, name)
            if value is not None and value < (0 if name == "num_workers" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be >= {0 if name == 'num_workers' else 1}, got {value}")
        for name in ("count_threshold", "baseline_threshold", "seg_threshold"):
            value = getattr(args, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a probability in [0, 1), got {value}")
        if args.mc_samples < 0:
            raise ValueError(f"--mc-samples must be >= 0, got {args.mc_samples}")
        if not 0 <= args.mc_threshold < 1:
            raise ValueError(f"--mc-threshold must be a probability in [0, 1), got {args.mc_threshold}")
        attack = None
        if args.attack:
            from ..train.attack import AttackConfig

            attack = AttackConfig(epsilon=args.attack_epsilon, lam=args.attack_lambda, steps=args.attack_steps,
                                  step_size=args.attack_step_size, noise_init=args.attack_noise,
                                  norm=args.attack_norm, seed=args.attack_seed)
        overrides = {k: getattr(args, k) for k in DATA_KEYS if hasattr(args, k)}
        if "shape" in overrides:
            overrides["shape"] = tuple(overrides["shape"])
        results = evaluate_checkpoints(
            checkpoints, data_overrides=overrides, split=args.split, device=args.device,
            batch_size=args.batch_size, amp=args.amp, count_threshold=args.count_threshold,
            baseline_threshold=args.baseline_threshold, seg_threshold=args.seg_threshold, n_bins=args.n_bins,
            num_workers=args.num_workers, attack=attack, mc_samples=args.mc_samples, mc_threshold=args.mc_threshold)
        paths = write_report(results, args.out_dir, plots=args.plots, paper_table=args.paper_table,
                             reference=args.reference)
    except (ValueError, FileNotFoundError, ConfigError) as exc:
        print(f"lesioncount evaluate-model: {exc}", file=sys.stderr)
        return 2
    print(paths["report"].read_text().split("## Table C.1")[0].rstrip())
    print(f"\nwrote {paths['report']}, {paths['table1'].name}, {paths['sweep'].name}, {paths['discarded'].name}, "
          f"{paths['per_case'].name} and {len(paths['figures'])} figure(s) to {args.out_dir}")
    return 0
