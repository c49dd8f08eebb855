"""Training data: phantom datasets, an nnU-Net raw-folder reader, augmentation and split building.

Every dataset yields dict items::

    {"image": float32 tensor (C, D, H, W),    # per-channel z-scored network input
     "mask":  float32 tensor (1, D, H, W),    # enhancing-lesion mask in {0, 1}
     "count": int64 scalar tensor,            # connected components of the mask (dataset connectivity)
     "name":  str}                            # case id

- :class:`PhantomDataset`: synthetic MS-like phantoms (:mod:`lesioncount.train.phantom`), generated on
  demand from ``(seed, index)``, optionally cached in memory (bounded, least recently used).
- :class:`AnatomyPhantomDataset`: the same lesion model on real anatomy
  (:mod:`lesioncount.train.anatomy`: nilearn's MNI152 templates or Debian's Colin27).
- :class:`NnUNetRawDataset`: an nnU-Net raw dataset folder (``dataset.json``, ``imagesTr``,
  ``labelsTr``, ``imagesTs``, ``labelsTs``), NIfTI arrays transposed from nibabel's (x, y, z) to
  (z, y, x) = (D, H, W).
- :class:`RandomAffineFlip`: random flips plus a small random rotation/scaling applied identically to
  image (trilinear) and mask (nearest); the count is recomputed from the transformed mask.
- :func:`build_datasets`: (train, val, test) with disjoint cases for a data source name.

The training loop (:mod:`lesioncount.train.loop`) applies the augmentation itself, with a generator
seeded per (seed, epoch, index); the datasets returned by :func:`build_datasets` are not augmented.

Example:
    >>> from lesioncount.train.data import PhantomDataset
    >>> ds = PhantomDataset(4, shape=(16, 32, 32), seed=0)
    >>> item = ds[0]
    >>> item["image"].shape, item["mask"].shape, item["count"].dtype
    (torch.Size([5, 16, 32, 32]), torch.Size([1, 16, 32, 32]), torch.int64)
"""

from __future__ import annotations

import json
import math
import pathlib
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._validation import DEFAULT_CONNECTIVITY
from .phantom import (LesionSettings, _check_shape, connectivity_structure, count_lesions, generate_phantom,
                      zscore_normalize)

__all__ = [
    "PhantomDataset",
    "AnatomyPhantomDataset",
    "NnUNetRawDataset",
    "NnUNetFormatError",
    "RandomAffineFlip",
    "build_datasets",
    "make_item",
    "center_crop_or_pad",
]

Item = Dict[str, Any]
_DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB of cached cases per dataset (per DataLoader worker)


def make_item(image: np.ndarray, mask: np.ndarray, name: str, connectivity: int = DEFAULT_CONNECTIVITY[3]) -> Item:
    """Build a dataset item from a (C, D, H, W) image and a (D, H, W) binary mask.

    The count is the number of connected components of ``mask > 0`` with ``connectivity``.

    Example:
        >>> m = np.zeros((4, 4, 4), np.uint8); m[0, 0, 0] = m[2, 2, 2] = 1
        >>> make_item(np.zeros((1, 4, 4, 4), np.float32), m, "a")["count"]
        tensor(2)
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim != 4 or mask.shape != image.shape[1:]:
        raise ValueError(f"make_item({name!r}): image must be (C, D, H, W) and mask (D, H, W) of the same "
                         f"spatial size, got {image.shape} and {mask.shape}")
    binary = mask > 0
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
        "mask": torch.from_numpy(binary.astype(np.float32)[None]),
        "count": torch.tensor(count_lesions(binary, connectivity), dtype=torch.int64),
        "name": str(name),
    }


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


class _CachedCaseDataset(Dataset):
    """Generated-case dataset with a bounded LRU cache of finished items."""

    def __init__(self, num_cases: int, shape: Sequence[int], seed: int, connectivity: int,
                 first_index: int, cache_bytes: Optional[int], transform: Optional[Callable]) -> None:
        self.num_cases = _check_count("num_cases", num_cases)
        self.shape = _check_shape(shape, minimum=1)
        self.seed = int(seed)
        connectivity_structure(connectivity)
        self.connectivity = int(connectivity)
        self.first_index = _check_count("first_index", first_index)
        self.transform = transform
        case_bytes = 6 * int(np.prod(self.shape)) * 4  # 5 image channels + the mask, float32
        budget = _DEFAULT_CACHE_BYTES if cache_bytes is None else int(cache_bytes)
        self.cache_cases = max(0, budget // case_bytes)
        self._cache: "OrderedDict[int, Item]" = OrderedDict()
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_cases

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch used to seed ``transform`` (augmentation differs per epoch)."""
        self.epoch = int(epoch)

    def _generate(self, case_index: int) -> Item:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> Item:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"{type(self).__name__} index must be an int, got {type(index).__name__}")
        if index < 0:
            index += self.num_cases
        if not 0 <= index < self.num_cases:
            raise IndexError(f"{type(self).__name__} index {index} out of range for {self.num_cases} cases")
        item = self._cache.get(index)
        if item is None:
            item = self._generate(self.first_index + int(index))
            if self.cache_cases:
                self._cache[index] = item
                if len(self._cache) > self.cache_cases:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(index)
        item = dict(item)  # callers may replace entries without touching the cache
        if self.transform is not None:
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch, int(index), 7]).generate_state(1)[0]))
            item = self.transform(item, generator)
        return item


