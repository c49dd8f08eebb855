"""``python -m lesioncount.train``: the same as ``lesioncount train`` (the entry point for ``torchrun``).

Example:
    torchrun --nproc_per_node 2 -m lesioncount.train -o runs/ddp --config configs/phantom_small.yaml
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    """Parse the training flags and train; returns the exit code."""
    from .._extras import MissingExtraError
    from ..commands import train as train_command

    parser = argparse.ArgumentParser(prog="python -m lesioncount.train", description=train_command.HELP)
    train_command.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return train_command.run(args)
    except MissingExtraError as exc:
        print(f"lesioncount train: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
