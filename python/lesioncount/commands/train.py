"""``lesioncount train``: train the 3D UNet with the segmentation loss, then with the count loss.

Configured by flags or a YAML file (``--config FILE``; flags override the file); the resolved
settings are saved to ``OUT_DIR/config.yaml``. Multi-GPU / multi-node: launch the same command with
``torchrun`` (``torchrun --nproc_per_node 4 -m lesioncount.train -o OUT ...``).

Example:
    lesioncount train -o runs/tiny --epochs 2 --pretrain-epochs 1 --num-train 4 --num-val 2 \\
        --shape 16 32 32 --base-filters 4 --levels 3 --device cpu
"""
from __future__ import annotations

import argparse
import sys

HELP = "train the UNet (segmentation pre-training, then segmentation + count loss); DDP via torchrun"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``lesioncount train`` / ``python -m lesioncount.train``."""
    from ..train.config import add_train_arguments

    add_train_arguments(parser)


def register(subparsers) -> None:
    """Add the ``train`` subcommand to the ``lesioncount`` parser."""
    parser = subparsers.add_parser(
        "train", help=HELP, description=HELP + ". Flags override the values of --config FILE.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Resolve the config, train (or resume), print where the results are. Returns the exit code."""
    from ..train.config import ConfigError, config_from_args
    from ..train.loop import CheckpointError, train

    try:
        config = config_from_args(args)

        result = train(config, resume=args.resume)
    except (ConfigError, CheckpointError) as exc:
        print(f"lesioncount train: {exc}", file=sys.stderr)
        return 2
    import os

    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"done: best validation segmentation F1 {result.best_metric:.4f} at epoch {result.best_epoch}; "
              f"checkpoints, metrics.csv and config.yaml in {result.out_dir}")
    return 0