class PhantomDataset(_CachedCaseDataset):
    """Synthetic multi-sequence MS phantoms (:func:`lesioncount.train.phantom.generate_phantom`).

    Item ``i`` is phantom case ``first_index + i`` of family ``seed``: datasets with the same seed and
    disjoint index ranges have disjoint cases (that is how :func:`build_datasets` splits).

    Args:
        num_cases: number of items.
        shape: (D, H, W) of every volume (each >= 8; divisible by 16 for the default UNet).
        seed: phantom family seed.
        connectivity: 6, 18 or 26, used for ``"count"``.
        first_index: case number of item 0.
        settings: :class:`~lesioncount.train.phantom.LesionSettings` for the lesion model.
        cache_bytes: memory budget for cached items (None: 1 GiB; 0 disables). With DataLoader workers
            each worker has its own cache.
        transform: optional ``transform(item, generator)`` (e.g. :class:`RandomAffineFlip`), seeded per
            (seed, epoch, index); see :meth:`set_epoch`.

    Items: ``image`` (5, D, H, W) float32 z-scored in the brain; ``mask`` (1, D, H, W) float32;
    ``count`` int64; ``name`` ``"phantom_s{seed}_{case:06d}"``.

    Example:
        >>> ds = PhantomDataset(2, shape=(16, 32, 32), seed=3, connectivity=26)
        >>> len(ds), ds[1]["name"]
        (2, 'phantom_s3_000001')
    """

    def __init__(self, num_cases: int, shape: Sequence[int] = (32, 64, 64), seed: int = 0,
                 connectivity: int = DEFAULT_CONNECTIVITY[3], first_index: int = 0, settings: Optional[LesionSettings] = None,
                 cache_bytes: Optional[int] = None, transform: Optional[Callable] = None) -> None:
        super().__init__(num_cases, shape, seed, connectivity, first_index, cache_bytes, transform)
        if min(self.shape) < 8:
            raise ValueError(f"PhantomDataset: shape must be >= 8 in every dimension, got {self.shape}")
        self.settings = settings

    def _generate(self, case_index: int) -> Item:
        case = generate_phantom(case_index, shape=self.shape, seed=self.seed, settings=self.settings)
        return make_item(case.normalized_image(), case.mask, case.name, self.connectivity)


class AnatomyPhantomDataset(_CachedCaseDataset):
    """Phantoms on real anatomy (:func:`lesioncount.train.anatomy.generate_anatomy_case`).

    Same arguments and items as :class:`PhantomDataset`, plus ``source`` (``None``: nilearn's MNI152
    when installed, else Colin27 from Debian's mricron-data; or ``"mni152"`` / ``"colin27"``).
    Raises :class:`~lesioncount._extras.MissingExtraError` at construction when no template exists.

    Example:
        >>> ds = AnatomyPhantomDataset(1, shape=(16, 32, 32))   # doctest: +SKIP
        >>> ds[0]["image"].shape                                # doctest: +SKIP
        torch.Size([5, 16, 32, 32])
    """

    def __init__(self, num_cases: int, shape: Sequence[int] = (32, 64, 64), seed: int = 0,
                 connectivity: int = DEFAULT_CONNECTIVITY[3], first_index: int = 0, settings: Optional[LesionSettings] = None,
                 cache_bytes: Optional[int] = None, transform: Optional[Callable] = None,
                 source: Optional[str] = None) -> None:
        super().__init__(num_cases, shape, seed, connectivity, first_index, cache_bytes, transform)
        from . import anatomy

        self.settings = settings
        self.source = anatomy.resolve_source(source)  # fails early, with the install hint

    def _generate(self, case_index: int) -> Item:
        from . import anatomy

        case = anatomy.generate_anatomy_case(case_index, shape=self.shape, seed=self.seed,
                                             settings=self.settings, source=self.source)
        return make_item(case.normalized_image(), case.mask, case.name, self.connectivity)


