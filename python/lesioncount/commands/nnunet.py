"""``lesioncount nnunet-train``, ``nnunet-predict`` and ``nnunet-trainer-dir``: nnU-Net v2 with lesion counts.

``nnunet-predict`` takes ``nnUNetv2_predict``'s arguments plus ``lesioncount count``'s counting
options and runs nnU-Net's own predictor (:class:`lesioncount.nnunet.predict.CountingPredictor`),
whose export workers count each case in memory and write the ``CASE.json`` / ``summary.csv`` /
``errors.csv`` of ``lesioncount count``.

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
    lesioncount nnunet-predict -i imagesTs -o pred -d 990 -c 3d_fullres -f 0 -device cpu --count-output counts
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

from ._options import add_count_options

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
    """Add ``nnunet-train``, ``nnunet-predict`` and ``nnunet-trainer-dir`` to the ``lesioncount`` parser."""
    parser = subparsers.add_parser("nnunet-train", help=HELP, description=HELP + ".")
    add_arguments(parser)
    parser.set_defaults(func=run)
    p = subparsers.add_parser("nnunet-predict", help=PREDICT_HELP, description=PREDICT_HELP + ". " + PREDICT_DESCRIPTION)
    add_predict_arguments(p)
    p.set_defaults(func=run_predict)
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


# ----------------------------------------------------------------------------- nnunet-predict
PREDICT_HELP = "predict with nnU-Net v2 and count the lesions of every case in memory (nnUNetv2_predict's arguments + count options)"
PREDICT_DESCRIPTION = (
    "nnU-Net's own predictor (nnUNetPredictor: preprocessing, sliding window, mirroring, fold ensemble, "
    "resampling, the segmentation CASE.<file_ending>); its export workers also count the lesion channel of the "
    "probabilities and write COUNTS/CASE.json, COUNTS/summary.csv and COUNTS/errors.csv exactly as "
    "`lesioncount count` writes them for `nnUNetv2_predict --save_probabilities` output (only timings differ). "
    "No CASE.npz is written unless --save_probabilities. Exit codes: 0 every case counted, 1 some cases "
    "could not be counted (errors.csv), 2 bad arguments.")
# files nnU-Net writes into the output folder: a case of that name would collide with them
_NNUNET_FILES = ("dataset", "plans", "predict_from_raw_data_args")


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """nnUNetv2_predict's arguments (same names and defaults, except ``-tr``), then the count options
    of ``lesioncount count`` (same names and defaults)."""
    a = parser.add_argument
    a("-i", required=True, help="input folder (CASE_0000.nii.gz, ... as for nnUNetv2_predict)")
    a("-o", required=True, help="output folder for nnU-Net's segmentations (created)")
    a("-d", required=True, help="dataset name or ID of the trained model")
    a("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    a("-tr", default="nnUNetTrainerCount",
      help="trainer the model was trained with (default nnUNetTrainerCount; nnUNetTrainer models work too)")
    a("-c", required=True, help="configuration, e.g. 3d_fullres")
    a("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="folds to ensemble (default 0 1 2 3 4)")
    a("-step_size", type=float, default=0.5, help="sliding-window step size in (0, 1] (default 0.5)")
    a("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    a("--verbose", action="store_true", help="nnU-Net's verbose output")
    a("--save_probabilities", action="store_true", help="also write nnU-Net's CASE.npz/CASE.pkl")
    a("--continue_prediction", "--c", action="store_true",
      help="skip cases whose segmentation (and .npz with --save_probabilities) and CASE.json exist "
           "(their JSON rows go into the summary when computed with the same count options)")
    a("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    a("-npp", type=int, default=int(os.environ.get("nnUNet_npp") or 3),
      help="preprocessing processes (default 3; 0: in this process)")
    a("-nps", type=int, default=int(os.environ.get("nnUNet_nps") or 3),
      help="export + count processes (default 3; 0: in this process)")
    a("-prev_stage_predictions", default=None, help="previous stage's segmentations (cascade)")
    a("-num_parts", type=int, default=1, help="number of shards of the case list (default 1)")
    a("-part_id", type=int, default=0, help="this shard, 0 <= part_id < num_parts (cases k with k %% num_parts == part_id)")
    a("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="device of the network (default cuda)")
    a("--disable_progress_bar", action="store_true", help="no nnU-Net progress bar")
    a("--not_on_device", action="store_true", help="do not keep the sliding-window output on the device")
    g = parser.add_argument_group("counting (as `lesioncount count`)")
    g.add_argument("--count-output", default=None, help="folder for CASE.json, summary.csv, errors.csv (default: -o)")
    add_count_options(
        g, threshold="candidate threshold, a probability in [0, 1) (default 0.1)",
        connectivity="3-D neighbourhood (default 18)", min_size="drop candidates with fewer voxels (default 0)",
        min_volume="drop candidates smaller than this many mm^3 (ceil(V / voxel volume) voxels per case)",
        max_count="M: bins 0..M-1 and 'M or more' (default 4)", channel_default=1,
        channel="lesion channel of nnU-Net's probabilities (softmax: the label value; regions: the region index) "
                "(default 1)",
        baseline_threshold="threshold of the cc_count baseline (default 0.5)")
    g.add_argument("--save-labels", action="store_true", help="write COUNTS/CASE_labels.nii.gz (candidate label map)")


def _predict_usage_errors(args) -> list:
    import math

    errors = []
    if not (0.0 <= args.threshold < 1.0) or math.isnan(args.threshold):
        errors.append(f"--threshold must be a probability in [0, 1), got {args.threshold}")
    if not (0.0 <= args.baseline_threshold < 1.0):
        errors.append(f"--baseline-threshold must be in [0, 1), got {args.baseline_threshold}")
    if args.min_size < 0:
        errors.append(f"--min-size must be >= 0 voxels, got {args.min_size}")
    if args.min_volume is not None and not (math.isfinite(args.min_volume) and args.min_volume >= 0):
        errors.append(f"--min-volume must be a finite number >= 0 (mm^3), got {args.min_volume}")
    if args.max_count < 1:
        errors.append(f"--max-count must be >= 1, got {args.max_count}")
    if args.channel < 0:
        errors.append(f"--channel must be >= 0, got {args.channel}")
    if not 0.0 < args.step_size <= 1.0:
        errors.append(f"-step_size must be in (0, 1], got {args.step_size}")
    if args.num_parts < 1:
        errors.append(f"-num_parts must be >= 1, got {args.num_parts}")
    elif not 0 <= args.part_id < args.num_parts:
        errors.append(f"-part_id must satisfy 0 <= part_id < num_parts ({args.num_parts}), got {args.part_id}")
    if args.npp < 0 or args.nps < 0:
        errors.append(f"-npp and -nps must be >= 0, got {args.npp} and {args.nps}")
    for f in args.f:
        if f != "all" and not f.isdigit():
            errors.append(f"-f: folds are integers or 'all', got {f!r}")
    if not os.path.isdir(args.i):
        errors.append(f"-i {args.i}: no such folder")
    return errors


def _kept_report(json_path: pathlib.Path, settings) -> dict:
    """A CASE.json of an earlier run, if it was computed with the same count options (else ValueError)."""
    import json

    report = json.loads(json_path.read_text())
    stored = report["settings"]
    current = {"threshold": settings.threshold, "connectivity": settings.connectivity,
               "max_count": settings.max_count, "from_logits": False, "channel": settings.channel,
               "baseline_threshold": settings.baseline_threshold, "min_volume_mm3": settings.min_volume,
               "mask": None}
    if settings.min_volume is None:
        current["min_size_voxels"] = settings.min_size
    differ = [f"{k} {stored.get(k, 'missing')!r} (now {v!r})" for k, v in current.items() if stored.get(k, "missing") != v]
    if differ:
        raise ValueError(f"existing {json_path.name} was computed with other settings: {', '.join(differ)}; "
                         f"run without --continue_prediction to recompute")
    return report


def run_predict(args: argparse.Namespace) -> int:
    """Run ``lesioncount nnunet-predict``; returns the exit code (0 ok, 1 some cases failed, 2 usage error)."""
    import csv
    import time

    from .._extras import require

    def fail(message: str) -> int:
        print(f"lesioncount nnunet-predict: error: {message}", file=sys.stderr)
        return 2

    require("nnunetv2", "lesioncount nnunet-predict")
    require("nibabel", "lesioncount nnunet-predict")
    problems = _predict_usage_errors(args)
    if problems:
        return fail("; ".join(problems))

    import torch
    from batchgenerators.utilities.file_and_folder_operations import join
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from ..nnunet.predict import NIFTI_ENDINGS, CountingPredictor, CountJob
    from ..report import CountSettings, summary_fields, summary_row

    try:
        model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    except (RuntimeError, ValueError, TypeError) as exc:
        return fail(f"-d {args.d}: {exc}")
    folds = [f if f == "all" else int(f) for f in args.f]
    missing = [f for f in folds if not os.path.isfile(join(model_folder, f"fold_{f}", args.chk))]
    if missing:
        return fail(f"no {args.chk} for fold(s) {missing} in {model_folder} (check -d, -tr, -p, -c, -f, -chk)")
    if args.device == "cpu":  # as nnUNetv2_predict
        import multiprocessing

        torch.set_num_threads(multiprocessing.cpu_count())
        device = torch.device("cpu")
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            return fail("-device cuda: CUDA is not available (no GPU, or torch built without CUDA); use -device cpu")
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        device = torch.device("cuda")
    else:
        device = torch.device("mps")

    predictor = CountingPredictor(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
                                  perform_everything_on_device=not args.not_on_device, device=device,
                                  verbose=args.verbose, verbose_preprocessing=args.verbose,
                                  allow_tqdm=not args.disable_progress_bar)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    ending = predictor.dataset_json["file_ending"]
    if ending not in NIFTI_ENDINGS:
        return fail(f"the model's dataset uses {ending!r} files; the count report takes its geometry from a NIfTI "
                    f"segmentation ({', '.join(NIFTI_ENDINGS)})")
    heads = predictor.label_manager.num_segmentation_heads
    if args.channel >= heads:
        return fail(f"--channel {args.channel} out of range: the model predicts {heads} channels "
                    f"({'regions' if predictor.label_manager.has_regions else 'labels'} 0..{heads - 1})")

    all_lists = create_lists_from_splitted_dataset_folder(args.i, ending)
    if not all_lists:
        return fail(f"-i {args.i}: no images ending in _XXXX{ending}")
    lists = all_lists[args.part_id::args.num_parts]
    cases = [os.path.basename(files[0])[: -(len(ending) + 5)] for files in lists]
    out_dir = pathlib.Path(args.o)
    count_dir = pathlib.Path(args.count_output) if args.count_output else out_dir
    if count_dir.resolve() == out_dir.resolve():
        clash = sorted(set(cases) & set(_NNUNET_FILES))
        if clash:
            return fail(f"case(s) {clash} would overwrite nnU-Net's {clash[0]}.json in -o; pass --count-output DIR")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        count_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return fail(f"cannot create the output folder: {exc}")
    settings = CountSettings(threshold=args.threshold, connectivity=args.connectivity, min_size=args.min_size,
                             min_volume=args.min_volume, max_count=args.max_count, from_logits=False, mask=None,
                             channel=args.channel, device="cpu", baseline_threshold=args.baseline_threshold)

    rows, errors, todo = {}, [], []
    for index, (files, case) in enumerate(zip(lists, cases)):
        ofile = join(args.o, case)
        json_path = count_dir / f"{case}.json"
        done = os.path.isfile(ofile + ending) and (not args.save_probabilities or os.path.isfile(ofile + ".npz"))
        if args.continue_prediction and done and json_path.is_file():
            try:
                rows[index] = summary_row(_kept_report(json_path, settings))
            except (ValueError, KeyError, TypeError) as exc:
                errors.append((case, str(json_path), str(exc)))
            continue
        todo.append((index, files, ofile, CountJob(case, str(json_path), settings, args.save_labels)))
    if args.continue_prediction:
        print(f"lesioncount nnunet-predict: --continue_prediction: {len(cases) - len(todo)} of {len(cases)} case(s) "
              f"already predicted and counted")

    t0 = time.perf_counter()
    results = predictor.predict_and_count([t[1] for t in todo], [t[2] for t in todo], [t[3] for t in todo],
                                          save_probabilities=args.save_probabilities,
                                          num_processes_preprocessing=args.npp,
                                          num_processes_segmentation_export=args.nps,
                                          folder_with_segs_from_prev_stage=args.prev_stage_predictions)
    elapsed = time.perf_counter() - t0
    for (index, _files, ofile, _job), result in zip(todo, results):
        if result.error is not None:
            errors.append((result.case, ofile + ending, result.error))
            print(f"lesioncount nnunet-predict: {result.case}: {result.error}", file=sys.stderr)
        else:
            rows[index] = summary_row(result.report)

    suffix = "" if args.num_parts == 1 else f".part-{args.part_id}-of-{args.num_parts}"
    # rows in the order `lesioncount count` lists nnU-Net's output folder (by file name CASE.npz)
    order = sorted(rows, key=lambda i: cases[i] + ".npz")
    with open(count_dir / f"summary{suffix}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=summary_fields(args.max_count))
        writer.writeheader()
        for index in order:
            writer.writerow(rows[index])
    with open(count_dir / f"errors{suffix}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "file", "error"])
        writer.writerows(sorted(errors))
    failed = sum(r.error is not None for r in results)
    print(f"lesioncount nnunet-predict: {len(todo) - failed} of {len(todo)} case(s) predicted and counted "
          f"in {elapsed:.2f} s -> {count_dir}")
    if errors:
        print(f"lesioncount nnunet-predict: {len(errors)} case(s) failed; see {count_dir / f'errors{suffix}.csv'}",
              file=sys.stderr)
        return 1
    return 0
