"""Seeded synthetic multi-sequence MS-like brain phantoms with gadolinium-enhancing lesions.

Each case is five co-registered sequences ``(T1, T1c, T2, FLAIR, PD)`` of a synthetic head plus the
binary mask of the *enhancing* lesions (the target that is counted). Case ``index`` of a given
``seed`` is fully determined by ``(seed, index)`` (``numpy.random.SeedSequence``), so a dataset can
regenerate any case on demand, in any order, on any machine.

Anatomy (hard tissue classes, then partial-volume smoothing):

- ellipsoidal head: scalp (fat), skull (dark everywhere), an outer CSF layer, the brain;
- cortical grey matter with an irregular (random smooth field) inner border, a few CSF sulci,
  white matter, two lateral ventricles (CSF) with enhancing choroid plexus, deep grey-matter nuclei.

Relative intensities (:data:`TISSUE_INTENSITIES`) follow the usual contrasts: T1 WM > GM > CSF;
T2 CSF > GM > WM; FLAIR like T2 with CSF suppressed (dark); PD CSF > GM > WM with small contrast;
T1c is T1 with enhancing structures (choroid plexus, enhancing lesions) bright.

Lesions (shared with :mod:`lesioncount.train.anatomy` through :func:`place_lesions` and
:func:`render_lesions`):

- *enhancing* lesions, mostly in white matter (some juxtacortical), sizes from a few voxels to a
  few hundred (log-uniform radius), bright in T1c, mildly bright in T2/FLAIR/PD, slightly dark in T1.
  They are placed in *units*: a single blob, an overlapping pair (always one component), or a pair
  touching only along an edge (one component under 18/26-connectivity, two under 6) or only at a
  corner (one component under 26-connectivity, two under 6/18). The number of units is skewed like
  gad-lesion counts in MS trials: about 45 % of cases have none, then a geometric tail
  (1: ~25 %, 2: ~14 %, 3: ~7 %, 4+: ~9 %).
- *non-enhancing* T2/FLAIR lesions (bright in T2/FLAIR, dark in T1, unchanged between T1 and T1c):
  distractors that are not in the mask.

The count of a case is never the number of blobs placed: it is the number of connected components of
the final mask, from ``scipy.ndimage.label`` with the structure of the chosen connectivity
(:func:`count_lesions`), because blobs merge, and clipping to brain tissue can split or remove them.

Then a smooth multiplicative bias field per sequence and Rician noise are applied. For the network,
:func:`zscore_normalize` standardises each channel within the intracranial mask.

Example:
    >>> from lesioncount.train.phantom import generate_phantom
    >>> case = generate_phantom(3, shape=(32, 64, 64), seed=0)
    >>> case.image.shape, case.mask.shape
    ((5, 32, 64, 64), (32, 64, 64))
    >>> case.count(18) == count_lesions(case.mask, 18)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .._validation import DEFAULT_CONNECTIVITY, connectivity_text

__all__ = [
    "SEQUENCES",
    "TISSUES",
    "TISSUE_INTENSITIES",
    "ENHANCING_LESION_INTENSITY",
    "NON_ENHANCING_LESION_INTENSITY",
    "LesionSettings",
    "LesionLayout",
    "PhantomCase",
    "connectivity_structure",
    "count_lesions",
    "case_rng",
    "place_lesions",
    "render_lesions",
    "apply_bias_and_noise",
    "zscore_normalize",
    "generate_phantom",
]

SEQUENCES: Tuple[str, ...] = ("T1", "T1c", "T2", "FLAIR", "PD")
TISSUES: Tuple[str, ...] = ("background", "scalp", "skull", "csf", "gm", "wm", "choroid_plexus", "deep_gm")
BACKGROUND, SCALP, SKULL, CSF, GM, WM, CHOROID, DEEP_GM = range(len(TISSUES))

#: Relative intensity of each tissue (rows, :data:`TISSUES` order) in each sequence (columns,
#: :data:`SEQUENCES` order). Arbitrary units, WM T1 = 0.85.
TISSUE_INTENSITIES = np.array(
    [
        #  T1    T1c   T2    FLAIR  PD
        [0.00, 0.00, 0.00, 0.00, 0.00],  # background (air)
        [0.95, 0.97, 0.55, 0.60, 0.75],  # scalp / fat
        [0.06, 0.06, 0.05, 0.05, 0.10],  # skull (cortical bone)
        [0.20, 0.22, 1.00, 0.10, 0.92],  # CSF
        [0.60, 0.62, 0.68, 0.70, 0.80],  # cortical grey matter
        [0.85, 0.86, 0.45, 0.50, 0.66],  # white matter
        [0.45, 1.15, 0.75, 0.35, 0.80],  # choroid plexus (enhances)
        [0.66, 0.68, 0.60, 0.64, 0.76],  # deep grey matter
    ],
    dtype=np.float32,
)
#: Intensity of an enhancing (gadolinium-positive) lesion, per sequence.
ENHANCING_LESION_INTENSITY = np.array([0.70, 1.30, 0.78, 0.85, 0.80], dtype=np.float32)
#: Intensity of a non-enhancing T2/FLAIR lesion (a distractor, not in the mask), per sequence.
NON_ENHANCING_LESION_INTENSITY = np.array([0.50, 0.51, 0.92, 1.00, 0.86], dtype=np.float32)

_STRUCTURES: Dict[int, np.ndarray] = {}
_UNIT_KINDS = ("single", "overlap", "edge", "corner")


def connectivity_structure(connectivity: int) -> np.ndarray:
    """3x3x3 ``scipy.ndimage.label`` structure for a 3D neighbour count (6, 18 or 26).

    ``6 -> generate_binary_structure(3, 1)``, ``18 -> (3, 2)``, ``26 -> (3, 3)``.

    Example:
        >>> int(connectivity_structure(18).sum())
        19
    """
    from .._reference import CONNECTIVITY_TO_RANK

    rank = CONNECTIVITY_TO_RANK.get(connectivity, (None, None)) if not isinstance(connectivity, bool) else (None, None)
    if rank[0] != 3:
        raise ValueError(f"connectivity must be one of {connectivity_text(3)} for 3D volumes, got {connectivity!r}")
    rank = rank[1]
    if connectivity not in _STRUCTURES:
        _STRUCTURES[connectivity] = ndimage.generate_binary_structure(3, rank)
    return _STRUCTURES[connectivity]


def count_lesions(mask: np.ndarray, connectivity: int = DEFAULT_CONNECTIVITY[3]) -> int:
    """Number of connected components of a 3D binary ``mask`` (D, H, W) with the given connectivity.

    Example:
        >>> m = np.zeros((3, 3, 3), bool); m[0, 0, 0] = m[1, 1, 1] = True
        >>> count_lesions(m, 6), count_lesions(m, 26)
        (2, 1)
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"count_lesions: mask must be 3-D (D, H, W), got shape {mask.shape}")
    return int(ndimage.label(mask > 0, structure=connectivity_structure(connectivity))[1])


