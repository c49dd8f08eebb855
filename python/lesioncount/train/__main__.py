"""``python -m lesioncount.train``: the same as ``lesioncount train`` (the entry point for ``torchrun``).

Both parse the flags of :func:`lesioncount.train.config.add_train_arguments` and call :func:`run`;
this module imports nothing above the ``train`` package.

Example:
    torchrun --nproc_per_node 2 -m lesioncount.train -o runs/ddp --config configs/phantom_multitask.yaml
"""
from __future__ import annotations

import argparse
import os
import sys

HELP = "train the UNet (segmentation pre-training, then segmentation + count loss); DDP via torchrun"


def run(args: argparse.Namespace) -> int:
    """Resolve the config, train (or resume), print where the results are. Returns the exit code
    (2 with the reason on stderr for a bad setting or checkpoint)."""
    from .config import ConfigError, config_from_args
    from .loop import CheckpointError, train

    try:
        result = train(config_from_args(args), resume=args.resume)
    except (ConfigError, CheckpointError) as exc:
        print(f"lesioncount train: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"done: best validation segmentation F1 {result.best_metric:.4f} at epoch {result.best_epoch}; "
              f"checkpoints, metrics.csv and config.yaml in {result.out_dir}")
    return 0


def main(argv=None) -> int:
    """Parse ``argv`` (default: the command line) as ``lesioncount train``'s flags and train; returns
    the exit code."""
    from .config import add_train_arguments

    parser = argparse.ArgumentParser(prog="python -m lesioncount.train",
                                     description=HELP + ". Flags override the values of --config FILE.")
    add_train_arguments(parser)
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
