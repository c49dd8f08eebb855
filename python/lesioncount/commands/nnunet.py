"""``lesioncount nnunet-train`` and ``lesioncount nnunet-trainer-dir``: the nnU-Net v2 count trainer.

``nnunet-train`` takes ``nnUNetv2_train``'s arguments (same names and defaults, except ``-tr``, which
defaults to ``nnUNetTrainerCount``) plus ``--count-*`` options. It puts the options in the
``LESIONCOUNT_NNUNET_*`` environment variables and the folder of the lesioncount trainers on
``nnUNet_extTrainer`` (nnU-Net's own mechanism for trainers outside its package), then trains the
way ``nnUNetv2_train`` does: one process runs the same steps as nnU-Net's ``run_training`` with
nnU-Net's helpers (continuing ``--c``, ``--val``, ``--val_best``, pretrained weights, the final
validation), the trainer class taken directly; ``-num_gpus > 1`` calls nnU-Net's ``run_training``
itself (DDP workers find the trainer by name through ``nnUNet_extTrainer``).

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

    if args.device == "cpu":  # as nnUNetv2_train does
        torch.set_num_threads(multiprocessing.cpu_count())
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    try:
        if args.num_gpus > 1:
            # DDP: nnU-Net spawns one process per GPU, each finds the trainer by name (nnUNet_extTrainer)
            from nnunetv2.run.run_training import run_training

            run_training(args.dataset_name_or_id, args.configuration, args.fold, args.tr, args.p,
                         args.pretrained_weights, args.num_gpus, args.npz, args.c, args.val,
                         args.disable_checkpointing, args.val_best, device=torch.device(args.device))
        else:
            _run_single(args, torch.device(args.device))
    except CountOptionError as exc:  # raised by the trainer, naming the option and its variable
        print(f"lesioncount nnunet-train: {exc}", file=sys.stderr)
        return 2
    return 0


def _trainer_class(name: str):
    """The lesioncount trainer of that name, else nnU-Net's search by class name (its own package,
    then nnUNet_extTrainer). Our own classes are taken directly: nnU-Net's search imports every
    trainer module it has, and some (Primus) need timm/torchvision."""
    from ..nnunet import trainer as ours

    cls = getattr(ours, name, None)
    if isinstance(cls, type) and issubclass(cls, ours.nnUNetTrainer):
        return cls
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    return recursive_find_trainer_class_by_name(name)


def _run_single(args: argparse.Namespace, device) -> None:
    """nnU-Net's ``run_training`` for one process (same steps, same nnU-Net helpers), with the
    trainer class resolved by :func:`_trainer_class`."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    fold = args.fold
    if fold != "all":
        try:
            fold = int(fold)
        except ValueError:
            raise SystemExit(f"lesioncount nnunet-train: fold must be an int or 'all', got {fold!r}") from None
    dataset = args.dataset_name_or_id
    if not dataset.startswith("Dataset"):
        try:
            dataset = int(dataset)
        except ValueError:
            raise SystemExit("lesioncount nnunet-train: dataset_name_or_id must be an integer ID or a name "
                             f"DatasetXXX_YYY, got {args.dataset_name_or_id!r}") from None
    if args.c and args.val:
        raise SystemExit("lesioncount nnunet-train: --c and --val cannot be combined")
    if args.val_best and args.disable_checkpointing:
        raise SystemExit("lesioncount nnunet-train: --val_best is not compatible with --disable_checkpointing")
    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset))
    plans = load_json(join(folder, args.p + ".json"))
    plans["continue_training"] = args.c
    trainer = _trainer_class(args.tr)(plans=plans, configuration=args.configuration, fold=fold,
                                      dataset_json=load_json(join(folder, "dataset.json")), device=device)
    if args.disable_checkpointing:
        trainer.disable_checkpointing = True
    maybe_load_checkpoint(trainer, args.c, args.val, args.pretrained_weights)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    if not args.val:
        trainer.run_training()
    if args.val_best:
        trainer.load_checkpoint(join(trainer.output_folder, "checkpoint_best.pth"))
    trainer.perform_actual_validation(args.npz)
