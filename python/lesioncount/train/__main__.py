"""``python -m lesioncount.train``: the same as ``lesioncount train`` (the entry point for ``torchrun``).

Example:
    torchrun --nproc_per_node 2 -m lesioncount.train -o runs/ddp --config configs/phantom_multitask.yaml
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    """Run ``lesioncount train`` with these arguments (default: the command line); returns the exit code."""
    from ..cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
