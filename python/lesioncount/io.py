"""Reading probability maps and masks from disk, and writing label maps, with their geometry kept.

Supported inputs (one 3-D case per file):

- NIfTI ``CASE.nii`` / ``CASE.nii.gz`` (nibabel): a 3-D map, a 4-D map with a singleton 4th
  dimension, or a multi-channel 4-D map ``(x, y, z, C)`` from which ``channel`` is taken (it must be
  given: which volume holds the lesion probabilities is not guessed). The
  affine is the image's best affine (sform, else qform), as ``nibabel.load(path).affine`` gives it.
- nnU-Net v2 ``--save_probabilities`` output ``CASE.npz`` with the key ``probabilities`` of shape
  ``(C, z, y, x)`` (SimpleITK axis order, softmax over C classes). The lesion channel ``channel``
  (default 1: background + lesion) is transposed to NIfTI voxel order ``(x, y, z)``. The geometry
  comes from the sibling segmentation ``CASE.nii.gz`` that nnU-Net writes next to it (read with
  nibabel, header only). The ``CASE.pkl`` file is never unpickled (unpickling runs arbitrary
  code). A missing sibling is an error naming the file it looked for, unless
  ``missing_geometry="identity"`` is passed explicitly, which uses the identity affine (1 mm
  voxels) and warns.
- NumPy ``CASE.npy`` holding a 3-D array already in ``(i, j, k)`` order; identity affine, 1 mm voxels.

Outputs (:func:`write_label_map`, and every file ``lesioncount count`` / ``merge`` write) are
written atomically with :func:`atomic_file`: into a hidden temporary file next to the target
(``.NAME.<pid>.<random>.tmp``), flushed to disk (fsync), then renamed over the target
(``os.replace``), so a reader sees the old file or the complete new one, never a partial one, and
two processes never share a temporary name. The temporary file is removed when writing fails.

Every failure to read a case raises :class:`CaseReadError`, whose message starts with the file path
and says what was wrong (unreadable or corrupt file, wrong rank, missing key, channel out of range,
shape mismatch with the sibling segmentation, degenerate affine). Values are returned raw: no range
or NaN check here (``count_distribution`` does that).

Example:
    >>> from lesioncount.io import find_cases, read_probability_map
    >>> for path in find_cases("predictions/"):               # doctest: +SKIP
    ...     vol = read_probability_map(path)                    # Volume: data (x, y, z), affine (4, 4)
    ...     print(vol.name, vol.data.shape, vol.spacing)
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import re
import secrets
import warnings
import zipfile
from dataclasses import dataclass
from typing import Union

import numpy as np

from ._extras import require
from ._gunzip import GZIP_BACKENDS, gunzip, gzip_backend, set_gzip_backend

__all__ = [
    "CaseReadError",
    "Volume",
    "SUPPORTED_SUFFIXES",
    "case_name",
    "find_cases",
    "read_probability_map",
    "read_mask",
    "write_label_map",
    "atomic_file",
    "temp_path",
    "is_temp_name",
    "write_text",
    "JSONText",
    "format_json",
    "write_json",
    "fsync_folder",
    "unlink_if_present",
    "mask_for_case",
    "read_case",
    "read_map_on_grid",
    "c_contiguous",
    "GZIP_BACKENDS",
    "gunzip",
    "gzip_backend",
    "set_gzip_backend",
]

PathLike = Union[str, pathlib.Path]

#: File name endings recognised as cases (longest first, so ``.nii.gz`` wins over ``.gz``).
SUPPORTED_SUFFIXES = (".nii.gz", ".nii", ".npz", ".npy")
_NNUNET_KEY = "probabilities"


class CaseReadError(ValueError):
    """A case file could not be read; the message starts with the file path and gives the reason."""

    def __init__(self, path: PathLike, reason: str):
        self.path = pathlib.Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class Volume:
    """One 3-D case with its geometry.

    Attributes:
        data: (X, Y, Z) array in NIfTI voxel-index order (i, j, k), as nibabel returns it.
            nnU-Net ``(C, z, y, x)`` arrays are transposed to ``(x, y, z)`` to match.
        affine: (4, 4) float64 mapping a voxel index ``(i, j, k, 1)`` to world millimetres
            (nibabel convention, RAS+). Identity for ``.npy`` files.
        name: case id (file name without ``.nii.gz`` / ``.nii`` / ``.npz`` / ``.npy``).
        path: the file the data came from.

    Example:
        >>> v = Volume(np.zeros((4, 5, 6), np.float32), np.diag([0.5, 1.0, 3.0, 1.0]), "c", pathlib.Path("c.npy"))
        >>> v.spacing, round(v.voxel_volume, 9)
        ((0.5, 1.0, 3.0), 1.5)
    """

    data: np.ndarray
    affine: np.ndarray
    name: str
    path: pathlib.Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k: the column norms of ``affine[:3, :3]``."""
        norms = np.linalg.norm(np.asarray(self.affine, dtype=np.float64)[:3, :3], axis=0)
        return tuple(float(n) for n in norms)

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm^3: ``|det(affine[:3, :3])|`` (equals the product of the
        spacings for any rotation/flip; also correct for sheared affines)."""
        return float(abs(np.linalg.det(np.asarray(self.affine, dtype=np.float64)[:3, :3])))

    def world(self, index: np.ndarray) -> np.ndarray:
        """World coordinates (N, 3) in mm of voxel indices ``index`` (N, 3) (float ok).

        Example:
            >>> v = Volume(np.zeros((2, 2, 2)), np.diag([2.0, 3.0, 4.0, 1.0]), "c", pathlib.Path("c.npy"))
            >>> v.world(np.array([[1, 1, 1]])).tolist()
            [[2.0, 3.0, 4.0]]
        """
        idx = np.asarray(index, dtype=np.float64).reshape(-1, 3)
        a = np.asarray(self.affine, dtype=np.float64)
        return idx @ a[:3, :3].T + a[:3, 3]


def _suffix(path: pathlib.Path) -> str | None:
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def case_name(path: PathLike) -> str:
    """The case id of ``path``: its file name without a supported suffix.

    Example:
        >>> case_name("preds/BRATS_001.nii.gz"), case_name("x/case7.npz")
        ('BRATS_001', 'case7')
    """
    path = pathlib.Path(path)
    suffix = _suffix(path)
    if suffix is None:
        raise CaseReadError(path, f"unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})")
    return path.name[: -len(suffix)]


def _nnunet_sibling(path: pathlib.Path) -> pathlib.Path | None:
    """The segmentation NIfTI nnU-Net writes next to ``CASE.npz`` (``.nii.gz`` preferred), if any."""
    stem = path.name[: -len(".npz")]
    for suffix in (".nii.gz", ".nii"):
        candidate = path.with_name(stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def find_cases(path: PathLike) -> list[pathlib.Path]:
    """The case files under ``path``.

    A file gives ``[path]`` (it must have a supported suffix). A folder gives its supported files
    (not recursive), sorted by name, skipping the segmentation ``CASE.nii.gz`` / ``CASE.nii`` that
    sits next to an nnU-Net ``CASE.npz`` (it only provides the geometry), and skipping hidden files
    and sub-folders. Entries with a supported name that cannot be opened (a dangling symbolic link,
    a symbolic link loop, an entry whose status cannot be read) are listed too, so that reading
    them fails with :class:`CaseReadError` saying why (``lesioncount count`` reports them in
    ``errors.csv``) instead of their being skipped silently.
    Two files with the same case id (e.g. ``a.npy`` and ``a.nii.gz`` without ``a.npz``) are an error,
    since their outputs would collide.

    Example:
        >>> find_cases("nnunet_out/")   # doctest: +SKIP
        [PosixPath('nnunet_out/case_000.npz'), PosixPath('nnunet_out/case_001.npz')]
    """
    path = pathlib.Path(path)
    if path.is_file():
        case_name(path)  # raises for unsupported suffixes
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = [p for p in path.iterdir() if not p.name.startswith(".") and _suffix(p)
             and (p.is_file() or _broken_entry(p) is not None)]
    npz_stems = {case_name(p) for p in files if _suffix(p) == ".npz"}
    cases = [p for p in files if not (_suffix(p) in (".nii.gz", ".nii") and case_name(p) in npz_stems)]
    cases.sort(key=lambda p: p.name)
    seen: dict[str, pathlib.Path] = {}
    for p in cases:
        name = case_name(p)
        if name in seen:
            raise CaseReadError(p, f"case id {name!r} is also used by {seen[name].name}; rename one of them")
        seen[name] = p
    return cases


def _broken_entry(path: pathlib.Path) -> str | None:
    """Why ``path`` cannot be opened although the folder lists it, or None (a regular file, a
    folder, or absent).

    Example:
        >>> _broken_entry(pathlib.Path("/"))   # a folder: not broken
    """
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the link points, directly or not, at itself)"
        if exc.errno == errno.ENOENT:
            if os.path.islink(path):
                return f"dangling symbolic link (its target {os.readlink(path)!r} does not exist)"
            return None  # removed meanwhile
        return f"cannot access it ({exc.strerror or exc})"
    return None


def _require_file(path: pathlib.Path) -> None:
    """CaseReadError unless ``path`` is a regular file (following links), with the reason."""
    if path.is_file():
        return
    broken = _broken_entry(path)
    if broken is not None:
        raise CaseReadError(path, broken)
    raise CaseReadError(path, "is a folder, not a file" if path.is_dir() else "no such file")


def _nibabel():
    return require("nibabel", "reading and writing NIfTI files")


def _check_affine(path: pathlib.Path, affine) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise CaseReadError(path, f"invalid affine (need a finite 4x4 matrix, got {affine.tolist()})")
    if abs(np.linalg.det(affine[:3, :3])) <= 0.0:
        raise CaseReadError(path, "degenerate affine (zero voxel volume); fix the NIfTI header (sform/qform)")
    return affine


def _load_gzipped_nifti(nib, path: pathlib.Path):
    """(image, decompressed bytes) of a .nii.gz file, or None when it is not a plain NIfTI-1/2 stream.

    The file is read whole and inflated by :func:`gunzip` (ISA-L / zlib-ng / zlib, whichever is
    installed; one GIL-free call per gzip member), so reader threads (``lesioncount count
    --workers``) decompress in parallel; nibabel's streaming reader inflates with zlib in 8 KiB
    steps and takes the GIL back after each. Only the header is parsed by nibabel (from the
    decompressed bytes); corrupt or truncated data raises.
    """
    with open(path, "rb") as f:
        raw = f.read()
    data = gunzip(raw)
    del raw
    if len(data) < 4:
        return None
    sizeof_hdr = {int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")}
    image_class = nib.Nifti1Image if 348 in sizeof_hdr else nib.Nifti2Image if 540 in sizeof_hdr else None
    if image_class is None:
        return None  # not NIfTI (or a .hdr/.img pair): let nib.load say what it is
    try:
        return image_class.from_bytes(data), data
    except Exception:  # noqa: BLE001 - e.g. a bad header: nib.load gives the error message
        return None


def _unscaled_view(img, data: bytes) -> np.ndarray | None:
    """The image array as a read-only view on the decompressed ``data``, when nibabel would return
    the stored values unchanged (scale factors 1 and 0, or none); None otherwise.

    This is what ``np.asanyarray(img.dataobj)`` returns in that case (same dtype, byte order,
    shape and F/C order, taken from nibabel's own ArrayProxy), without copying the bytes out of
    an in-memory stream first.
    """
    from nibabel.arrayproxy import ArrayProxy

    proxy = img.dataobj
    if type(proxy) is not ArrayProxy or proxy.order not in ("F", "C"):
        return None
    if not (float(proxy.slope) == 1.0 and float(proxy.inter) == 0.0):
        return None
    count = int(np.prod(proxy.shape, dtype=np.int64))
    dtype = np.dtype(proxy.dtype)
    if proxy.offset < 0 or len(data) < proxy.offset + count * dtype.itemsize:
        return None  # short data: nibabel reports it
    return np.frombuffer(data, dtype=dtype, count=count, offset=proxy.offset).reshape(proxy.shape, order=proxy.order)


def _load_nifti(path: pathlib.Path, *, view_ok: bool = False):
    """(array as stored, affine) of a NIfTI file; every read failure becomes a CaseReadError.

    ``view_ok``: the array of a ``.nii.gz`` may be a read-only view on the decompressed bytes
    (the caller copies it anyway); otherwise it is writeable, as nibabel returns it.
    """
    nib = _nibabel()
    try:
        loaded = _load_gzipped_nifti(nib, path) if path.name.lower().endswith(".gz") else None
    except Exception as exc:  # truncated gzip -> EOFError, corrupt -> zlib.error / BadGzipFile ...
        raise CaseReadError(path, f"cannot decompress, file truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    img, data = loaded if loaded is not None else (None, None)
    try:
        img = img if img is not None else nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise CaseReadError(path, f"cannot read NIfTI header ({type(exc).__name__}: {exc})") from exc
    try:
        array = _unscaled_view(img, data) if view_ok and data is not None else None
        if array is None:
            array = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip -> EOFError, corrupt -> zlib.error / OSError ...
        raise CaseReadError(path, f"cannot read image data, file truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    return array, _check_affine(path, img.affine)


# z-slab width of the F -> C copy: 16 float32 are one 64-byte cache line of the output
_SLAB = 16


def c_contiguous(data: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray(data)``, about 3x faster for F-ordered 3-D volumes.

    A NIfTI volume (X, Y, Z) is stored F-ordered (x fastest), and an nnU-Net ``(z, y, x)`` array
    transposed to ``(x, y, z)`` is F-ordered too; the counting needs C order (labels numbered in
    raster order of the (X, Y, Z) grid). NumPy's one-pass copy writes the output with a stride of
    Z elements and misses the cache on almost every element; copying slabs of 16 z-planes keeps
    each output cache line in cache while it is filled. The result is the same array (values,
    dtype, shape), C-contiguous and writeable (a new array unless ``data`` already was C-contiguous).

    Args:
        data: any array; only F-contiguous 3-D arrays take the slab path.

    Returns:
        C-contiguous array equal to ``data``.

    Example:
        >>> a = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
        >>> c = c_contiguous(a)
        >>> c.flags.c_contiguous, bool(np.array_equal(c, a))
        (True, True)
    """
    data = np.asarray(data)
    if data.flags.c_contiguous or data.ndim != 3 or not data.flags.f_contiguous or data.shape[2] <= _SLAB:
        return np.ascontiguousarray(data)
    out = np.empty(data.shape, dtype=data.dtype)
    for k in range(0, data.shape[2], _SLAB):
        out[:, :, k:k + _SLAB] = data[:, :, k:k + _SLAB]
    return out


def _as_float(data: np.ndarray) -> np.ndarray:
    if data.dtype in (np.float32, np.float64):
        return data
    if data.dtype.kind in "fiub":
        return data.astype(np.float32)
    raise TypeError(f"unsupported data type {data.dtype}")


def _select_nifti_channel(path: pathlib.Path, data: np.ndarray, channel: int | None,
                          choose: str | None = None) -> np.ndarray:
    """(x, y, z), (x, y, z, 1) or (x, y, z, C) -> (x, y, z). Extra trailing singleton dims are dropped.
    ``channel`` None with C > 1: an error, which says how to choose a volume when ``choose`` is given."""
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        if channel is None:
            if choose:
                raise CaseReadError(
                    path, f"4-D image of shape {data.shape} holds {data.shape[3]} volumes; which one is the lesion "
                          f"probability map is not guessed: choose it with {choose} (0-based)")
            raise CaseReadError(path, f"expected a 3-D image, got 4-D shape {data.shape} with {data.shape[3]} channels")
        if not 0 <= channel < data.shape[3]:
            raise CaseReadError(
                path, f"channel {channel} out of range: the image has {data.shape[3]} channels (shape {data.shape})"
            )
        data = data[..., channel]
    if data.ndim != 3:
        raise CaseReadError(
            path, f"expected a 3-D image (x, y, z) or 4-D (x, y, z, C), got {data.ndim}-D shape {data.shape}"
        )
    return data


def _read_npz_channel(path: pathlib.Path, channel: int) -> np.ndarray:
    """The ``channel`` of an nnU-Net ``probabilities`` array, transposed (z, y, x) -> (x, y, z)."""
    try:
        with np.load(str(path), allow_pickle=False) as archive:
            if _NNUNET_KEY not in archive.files:
                raise CaseReadError(
                    path, f"missing key {_NNUNET_KEY!r} (nnU-Net --save_probabilities format); keys present: {archive.files}"
                )
            probs = archive[_NNUNET_KEY]
    except CaseReadError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise CaseReadError(path, f"cannot read .npz archive, file truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    if probs.ndim != 4:
        raise CaseReadError(
            path, f"{_NNUNET_KEY!r} must be 4-D (C, z, y, x) as nnU-Net writes it, got {probs.ndim}-D shape {probs.shape}"
        )
    if not 0 <= channel < probs.shape[0]:
        raise CaseReadError(
            path, f"channel {channel} out of range: {_NNUNET_KEY!r} has {probs.shape[0]} channels (shape {probs.shape})"
        )
    try:
        chosen = _as_float(probs[channel])
    except TypeError as exc:
        raise CaseReadError(path, str(exc)) from None
    return c_contiguous(chosen.transpose(2, 1, 0))


def _geometry_for_npz(path: pathlib.Path, shape: tuple[int, ...], missing_geometry: str) -> np.ndarray:
    sibling = _nnunet_sibling(path)
    if sibling is None:
        expected = path.with_name(path.name[: -len(".npz")] + ".nii.gz")
        if missing_geometry == "identity":
            warnings.warn(
                f"{path}: sibling segmentation {expected.name} not found; using the identity affine (1 mm voxels)",
                stacklevel=3,
            )
            return np.eye(4)
        raise CaseReadError(
            path,
            f"sibling segmentation {expected} not found; nnU-Net writes it next to the .npz and it gives the "
            f"geometry (the .pkl is never unpickled). Pass missing_geometry='identity' "
            f"(CLI: --allow-missing-geometry) to use 1 mm voxels and the identity affine",
        )
    nib = _nibabel()
    try:
        img = nib.load(str(sibling))
    except Exception as exc:
        raise CaseReadError(path, f"cannot read the sibling segmentation {sibling.name} ({type(exc).__name__}: {exc})") from exc
    sib_shape = tuple(int(s) for s in img.shape)
    while len(sib_shape) > 3 and sib_shape[-1] == 1:
        sib_shape = sib_shape[:-1]
    if sib_shape != tuple(shape):
        raise CaseReadError(
            path,
            f"shape mismatch: probabilities transposed from (z, y, x) to (x, y, z) have shape {tuple(shape)}, "
            f"but the sibling segmentation {sibling.name} has shape {tuple(img.shape)}",
        )
    return _check_affine(sibling, img.affine)


def _read_npy(path: pathlib.Path) -> np.ndarray:
    try:
        return np.load(str(path), allow_pickle=False)
    except Exception as exc:
        raise CaseReadError(path, f"cannot read .npy file ({type(exc).__name__}: {exc})") from exc


def read_probability_map(path: PathLike, channel: int | None = None, *, missing_geometry: str = "error") -> Volume:
    """Read one probability (or logit) map with its geometry.

    Args:
        path: ``.nii`` / ``.nii.gz`` / ``.npz`` (nnU-Net) / ``.npy`` file.
        channel: lesion channel of multi-channel inputs: index C of an nnU-Net ``(C, z, y, x)``
            array, or of the 4th axis of an ``(x, y, z, C)`` NIfTI. Ignored for 3-D inputs and
            4-D NIfTI with a singleton 4th dimension. ``None`` (default): 1 for an nnU-Net ``.npz``
            (background + lesion); a 4-D NIfTI with several volumes then raises
            :class:`CaseReadError` (no volume is picked silently).
        missing_geometry: ``"error"`` (default): an ``.npz`` without its sibling ``CASE.nii.gz``
            raises :class:`CaseReadError`; ``"identity"``: use the identity affine and warn.

    Returns:
        :class:`Volume` with ``data`` (X, Y, Z) C-contiguous float32 or float64 (raw values, not
        range checked; integer and float16 files become float32) and the (4, 4) affine.

    Raises:
        CaseReadError: the message names the file and the reason.

    Example:
        >>> vol = read_probability_map("nnunet_out/case_001.npz", channel=1)   # doctest: +SKIP
        >>> vol.data.shape == nibabel.load("nnunet_out/case_001.nii.gz").shape  # doctest: +SKIP
        True
    """
    if missing_geometry not in ("error", "identity"):
        raise ValueError(f"missing_geometry must be 'error' or 'identity', got {missing_geometry!r}")
    path = pathlib.Path(path)
    name = case_name(path)
    _require_file(path)
    suffix = _suffix(path)
    if suffix == ".npz":
        data = _read_npz_channel(path, 1 if channel is None else int(channel))
        affine = _geometry_for_npz(path, data.shape, missing_geometry)
    elif suffix == ".npy":
        data = _read_npy(path)
        if data.ndim != 3:
            raise CaseReadError(path, f"expected a 3-D array (i, j, k), got {data.ndim}-D shape {data.shape}")
        affine = np.eye(4)
    else:
        data, affine = _load_nifti(path, view_ok=True)
        data = _select_nifti_channel(path, data, None if channel is None else int(channel),
                                     choose="channel=N (CLI: --channel N)")
    try:
        # C order, so that label ids follow SciPy raster order on the (X, Y, Z) grid and the copy
        # happens here, in the worker threads of `lesioncount count --workers`.
        data = c_contiguous(_as_float(np.asarray(data)))
    except TypeError as exc:
        raise CaseReadError(path, str(exc)) from None
    if not data.flags.writeable:  # a view on the decompressed bytes (already C ordered)
        data = data.copy()
    if min(data.shape) < 1:
        raise CaseReadError(path, f"empty image of shape {data.shape}")
    return Volume(data=data, affine=affine, name=name, path=path)


def read_mask(path: PathLike) -> Volume:
    """Read a region-of-interest mask (e.g. a brain mask) with its geometry.

    ``.nii`` / ``.nii.gz`` (3-D, or 4-D with a singleton 4th dimension) and 3-D ``.npy`` files are
    accepted. Values are returned raw (bool/int/float); nonzero means "inside". ``.npz`` masks are
    rejected (no nnU-Net convention exists for them).

    Returns:
        :class:`Volume` with ``data`` (X, Y, Z) and the (4, 4) affine.

    Example:
        >>> read_mask("brain_mask.nii.gz").data.shape   # doctest: +SKIP
        (160, 192, 160)
    """
    path = pathlib.Path(path)
    name = case_name(path)
    _require_file(path)
    suffix = _suffix(path)
    if suffix == ".npz":
        raise CaseReadError(path, "masks must be .nii, .nii.gz or .npy files, not .npz")
    if suffix == ".npy":
        data = _read_npy(path)
        affine = np.eye(4)
        if data.ndim != 3:
            raise CaseReadError(path, f"expected a 3-D mask (i, j, k), got {data.ndim}-D shape {data.shape}")
    else:
        data, affine = _load_nifti(path)
        data = _select_nifti_channel(path, data, None)
    data = np.asarray(data)
    return Volume(data=data if data.flags.writeable else data.copy(), affine=affine, name=name, path=path)


def temp_path(path: PathLike) -> pathlib.Path:
    """A fresh hidden temporary name next to ``path``: ``.NAME.<pid>.<random hex>.tmp``.

    Unique per process and call (pid + 64 random bits), in the same folder (so that
    ``os.replace`` onto ``path`` is an atomic rename on the same file system), and hidden (so that
    :func:`find_cases` never lists it).

    Example:
        >>> t = temp_path("out/case_001.json")
        >>> t.parent.as_posix(), t.name.startswith(".case_001.json."), t.suffix
        ('out', True, '.tmp')
    """
    path = pathlib.Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")


_TEMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{16}\.tmp$")


def is_temp_name(name: str) -> bool:
    """True for a file name of the form :func:`temp_path` gives (``.NAME.<pid>.<16 hex>.tmp``): the
    leftover of a write that was killed before its rename.

    Example:
        >>> is_temp_name(temp_path("out/case_001.json").name), is_temp_name("case_001.json")
        (True, False)
    """
    return bool(_TEMP_NAME.match(name))


def _fsync_and_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "w", *, commit: bool = True, **open_kwargs):
    """Write ``path`` atomically: yields a file object open on a :func:`temp_path` next to it.

    On a normal exit the data are flushed and fsync'ed, the file closed and renamed over ``path``
    (``os.replace``: readers see the old file or the complete new one). On an exception (including
    KeyboardInterrupt) the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the target file.
        mode: ``"w"`` (text, the default) or ``"wb"``; ``open_kwargs`` go to :func:`open`
            (e.g. ``newline=""`` for CSV).
        commit: False: do not rename; the caller finds the finished temporary file's path in the
            yielded object's ``temp_path`` attribute and must ``os.replace`` it onto ``path`` or
            remove it (``lesioncount count`` renames label maps written by its worker threads in
            case order this way).

    Example:
        >>> import tempfile
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "summary.csv"
        >>> with atomic_file(target, newline="") as f:
        ...     _ = f.write("case,n\\n")
        >>> target.read_text(), [p.name for p in target.parent.iterdir()]
        ('case,n\\n', ['summary.csv'])
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = pathlib.Path(path)
    tmp = temp_path(path)
    f = open(tmp, "x" + mode[1:], **open_kwargs)  # noqa: SIM115 (exclusive create; closed below)
    try:
        f.temp_path = tmp  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover (builtin file objects accept attributes)
        pass
    try:
        yield f
        _fsync_and_close(f)
        if commit:
            os.replace(tmp, path)
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: PathLike, text: str) -> pathlib.Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`); returns ``path``.

    Example:
        >>> import tempfile
        >>> write_text(pathlib.Path(tempfile.mkdtemp()) / "a.txt", "hello\\n").read_text()
        'hello\\n'
    """
    path = pathlib.Path(path)
    with atomic_file(path) as f:
        f.write(text)
    return path


class JSONText(str):
    """A value that :func:`format_json` writes as it is: JSON text formatted earlier (e.g. by a
    worker thread, so that the thread that writes the file only joins the parts)."""


def format_json(value, level: int = 0) -> str:
    """Indented JSON (1 space per level) with lists of scalars (numbers, short strings) kept on one line:
    the layout of every ``CASE.json`` (``lesioncount count``, ``nnunet-predict``).

    Built from the structure, not by editing ``json.dumps`` output, so strings holding brackets or
    commas (a case file ``scan[1,2].nii.gz``) are written unchanged. A :class:`JSONText` value is
    inserted as it is (it must be the output of ``format_json(v, level)`` at that depth).

    Args:
        value: dicts, lists / tuples, and JSON scalars.
        level: the nesting depth of ``value`` (its closing bracket is indented by ``level`` spaces).

    Example:
        >>> print(format_json({"pmf": [0.5, 0.5], "case": "a[1,2]", "t": {"x": 1}}))
        {
         "pmf": [0.5, 0.5],
         "case": "a[1,2]",
         "t": {
          "x": 1
         }
        }
    """
    if isinstance(value, JSONText):
        return str(value)
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {format_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in value):
            return json.dumps(list(value))  # "[1, 2]": one line
        return "[\n" + ",\n".join(inner + format_json(v, level + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value)


def write_json(path: PathLike, value) -> pathlib.Path:
    """Write ``value`` as :func:`format_json` text and a final newline, atomically; returns ``path``.

    Example:
        >>> import tempfile
        >>> write_json(pathlib.Path(tempfile.mkdtemp()) / "a.json", {"n": [1, 2]}).read_text()
        '{\\n "n": [1, 2]\\n}\\n'
    """
    return write_text(path, format_json(value) + "\n")


def fsync_folder(folder: PathLike) -> None:
    """fsync a folder, so that the renames into it are on disk; silently skipped where the system
    does not allow it (no O_RDONLY on folders, or no fsync on them).

    Example:
        >>> fsync_folder(".")
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unlink_if_present(path: PathLike) -> None:
    """Remove ``path``; nothing happens when it does not exist (other errors propagate).

    Example:
        >>> unlink_if_present("no/such/file.json")
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def mask_for_case(mask_dir: PathLike, name: str) -> pathlib.Path:
    """The mask of case ``name`` in a folder of per-case masks: ``NAME.nii.gz``, ``NAME.nii`` or
    ``NAME.npy`` (first found); :class:`CaseReadError` naming what was looked for otherwise.

    Example:
        >>> mask_for_case("masks/", "case_001")   # doctest: +SKIP
        PosixPath('masks/case_001.nii.gz')
    """
    mask_dir = pathlib.Path(mask_dir)
    for suffix in (".nii.gz", ".nii", ".npy"):
        candidate = mask_dir / (name + suffix)
        if candidate.is_file():
            return candidate
    raise CaseReadError(mask_dir / (name + ".nii.gz"), f"no mask for case {name!r} in {mask_dir} "
                        f"(looked for {name}.nii.gz, {name}.nii, {name}.npy)")


def read_case(path: PathLike, *, channel: int | None = None, missing_geometry: str = "error",
              mask: "Volume | PathLike | None" = None) -> tuple[Volume, Volume | None, list[str]]:
    """Read one case with its geometry and its region-of-interest mask.

    Args:
        path: the probability map (:func:`read_probability_map`).
        channel, missing_geometry: as in :func:`read_probability_map`.
        mask: None; a :class:`Volume` already read (one mask for every case); or a folder of
            per-case masks, where :func:`mask_for_case` finds this case's.

    Returns:
        ``(volume, mask volume or None, notes)``: ``volume.data`` (X, Y, Z) with its (4, 4) affine;
        ``notes`` says where the geometry was not found (an nnU-Net ``.npz`` without its sibling
        ``CASE.nii.gz`` read with ``missing_geometry="identity"``: identity affine, 1 mm voxels).
        The mask's grid is not compared here (:func:`lesioncount.report.check_mask` does that).

    Example:
        >>> vol, mask, notes = read_case("preds/case_001.nii.gz", mask="masks/")   # doctest: +SKIP
    """
    path = pathlib.Path(path)
    volume = read_probability_map(path, channel=channel, missing_geometry=missing_geometry)
    notes = []
    if path.name.lower().endswith(".npz") and _nnunet_sibling(path) is None:
        notes.append(f"{path}: sibling segmentation {volume.name}.nii.gz not found; identity affine (1 mm voxels) used")
    if mask is not None and not isinstance(mask, Volume):
        mask = read_mask(mask_for_case(mask, volume.name)) if pathlib.Path(mask).is_dir() else read_mask(mask)
    return volume, mask, notes


def read_map_on_grid(path: PathLike, shape, affine, kinds: str, what: str):
    """A NIfTI map written earlier (a label or detection map), if it is usable on a case's grid.

    Args:
        path: the ``.nii`` / ``.nii.gz`` file.
        shape: the case's (X, Y, Z) shape; affine: its (4, 4) voxel-to-world matrix.
        kinds: the accepted NumPy dtype kinds (``"iu"``: integers, ``"f"``: floats).
        what: what the map should be, for the reason (``"an integer label map"``).

    Returns:
        ``(array, None)``: the (X, Y, Z) array, of a dtype kind in ``kinds``, ``shape`` and an
        affine equal to ``affine`` (rtol 1e-5, atol 1e-3 mm); ``(None, why not)`` otherwise
        (missing, empty, unreadable, wrong dtype, shape or affine).

    Example:
        >>> read_map_on_grid("no/such_labels.nii.gz", [4, 4, 4], np.eye(4), "iu", "an integer label map")
        (None, 'missing')
    """
    path = pathlib.Path(path)
    if not os.path.lexists(path):
        return None, "missing"
    try:
        if path.stat().st_size == 0:
            return None, "empty (0 bytes)"
        array, map_affine = _load_nifti(path)
    except CaseReadError as exc:
        return None, exc.reason
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    if array.dtype.kind not in kinds:
        return None, f"not {what} ({array.dtype})"
    if list(array.shape) != list(shape):
        return None, f"shape {list(array.shape)}, but the case has shape {list(shape)}"
    if not np.allclose(map_affine, np.asarray(affine), rtol=1e-5, atol=1e-3):
        return None, "its affine differs from the case's"
    return array, None


def write_label_map(path: PathLike, labels, affine, *, commit: bool = True) -> pathlib.Path:
    """Write an integer label map as NIfTI with the given affine, atomically.

    Args:
        path: output ``.nii`` or ``.nii.gz`` file.
        labels: (X, Y, Z) integer array or tensor (0 background, 1..K lesions).
        affine: (4, 4) voxel-to-world matrix (use the input's ``Volume.affine``).
        commit: True (default): the file is written to a hidden temporary name, fsync'ed and
            renamed onto ``path`` (see :func:`atomic_file`; an interrupted write never leaves a
            partial ``path``). False: the finished temporary file is left for the caller to
            ``os.replace`` onto ``path`` (or remove).

    Returns:
        ``path``, or with ``commit=False`` the temporary file.

    The file is int16 when the largest label is at most 32767, int32 otherwise (more labels than
    int32 can hold is an error). Units are set to mm. ``.nii.gz`` is gzip level 1 without a name
    or time stamp in the gzip header, byte for byte what ``nibabel.save`` writes.

    Example:
        >>> write_label_map("out/case_labels.nii.gz", labels, vol.affine)   # doctest: +SKIP
    """
    nib = _nibabel()
    path = pathlib.Path(path)
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3-D (X, Y, Z) array, got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise TypeError(f"labels must be an integer array, got {labels.dtype}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise ValueError(f"label map path must end in .nii or .nii.gz, got {path.name!r}")
    low = int(labels.min()) if labels.size else 0
    high = int(labels.max()) if labels.size else 0
    if low < 0:
        raise ValueError(f"labels must be >= 0, got minimum {low}")
    if high <= np.iinfo(np.int16).max:
        dtype = np.int16
    elif high <= np.iinfo(np.int32).max:
        dtype = np.int32
    else:
        raise ValueError(f"{high} labels do not fit in an int32 NIfTI")
    img = nib.Nifti1Image(labels.astype(dtype, copy=False), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.header["intent_name"] = b"lesion labels"
    return _save_nifti_atomic(path, img, commit=commit)


def _save_nifti_atomic(path: pathlib.Path, img, *, commit: bool = True) -> pathlib.Path:
    """Write a nibabel image to ``path`` through :func:`atomic_file`; returns ``path``, or with
    ``commit=False`` the finished temporary file. ``.nii.gz``: gzip level 1 without a name or time
    stamp in the gzip header (byte for byte what ``nibabel.save`` writes)."""
    with atomic_file(path, "wb", commit=commit) as f:
        if path.name.lower().endswith(".gz"):
            import gzip

            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=1, mtime=0) as gz:
                img.to_stream(gz)
        else:
            img.to_stream(f)
        written = f.temp_path
    return path if commit else written
