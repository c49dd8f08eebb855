"""Lesion phantoms on real brain anatomy (MNI152 2009a or Colin27 templates).

The background anatomy comes from tissue templates found on the local machine (nothing is
downloaded):

- ``"mni152"``: the ICBM152 2009a symmetric templates that nilearn ships inside its package
  (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``; located from the
  installed package path without importing nilearn). GM and WM are the template probabilities; the
  intracranial mask is the (hole-filled) nonzero region of the skull-stripped T1 united with GM/WM,
  and CSF = intracranial mask - GM - WM (clipped to [0, 1]), which covers ventricles and sulci.
- ``"colin27"``: the Colin27 single-subject brain of Debian's ``mricron-data`` package, installed at
  ``/usr/share/mricron/templates/ch2bet.nii.gz`` (skull-stripped, 1 mm; the package also has the
  0.5 mm head ``ch2better.nii.gz``). It has no probability maps, so CSF/GM/WM memberships come from
  its T1 intensities: a 3-class 1-D gaussian mixture (k-means initialised at the 10/50/90 %
  quantiles) gives soft posteriors. ``$LESIONCOUNT_COLIN27`` may point to another copy of the file.

Per case (seeded by ``(seed, index)``): a random left-right flip, rotation of up to 6 degrees about
each axis, per-axis scale 0.93-1.07 and a shift of up to 3 % of the brain's bounding box map the
target grid (D, H, W) onto the template's brain box; GM/WM/CSF probabilities are sampled there
(trilinear, from templates pre-smoothed to the target resolution for partial volume). The five
sequences are ``sum_t p_t * TISSUE_INTENSITIES[t]``, then the lesion model of
:mod:`lesioncount.train.phantom` (:func:`~lesioncount.train.phantom.place_lesions`,
:func:`~lesioncount.train.phantom.render_lesions`) adds enhancing lesions (mask) and non-enhancing
distractors, then bias field and Rician noise.

When no template is present, :func:`resolve_source` raises
:class:`~lesioncount._extras.MissingExtraError` naming what to install: ``pip install nilearn`` (the
``[anatomy]`` extra) or ``apt install mricron-data``.

Example:
    >>> from lesioncount.train.anatomy import generate_anatomy_case
    >>> case = generate_anatomy_case(0, shape=(16, 32, 32), seed=0)   # doctest: +SKIP
    >>> case.image.shape, case.count(18) >= 0                         # doctest: +SKIP
    ((5, 16, 32, 32), True)
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import pathlib
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .._extras import MissingExtraError, require
from .phantom import (
    CSF,
    GM,
    TISSUE_INTENSITIES,
    WM,
    LesionSettings,
    PhantomCase,
    _check_shape,
    apply_bias_and_noise,
    case_rng,
    place_lesions,
    render_lesions,
)

__all__ = [
    "MNI152_FILES",
    "COLIN27_CANDIDATES",
    "SOURCES",
    "TissueTemplate",
    "nilearn_template_dir",
    "colin27_path",
    "resolve_source",
    "load_template",
    "generate_anatomy_case",
]

SOURCES = ("mni152", "colin27")
MNI152_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
#: Where Debian's mricron-data package installs the skull-stripped Colin27 brain (checked in order).
COLIN27_CANDIDATES = (
    "/usr/share/mricron/templates/ch2bet.nii.gz",
    "/usr/lib/mricron/templates/ch2bet.nii.gz",
)
MISSING_MESSAGE = (
    "no anatomy template found for the anatomy phantoms: install nilearn, which bundles the MNI152 "
    "templates (pip install nilearn; from the lesioncount source folder also pip install --no-build-isolation "
    "'.[anatomy]'), or Debian's Colin27 brain (apt install mricron-data)"
)


@dataclass(frozen=True)
class TissueTemplate:
    """Tissue probabilities of a template, (z, y, x) arrays cropped to the intracranial box.

    ``gm``, ``wm``, ``csf``: float32 in [0, 1], ``gm + wm + csf <= 1`` (the rest is background).
    ``spacing``: voxel size (z, y, x) in mm. ``source``: ``"mni152"`` or ``"colin27"``.
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    spacing: Tuple[float, float, float]
    source: str


