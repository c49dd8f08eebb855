"""``lesioncount train``: train the 3D UNet with the segmentation loss, then with the count loss.

Configured by flags or a YAML file (``--config FILE``; flags override the file); the resolved
settings are saved to ``OUT_DIR/config.yaml``. Multi-GPU / multi-node: launch the same command with
``torchrun`` (``torchrun --nproc_per_node 4 -m lesioncount.train -o OUT ...``), which runs the same
:func:`lesioncount.train.__main__.run`.

Example:
    lesioncount train -o runs/tiny --epochs 2 --pretrain-epochs 1 --num-train 4 --num-val 2 \\
        --shape 16 32 32 --base-filters 4 --levels 3 --device cpu
"""
from __future__ import annotations

import argparse

from ..train.__main__ import HELP


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
    from ..train.__main__ import run as train_run

    return train_run(args)