# --------------------------------------------------------------------------------------------------
# nnU-Net raw folders
# --------------------------------------------------------------------------------------------------


class NnUNetFormatError(ValueError):
    """An nnU-Net raw folder is malformed; the message names the file and what was expected."""


def center_crop_or_pad(array: np.ndarray, shape: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
    """Center-crop and/or zero-pad the last three axes of ``array`` to ``shape`` (D, H, W).

    Where the difference is odd, the extra voxel is cropped from / padded at the end.

    Example:
        >>> center_crop_or_pad(np.ones((1, 3, 5, 4)), (4, 4, 4)).shape
        (1, 4, 4, 4)
    """
    target = _check_shape(shape, minimum=1)
    array = np.asarray(array)
    slices: List[slice] = [slice(None)] * (array.ndim - 3)
    pads: List[Tuple[int, int]] = [(0, 0)] * (array.ndim - 3)
    for size, want in zip(array.shape[-3:], target):
        if size >= want:
            start = (size - want) // 2
            slices.append(slice(start, start + want))
            pads.append((0, 0))
        else:
            before = (want - size) // 2
            slices.append(slice(None))
            pads.append((before, want - size - before))
    out = array[tuple(slices)]
    if any(p != (0, 0) for p in pads):
        out = np.pad(out, pads, mode="constant", constant_values=pad_value)
    return out


def _nifti_zyx(path: pathlib.Path) -> np.ndarray:
    """Read a 3D NIfTI file as a (z, y, x) array (nibabel's (x, y, z) transposed)."""
    from .._extras import require

    nib = require("nibabel", "reading nnU-Net NIfTI files")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
    except Exception as exc:  # nibabel raises several types for broken files
        raise NnUNetFormatError(f"{path}: cannot be read as NIfTI ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise NnUNetFormatError(f"{path}: expected a 3-D volume, got array shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 1, 0))