def nilearn_template_dir() -> Optional[pathlib.Path]:
    """Folder with nilearn's bundled MNI152 files, or None (nilearn missing or files absent).

    Uses the installed package's location; nilearn itself is not imported.

    Example:
        >>> d = nilearn_template_dir()
        >>> d is None or (d / MNI152_FILES["gm"]).is_file()
        True
    """
    try:
        spec = importlib.util.find_spec("nilearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = pathlib.Path(location) / "datasets" / "data"
        if all((folder / name).is_file() for name in MNI152_FILES.values()):
            return folder
    return None


def colin27_path() -> Optional[pathlib.Path]:
    """Path of the Colin27 brain (``$LESIONCOUNT_COLIN27`` or mricron-data's ``ch2bet.nii.gz``), or None.

    Example:
        >>> p = colin27_path()
        >>> p is None or p.name.endswith(".nii.gz") or p.name.endswith(".nii")
        True
    """
    override = os.environ.get("LESIONCOUNT_COLIN27")
    candidates = ([override] if override else []) + list(COLIN27_CANDIDATES)
    for candidate in candidates:
        path = pathlib.Path(candidate)
        if path.is_file():
            return path
    return None


def resolve_source(source: Optional[str] = None) -> str:
    """Pick the template: ``None`` -> ``"mni152"`` if nilearn's files exist, else ``"colin27"`` if present.

    Raises:
        ValueError: unknown ``source``.
        MissingExtraError: the requested (or any) template is not installed; the message names
            ``pip install nilearn`` and ``apt install mricron-data``.

    Example:
        >>> resolve_source() in SOURCES   # doctest: +SKIP
        True
    """
    if source is not None and source not in SOURCES:
        raise ValueError(f"anatomy source must be one of {SOURCES} or None, got {source!r}")
    if source in (None, "mni152") and nilearn_template_dir() is not None:
        return "mni152"
    if source in (None, "colin27") and colin27_path() is not None:
        return "colin27"
    if source == "mni152":
        raise MissingExtraError("the MNI152 templates bundled with nilearn were not found: "
                                "pip install nilearn (or use source='colin27' after "
                                "apt install mricron-data)")
    if source == "colin27":
        raise MissingExtraError(f"the Colin27 brain was not found at {', '.join(COLIN27_CANDIDATES)} "
                                f"(or $LESIONCOUNT_COLIN27): apt install mricron-data (or use source='mni152' "
                                f"after pip install nilearn)")
    raise MissingExtraError(MISSING_MESSAGE)


def _read_zyx(path: pathlib.Path) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    nib = require("nibabel", "reading anatomy templates")
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D template, got shape {data.shape}")
    zooms = image.header.get_zooms()[:3]
    return np.ascontiguousarray(data.transpose(2, 1, 0)), (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def _intracranial(support: np.ndarray) -> np.ndarray:
    closed = ndimage.binary_closing(support, structure=ndimage.generate_binary_structure(3, 1), iterations=2)
    return ndimage.binary_fill_holes(closed | support)


def _crop_to(mask: np.ndarray, *arrays: np.ndarray, margin: int = 3):
    box = ndimage.find_objects(mask.astype(np.int8))[0]
    box = tuple(slice(max(0, s.start - margin), min(n, s.stop + margin)) for s, n in zip(box, mask.shape))
    return [np.ascontiguousarray(a[box]) for a in arrays]


def _mni152_template() -> TissueTemplate:
    folder = nilearn_template_dir()
    if folder is None:
        raise MissingExtraError(MISSING_MESSAGE)
    t1, spacing = _read_zyx(folder / MNI152_FILES["t1"])
    gm, _ = _read_zyx(folder / MNI152_FILES["gm"])
    wm, _ = _read_zyx(folder / MNI152_FILES["wm"])
    scale = max(float(gm.max()), float(wm.max()), 1e-6)  # uint8 0..255 in nilearn's copy
    scale = 1.0 if scale <= 1.0 + 1e-6 else scale
    gm, wm = gm / scale, wm / scale
    total = np.maximum(gm + wm, 1.0)  # keep gm + wm <= 1
    gm, wm = gm / total, wm / total
    intracranial = _intracranial((t1 > 0.05 * float(t1.max())) | (gm + wm > 0.5))
    csf = np.clip(intracranial.astype(np.float32) - gm - wm, 0.0, 1.0)
    gm, wm, csf = _crop_to(intracranial, gm, wm, csf)
    return TissueTemplate(gm.astype(np.float32), wm.astype(np.float32), csf.astype(np.float32), spacing, "mni152")


def _soft_three_class(values: np.ndarray, iterations: int = 20) -> Tuple[np.ndarray, np.ndarray]:
    """1-D three-class gaussian mixture (shared variance): (means (3,), sigma) fitted on ``values``."""
    means = np.quantile(values, [0.1, 0.5, 0.9]).astype(np.float64)
    for _ in range(iterations):
        assign = np.argmin(np.abs(values[:, None] - means[None]), axis=1)
        means = np.array([values[assign == k].mean() if (assign == k).any() else means[k] for k in range(3)])
    sigma = float(np.sqrt(np.mean((values - means[assign]) ** 2)))
    return means, max(sigma, 1e-6)


def _colin27_template() -> TissueTemplate:
    path = colin27_path()
    if path is None:
        raise MissingExtraError(MISSING_MESSAGE)
    t1, spacing = _read_zyx(path)
    brain = t1 > 0
    if not brain.any():
        raise ValueError(f"{path}: the Colin27 template is empty")
    intracranial = _intracranial(brain)
    means, sigma = _soft_three_class(t1[brain].astype(np.float64))
    logits = -0.5 * ((t1[..., None] - means.astype(np.float32)) / sigma) ** 2
    logits -= logits.max(axis=-1, keepdims=True)
    post = np.exp(logits)
    post /= post.sum(axis=-1, keepdims=True)
    inside = intracranial.astype(np.float32)
    csf, gm, wm = (post[..., k] * inside for k in range(3))
    csf = np.where(intracranial & ~brain, 1.0, csf)  # holes of the stripped brain: ventricles/CSF
    gm, wm, csf = _crop_to(intracranial, gm, wm, csf)
    return TissueTemplate(gm.astype(np.float32), wm.astype(np.float32), csf.astype(np.float32), spacing, "colin27")


@functools.lru_cache(maxsize=2)
def load_template(source: Optional[str] = None) -> TissueTemplate:
    """Load (and cache) the tissue template of ``source`` (see :func:`resolve_source`).

    Example:
        >>> t = load_template("mni152")   # doctest: +SKIP
        >>> t.gm.shape == t.wm.shape == t.csf.shape   # doctest: +SKIP
        True
    """
    source = resolve_source(source)
    return _mni152_template() if source == "mni152" else _colin27_template()


@functools.lru_cache(maxsize=4)
def _smoothed_template(source: str, shape: Tuple[int, int, int]) -> TissueTemplate:
    """Template pre-smoothed so that sampling it on ``shape`` mimics partial-volume averaging."""
    template = load_template(source)
    step = [box / n for box, n in zip(template.gm.shape, shape)]  # template voxels per output voxel
    sigma = [0.42 * s if s > 1.0 else 0.0 for s in step]
    if not any(sigma):
        return template
    smooth = [ndimage.gaussian_filter(a, sigma=sigma, mode="constant", truncate=3.0)
              for a in (template.gm, template.wm, template.csf)]
    return TissueTemplate(*smooth, spacing=template.spacing, source=template.source)


def _sample_grid(rng: np.random.Generator, template_shape: Sequence[int], shape: Sequence[int],
                 max_rotation_deg: float = 6.0, scale_range: Tuple[float, float] = (0.93, 1.07),
                 max_shift: float = 0.03) -> np.ndarray:
    """Template coordinates (3, D, H, W) for every output voxel under a random jittered affine."""
    box = np.asarray(template_shape, dtype=np.float64)
    angles = np.radians(rng.uniform(-max_rotation_deg, max_rotation_deg, size=3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a] = r[b, b] = math.cos(angle)
        r[a, b], r[b, a] = -math.sin(angle), math.sin(angle)
        rotation = r @ rotation
    scales = rng.uniform(*scale_range, size=3)
    flip = np.array([1.0, 1.0, -1.0 if rng.random() < 0.5 else 1.0])  # left-right
    shift = rng.uniform(-max_shift, max_shift, size=3) * box
    matrix = rotation @ np.diag(box * scales * flip)  # unit cube coords -> template voxels
    center = (box - 1) / 2 + shift
    axes = [(np.arange(n, dtype=np.float64) + 0.5) / n - 0.5 for n in shape]
    u = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0).reshape(3, -1)
    coords = matrix @ u + center[:, None]
    return coords.reshape(3, *shape)


def generate_anatomy_case(index: int, shape: Sequence[int] = (32, 64, 64), seed: int = 0,
                          settings: Optional[LesionSettings] = None, source: Optional[str] = None) -> PhantomCase:
    """Case ``index`` of family ``seed``: template anatomy with jitter, lesions, bias and noise.

    Args:
        index: case number (>= 0); the case depends only on ``(seed, index)``, ``shape`` and the template.
        shape: (D, H, W) output grid, each >= 8; the template's brain box is mapped onto it.
        seed: family seed.
        settings: lesion model (:class:`~lesioncount.train.phantom.LesionSettings`).
        source: ``None`` (auto), ``"mni152"`` or ``"colin27"``.

    Returns:
        :class:`~lesioncount.train.phantom.PhantomCase`: ``image`` (5, D, H, W) float32, ``mask``
        (D, H, W) uint8, ``tissue`` the most probable of background/CSF/GM/WM, ``brain_mask``
        (GM + WM + CSF > 0.5), name ``"anatomy_{source}_s{seed}_{index:06d}"``.

    Example:
        >>> case = generate_anatomy_case(2, shape=(16, 32, 32), seed=1)   # doctest: +SKIP
        >>> case.name                                                     # doctest: +SKIP
        'anatomy_mni152_s1_000002'
    """
    dims = _check_shape(shape)
    source = resolve_source(source)
    template = _smoothed_template(source, dims)
    rng_anatomy = case_rng(seed, index, 10)
    rng_lesions = case_rng(seed, index, 11)
    rng_noise = case_rng(seed, index, 12)

    coords = _sample_grid(rng_anatomy, template.gm.shape, dims)
    probs = np.stack([ndimage.map_coordinates(a, coords, order=1, mode="constant", cval=0.0)
                      for a in (template.csf, template.gm, template.wm)]).astype(np.float32)
    np.clip(probs, 0.0, 1.0, out=probs)
    table = TISSUE_INTENSITIES[[CSF, GM, WM]]  # (3 tissues, 5 sequences)
    image = np.einsum("tc,tdhw->cdhw", table, probs).astype(np.float32)

    tissue = np.zeros(dims, dtype=np.uint8)
    present = probs.sum(axis=0) > 0.5
    tissue[present] = np.array([CSF, GM, WM], dtype=np.uint8)[np.argmax(probs, axis=0)[present]]
    parenchyma = (probs[1] + probs[2]) > 0.5
    white = np.flatnonzero(ndimage.binary_erosion(probs[2] > 0.6))
    if white.size == 0:
        white = np.flatnonzero(probs[2] > 0.5)
    grey = np.flatnonzero(probs[1] > 0.6)
    layout = place_lesions(rng_lesions, parenchyma, white, grey, settings)
    render_lesions(image, layout)
    grids = tuple(np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([n if a == axis else 1 for a in range(3)])
                  for axis, n in enumerate(dims))
    apply_bias_and_noise(image, rng_noise, grids, TISSUE_INTENSITIES[WM])
    return PhantomCase(
        image=image,
        mask=layout.mask.astype(np.uint8),
        tissue=tissue,
        brain_mask=present,
        distractor_mask=layout.distractor > 0,
        units=list(layout.units),
        num_blobs=layout.num_blobs,
        name=f"anatomy_{source}_s{seed}_{index:06d}",
    )
