"""``lesioncount nnunet-train`` and ``lesioncount nnunet-trainer-dir``: the nnU-Net v2 count trainer.

``nnunet-train`` takes ``nnUNetv2_train``'s arguments (same names and defaults, except ``-tr``, which
defaults to ``nnUNetTrainerCount``) plus ``--count-*`` options, puts the folder of the lesioncount
trainers on ``nnUNet_extTrainer`` (nnU-Net's own mechanism for trainers outside its package) and the
options in the ``LESIONCOUNT_NNUNET_*`` environment variables, then calls nnU-Net's own
``run_training``: continuing (``--c``), validation (``--val``), pretrained weights and multi-GPU DDP
(``-num_gpus``) behave exactly as with ``nnUNetv2_train``.

Example:
    lesioncount nnunet-train 990 3d_fullres 0 -device cpu --count-pretrain-epochs 20 --count-w1 1e-3
    export nnUNet_extTrainer=$(lesioncount nnunet-trainer-dir)   # then nnUNetv2_train/_predict -tr nnUNetTrainerCount
"""
from __future__ import annotations

import argparse
import os
import sys

HELP = "train nnU-Net v2 with the count term added (nnUNetv2_train's arguments + --count-* options)"


def _flag(attr: str) -> str:
    name = attr[len("count_"):] if attr.startswith("count_num_") else attr
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """nnUNetv2_train's arguments, then one ``--count-*`` flag per trainer option."""
    from ..nnunet.options import COUNT_OPTIONS

    parser.add_argument("dataset_name_or_id", help="dataset name or ID to train with")
    parser.add_argument("configuration", help="configuration to train, e.g. 3d_fullres")
    parser.add_argument("fold", help="fold of the 5-fold cross-validation (0-4) or 'all'")
    parser.add_argument("-tr", default="nnUNetTrainerCount",
                        help="trainer class (default nnUNetTrainerCount; a subclass in nnUNet_extTrainer also works)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-pretrained_weights", default=None, help="nnU-Net checkpoint to initialise from")
    parser.add_argument("-num_gpus", type=int, default=1, help="number of GPUs (DDP when > 1)")
    parser.add_argument("--npz", action="store_true", help="save softmax predictions of the final validation")
    parser.add_argument("--c", action="store_true", help="continue training from the latest checkpoint")
    parser.add_argument("--val", action="store_true", help="only run the validation (training must be finished)")
    parser.add_argument("--val_best", action="store_true", help="validate with checkpoint_best instead of checkpoint_final")
    parser.add_argument("--disable_checkpointing", action="store_true", help="do not write checkpoints")
    parser.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="device (default cuda)")
    group = parser.add_argument_group("count term (override the trainer's class attributes)")
    for attr, (env, _parse, help_) in COUNT_OPTIONS.items():
        group.add_argument(_flag(attr), dest=attr, default=None, metavar="VALUE", help=f"{help_} [{env}]")


def _run_trainer_dir(args: argparse.Namespace) -> int:
    from ..nnunet import TRAINER_DIR

    print(TRAINER_DIR)
    return 0


def register(subparsers) -> None:
    """Add ``nnunet-train`` and ``nnunet-trainer-dir`` to the ``lesioncount`` parser."""
    parser = subparsers.add_parser("nnunet-train", help=HELP, description=HELP + ".")
    add_arguments(parser)
    parser.set_defaults(func=run)
    d = subparsers.add_parser("nnunet-trainer-dir", help="print the folder to put in nnUNet_extTrainer",
                              description="Print the folder of the lesioncount nnU-Net trainers: "
                                          "export nnUNet_extTrainer=$(lesioncount nnunet-trainer-dir)")
    d.set_defaults(func=_run_trainer_dir)


def run(args: argparse.Namespace) -> int:
    """Set nnUNet_extTrainer and the LESIONCOUNT_NNUNET_* variables, then run nnU-Net's training."""
    from .._extras import require
    from ..nnunet import TRAINER_DIR
    from ..nnunet.options import COUNT_OPTIONS, CountOptionError, parse_option

    require("nnunetv2", "lesioncount nnunet-train")
    for attr, (env, _parse, _help) in COUNT_OPTIONS.items():
        text = getattr(args, attr)
        if text is None:
            continue
        try:
            parse_option(attr, text)
        except CountOptionError as exc:
            print(f"lesioncount nnunet-train: {_flag(attr)}: {exc}", file=sys.stderr)
            return 2
        os.environ[env] = text
    paths = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if str(TRAINER_DIR) not in paths:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([str(TRAINER_DIR)] + paths)

    import multiprocessing

    import torch
    from nnunetv2.run.run_training import run_training

    if args.device == "cpu":  # as nnUNetv2_train does
        torch.set_num_threads(multiprocessing.cpu_count())
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    try:
        run_training(args.dataset_name_or_id, args.configuration, args.fold, args.tr, args.p, args.pretrained_weights,
                     args.num_gpus, args.npz, args.c, args.val, args.disable_checkpointing, args.val_best,
                     device=torch.device(args.device))
    except CountOptionError as exc:  # raised by the trainer, naming the option and its variable
        print(f"lesioncount nnunet-train: {exc}", file=sys.stderr)
        return 2
    return 0