def case_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """Independent ``numpy`` generator for ``(seed, case index, stream)``.

    Example:
        >>> case_rng(0, 1).random() == case_rng(0, 1).random()
        True
    """
    if int(index) < 0:
        raise ValueError(f"case index must be >= 0, got {index}")
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF,
                                                          int(index), int(stream)]))


# --------------------------------------------------------------------------------------------------
# lesion model (shared with anatomy.py)
# --------------------------------------------------------------------------------------------------


@dataclass
class LesionSettings:
    """Parameters of the lesion model.

    ``zero_fraction`` of cases get no enhancing lesion; otherwise the number of lesion units is
    ``Geometric(unit_geometric_p)`` (>= 1), capped at ``max_units``. ``unit_kind_probs`` gives the
    probabilities of single blobs, overlapping pairs, edge-touching and corner-touching pairs.
    Blob radii are log-uniform in ``radius_range`` voxels (times an anisotropy factor per axis).
    Non-enhancing distractors: ``Poisson(distractor_mean)`` blobs with radii in ``distractor_radius_range``.

    Example:
        >>> LesionSettings(zero_fraction=0.0).zero_fraction
        0.0
    """

    zero_fraction: float = 0.45
    unit_geometric_p: float = 0.45
    max_units: int = 12
    unit_kind_probs: Tuple[float, float, float, float] = (0.6, 0.2, 0.1, 0.1)
    radius_range: Tuple[float, float] = (0.8, 3.6)
    pair_radius_range: Tuple[float, float] = (0.8, 2.5)
    juxtacortical_fraction: float = 0.15
    distractor_mean: float = 3.0
    distractor_radius_range: Tuple[float, float] = (1.0, 4.0)
    enhancement_range: Tuple[float, float] = (0.75, 1.0)
    placement_attempts: int = 40

    def __post_init__(self) -> None:
        if not 0.0 <= self.zero_fraction <= 1.0:
            raise ValueError(f"LesionSettings.zero_fraction must be in [0, 1], got {self.zero_fraction}")
        if not 0.0 < self.unit_geometric_p <= 1.0:
            raise ValueError(f"LesionSettings.unit_geometric_p must be in (0, 1], got {self.unit_geometric_p}")
        probs = np.asarray(self.unit_kind_probs, dtype=np.float64)
        if probs.shape != (4,) or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(
                f"LesionSettings.unit_kind_probs must be 4 non-negative weights, got {self.unit_kind_probs}")
        for name in ("radius_range", "pair_radius_range", "distractor_radius_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"LesionSettings.{name} must satisfy 0 < low <= high, got {(lo, hi)}")


@dataclass
class LesionLayout:
    """Lesions placed in one volume.

    ``mask`` (D, H, W) bool: enhancing lesion voxels (the target). ``enhancement`` (D, H, W) float32:
    per-voxel enhancing-lesion strength in [0, 1] (0 outside). ``distractor`` (D, H, W) float32: the
    same for non-enhancing lesions (never overlapping or touching the mask). ``units`` lists the kind of
    each enhancing unit placed (``"single"``, ``"overlap"``, ``"edge"``, ``"corner"``);
    ``num_blobs`` counts enhancing blobs (a pair is two blobs).
    """

    mask: np.ndarray
    enhancement: np.ndarray
    distractor: np.ndarray
    units: List[str] = field(default_factory=list)
    num_blobs: int = 0
    num_distractors: int = 0


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q


def _blob_voxels(center: np.ndarray, radii: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Integer voxel coordinates (n, 3) inside an ellipsoid (plus the voxel nearest the center)."""
    extent = int(math.ceil(float(radii.max()))) + 1
    base = np.round(center).astype(np.int64)
    offsets = np.arange(-extent, extent + 1)
    grid = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 3) + base
    local = (grid - center) @ rotation  # coordinates in the ellipsoid's axes
    inside = ((local / radii) ** 2).sum(axis=1) <= 1.0
    inside[np.flatnonzero((grid == base).all(axis=1))] = True
    return grid[inside]


def _keep(coords: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    shape = np.asarray(allowed.shape)
    inb = ((coords >= 0) & (coords < shape)).all(axis=1)
    coords = coords[inb]
    return coords[allowed[coords[:, 0], coords[:, 1], coords[:, 2]]]


def _sample_site(rng: np.random.Generator, sites: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    flat = sites[rng.integers(sites.size)]
    return np.asarray(np.unravel_index(flat, shape), dtype=np.float64) + rng.uniform(-0.5, 0.5, size=3)


def _blob(rng: np.random.Generator, center: np.ndarray, radius_range: Tuple[float, float],
          allowed: np.ndarray) -> np.ndarray:
    radius = _log_uniform(rng, *radius_range)
    radii = radius * rng.uniform(0.75, 1.3, size=3)
    return _keep(_blob_voxels(center, radii, _random_rotation(rng)), allowed)


def _touching_partner(rng: np.random.Generator, first: np.ndarray, kind: str,
                      radius_range: Tuple[float, float], allowed: np.ndarray) -> np.ndarray:
    """A blob touching ``first`` only across an edge (``"edge"``) or a corner (``"corner"``).

    With ``d`` a sign vector (2 non-zero axes for an edge, 3 for a corner) and ``v`` the voxel of
    ``first`` maximising ``d . u``, the partner keeps only voxels ``w`` with ``d_i (w_i - v_i) >= 1`` on
    every non-zero axis, so ``d . (w - u) >= 2`` (edge) or ``>= 3`` (corner) for every pair: no face
    (resp. no face or edge) contact is possible, and the voxel ``v + d`` gives the edge (corner) contact.
    """
    direction = rng.choice([-1, 1], size=3)
    if kind == "edge":
        direction[rng.integers(3)] = 0
    anchor = first[np.argmax(first @ direction)]
    contact = anchor + direction
    radius = _log_uniform(rng, *radius_range)
    center = contact + direction / np.linalg.norm(direction) * radius * 0.6
    coords = _blob_voxels(center.astype(np.float64), np.full(3, radius), np.eye(3))
    coords = np.concatenate([coords, contact[None]], axis=0)
    axes = direction != 0
    ok = ((coords[:, axes] - anchor[axes]) * direction[axes] >= 1).all(axis=1)
    partner = _keep(np.unique(coords[ok], axis=0), allowed)
    if not (partner == contact).all(axis=1).any():
        return partner[:0]  # the contact voxel left the allowed region: no touching pair here
    return partner


def _reserve(reserved: np.ndarray, coords: np.ndarray, margin: int = 2) -> None:
    """Mark a cube of half-width ``margin`` around each voxel (keeps later lesions >= margin away)."""
    shape = np.asarray(reserved.shape)
    offsets = np.arange(-margin, margin + 1)
    cube = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), axis=-1).reshape(-1, 3)
    grown = (coords[:, None, :] + cube[None]).reshape(-1, 3)
    grown = np.clip(grown, 0, shape - 1)
    reserved[grown[:, 0], grown[:, 1], grown[:, 2]] = True


def _sample_unit_count(rng: np.random.Generator, settings: LesionSettings) -> int:
    if rng.random() < settings.zero_fraction:
        return 0
    return int(min(settings.max_units, rng.geometric(settings.unit_geometric_p)))


def place_lesions(
    rng: np.random.Generator,
    allowed: np.ndarray,
    white_matter_sites: np.ndarray,
    grey_matter_sites: Optional[np.ndarray] = None,
    settings: Optional[LesionSettings] = None,
) -> LesionLayout:
    """Place enhancing lesion units and non-enhancing distractors in a volume.

    Args:
        rng: the case's generator.
        allowed: (D, H, W) bool, voxels a lesion may occupy (brain parenchyma).
        white_matter_sites: 1-D flat indices of voxels where lesion centres are drawn (white matter).
        grey_matter_sites: optional flat indices for juxtacortical lesions (``juxtacortical_fraction``).
        settings: :class:`LesionSettings` (defaults when None).

    Returns:
        :class:`LesionLayout`. Every blob is clipped to ``allowed``; units keep >= 2 voxels from each
        other (so they never merge by accident) and distractors keep away from enhancing units.

    Example:
        >>> allowed = np.ones((16, 32, 32), bool)
        >>> settings = LesionSettings(zero_fraction=0)
        >>> lay = place_lesions(case_rng(0, 1), allowed, np.arange(allowed.size), settings=settings)
        >>> lay.mask.shape, bool(lay.mask.any())
        ((16, 32, 32), True)
    """
    settings = settings or LesionSettings()
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.ndim != 3:
        raise ValueError(f"place_lesions: allowed must be a 3-D mask, got shape {allowed.shape}")
    shape = allowed.shape
    white_matter_sites = np.asarray(white_matter_sites, dtype=np.int64).ravel()
    mask = np.zeros(shape, dtype=bool)
    enhancement = np.zeros(shape, dtype=np.float32)
    distractor = np.zeros(shape, dtype=np.float32)
    layout = LesionLayout(mask=mask, enhancement=enhancement, distractor=distractor)
    if white_matter_sites.size == 0:
        return layout
    reserved = np.zeros(shape, dtype=bool)
    kind_probs = np.asarray(settings.unit_kind_probs, dtype=np.float64)
    kind_probs = kind_probs / kind_probs.sum()
    gm_sites = None if grey_matter_sites is None else np.asarray(grey_matter_sites, dtype=np.int64).ravel()

    def occupied(coords: np.ndarray) -> bool:
        return bool(reserved[coords[:, 0], coords[:, 1], coords[:, 2]].any())

    num_units = _sample_unit_count(rng, settings)
    for _ in range(num_units):
        kind = _UNIT_KINDS[int(rng.choice(4, p=kind_probs))]
        for _attempt in range(settings.placement_attempts):
            use_gm = gm_sites is not None and gm_sites.size and rng.random() < settings.juxtacortical_fraction
            center = _sample_site(rng, gm_sites if use_gm else white_matter_sites, shape)
            first = _blob(rng, center, settings.radius_range, allowed)
            if first.shape[0] == 0 or occupied(first):
                continue
            blobs = [first]
            if kind == "overlap":
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                spread = float(np.linalg.norm(first - first.mean(axis=0), axis=1).max()) + 0.5
                radius_b = _log_uniform(rng, *settings.pair_radius_range)
                partner_center = first.mean(axis=0) + direction * (spread + radius_b) * rng.uniform(0.45, 0.7)
                blobs.append(_blob_voxels(partner_center, np.full(3, radius_b) * rng.uniform(0.8, 1.2, 3),
                                          _random_rotation(rng)))
                blobs[1] = _keep(blobs[1], allowed)
            elif kind in ("edge", "corner"):
                blobs.append(_touching_partner(rng, first, kind, settings.pair_radius_range, allowed))
            if any(b.shape[0] == 0 or occupied(b) for b in blobs[1:]):
                continue
            strength = rng.uniform(*settings.enhancement_range)
            for coords in blobs:
                mask[coords[:, 0], coords[:, 1], coords[:, 2]] = True
                enhancement[coords[:, 0], coords[:, 1], coords[:, 2]] = strength
                layout.num_blobs += 1
            for coords in blobs:
                _reserve(reserved, coords)
            layout.units.append(kind)
            break

    for _ in range(int(rng.poisson(settings.distractor_mean))):
        for _attempt in range(settings.placement_attempts):
            coords = _blob(rng, _sample_site(rng, white_matter_sites, shape), settings.distractor_radius_range, allowed)
            if coords.shape[0] == 0 or occupied(coords):
                continue
            distractor[coords[:, 0], coords[:, 1], coords[:, 2]] = rng.uniform(0.7, 1.0)
            _reserve(reserved, coords)
            layout.num_distractors += 1
            break
    return layout


def _partial_volume(amount: np.ndarray, sigma: float) -> np.ndarray:
    """Lesion fraction: full inside the lesion, a smooth partial-volume rim outside it."""
    if not amount.any():
        return amount
    return np.maximum(amount, ndimage.gaussian_filter(amount, sigma=sigma, mode="constant", truncate=3.0))


def render_lesions(image: np.ndarray, layout: LesionLayout, scale: Optional[np.ndarray] = None,
                   sigma: float = 0.6) -> np.ndarray:
    """Blend lesion intensities into a multi-sequence ``image`` (C=5, D, H, W) in place.

    ``image = (1 - f) * image + f * lesion_intensity * scale`` per channel, where ``f`` is the lesion
    fraction (strength inside the lesion, a gaussian partial-volume rim outside). ``scale`` (C,)
    rescales the lesion intensity table to the image's units (1 for the phantom's own units).

    Example:
        >>> img = np.full((5, 8, 8, 8), 0.85, np.float32)
        >>> empty = np.zeros((8, 8, 8), np.float32)
        >>> lay = LesionLayout(empty > 0, empty.copy(), empty.copy())
        >>> lay.enhancement[4, 4, 4] = 1.0
        >>> round(float(render_lesions(img, lay)[1, 4, 4, 4]), 4)  # T1c of an enhancing voxel
        1.3
    """
    if image.ndim != 4 or image.shape[0] != len(SEQUENCES):
        raise ValueError(f"render_lesions: image must be (5, D, H, W), got shape {image.shape}")
    scale = np.ones(len(SEQUENCES), np.float32) if scale is None else np.asarray(scale, np.float32)
    for amount, table in ((layout.distractor, NON_ENHANCING_LESION_INTENSITY),
                          (layout.enhancement, ENHANCING_LESION_INTENSITY)):
        if not amount.any():
            continue
        fraction = _partial_volume(amount, sigma)
        box = ndimage.find_objects((fraction > 0).astype(np.int8))[0]
        f = fraction[box]
        for c in range(image.shape[0]):
            region = image[c][box]
            region *= 1.0 - f
            region += f * (table[c] * scale[c])
    return image


# --------------------------------------------------------------------------------------------------
# head phantom
# --------------------------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, coords: Sequence[np.ndarray], terms: int = 6,
                  frequency: Tuple[float, float] = (1.0, 3.0)) -> np.ndarray:
    """Random smooth field in about [-1, 1]: a sum of plane waves over normalised coordinates.

    ``coords`` are open grids (``np.ogrid`` style: shapes (D,1,1), (1,H,1), (1,1,W)). Each wave
    ``sin(k.p + phase)`` is the imaginary part of a separable product of 1-D complex exponentials,
    which costs one complex multiply per voxel instead of a full-volume sine.
    """
    axes_1d = [np.asarray(c, dtype=np.float64).ravel() for c in coords]
    shape = tuple(a.size for a in axes_1d)
    out = np.zeros(shape, dtype=np.float32)
    for _ in range(terms):
        k = rng.normal(size=3)
        k *= rng.uniform(*frequency) * math.pi / np.linalg.norm(k)
        phase = rng.uniform(0, 2 * math.pi)
        ez, ey, ex = (np.exp(1j * (k[i] * axes_1d[i] + (phase if i == 0 else 0.0))).astype(np.complex64)
                      for i in range(3))
        plane = ez[:, None] * ey[None, :]
        out += (plane[:, :, None] * ex[None, None, :]).imag
    out *= 1.0 / math.sqrt(terms / 2.0)
    return out


def _ellipsoid_radius(coords: Sequence[np.ndarray], center: Sequence[float], axes: Sequence[float]) -> np.ndarray:
    z, y, x = coords  # float32 open grids; Python floats keep the arithmetic in float32
    c0, c1, c2 = (float(v) for v in center)
    a0, a1, a2 = (float(v) for v in axes)
    return np.sqrt(((z - c0) / a0) ** 2 + ((y - c1) / a1) ** 2 + ((x - c2) / a2) ** 2)


def apply_bias_and_noise(image: np.ndarray, rng: np.random.Generator, coords: Sequence[np.ndarray],
                         reference: np.ndarray, bias_amplitude: Tuple[float, float] = (0.04, 0.12),
                         noise_level: Tuple[float, float] = (0.015, 0.04)) -> np.ndarray:
    """Multiplicative smooth bias field and Rician noise, per channel, in place.

    ``image`` (C, D, H, W); ``coords`` the normalised (z, y, x) open grids; ``reference`` (C,) the
    intensity the noise level is relative to (white matter). Rician: ``sqrt((I + s n1)^2 + (s n2)^2)``.

    Example:
        >>> zz, yy, xx = np.ogrid[-1:1:4j, -1:1:4j, -1:1:4j]
        >>> out = apply_bias_and_noise(np.ones((1, 4, 4, 4), np.float32), case_rng(0, 0), (zz, yy, xx), np.ones(1))
        >>> bool((out > 0).all())
        True
    """
    for c in range(image.shape[0]):
        amplitude = rng.uniform(*bias_amplitude)
        bias = np.exp(amplitude * _smooth_field(rng, coords, terms=3, frequency=(0.3, 0.8)))
        image[c] *= bias
        sigma = float(rng.uniform(*noise_level) * reference[c])
        real = rng.standard_normal(size=image.shape[1:], dtype=np.float32)
        real *= sigma
        real += image[c]
        imag = rng.standard_normal(size=image.shape[1:], dtype=np.float32)
        imag *= sigma
        np.sqrt(real * real + imag * imag, out=image[c])
    return image


def zscore_normalize(image: np.ndarray, mask: Optional[np.ndarray] = None, eps: float = 1e-6) -> np.ndarray:
    """Per-channel z-score of ``image`` (C, D, H, W) using the statistics inside ``mask`` (D, H, W).

    ``mask=None`` uses the nonzero voxels of each channel (all voxels if a channel is all zero).
    Voxels outside the mask are transformed with the same mean and std. Returns float32.

    Example:
        >>> img = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
        >>> out = zscore_normalize(img, np.ones((1, 4, 4), bool))
        >>> round(float(out.mean()), 6), round(float(out.std()), 4)
        (0.0, 1.0)
    """
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"zscore_normalize: image must be (C, D, H, W), got shape {image.shape}")
    out = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        channel = image[c].astype(np.float64, copy=False)
        if mask is not None:
            select = np.asarray(mask, dtype=bool)
            if select.shape != channel.shape:
                raise ValueError(f"zscore_normalize: mask shape {select.shape} != image spatial shape {channel.shape}")
        else:
            select = channel != 0
        values = channel[select] if select.any() else channel.ravel()
        mean, std = float(values.mean()), float(values.std())
        out[c] = (channel - mean) / max(std, eps)
    return out


@dataclass
class PhantomCase:
    """One generated case.

    Attributes:
        image: (5, D, H, W) float32 raw intensities (T1, T1c, T2, FLAIR, PD), bias and noise included.
        mask: (D, H, W) uint8 enhancing-lesion mask (the counted target).
        tissue: (D, H, W) uint8 hard tissue class (:data:`TISSUES` index).
        brain_mask: (D, H, W) bool intracranial mask (CSF, GM, WM, ...), used for normalisation.
        distractor_mask: (D, H, W) bool non-enhancing lesion voxels (not in ``mask``).
        units: kind of each enhancing unit placed; num_blobs: enhancing blobs placed.
        name: case id, e.g. ``"phantom_s0_000007"``.
    """

    image: np.ndarray
    mask: np.ndarray
    tissue: np.ndarray
    brain_mask: np.ndarray
    distractor_mask: np.ndarray
    units: List[str]
    num_blobs: int
    name: str
    _counts: Dict[int, int] = field(default_factory=dict, repr=False)

    def count(self, connectivity: int = DEFAULT_CONNECTIVITY[3]) -> int:
        """Connected components of :attr:`mask` (cached per connectivity: 6, 18 or 26).

        Example:
            >>> case = generate_phantom(0, shape=(16, 32, 32))
            >>> case.count(26) <= case.count(18) <= case.count(6)
            True
        """
        connectivity_structure(connectivity)
        if connectivity not in self._counts:
            self._counts[connectivity] = count_lesions(self.mask, connectivity)
        return self._counts[connectivity]

    def normalized_image(self) -> np.ndarray:
        """(5, D, H, W) float32 per-channel z-score within :attr:`brain_mask` (the network input).

        Example:
            >>> x = generate_phantom(0, shape=(16, 32, 32)).normalized_image()
            >>> x.shape, x.dtype
            ((5, 16, 32, 32), dtype('float32'))
        """
        return zscore_normalize(self.image, self.brain_mask)


def _check_shape(shape: Sequence[int], minimum: int = 8, what: str = "shape") -> Tuple[int, int, int]:
    """``shape`` as 3 ints (D, H, W), each >= ``minimum`` (phantoms need 8: the head fills the volume)."""
    try:
        dims = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of 3 ints (D, H, W), got {shape!r}") from None
    if len(dims) != 3 or min(dims) < minimum:
        raise ValueError(f"{what} must be 3 ints (D, H, W), each >= {minimum}, got {shape!r}")
    return dims  # type: ignore[return-value]


def _head_tissues(rng: np.random.Generator, coords: Sequence[np.ndarray]) -> np.ndarray:
    """Hard tissue label map of a random head (uint8, :data:`TISSUES` indices)."""
    z, y, x = coords
    shape = np.broadcast_shapes(z.shape, y.shape, x.shape)
    center = rng.uniform(-0.03, 0.03, size=3)
    axes = np.array([0.9, 0.92, 0.84]) * rng.uniform(0.93, 1.03, size=3)
    rho = _ellipsoid_radius(coords, center, axes)
    surface = _smooth_field(rng, coords, terms=5, frequency=(1.0, 2.5))
    gyri = _smooth_field(rng, coords, terms=8, frequency=(3.0, 6.0))
    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[rho < 1.0] = SCALP
    tissue[rho < 0.93] = SKULL
    brain_outer = 0.84 + 0.01 * surface
    tissue[rho < brain_outer] = CSF
    tissue[rho < brain_outer - 0.035] = GM
    tissue[rho < 0.70 + 0.06 * gyri] = WM
    sulci = (tissue == GM) & (gyri > 1.2) & (rho > brain_outer - 0.06)
    tissue[sulci] = CSF
    # deep grey nuclei and lateral ventricles (CSF) with choroid plexus
    spread = rng.uniform(0.9, 1.1)
    for side in (-1.0, 1.0):
        deep = _ellipsoid_radius(coords, center + [0.0, 0.0, side * 0.26 * spread], axes * [0.17, 0.2, 0.13])
        tissue[deep < 1.0] = DEEP_GM
        ventricle_axes = axes * np.array([0.2, 0.42, 0.1]) * rng.uniform(0.8, 1.3, size=3)
        ventricle_center = center + [0.06, -0.02, side * 0.11 * spread]
        ventricle = _ellipsoid_radius(coords, ventricle_center, ventricle_axes)
        tissue[ventricle < 1.0] = CSF
        plexus = _ellipsoid_radius(coords, ventricle_center + [0.0, 0.12, 0.0], ventricle_axes * [0.35, 0.35, 0.5])
        tissue[plexus < 1.0] = CHOROID
    return tissue


def generate_phantom(index: int, shape: Sequence[int] = (32, 64, 64), seed: int = 0,
                     settings: Optional[LesionSettings] = None, partial_volume_sigma: float = 0.6) -> PhantomCase:
    """Generate phantom case ``index`` of the phantom family ``seed``.

    Args:
        index: case number (>= 0); the case depends only on ``(seed, index)`` and ``shape``.
        shape: (D, H, W) voxels, each >= 8 (the head fills the volume: normalised coordinates).
        seed: family seed (use different seeds for train/val/test).
        settings: lesion model parameters (:class:`LesionSettings`).
        partial_volume_sigma: gaussian sigma (voxels) of the tissue partial-volume smoothing.

    Returns:
        :class:`PhantomCase` with ``image`` (5, D, H, W) float32 and ``mask`` (D, H, W) uint8.

    Example:
        >>> case = generate_phantom(0, shape=(16, 32, 32), seed=1)
        >>> case.image.dtype, case.image.shape, case.mask.dtype
        (dtype('float32'), (5, 16, 32, 32), dtype('uint8'))
    """
    dims = _check_shape(shape)
    rng_anatomy = case_rng(seed, index, 0)
    rng_lesions = case_rng(seed, index, 1)
    rng_noise = case_rng(seed, index, 2)
    coords = tuple(
        np.linspace(-1.0, 1.0, n, dtype=np.float32).reshape([n if a == axis else 1 for a in range(3)])
        for axis, n in enumerate(dims)
    )
    tissue = _head_tissues(rng_anatomy, coords)

    # tissue intensities with partial-volume smoothing (linear, so smoothing each channel equals
    # mixing tissue intensities by smoothed tissue fractions)
    image = TISSUE_INTENSITIES[tissue].transpose(3, 0, 1, 2).copy()
    for c in range(image.shape[0]):
        image[c] = ndimage.gaussian_filter(image[c], sigma=partial_volume_sigma, truncate=3.0)

    parenchyma = (tissue == WM) | (tissue == GM) | (tissue == DEEP_GM)
    white = np.flatnonzero(ndimage.binary_erosion(tissue == WM))
    if white.size == 0:
        white = np.flatnonzero(tissue == WM)
    grey = np.flatnonzero(tissue == GM)
    layout = place_lesions(rng_lesions, parenchyma, white, grey, settings)
    render_lesions(image, layout, sigma=partial_volume_sigma)
    apply_bias_and_noise(image, rng_noise, coords, TISSUE_INTENSITIES[WM])

    brain_mask = (tissue == CSF) | (tissue == CHOROID) | parenchyma
    return PhantomCase(
        image=image,
        mask=layout.mask.astype(np.uint8),
        tissue=tissue,
        brain_mask=brain_mask,
        distractor_mask=layout.distractor > 0,
        units=list(layout.units),
        num_blobs=layout.num_blobs,
        name=f"phantom_s{seed}_{index:06d}",
    )