class NnUNetRawDataset(Dataset):
    """An nnU-Net raw dataset folder as training items.

    Layout (nnU-Net v2; v1's ``"modality"`` key is accepted too)::

        root/dataset.json        {"channel_names": {"0": "T1", ...}, "labels": {"background": 0, "lesion": 1},
                                  "numTraining": N, "file_ending": ".nii.gz"}
        root/imagesTr/CASE_0000.nii.gz ... CASE_{C-1:04d}.nii.gz
        root/labelsTr/CASE.nii.gz
        root/imagesTs/..., root/labelsTs/...   (split="Ts"; labels are required to count)

    NIfTI arrays are (x, y, z); image and mask are both transposed to (z, y, x) = (D, H, W).

    Args:
        root: folder with ``dataset.json``.
        split: ``"Tr"`` or ``"Ts"``.
        connectivity: 6, 18 or 26, for ``"count"``.
        shape: optional (D, H, W) to center-crop/zero-pad to (each a multiple of ``size_multiple``);
            cropping happens before counting, so the count matches the returned mask.
        cases: optional case ids (default: every case in the split, sorted).
        lesion_label: the label value (int) or name (a key of ``labels``) counted as lesion; default
            every label > 0.
        size_multiple: required divisor of ``shape`` (16 for a 5-level UNet).
        transform: optional ``transform(item, generator)``.

    Items: ``image`` (C, D, H, W) float32, z-scored per channel within its nonzero voxels;
    ``mask`` (1, D, H, W) float32; ``count`` int64; ``name`` the case id.

    Example:
        >>> ds = NnUNetRawDataset("nnUNet_raw/Dataset001_MS", split="Tr", shape=(32, 64, 64))  # doctest: +SKIP
        >>> ds.channel_names                                                                    # doctest: +SKIP
        ['T1', 'T1c', 'T2', 'FLAIR', 'PD']
    """

    def __init__(self, root: Union[str, pathlib.Path], split: str = "Tr", connectivity: int = DEFAULT_CONNECTIVITY[3],
                 shape: Optional[Sequence[int]] = None, cases: Optional[Sequence[str]] = None,
                 lesion_label: Union[int, str, None] = None, size_multiple: int = 16,
                 transform: Optional[Callable] = None) -> None:
        self.root = pathlib.Path(root)
        if split not in ("Tr", "Ts"):
            raise ValueError(f"NnUNetRawDataset: split must be 'Tr' or 'Ts', got {split!r}")
        self.split = split
        connectivity_structure(connectivity)
        self.connectivity = int(connectivity)
        self.shape = None if shape is None else _check_shape(shape, minimum=1)
        if self.shape is not None and any(s % size_multiple for s in self.shape):
            raise ValueError(f"NnUNetRawDataset: shape {self.shape} must be divisible by {size_multiple} "
                             f"(the UNet's 2**(levels-1))")
        self.transform = transform
        self.epoch = 0

        meta_path = self.root / "dataset.json"
        if not self.root.is_dir():
            raise NnUNetFormatError(f"{self.root}: nnU-Net dataset folder does not exist")
        if not meta_path.is_file():
            raise NnUNetFormatError(f"{meta_path}: missing (an nnU-Net raw folder needs dataset.json)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise NnUNetFormatError(f"{meta_path}: not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise NnUNetFormatError(f"{meta_path}: expected a JSON object")
        channels = meta.get("channel_names", meta.get("modality"))
        if not isinstance(channels, dict) or not channels:
            raise NnUNetFormatError(f"{meta_path}: needs a non-empty 'channel_names' object like "
                                    f"{{\"0\": \"T1\", \"1\": \"FLAIR\"}}")
        try:
            order = sorted(int(k) for k in channels)
        except ValueError:
            raise NnUNetFormatError(
                f"{meta_path}: channel_names keys must be '0', '1', ..., got {list(channels)}") from None
        if order != list(range(len(order))):
            raise NnUNetFormatError(f"{meta_path}: channel_names keys must be 0..{len(order) - 1}, got {order}")
        self.channel_names = [str(channels[str(k)]) for k in order]
        self.file_ending = str(meta.get("file_ending", ".nii.gz"))
        if self.file_ending not in (".nii.gz", ".nii"):
            raise NnUNetFormatError(f"{meta_path}: file_ending {self.file_ending!r} is not supported "
                                    f"(only .nii.gz and .nii)")
        labels = meta.get("labels", {})
        self.lesion_label = self._resolve_label(lesion_label, labels, meta_path)

        self.images_dir = self.root / f"images{split}"
        self.labels_dir = self.root / f"labels{split}"
        if not self.images_dir.is_dir():
            raise NnUNetFormatError(f"{self.images_dir}: missing (split={split!r})")
        if not self.labels_dir.is_dir():
            raise NnUNetFormatError(f"{self.labels_dir}: missing; lesion counts need the labels of split {split!r}")
        suffix = "_0000" + self.file_ending
        found = sorted(p.name[: -len(suffix)] for p in self.images_dir.iterdir() if p.name.endswith(suffix))
        if split == "Tr" and "numTraining" in meta and int(meta["numTraining"]) != len(found):
            raise NnUNetFormatError(f"{meta_path}: numTraining={meta['numTraining']} but {self.images_dir} "
                                    f"holds {len(found)} cases (files *{suffix})")
        if cases is not None:
            missing = [c for c in cases if c not in found]
            if missing:
                raise NnUNetFormatError(f"{self.images_dir}: no case(s) {missing[:5]} (no file "
                                        f"{missing[0]}{suffix})")
            found = [str(c) for c in cases]
        self.cases: List[str] = found

    @staticmethod
    def _resolve_label(lesion_label: Union[int, str, None], labels: Any, meta_path: pathlib.Path) -> Optional[int]:
        if lesion_label is None:
            return None
        if isinstance(lesion_label, str) and not lesion_label.lstrip("-").isdigit():
            if not isinstance(labels, dict) or lesion_label not in labels:
                raise NnUNetFormatError(f"{meta_path}: lesion_label {lesion_label!r} is not a key of 'labels' "
                                        f"({list(labels) if isinstance(labels, dict) else labels})")
            value = labels[lesion_label]
            if isinstance(value, list):  # nnU-Net v2 region labels
                raise NnUNetFormatError(f"{meta_path}: label {lesion_label!r} is a region {value}; give an int value")
            return int(value)
        return int(lesion_label)

    def __len__(self) -> int:
        return len(self.cases)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch used to seed ``transform``."""
        self.epoch = int(epoch)

    def image_paths(self, case: str) -> List[pathlib.Path]:
        """Channel files of ``case`` in channel order (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ...).

        Example:
            >>> [p.name for p in NnUNetRawDataset("Dataset001_MS").image_paths("a")][:1]   # doctest: +SKIP
            ['a_0000.nii.gz']
        """
        return [self.images_dir / f"{case}_{c:04d}{self.file_ending}" for c in range(len(self.channel_names))]

    def load_case(self, case: str) -> Tuple[np.ndarray, np.ndarray]:
        """``(image (C, D, H, W) float32 raw, mask (D, H, W) bool)`` of ``case``, before cropping.

        Example:
            >>> image, mask = NnUNetRawDataset("Dataset001_MS").load_case("case_001")   # doctest: +SKIP
            >>> image.shape[1:] == mask.shape                                          # doctest: +SKIP
            True
        """
        channels = []
        for c, path in enumerate(self.image_paths(case)):
            if not path.is_file():
                raise NnUNetFormatError(f"{path}: missing channel {c} ({self.channel_names[c]!r}) of case {case!r}")
            channels.append(_nifti_zyx(path))
            if channels[-1].shape != channels[0].shape:
                raise NnUNetFormatError(f"{path}: shape (z, y, x) {channels[-1].shape} differs from channel 0 "
                                        f"{channels[0].shape}")
        label_path = self.labels_dir / f"{case}{self.file_ending}"
        if not label_path.is_file():
            raise NnUNetFormatError(f"{label_path}: missing label file of case {case!r}")
        label = _nifti_zyx(label_path)
        if label.shape != channels[0].shape:
            raise NnUNetFormatError(f"{label_path}: label shape (z, y, x) {label.shape} differs from the image "
                                    f"{channels[0].shape}")
        mask = label > 0 if self.lesion_label is None else label == self.lesion_label
        return np.stack(channels).astype(np.float32, copy=False), mask

    def __getitem__(self, index: int) -> Item:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if index < 0:
            index += len(self.cases)
        if not 0 <= index < len(self.cases):
            raise IndexError(f"NnUNetRawDataset index {index} out of range for {len(self.cases)} cases")
        case = self.cases[index]
        image, mask = self.load_case(case)
        if self.shape is not None:
            image = center_crop_or_pad(image, self.shape)
            mask = center_crop_or_pad(mask, self.shape)
        item = make_item(zscore_normalize(image), mask, case, self.connectivity)
        if self.transform is not None:
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.epoch, int(index), 7]).generate_state(1)[0]))
            item = self.transform(item, generator)
        return item


# --------------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------------


def _rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation (3, 3) float64 from three angles (radians) about the D, H and W axes."""
    out = torch.eye(3, dtype=torch.float64)
    for axis in range(3):
        a, b = [i for i in range(3) if i != axis]
        c, s = math.cos(float(angles[axis])), math.sin(float(angles[axis]))
        r = torch.eye(3, dtype=torch.float64)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        out = r @ out
    return out


class RandomAffineFlip:
    """Random flips and a small random rotation/scaling, identical for image and mask.

    ``transform(item, generator) -> item``: flips each spatial axis with probability ``flip_prob``
    (exact, ``torch.flip``), then with probability ``affine_prob`` resamples with a rotation of up to
    ``max_rotation_deg`` degrees about each axis and a per-axis scale in ``scale_range`` about the
    volume centre, in voxel space (``F.affine_grid``/``F.grid_sample``, ``align_corners=False``):
    trilinear with border padding for the image, nearest with zero padding for the mask. ``count``
    is recomputed from the transformed mask with ``connectivity`` (resampling can split, merge or
    drop lesions). Deterministic given the ``torch.Generator``.

    Shapes: ``image`` (C, D, H, W), ``mask`` (1, D, H, W) (a batch dimension is not expected).

    Example:
        >>> ds = PhantomDataset(1, shape=(16, 32, 32))
        >>> out = RandomAffineFlip()(ds[0], torch.Generator().manual_seed(0))
        >>> out["image"].shape, bool(((out["mask"] == 0) | (out["mask"] == 1)).all())
        (torch.Size([5, 16, 32, 32]), True)
    """

    def __init__(self, flip_prob: float = 0.5, affine_prob: float = 0.8, max_rotation_deg: float = 5.0,
                 scale_range: Tuple[float, float] = (0.9, 1.1), connectivity: int = DEFAULT_CONNECTIVITY[3]) -> None:
        for name, p in (("flip_prob", flip_prob), ("affine_prob", affine_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"RandomAffineFlip: {name} must be in [0, 1], got {p}")
        if max_rotation_deg < 0:
            raise ValueError(f"RandomAffineFlip: max_rotation_deg must be >= 0, got {max_rotation_deg}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"RandomAffineFlip: scale_range must satisfy 0 < low <= high, got {scale_range}")
        connectivity_structure(connectivity)
        self.flip_prob = float(flip_prob)
        self.affine_prob = float(affine_prob)
        self.max_rotation_deg = float(max_rotation_deg)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.connectivity = int(connectivity)

    def sample(self, generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
        """Draw the parameters: ``flips`` (3 bools), ``apply_affine``, ``angles`` (3, rad), ``scales`` (3,).

        Example:
            >>> p = RandomAffineFlip(max_rotation_deg=5).sample(torch.Generator().manual_seed(0))
            >>> bool((p["angles"].abs() <= math.radians(5)).all())
            True
            >>> bool(((p["scales"] >= 0.9) & (p["scales"] <= 1.1)).all())
            True
        """
        u = torch.rand(10, generator=generator, dtype=torch.float64)
        flips = [bool(u[i] < self.flip_prob) for i in range(3)]
        apply_affine = bool(u[3] < self.affine_prob)
        angles = (u[4:7] * 2 - 1) * math.radians(self.max_rotation_deg)
        low, high = self.scale_range
        scales = low + (high - low) * u[7:10]
        return {"flips": flips, "apply_affine": apply_affine, "angles": angles, "scales": scales}

    @staticmethod
    def normalized_theta(angles: torch.Tensor, scales: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        """(3, 4) ``affine_grid`` matrix: output -> input normalised coords for a voxel-space rotation/scale.

        Voxel-space map ``p_in = A p_out`` (A = rotation * diag(1/scale), about the centre), expressed
        in grid_sample's normalised (x=W, y=H, z=D) coordinates: ``S^-1 A S`` with ``S = diag(size/2)``.

        Example:
            >>> RandomAffineFlip.normalized_theta(torch.zeros(3), torch.ones(3), (4, 8, 6))[:, :3].diag()
            tensor([1., 1., 1.], dtype=torch.float64)
        """
        a = _rotation_matrix(angles) @ torch.diag(1.0 / scales.to(torch.float64))  # (D, H, W) axes
        half = torch.tensor([s / 2.0 for s in spatial], dtype=torch.float64)
        a_norm = torch.diag(1.0 / half) @ a @ torch.diag(half)
        perm = [2, 1, 0]  # (D, H, W) -> (x, y, z)
        theta = torch.zeros(3, 4, dtype=torch.float64)
        theta[:, :3] = a_norm[perm][:, perm]
        return theta

    def __call__(self, item: Item, generator: Optional[torch.Generator] = None) -> Item:
        image, mask = item["image"], item["mask"]
        if image.dim() != 4 or mask.dim() != 4 or mask.shape[0] != 1 or image.shape[1:] != mask.shape[1:]:
            raise ValueError(f"RandomAffineFlip: expected image (C, D, H, W) and mask (1, D, H, W), got "
                             f"{tuple(image.shape)} and {tuple(mask.shape)}")
        params = self.sample(generator)
        dims = [i + 1 for i, f in enumerate(params["flips"]) if f]
        if dims:
            image, mask = torch.flip(image, dims), torch.flip(mask, dims)
        if params["apply_affine"]:
            spatial = tuple(image.shape[1:])
            theta = self.normalized_theta(params["angles"], params["scales"], spatial)
            grid = F.affine_grid(theta[None].to(torch.float32), [1, 1, *spatial], align_corners=False)
            image = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="border",
                                  align_corners=False)[0].to(item["image"].dtype)
            mask = F.grid_sample(mask[None].float(), grid, mode="nearest", padding_mode="zeros",
                                 align_corners=False)[0].to(item["mask"].dtype)
        out = dict(item)
        out["image"] = image.contiguous()
        out["mask"] = mask.contiguous()
        out["count"] = torch.tensor(count_lesions(mask[0].numpy() > 0.5, self.connectivity), dtype=torch.int64)
        return out


# --------------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------------


def build_datasets(source: str, *, num_train: int, num_val: int, num_test: int,
                   shape: Sequence[int] = (32, 64, 64), seed: int = 0, connectivity: int = DEFAULT_CONNECTIVITY[3],
                   data_dir: Union[str, pathlib.Path, None] = None,
                   cache_bytes: Optional[int] = None) -> Tuple[Dataset, Dataset, Dataset]:
    """Training, validation and test datasets with disjoint cases (no augmentation applied).

    - ``"phantom"`` / ``"anatomy"``: one phantom family ``seed``; train takes case numbers
      ``[0, num_train)``, val ``[num_train, num_train + num_val)``, test the next ``num_test``.
    - ``"nnunet"``: ``data_dir`` is an nnU-Net raw folder. The ``imagesTr`` cases are shuffled with
      ``seed``; val takes ``num_val`` of them, and test takes ``num_test`` of them unless the folder has
      ``imagesTs`` + ``labelsTs`` (then test is that split, ``num_test`` capping it when > 0); train
      takes ``num_train`` of the rest (0 or None: all of the rest). ``shape`` crops/pads each volume.

    Example:
        >>> tr, va, te = build_datasets("phantom", num_train=4, num_val=2, num_test=2, shape=(16, 32, 32))
        >>> len(tr), len(va), len(te), va[0]["name"]
        (4, 2, 2, 'phantom_s0_000004')
    """
    counts = {"num_val": num_val, "num_test": num_test}
    for name, value in counts.items():
        _check_count(name, value)
    if source in ("phantom", "anatomy"):
        _check_count("num_train", num_train)
        cls = PhantomDataset if source == "phantom" else AnatomyPhantomDataset
        common = dict(shape=shape, seed=seed, connectivity=connectivity, cache_bytes=cache_bytes)
        train = cls(num_train, first_index=0, **common)
        val = cls(num_val, first_index=num_train, **common)
        test = cls(num_test, first_index=num_train + num_val, **common)
        return train, val, test
    if source == "nnunet":
        if data_dir is None:
            raise ValueError("build_datasets('nnunet'): data_dir (the nnU-Net raw dataset folder) is required")
        root = pathlib.Path(data_dir)
        full = NnUNetRawDataset(root, "Tr", connectivity=connectivity, shape=shape)
        order = list(full.cases)
        np.random.default_rng(seed).shuffle(order)
        has_test_split = (root / "imagesTs").is_dir() and (root / "labelsTs").is_dir()
        carve_test = 0 if has_test_split else num_test
        if num_val + carve_test > len(order):
            raise ValueError(f"build_datasets('nnunet'): {root} has {len(order)} training cases, fewer than "
                             f"num_val={num_val} + num_test={carve_test}")
        val_cases = order[:num_val]
        test_cases = order[num_val:num_val + carve_test]
        rest = order[num_val + carve_test:]
        if num_train:
            _check_count("num_train", num_train)
            if num_train > len(rest):
                raise ValueError(f"build_datasets('nnunet'): num_train={num_train} but only {len(rest)} cases of "
                                 f"{root / 'imagesTr'} remain after validation/test")
            rest = rest[:num_train]
        make = lambda split, cases: NnUNetRawDataset(root, split, connectivity=connectivity, shape=shape,  # noqa: E731
                                                     cases=sorted(cases))
        train, val = make("Tr", rest), make("Tr", val_cases)
        if has_test_split:
            test = NnUNetRawDataset(root, "Ts", connectivity=connectivity, shape=shape)
            if num_test:
                test = NnUNetRawDataset(root, "Ts", connectivity=connectivity, shape=shape, cases=test.cases[:num_test])
        else:
            test = make("Tr", test_cases)
        return train, val, test
    raise ValueError(f"build_datasets: source must be 'phantom', 'anatomy' or 'nnunet', got {source!r}")
