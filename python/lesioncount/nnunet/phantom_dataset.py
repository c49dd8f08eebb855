"""Write the embedded MS-like phantom as an nnU-Net v2 raw dataset (dataset.json, imagesTr, labelsTr).

Needs nibabel (``lesioncount[io]``), not nnU-Net. The phantom (:mod:`lesioncount.train.phantom`) is
seeded, so a dataset written twice with the same arguments is identical.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Sequence

import numpy as np

from .._extras import require

__all__ = ["write_phantom_dataset"]


def write_phantom_dataset(raw_dir, dataset_id: int = 990, name: str = "LesionPhantom", num_cases: int = 6,
                          shape: Sequence[int] = (32, 64, 64), seed: int = 0,
                          channels: Sequence[str] = ("T1", "T1c", "T2", "FLAIR", "PD"),
                          spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> pathlib.Path:
    """Write ``num_cases`` phantom cases as ``raw_dir/DatasetXXX_name`` in nnU-Net v2's raw format.

    Each case ``phantom_XXX`` has one NIfTI per sequence (``imagesTr/phantom_XXX_0000.nii.gz``, ...,
    in the order of ``channels``) and its enhancing-lesion mask (``labelsTr/phantom_XXX.nii.gz``,
    labels ``background`` 0 and ``lesion`` 1). Arrays are (D, H, W) = (z, y, x) in the phantom; they
    are written with x first, as NIfTI expects, with a diagonal affine of ``spacing`` (z, y, x) mm.

    Args:
        raw_dir: the ``nnUNet_raw`` folder.
        dataset_id: nnU-Net's 3-digit dataset id (1..999).
        name: dataset name (letters, digits, ``_``/``-``).
        num_cases: number of training cases (nnU-Net's 5-fold split needs >= 5 for folds 0-4).
        shape: phantom (D, H, W), each >= 8.
        seed: phantom family seed.
        channels: subset of the phantom's sequences, in the order written.
        spacing: voxel size (z, y, x) in mm.

    Returns:
        The dataset folder.

    Example:
        >>> folder = write_phantom_dataset(tmp / "nnUNet_raw", 990, num_cases=6, shape=(16, 32, 32))  # doctest: +SKIP
        >>> sorted(p.name for p in folder.iterdir())                                                 # doctest: +SKIP
        ['dataset.json', 'imagesTr', 'labelsTr']
    """
    from ..train.phantom import SEQUENCES, generate_phantom

    nib = require("nibabel", "writing the nnU-Net phantom dataset")
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ValueError(f"`dataset_id` must be an int in 1..999, got {dataset_id!r}")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"`name` must be letters, digits, '_' or '-', got {name!r}")
    if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 1:
        raise ValueError(f"`num_cases` must be an int >= 1, got {num_cases!r}")
    channels = tuple(channels)
    unknown = [c for c in channels if c not in SEQUENCES]
    if not channels or unknown:
        raise ValueError(f"`channels` must be a non-empty subset of {SEQUENCES}, got {channels!r}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"`spacing` must be 3 positive numbers (z, y, x), got {spacing!r}")
    index = [SEQUENCES.index(c) for c in channels]

    folder = pathlib.Path(raw_dir) / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])  # NIfTI axes are (x, y, z)
    counts = {}
    for i in range(num_cases):
        case = generate_phantom(i, shape=shape, seed=seed)
        case_id = f"phantom_{i:03d}"
        for j, c in enumerate(index):
            data = np.ascontiguousarray(case.image[c].transpose(2, 1, 0), dtype=np.float32)
            nib.save(nib.Nifti1Image(data, affine), str(folder / "imagesTr" / f"{case_id}_{j:04d}.nii.gz"))
        mask = np.ascontiguousarray(case.mask.transpose(2, 1, 0), dtype=np.uint8)
        nib.save(nib.Nifti1Image(mask, affine), str(folder / "labelsTr" / f"{case_id}.nii.gz"))
        counts[case_id] = case.count(18)
    meta = {
        "channel_names": {str(j): channels[j] for j in range(len(channels))},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
        "name": name,
        "description": f"lesioncount MS-like phantom, seed {seed}, shape {tuple(shape)}; lesion counts "
                       f"(18-connectivity): {counts}",
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder
