"""nnU-Net v2 integration: a trainer that adds the paper's count term to nnU-Net's own loss.

Needs nnunetv2 (the ``[nnunet]`` extra: ``pip install --no-build-isolation '.[nnunet]'`` from the
source folder). The trainer class :class:`nnUNetTrainerCount` lives in :mod:`lesioncount.nnunet.trainer` and is imported lazily here, so that
:func:`write_phantom_dataset` (which needs only nibabel) works without nnU-Net installed.

Selecting the trainer (nnU-Net finds trainers by class name):

- ``lesioncount nnunet-train DATASET CONFIG FOLD [nnUNetv2_train flags] [--count-* flags]``:
  runs nnU-Net's own ``run_training`` with ``-tr nnUNetTrainerCount`` (no edit of nnU-Net);
- ``export nnUNet_extTrainer=$(lesioncount nnunet-trainer-dir)`` then the usual
  ``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerCount`` and
  ``nnUNetv2_predict ... -tr nnUNetTrainerCount`` (nnU-Net >= 2.6 searches that folder);
- or copy ``lesioncount/nnunet/trainers/lesioncount_trainers.py`` (a 3-line re-export) into
  ``nnunetv2/training/nnUNetTrainer/variants/`` (lost when nnunetv2 is reinstalled).

nnU-Net's own search imports every trainer module nnU-Net ships; its Primus trainers import timm and
torchvision, so ``nnUNetv2_train``/``nnUNetv2_predict`` need a torchvision built for the installed
torch (``make test-integration`` runs them in such an environment, ``.venv-integration``).

Prediction with counting in memory: ``lesioncount nnunet-predict`` (:mod:`lesioncount.nnunet.predict`,
``CountingPredictor``: nnU-Net's predictor whose export workers also write ``lesioncount count``'s
``CASE.json``).

Example:
    >>> from lesioncount.nnunet import nnUNetTrainerCount, TRAINER_DIR   # doctest: +SKIP
"""
from __future__ import annotations

import pathlib

from .options import COUNT_LOG_KEYS, COUNT_OPTIONS, CountOptionError
from .phantom_dataset import write_phantom_dataset

#: Folder to put in ``nnUNet_extTrainer`` so that ``nnUNetv2_train -tr nnUNetTrainerCount`` finds the trainer.
TRAINER_DIR = pathlib.Path(__file__).resolve().parent / "trainers"

__all__ = ["TRAINER_DIR", "COUNT_LOG_KEYS", "COUNT_OPTIONS", "CountOptionError", "nnUNetTrainerCount", "write_phantom_dataset"]

_LAZY = ("nnUNetTrainerCount",)


def __getattr__(name: str):
    if name in _LAZY:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
