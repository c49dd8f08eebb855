"""Deterministic synthetic lesion probability maps for demos, tests and benchmarks.

Every generator is seeded (``numpy.random.Generator``) and returns ``torch`` tensors on the CPU, so
a given call always produces the same data on every machine. Item ``i`` of a batch depends only on
``(seed, i)``, never on the batch size, so ``realistic_probability_maps(batch=1, seed=s)`` is the
first item of ``realistic_probability_maps(batch=8, seed=s)``.

Three generators:

- :func:`realistic_probability_maps`: what a segmentation network's sigmoid output looks like on a
  brain MRI with small lesions: a few soft-edged ellipsoidal blobs (radius 1.5-5 voxels) on a smooth,
  low-probability background whose occasional bumps produce spurious small candidates at the usual
  threshold 0.1 (tens per item, not thousands).
- :func:`noise_volume`: i.i.d. uniform probabilities with a chosen fraction above 0.1: the worst case
  for connected-component labelling (huge numbers of tiny components and long merge chains).
- :func:`demo_batch`: a small embedded example (4 items of 32x64x64 with 0, 1, 2 and 4 true lesions,
  two of which touch) used by ``lesioncount demo``.

Only numpy and torch are required; ``scipy.ndimage.gaussian_filter`` is used when SciPy is
installed (it is faster), otherwise an equivalent separable numpy filter.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["realistic_probability_maps", "noise_volume", "demo_batch"]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _item_rng(seed: int, item: int, stream: int = 0) -> np.random.Generator:
    """An independent generator per (seed, item, stream)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(item), stream]))


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    radius = max(1, int(truncate * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _gaussian_filter(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable gaussian smoothing with reflect boundaries (SciPy's default mode)."""
    try:
        from scipy.ndimage import gaussian_filter
    except ImportError:  # pragma: no cover - exercised only without SciPy
        gaussian_filter = None
    if gaussian_filter is not None:
        return gaussian_filter(a, sigma=sigma, mode="reflect", truncate=4.0)
    k = _gaussian_kernel(sigma)
    r = k.size // 2
    out = a.astype(np.float32, copy=True)
    for axis in range(out.ndim):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="symmetric")  # symmetric == scipy "reflect"
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for j in range(k.size):
            sl = [slice(None)] * out.ndim
            sl[axis] = slice(j, j + n)
            acc += k[j] * p[tuple(sl)]
        out = acc
    return out


def _smooth_background(
    rng: np.random.Generator,
    shape: Sequence[int],
    base: float,
    spread: float,
    sigma: float,
) -> np.ndarray:
    """Smooth low-probability background: sigmoid(logit(base) + spread * z), z a unit-variance
    gaussian-smoothed white noise field (correlation length ~ sigma voxels)."""
    noise = rng.standard_normal(size=tuple(shape), dtype=np.float32)
    z = _gaussian_filter(noise, sigma)
    std = float(z.std())
    if std > 0:
        z *= np.float32(1.0 / std)
    logits = z
    logits *= np.float32(spread)
    logits += np.float32(math.log(base / (1.0 - base)))
    # in-place sigmoid in float32
    np.negative(logits, out=logits)
    np.exp(logits, out=logits)
    logits += np.float32(1.0)
    np.reciprocal(logits, out=logits)
    return logits


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    q *= np.sign(np.diag(r))
    return q


def _paint_blob(
    prob: np.ndarray,
    mask: np.ndarray | None,
    center: np.ndarray,
    radii: np.ndarray,
    rotation: np.ndarray,
    peak: float,
    softness: float,
) -> None:
    """Paint one soft ellipsoid into ``prob`` (max-combined) and its hard interior into ``mask``.

    Probability = peak * sigmoid(-d / softness), d an approximate signed distance to the ellipsoid
    surface ((normalised radius - 1) * mean radius). Only the bounding box is touched.
    """
    ndim = prob.ndim
    ext = float(radii.max()) + 6.0 * softness + 1.0
    lo = np.maximum(np.floor(center - ext).astype(int), 0)
    hi = np.minimum(np.ceil(center + ext).astype(int) + 1, np.array(prob.shape))
    if np.any(hi <= lo):
        return
    grids = np.meshgrid(
        *[np.arange(lo[a], hi[a], dtype=np.float32) - np.float32(center[a]) for a in range(ndim)],
        indexing="ij",
    )
    coords = np.stack(grids, axis=-1)  # (..., ndim)
    local = coords @ rotation.astype(np.float32)  # rotate into the ellipsoid frame
    rho = np.sqrt(np.sum((local / radii.astype(np.float32)) ** 2, axis=-1))
    d = (rho - 1.0) * np.float32(radii.mean())
    blob = np.float32(peak) / (1.0 + np.exp(d / np.float32(softness)))
    box = tuple(slice(int(lo[a]), int(hi[a])) for a in range(ndim))
    np.maximum(prob[box], blob.astype(prob.dtype), out=prob[box])
    if mask is not None:
        mask[box] |= d <= 0


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


# --------------------------------------------------------------------------------------------------
# public generators
# --------------------------------------------------------------------------------------------------


def realistic_probability_maps(
    batch: int = 4,
    shape: Sequence[int] = (64, 192, 192),
    num_lesions: tuple[int, int] = (3, 8),
    radius: tuple[float, float] = (1.5, 5.0),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    return_masks: bool = False,
    *,
    weak_fraction: float = 0.2,
    background: float = 0.02,
    background_spread: float = 0.4,
    background_sigma: float = 1.5,
):
    """Realistic lesion probability maps (sigmoid outputs of a segmentation network).

    Each item holds ``num_lesions`` (inclusive range, drawn uniformly) non-overlapping ellipsoidal
    lesions with mean radius drawn from ``radius`` (voxels), random anisotropy (0.7-1.3 per axis)
    and orientation. A lesion's probability is ``peak * sigmoid(-d / s)``, ``d`` its signed
    distance, ``s`` in [0.5, 1.0] voxels (soft edges). Peaks are in [0.6, 0.99], except a
    ``weak_fraction`` of lesions with peak in [0.3, 0.6]. The background is
    ``sigmoid(logit(background) + background_spread * z)``, ``z`` smoothed unit-variance noise
    (``background_sigma`` voxels): mostly 0.01-0.05, with occasional bumps that cross 0.1 and
    make tens of small spurious candidates per 64x192x192 item at threshold 0.1.

    Args:
        batch: number of items B.
        shape: spatial shape ``(D, H, W)`` (or ``(H, W)`` for 2D maps).
        num_lesions: inclusive (min, max) number of true lesions per item.
        radius: (min, max) mean lesion radius in voxels.
        seed: item ``i`` depends only on ``(seed, i)``.
        dtype: output floating dtype.
        return_masks: also return the true lesion masks and counts.

    Returns:
        ``probs`` of shape ``(B, *shape)`` and ``dtype``; with ``return_masks=True`` the tuple
        ``(probs, masks, counts)``: ``masks`` bool ``(B, *shape)`` (the union of the lesion
        interiors, ``d <= 0``), ``counts`` int64 ``(B,)`` (number of lesions placed; lesions
        never overlap or touch, so it is also the number of connected components of ``masks``
        at any connectivity).

    Example:
        >>> from lesioncount.synthetic import realistic_probability_maps
        >>> probs, masks, counts = realistic_probability_maps(2, (32, 64, 64), return_masks=True)
        >>> probs.shape, masks.shape, counts.shape
        (torch.Size([2, 32, 64, 64]), torch.Size([2, 32, 64, 64]), torch.Size([2]))

    Cost: well under a second per 64x192x192 item (the background filter dominates).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be (D, H, W) or (H, W) with positive sizes, got {shape}")
    lo_n, hi_n = int(num_lesions[0]), int(num_lesions[1])
    if lo_n < 0 or hi_n < lo_n:
        raise ValueError(f"num_lesions must be an inclusive range (min, max), got {num_lesions}")
    ndim = len(shape)
    probs = np.empty((batch,) + shape, dtype=np.float32)
    masks = np.zeros((batch,) + shape, dtype=bool) if return_masks else None
    counts = np.zeros(batch, dtype=np.int64)
    dims = np.array(shape, dtype=np.float64)
    for b in range(batch):
        rng_bg = _item_rng(seed, b, 0)
        rng = _item_rng(seed, b, 1)
        prob = _smooth_background(rng_bg, shape, background, background_spread, background_sigma)
        mask = masks[b] if masks is not None else None
        n = int(rng.integers(lo_n, hi_n + 1))
        placed: list[tuple[np.ndarray, float]] = []
        attempts = 0
        while len(placed) < n and attempts < 200 * max(n, 1):
            attempts += 1
            r = float(rng.uniform(radius[0], radius[1]))
            radii = r * rng.uniform(0.7, 1.3, size=ndim)
            radii *= r / radii.mean()  # keep the mean radius r
            reach = float(radii.max())
            margin = np.minimum(reach + 1.0, (dims - 1) / 2.0)
            center = rng.uniform(margin, dims - 1 - margin)
            # no overlap and no touching: keep 3 voxels between lesion surfaces
            if any(np.linalg.norm(center - c) < reach + rc + 3.0 for c, rc in placed):
                continue
            weak = rng.random() < weak_fraction
            peak = float(rng.uniform(0.3, 0.6) if weak else rng.uniform(0.6, 0.99))
            softness = float(rng.uniform(0.5, 1.0))
            _paint_blob(prob, mask, center, radii, _random_rotation(rng, ndim), peak, softness)
            placed.append((center, reach))
        probs[b] = prob
        counts[b] = len(placed)
    out = _to_torch(probs, dtype)
    if return_masks:
        return out, torch.from_numpy(masks), torch.from_numpy(counts)
    return out


def noise_volume(
    batch: int = 1,
    shape: Sequence[int] = (64, 192, 192),
    density: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """I.i.d. random probabilities with about ``density`` of the voxels above 0.1.

    Each voxel is foreground (uniform in (0.1, 1)) with probability ``density``, else background
    (uniform in [0, 0.1)). At ``density`` 0.5 and 3D 6/18/26-connectivity this is above the
    site-percolation threshold: one giant component spanning the volume plus small debris, the
    worst case for connected-component labelling (long union-find chains, random access).

    Returns:
        ``probs`` of shape ``(batch, *shape)`` and ``dtype``.

    Example:
        >>> from lesioncount.synthetic import noise_volume
        >>> x = noise_volume(1, (16, 16, 16), density=0.5)
        >>> 0.4 < (x > 0.1).float().mean().item() < 0.6
        True
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    shape = tuple(int(s) for s in shape)
    out = np.empty((batch,) + shape, dtype=np.float32)
    lo32 = np.float32(0.1)  # float32(0.1) > 0.1 in double: keep background strictly below it
    below = np.nextafter(lo32, np.float32(0.0))
    above = np.nextafter(lo32, np.float32(1.0))
    for b in range(batch):
        rng = _item_rng(seed, b, 2)
        u = rng.random(size=shape, dtype=np.float32)
        fg = rng.random(size=shape, dtype=np.float32) < np.float32(density)
        v = np.where(fg, above + (np.float32(1.0) - above) * u, below * u)
        out[b] = v
    return _to_torch(out, dtype)


def demo_batch(dtype: torch.dtype = torch.float32):
    """A small fixed example batch for ``lesioncount demo``.

    Four items of shape 32x64x64 (D, H, W) with 0, 1, 2 and 4 true lesions on a smooth noisy
    background. In item 3, two of the four lesions touch: at threshold 0.1 they form a single
    connected component, so a thresholded component count says 3 while the truth is 4. One
    lesion in item 2 is weak (peak 0.45). Deterministic (fixed positions, seeded background).

    Returns:
        ``(probs, true_counts)``: probs ``(4, 32, 64, 64)`` in ``dtype`` (values in (0, 1)),
        true_counts int64 ``(4,)`` = ``[0, 1, 2, 4]``.

    Example:
        >>> from lesioncount.synthetic import demo_batch
        >>> probs, true_counts = demo_batch()
        >>> probs.shape, true_counts.tolist()
        (torch.Size([4, 32, 64, 64]), [0, 1, 2, 4])
    """
    shape = (32, 64, 64)
    eye = np.eye(3)
    # (center (d, h, w), radii, peak, softness)
    lesions = [
        [],
        [((16.0, 30.0, 34.0), (3.0, 3.5, 3.0), 0.93, 0.6)],
        [
            ((10.0, 20.0, 18.0), (2.5, 3.0, 3.5), 0.88, 0.6),
            ((22.0, 44.0, 46.0), (2.0, 2.0, 2.5), 0.45, 0.7),  # weak lesion
        ],
        [
            ((8.0, 14.0, 16.0), (2.0, 2.5, 2.5), 0.90, 0.6),
            ((24.0, 50.0, 20.0), (3.0, 3.0, 3.0), 0.80, 0.6),
            # a touching pair: centers 7 voxels apart, radii 3.5 + 3.0 -> surfaces ~0.5 voxel apart
            ((16.0, 32.0, 40.0), (3.5, 3.5, 3.5), 0.95, 0.6),
            ((16.0, 32.0, 47.0), (3.0, 3.0, 3.0), 0.85, 0.6),
        ],
    ]
    probs = np.empty((len(lesions),) + shape, dtype=np.float32)
    for b, items in enumerate(lesions):
        prob = _smooth_background(_item_rng(2022, b, 3), shape, 0.015, 0.45, 1.5)
        for center, radii, peak, softness in items:
            _paint_blob(prob, None, np.array(center), np.array(radii), eye, peak, softness)
        probs[b] = prob
    counts = torch.tensor([len(items) for items in lesions], dtype=torch.int64)
    return _to_torch(probs, dtype), counts
