"""Re-export of the lesioncount nnU-Net trainers, for nnU-Net's trainer search by class name.

Point ``nnUNet_extTrainer`` at this folder (``lesioncount nnunet-trainer-dir`` prints it), or copy
this file into ``nnunetv2/training/nnUNetTrainer/variants/``; then ``-tr nnUNetTrainerCount`` works
with ``nnUNetv2_train`` and ``nnUNetv2_predict``.
"""
from lesioncount.nnunet.trainer import nnUNetTrainerCount  # noqa: F401
