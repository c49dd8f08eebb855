"""Per-case count reports: the count distribution of one 3-D probability map, its baseline and a
table of its lesion candidates with their positions in voxel and world (mm) coordinates.

The pipeline for one case (what ``lesioncount count`` runs):

1. :func:`count_volume` runs :func:`lesioncount.count_distribution` on ``volume.data`` viewed as a
   (1, X, Y, Z) tensor, plus the thresholded connected-component baseline
   (:func:`lesioncount.cc_count` at 0.5) with the same mask, connectivity and minimum size.
2. :func:`case_report` turns that into a JSON-able dict (schema below); :func:`summary_row` into
   one flat CSV row, :func:`lesion_rows` into one CSV row per lesion candidate.

:func:`count_file` and :func:`count_array` run both steps on one file or one in-memory array and
return the report ``lesioncount count`` writes as ``CASE.json`` (the Python API for scripts that
fan a folder out themselves; see :func:`count_file` for a ``concurrent.futures`` example).

Report schema (``CASE.json``), M = ``max_count``::

    case, file, shape [X, Y, Z], spacing_mm [3], voxel_volume_mm3, affine [4][4]
    lesioncount_version
    settings: threshold, connectivity, min_size_voxels, min_volume_mm3 (or null), max_count,
              from_logits, mask (path or null), channel, device, baseline_threshold
    n_candidates                         K, components of value > threshold (after min_size)
    count: bins ["0", ..., "M-1", "M+"], pmf [M+1], expected_count (sum of p_k, not truncated at M),
           most_likely (bin index, M = "M or more"), most_likely_bin, entropy_nats,
           credible_interval {level, low, high, low_bin, high_bin, mass}
    baseline: cc_count (components at baseline_threshold), baseline_threshold,
              cc_count_at_threshold (= n_candidates)
    lesions: one dict per candidate, in label order (SciPy raster order of the first voxel on the
             (X, Y, Z) grid): id, probability, argmax_index [i, j, k], argmax_world_mm [x, y, z],
             size_voxels, volume_mm3, centroid_index [3], centroid_world_mm [3],
             bbox_index_min [3], bbox_index_max [3] (inclusive)
    timings_s: filled by the caller (``lesioncount count``: read_s, read_cpu_s, wait_s, count_s, write_s)

World coordinates are ``affine @ (i, j, k, 1)`` (nibabel convention). Sizes, centroids and boxes
are computed from one scan of the label map (:func:`region_stats`: ``np.bincount`` and
``np.minimum.at`` over the foreground voxels), never with one mask per lesion. The baseline is
counted inside the candidates' bounding boxes when its threshold is above the candidate threshold
(exact, see ``_baseline_count``), so a case costs one full labelling pass, not two.

Example:
    >>> from lesioncount.io import read_probability_map
    >>> vol = read_probability_map("case_001.nii.gz")                       # doctest: +SKIP
    >>> settings = CountSettings(threshold=0.1, max_count=4)
    >>> counted = count_volume(vol, settings)                                # doctest: +SKIP
    >>> report = case_report(vol, counted, settings)                         # doctest: +SKIP
    >>> report["count"]["pmf"], report["lesions"][0]["argmax_world_mm"]      # doctest: +SKIP
"""
from __future__ import annotations

import math
import pathlib  # noqa: F401 (used in the examples)
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ._validation import DEFAULT_CONNECTIVITY
from .counting import CountResult, cc_count, count_distribution
from .io import Volume

__all__ = [
    "CountSettings",
    "CaseCount",
    "bin_names",
    "credible_interval",
    "min_size_for_volume",
    "count_volume",
    "lesion_table",
    "region_stats",
    "RegionStats",
    "case_report",
    "summary_fields",
    "summary_row",
    "lesion_fields",
    "lesion_rows",
    "check_mask",
    "count_file",
    "count_array",
]

#: Default level of the count credible interval.
CREDIBLE_LEVEL = 0.9
_MASS_TOL = 1e-9


@dataclass
class CountSettings:
    """Options of one counting run (shared by all cases of a folder).

    ``min_size`` (voxels) and ``min_volume`` (mm^3) are alternatives; with ``min_volume`` the
    per-case voxel threshold is :func:`min_size_for_volume` of the case's voxel volume.
    """

    threshold: float = 0.1
    connectivity: int = DEFAULT_CONNECTIVITY[3]
    min_size: int = 0
    min_volume: float | None = None
    max_count: int = 4
    from_logits: bool = False
    mask: str | None = None
    channel: int = 1
    device: str = "cpu"
    baseline_threshold: float = 0.5

    def __post_init__(self):
        if self.min_volume is not None and self.min_size:
            raise ValueError("give either min_size (voxels) or min_volume (mm^3), not both")
        if self.min_volume is not None and not (math.isfinite(self.min_volume) and self.min_volume >= 0):
            raise ValueError(f"min_volume must be a finite number >= 0 (mm^3), got {self.min_volume}")
        if self.max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {self.max_count}")


class CaseCount(NamedTuple):
    """What :func:`count_volume` computed for one case.

    Attributes:
        result: :class:`lesioncount.CountResult` of the (1, X, Y, Z) input, moved to the CPU and
            detached.
        cc_count: components at ``settings.baseline_threshold`` (same mask, connectivity, min size).
        min_size: the minimum candidate size in voxels actually used.
        stats: :class:`RegionStats` of item 0's label map (reused by :func:`case_report`).
    """

    result: CountResult
    cc_count: int
    min_size: int
    stats: "RegionStats | None" = None


def bin_names(max_count: int) -> list[str]:
    """Names of the M+1 count bins: ``"0" .. "M-1"`` and ``"M+"``.

    Example:
        >>> bin_names(4)
        ['0', '1', '2', '3', '4+']
    """
    return [str(j) for j in range(max_count)] + [f"{max_count}+"]


def credible_interval(pmf: Sequence[float], level: float = CREDIBLE_LEVEL) -> tuple[int, int, float]:
    """Smallest interval of consecutive count bins holding at least ``level`` of the probability.

    Definition: among all bin ranges ``[low, high]`` (0 <= low <= high <= M, bin M = "M or more")
    whose total mass is >= ``level`` (up to 1e-9), take the one with the fewest bins; ties go to
    the larger mass, then to the smaller ``low``. The Poisson-binomial count is unimodal
    (log-concave), so this equals the highest-posterior-density set of the count. When
    ``high == M`` the interval is open: "low or more".

    Args:
        pmf: (M+1,) probabilities of bins 0..M.
        level: credible level in (0, 1].

    Returns:
        ``(low, high, mass)``.

    Example:
        >>> credible_interval([0.02, 0.1, 0.6, 0.25, 0.03])   # [1, 3] holds 0.95; no 2-bin range >= 0.9
        (1, 3, 0.95)
        >>> credible_interval([0.0, 0.95, 0.05, 0.0, 0.0])
        (1, 1, 0.95)
    """
    p = np.asarray(pmf, dtype=np.float64).reshape(-1)
    if p.size == 0:
        raise ValueError("pmf must have at least one bin")
    if not 0.0 < level <= 1.0:
        raise ValueError(f"level must be in (0, 1], got {level}")
    cum = np.concatenate([[0.0], np.cumsum(p)])
    target = min(level, float(cum[-1])) - _MASS_TOL
    n = p.size
    for width in range(1, n + 1):
        masses = cum[width:] - cum[:-width]  # masses[a] = mass of [a, a + width - 1]
        ok = np.flatnonzero(masses >= target)
        if ok.size:
            best = int(ok[np.argmax(masses[ok])])  # argmax returns the first (smallest low) on ties
            return best, best + width - 1, float(masses[best])
    return 0, n - 1, float(cum[-1])  # pragma: no cover (width n always qualifies)


def min_size_for_volume(min_volume: float, voxel_volume: float) -> int:
    """Minimum size in voxels of a lesion whose volume must be >= ``min_volume`` mm^3.

    ``ceil(min_volume / voxel_volume)``, with a 1e-6 relative tolerance so that a volume that is an
    exact multiple of the voxel volume in decimal (e.g. 6 mm^3 with 1.5 mm^3 voxels -> 4) is not
    pushed up by rounding: NIfTI headers store spacings in float32, so 0.9 mm voxels are
    0.89999998 mm and 10 of them hold 7.2899994 mm^3, not 7.29 (float32 spacings are off by at most
    6e-8 relative, a volume by about 2e-7).

    Example:
        >>> min_size_for_volume(10.0, 0.5 * 0.5 * 3.0), min_size_for_volume(6.0, 1.5)
        (14, 4)
        >>> min_size_for_volume(7.29, float(np.float32(0.9)) ** 3)   # 10 voxels of 0.9 mm, as stored
        10
    """
    if voxel_volume <= 0:
        raise ValueError(f"voxel volume must be > 0, got {voxel_volume}")
    if min_volume <= 0:
        return 0
    ratio = min_volume / voxel_volume
    return int(math.ceil(ratio * (1.0 - 1e-6)))


def _check_values_host(x: torch.Tensor, from_logits: bool) -> None:
    """ValueError for NaN, and for values outside [0, 1] unless ``from_logits``."""
    lo, hi = (float(v) for v in torch.aminmax(x))
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError("the map contains NaN")
    if not from_logits and (lo < 0.0 or hi > 1.0):
        from ._validation import out_of_range_hint

        raise ValueError(
            f"values must be probabilities in [0, 1], got values in [{lo:.6g}, {hi:.6g}]; "
            f"{out_of_range_hint(x, lo, hi, '--from-logits / from_logits=True')}"
        )


class RegionStats(NamedTuple):
    """Per-label statistics of a 3-D label map, row ``k`` for label ``k`` (row 0: unused).

    Attributes:
        sizes: (K+1,) int64 voxel counts.
        index_sums: (K+1, 3) float64 sums of the (i, j, k) indices of each label's voxels.
        bbox_min, bbox_max: (K+1, 3) int64 inclusive bounding boxes (undefined for empty labels).
    """

    sizes: np.ndarray
    index_sums: np.ndarray
    bbox_min: np.ndarray
    bbox_max: np.ndarray


def region_stats(labels: np.ndarray, num: int) -> RegionStats:
    """Sizes, index sums and bounding boxes of labels 1..num in one pass over the label map.

    One O(voxels) scan finds the foreground; everything else is O(foreground voxels)
    (``np.bincount`` with weights, ``np.minimum.at`` / ``np.maximum.at``). No per-label masks.

    Args:
        labels: (X, Y, Z) integer label map, 0 background.
        num: largest label.

    Example:
        >>> labels = np.zeros((4, 4, 4), np.int32); labels[1, 1:3, 2] = 1; labels[3, 0, 0] = 2
        >>> st = region_stats(labels, 2)
        >>> st.sizes.tolist(), st.bbox_min[1].tolist(), st.bbox_max[1].tolist()
        ([0, 2, 1], [1, 1, 2], [1, 2, 2])
    """
    labels = np.asarray(labels)
    flat = labels.reshape(-1)
    foreground = np.flatnonzero(flat != 0)  # nonzero on a bool array is ~3x faster than on int32
    fg_labels = flat[foreground].astype(np.intp)
    if fg_labels.size and int(fg_labels.max()) > num:
        raise ValueError(f"label map holds label {int(fg_labels.max())} > num = {num}")
    sizes = np.bincount(fg_labels, minlength=num + 1).astype(np.int64)
    fg_index = np.unravel_index(foreground, labels.shape)
    sums = np.zeros((num + 1, 3))
    lo = np.full((num + 1, 3), np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full((num + 1, 3), -1, dtype=np.int64)
    for axis, coords in enumerate(fg_index):
        sums[:, axis] = np.bincount(fg_labels, weights=coords, minlength=num + 1)
        np.minimum.at(lo[:, axis], fg_labels, coords)
        np.maximum.at(hi[:, axis], fg_labels, coords)
    return RegionStats(sizes, sums, lo, hi)


def _baseline_count(x: np.ndarray, labels: np.ndarray, stats: RegionStats, result: CountResult,
                    settings: CountSettings, min_size: int) -> int | None:
    """cc_count at ``settings.baseline_threshold`` without a second full labelling pass, or None.

    Valid when the baseline threshold is >= the candidate threshold: every voxel above it then lies
    in a candidate, so each baseline component lies inside exactly one candidate and the baseline
    count is the sum, over the candidates whose maximum exceeds the baseline threshold, of the
    components of (candidate & value > baseline threshold) inside the candidate's bounding box (same
    connectivity and min_size; a candidate removed by min_size only holds smaller components). The
    boxes are labelled separately; None (use the full pass) when their total volume exceeds the
    volume's, to stay O(voxels).
    """
    from .counting import _logit
    from .ops import label

    if settings.baseline_threshold < settings.threshold:
        return None
    cut = _logit(settings.baseline_threshold) if settings.from_logits else settings.baseline_threshold
    ids = result.lesion_ids[0].numpy()
    flat_argmax = result.argmax[0].numpy()
    flat_x = x.reshape(-1)
    chosen = [int(k) for k, a in zip(ids, flat_argmax) if k > 0 and float(flat_x[a]) > cut]
    extent = [stats.bbox_max[k] - stats.bbox_min[k] + 1 for k in chosen]
    if sum(int(np.prod(e)) for e in extent) > x.size:
        return None
    total = 0
    for k in chosen:
        box = tuple(slice(int(a), int(b) + 1) for a, b in zip(stats.bbox_min[k], stats.bbox_max[k]))
        inside = (labels[box] == k) & (x[box].astype(np.float64) > cut)
        _, num = label(torch.from_numpy(inside)[None], 0.5, settings.connectivity, min_size)
        total += int(num[0])
    return total


def count_volume(volume: Volume, settings: CountSettings, mask: np.ndarray | None = None) -> CaseCount:
    """Count distribution, baseline and region statistics of one case.

    Args:
        volume: the case; ``volume.data`` (X, Y, Z) probabilities (or logits with
            ``settings.from_logits``).
        settings: :class:`CountSettings`.
        mask: optional (X, Y, Z) array; voxels where it is 0/False are ignored (shape must match).

    Returns:
        :class:`CaseCount` (everything on the CPU).

    Raises:
        ValueError: NaN, values outside [0, 1] without ``from_logits`` (the message gives the
            range found), or a mask shape mismatch.

    Example:
        >>> vol = Volume(np.zeros((8, 8, 8), np.float32), np.eye(4), "c", pathlib.Path("c.npy"))
        >>> vol.data[2, 3, 4] = 0.7
        >>> count_volume(vol, CountSettings()).result.pmf
        tensor([[0.3000, 0.7000, 0.0000, 0.0000, 0.0000]])
    """
    data = volume.data
    if data.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {data.shape}")
    min_size = settings.min_size
    if settings.min_volume is not None:
        min_size = min_size_for_volume(settings.min_volume, volume.voxel_volume)
    device = torch.device(settings.device)
    data = np.ascontiguousarray(data)
    x = torch.from_numpy(data).unsqueeze(0).to(device)
    if device.type != "cpu":
        # On CUDA, count_distribution only asserts asynchronously on bad values, which would end the
        # process; check first (one pass, one host sync) so that only this case fails.
        _check_values_host(x, settings.from_logits)
    mask_t = None
    if mask is not None:
        if tuple(mask.shape) != tuple(data.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the map's shape {tuple(data.shape)}")
        mask_t = torch.from_numpy(np.ascontiguousarray(mask != 0)).to(device)
    try:
        result = count_distribution(
            x,
            threshold=settings.threshold,
            connectivity=settings.connectivity,
            min_size=min_size,
            max_count=settings.max_count,
            from_logits=settings.from_logits,
            mask=mask_t,
        )
    except (RuntimeError, ValueError):
        _check_values_host(x, settings.from_logits)  # a clear message with the value range, if that was it
        raise
    result = CountResult(*(t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in result))
    labels = result.labels[0].numpy()
    stats = region_stats(labels, int(result.num_lesions[0]))
    # (the label map already excludes voxels outside the mask, so the fast path needs no masking)
    baseline = _baseline_count(data, labels, stats, result, settings, min_size)
    if baseline is None:  # baseline threshold below the candidate threshold: a full labelling pass
        masked = data if mask is None else np.where(mask != 0, data, -np.inf if settings.from_logits else 0.0)
        baseline_input = torch.from_numpy(np.ascontiguousarray(masked))[None]
        baseline = int(cc_count(baseline_input, threshold=settings.baseline_threshold,
                                connectivity=settings.connectivity, min_size=min_size,
                                from_logits=settings.from_logits)[0])
    return CaseCount(result=result, cc_count=baseline, min_size=min_size, stats=stats)


def lesion_table(labels: np.ndarray, lesion_ids: np.ndarray, lesion_probs: np.ndarray, argmax: np.ndarray,
                 affine: np.ndarray, stats: RegionStats | None = None) -> list[dict]:
    """Per-candidate table of one item, in O(voxels) time and memory.

    Args:
        labels: (X, Y, Z) integer label map (0 background, 1..K).
        lesion_ids: (K',) label id of each column (0 = padding, skipped).
        lesion_probs: (K',) existence probability of each column.
        argmax: (K',) flat C-order index in (X, Y, Z) of each candidate's maximum voxel.
        affine: (4, 4) voxel-to-world matrix.
        stats: :func:`region_stats` of ``labels`` if already computed.

    Returns:
        One dict per candidate with keys id, probability, argmax_index, argmax_world_mm,
        size_voxels, volume_mm3, centroid_index, centroid_world_mm, bbox_index_min,
        bbox_index_max (inclusive), sorted by id.

    Example:
        >>> labels = np.zeros((4, 4, 4), np.int32); labels[1, 1:3, 2] = 1
        >>> rows = lesion_table(labels, np.array([1]), np.array([0.8]), np.array([1 * 16 + 1 * 4 + 2]), np.eye(4))
        >>> rows[0]["size_voxels"], rows[0]["centroid_index"], rows[0]["bbox_index_max"]
        (2, [1.0, 1.5, 2.0], [1, 2, 2])
    """
    labels = np.asarray(labels)
    affine = np.asarray(affine, dtype=np.float64)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (X, Y, Z), got shape {labels.shape}")
    ids = np.asarray(lesion_ids, dtype=np.int64).reshape(-1)
    probs = np.asarray(lesion_probs, dtype=np.float64).reshape(-1)
    flat_argmax = np.asarray(argmax, dtype=np.int64).reshape(-1)
    present = ids > 0
    ids, probs, flat_argmax = ids[present], probs[present], flat_argmax[present]
    if ids.size == 0:
        return []
    num = int(ids.max())
    if stats is None or stats.sizes.shape[0] < num + 1:
        stats = region_stats(labels, max(num, int(labels.max())))
    voxel_volume = float(abs(np.linalg.det(affine[:3, :3])))
    argmax_index = np.stack(np.unravel_index(flat_argmax, labels.shape), axis=1)
    to_world = lambda idx: np.asarray(idx, dtype=np.float64).reshape(-1, 3) @ affine[:3, :3].T + affine[:3, 3]  # noqa: E731
    argmax_world = to_world(argmax_index)
    rows = []
    for col in np.argsort(ids, kind="stable"):
        lesion = int(ids[col])
        size = int(stats.sizes[lesion])
        if size == 0:
            raise ValueError(f"label {lesion} listed as a candidate but absent from the label map")
        centroid = stats.index_sums[lesion] / size
        rows.append({
            "id": lesion,
            "probability": float(probs[col]),
            "argmax_index": [int(v) for v in argmax_index[col]],
            "argmax_world_mm": [float(v) for v in argmax_world[col]],
            "size_voxels": size,
            "volume_mm3": size * voxel_volume,
            "centroid_index": [float(v) for v in centroid],
            "centroid_world_mm": [float(v) for v in to_world(centroid)[0]],
            "bbox_index_min": [int(v) for v in stats.bbox_min[lesion]],
            "bbox_index_max": [int(v) for v in stats.bbox_max[lesion]],
        })
    return rows


def case_report(volume: Volume, counted: CaseCount, settings: CountSettings, item: int = 0,
                timings: dict | None = None) -> dict:
    """JSON-able report of one case (schema in the module docstring).

    Args:
        volume: the case (gives name, path, shape and affine).
        counted: :func:`count_volume` output for it.
        settings: the settings used.
        item: batch index of the case in ``counted.result`` (0 for :func:`count_volume` output).
        timings: optional ``{"read_s": ..., "count_s": ..., "write_s": ...}``.

    Example:
        >>> vol = Volume(np.zeros((8, 8, 8), np.float32), np.eye(4), "c", pathlib.Path("c.npy"))
        >>> vol.data[2, 3, 4] = 0.7
        >>> settings = CountSettings()
        >>> report = case_report(vol, count_volume(vol, settings), settings)
        >>> report["count"]["bins"], report["count"]["credible_interval"]["high_bin"]
        (['0', '1', '2', '3', '4+'], '1')
        >>> report["lesions"][0]["argmax_index"], report["lesions"][0]["size_voxels"]
        ([2, 3, 4], 1)
    """
    from . import __version__

    result = counted.result
    M = int(result.max_count)
    names = bin_names(M)
    pmf = result.pmf[item].double().numpy()
    low, high, mass = credible_interval(pmf, CREDIBLE_LEVEL)
    most_likely = int(np.argmax(pmf))
    labels = result.labels[item].numpy()
    lesions = lesion_table(labels, result.lesion_ids[item].numpy(), result.lesion_probs[item].numpy(),
                           result.argmax[item].numpy(), volume.affine, stats=counted.stats if item == 0 else None)
    settings_dict = asdict(settings)
    settings_dict["min_size_voxels"] = counted.min_size
    settings_dict["min_volume_mm3"] = settings_dict.pop("min_volume")
    del settings_dict["min_size"]
    return {
        "case": volume.name,
        "file": str(volume.path),
        "shape": [int(s) for s in volume.data.shape],
        "spacing_mm": list(volume.spacing),
        "voxel_volume_mm3": volume.voxel_volume,
        "affine": np.asarray(volume.affine, dtype=np.float64).tolist(),
        "lesioncount_version": __version__,
        "settings": settings_dict,
        "n_candidates": int(result.num_lesions[item]),
        "count": {
            "bins": names,
            "pmf": [float(v) for v in pmf],
            "expected_count": float(result.expected_count[item]),
            "most_likely": most_likely,
            "most_likely_bin": names[most_likely],
            "entropy_nats": 0.0 + float(result.entropy[item]),  # 0.0 + : no "-0.0" for a certain count
            "credible_interval": {"level": CREDIBLE_LEVEL, "low": low, "high": high,
                                  "low_bin": names[low], "high_bin": names[high], "mass": mass},
        },
        "baseline": {"cc_count": counted.cc_count, "baseline_threshold": settings.baseline_threshold,
                     "cc_count_at_threshold": int(result.num_lesions[item])},
        "lesions": lesions,
        "timings_s": dict(timings or {}),
    }


def summary_fields(max_count: int) -> list[str]:
    """CSV header of :func:`summary_row` for a given M.

    Example:
        >>> summary_fields(2)[:8]
        ['case', 'n_candidates', 'expected_count', 'most_likely', 'entropy', 'ci_low', 'ci_high', 'P(0)']
    """
    return (["case", "n_candidates", "expected_count", "most_likely", "entropy", "ci_low", "ci_high"]
            + [f"P({name})" for name in bin_names(max_count)]
            + ["cc_count", "read_s", "count_s", "write_s"])


def summary_row(report: dict) -> dict:
    """One flat CSV row of a :func:`case_report` dict (``most_likely`` and the credible interval
    ends are bin names, so ``"4+"`` stands for "4 or more").

    Example:
        >>> vol = Volume(np.zeros((8, 8, 8), np.float32), np.eye(4), "c", pathlib.Path("c.npy"))
        >>> vol.data[2, 3, 4] = 0.7
        >>> row = summary_row(case_report(vol, count_volume(vol, CountSettings()), CountSettings()))
        >>> row["P(1)"], row["ci_low"], row["ci_high"]
        (0.699999988079071, '0', '1')
    """
    count = report["count"]
    ci = count["credible_interval"]
    row = {
        "case": report["case"],
        "n_candidates": report["n_candidates"],
        "expected_count": count["expected_count"],
        "most_likely": count["most_likely_bin"],
        "entropy": count["entropy_nats"],
        "ci_low": ci["low_bin"],
        "ci_high": ci["high_bin"],
    }
    for name, p in zip(count["bins"], count["pmf"]):
        row[f"P({name})"] = p
    row["cc_count"] = report["baseline"]["cc_count"]
    timings = report.get("timings_s", {})
    for key in ("read_s", "count_s", "write_s"):
        row[key] = timings.get(key, "")
    return row


def lesion_fields() -> list[str]:
    """CSV header of :func:`lesion_rows` (``lesions.csv`` of ``lesioncount count``).

    Example:
        >>> lesion_fields()[:5]
        ['case', 'lesion_id', 'probability', 'size_voxels', 'volume_mm3']
    """
    return ["case", "lesion_id", "probability", "size_voxels", "volume_mm3", "argmax_i", "argmax_j", "argmax_k",
            "argmax_x_mm", "argmax_y_mm", "argmax_z_mm", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]


def lesion_rows(report: dict) -> list[dict]:
    """One flat CSV row per lesion candidate of a :func:`case_report` dict, in lesion id order.

    Columns (:func:`lesion_fields`): case, lesion_id, probability (existence probability),
    size_voxels, volume_mm3, argmax voxel index (argmax_i/j/k) and its world position in mm
    (argmax_x/y/z_mm), centroid in world mm (centroid_x/y/z_mm).

    Example:
        >>> vol = Volume(np.zeros((8, 8, 8), np.float32), np.diag([2.0, 1.0, 1.0, 1.0]), "c", pathlib.Path("c.npy"))
        >>> vol.data[2, 3, 4] = 0.7
        >>> row = lesion_rows(case_report(vol, count_volume(vol, CountSettings()), CountSettings()))[0]
        >>> row["case"], row["lesion_id"], row["size_voxels"], row["volume_mm3"], row["argmax_x_mm"]
        ('c', 1, 1, 2.0, 4.0)
    """
    rows = []
    for lesion in report["lesions"]:
        i, j, k = lesion["argmax_index"]
        x, y, z = lesion["argmax_world_mm"]
        cx, cy, cz = lesion["centroid_world_mm"]
        rows.append({"case": report["case"], "lesion_id": lesion["id"], "probability": lesion["probability"],
                     "size_voxels": lesion["size_voxels"], "volume_mm3": lesion["volume_mm3"],
                     "argmax_i": i, "argmax_j": j, "argmax_k": k,
                     "argmax_x_mm": x, "argmax_y_mm": y, "argmax_z_mm": z,
                     "centroid_x_mm": cx, "centroid_y_mm": cy, "centroid_z_mm": cz})
    return rows


def check_mask(volume: Volume, mask: Volume) -> None:
    """ValueError unless ``mask`` lies on ``volume``'s grid: the same shape and, when both files
    carry a geometry (not ``.npy``), the same affine within 1e-3 mm.

    Example:
        >>> v = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4), "c", pathlib.Path("c.nii.gz"))
        >>> check_mask(v, Volume(np.ones((4, 4, 4)), np.eye(4), "m", pathlib.Path("m.npy")))   # ok
    """
    def has_geometry(path) -> bool:
        return not str(path).lower().endswith(".npy")

    if tuple(mask.data.shape) != tuple(volume.data.shape):
        raise ValueError(f"mask {mask.path} has shape {tuple(mask.data.shape)} but {volume.path.name} has shape "
                         f"{tuple(volume.data.shape)}")
    if has_geometry(mask.path) and has_geometry(volume.path) and not np.allclose(
            mask.affine, volume.affine, rtol=1e-5, atol=1e-3):
        raise ValueError(f"mask {mask.path} and {volume.path.name} have different affines "
                         f"(mask {np.round(mask.affine, 4).tolist()} vs {np.round(volume.affine, 4).tolist()}); "
                         f"resample the mask to the prediction grid")


def _count_and_report(volume: Volume, settings: CountSettings, mask: Volume | None,
                      labels_path=None, commit: bool = True, *, detection_path=None):
    """(report without timings, count_s, write_s, label map file or None): the shared core of
    :func:`count_file`, :func:`count_array` and ``lesioncount count``.

    ``detection_path``: also write the detection map there (:func:`_count_and_write`); the return
    value stays the same 4-tuple (use :func:`_count_and_write` to get the detection map's file).
    """
    report, count_s, write_s, written = _count_and_write(volume, settings, mask, labels_path, detection_path,
                                                         commit=commit)
    return report, count_s, write_s, written["labels"]


def _count_and_write(volume: Volume, settings: CountSettings, mask: Volume | None, labels_path=None,
                     detection_path=None, *, commit: bool = True):
    """(report without timings, count_s, write_s, ``{"labels": file or None, "detection": file or None}``).

    Counts one case and writes the candidate label map (``labels_path``) and the detection map
    (``detection_path``: each candidate's voxels hold its p_k, float32, background 0;
    :func:`lesioncount.detection.detection_map`), both with the input's affine and atomically; with
    ``commit=False`` they are left as finished temporary files (the returned paths) for the caller
    to ``os.replace`` onto their targets. If a write fails, files already written by this call are
    removed.
    """
    import os
    import time

    t0 = time.perf_counter()
    if mask is not None:
        check_mask(volume, mask)
    counted = count_volume(volume, settings, mask=None if mask is None else mask.data)
    report = case_report(volume, counted, settings)
    count_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    written = {"labels": None, "detection": None}
    result = counted.result
    try:
        if labels_path is not None:
            from .io import write_label_map

            written["labels"] = write_label_map(labels_path, result.labels[0].numpy(), volume.affine, commit=commit)
        if detection_path is not None:
            from .detection import detection_map, write_detection_map

            dmap = detection_map(result.labels[0], result.lesion_probs[0], result.lesion_ids[0])
            written["detection"] = write_detection_map(detection_path, dmap, volume.affine, commit=commit)
    except BaseException:
        if not commit:  # committed files are complete outputs; temporary ones would be orphans
            for path in written.values():
                if path is not None:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
        raise
    return report, count_s, time.perf_counter() - t0, written


_OPTIONS = ("threshold", "connectivity", "min_size", "min_volume", "max_count", "from_logits", "channel", "device",
            "baseline_threshold")


def _settings(options: dict, mask_name: str | None) -> CountSettings:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; expected some of {', '.join(_OPTIONS)}")
    return CountSettings(mask=mask_name, **options)


def _mask_volume(mask, name: str) -> tuple[Volume | None, str | None]:
    from .io import read_mask

    if mask is None:
        return None, None
    if isinstance(mask, (str, pathlib.Path)):
        return read_mask(mask), str(mask)
    data = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return Volume(data, np.eye(4), name, pathlib.Path(f"{name}.npy")), "array"


def count_file(path, *, mask=None, labels_path=None, missing_geometry: str = "error", detection_path=None,
               **options) -> dict:
    """Count one probability map file: the report ``lesioncount count`` writes as ``CASE.json``.

    Args:
        path: ``.nii`` / ``.nii.gz`` / nnU-Net ``.npz`` (with its sibling ``CASE.nii.gz``) /
            ``.npy`` file (:func:`lesioncount.io.read_probability_map`).
        mask: optional region of interest: a mask file (``.nii``, ``.nii.gz``, ``.npy``) or an
            (X, Y, Z) array / tensor on the map's grid (nonzero = inside).
        labels_path: optional ``.nii.gz`` / ``.nii`` file to write the candidate label map to
            (atomically, with the input's affine), like ``--save-labels``.
        detection_path: optional ``.nii.gz`` / ``.nii`` file to write the detection map to (each
            candidate's voxels hold its p_k, float32, background 0; atomically, with the input's
            affine), like ``--save-detection-map``.
        missing_geometry: ``"error"`` or ``"identity"`` for an ``.npz`` without its sibling.
        **options: the counting settings, as in :class:`CountSettings` and the ``count`` options:
            ``threshold=0.1, connectivity=18, min_size=0, min_volume=None, max_count=4,
            from_logits=False, channel=None, device="cpu", baseline_threshold=0.5`` (``channel``:
            the lesion channel of a multi-channel file; not given, nnU-Net ``.npz`` use 1, a NIfTI
            with several volumes is an error; the report records 1 then, as the CLI does).

    Returns:
        The case report dict (schema in this module's docstring), equal to the ``CASE.json``
        ``lesioncount count`` writes with the same settings except for ``timings_s``, which here
        holds ``read_s``, ``read_cpu_s`` (of the calling thread), ``count_s`` and ``write_s``
        (the label and detection maps; 0 without ``labels_path`` / ``detection_path``).

    Raises:
        CaseReadError: the file (or mask file) cannot be read; ValueError: NaN, values outside
        [0, 1] without ``from_logits``, a mask off the map's grid, bad settings; TypeError: an
        unknown option.

    It holds no global state and releases the GIL while decompressing and counting, so it can run
    in threads or processes. Fanning a folder out over 4 workers::

        >>> import concurrent.futures, functools
        >>> from lesioncount.io import find_cases
        >>> from lesioncount.report import count_file, summary_row
        >>> count = functools.partial(count_file, threshold=0.1, min_volume=10.0)
        >>> with concurrent.futures.ProcessPoolExecutor(4) as pool:     # or ThreadPoolExecutor   # doctest: +SKIP
        ...     reports = list(pool.map(count, find_cases("predictions/")))   # in case order
        >>> rows = [summary_row(r) for r in reports]                                             # doctest: +SKIP

    (A failing case raises out of ``pool.map``; use ``pool.submit`` per case to collect failures
    instead, as ``lesioncount count`` does in ``errors.csv``.)
    """
    import time

    from .io import read_probability_map

    t0, c0 = time.perf_counter(), time.thread_time()
    # channel not given: 1 for nnU-Net .npz, an error for a NIfTI with several volumes (as in the CLI)
    volume = read_probability_map(path, channel=options.get("channel"), missing_geometry=missing_geometry)
    mask_volume, mask_name = _mask_volume(mask, volume.name + "_mask")
    read_s, read_cpu_s = time.perf_counter() - t0, time.thread_time() - c0
    if options.get("channel") is None:
        options = {k: v for k, v in options.items() if k != "channel"}
    settings = _settings(options, mask_name)
    report, count_s, write_s, _ = _count_and_write(volume, settings, mask_volume, labels_path, detection_path)
    report["timings_s"] = {"read_s": read_s, "read_cpu_s": read_cpu_s, "count_s": count_s, "write_s": write_s}
    return report


def count_array(data, affine=None, *, name: str = "array", mask=None, labels_path=None, detection_path=None,
                **options) -> dict:
    """Count one in-memory 3-D map: the same report as :func:`count_file` for that map on disk.

    Args:
        data: (X, Y, Z) NumPy array or tensor of probabilities (or logits with
            ``from_logits=True``), in the voxel order of ``affine``.
        affine: (4, 4) voxel-to-world matrix (default: identity, 1 mm voxels).
        name: the case id written into the report (``case``; ``file`` is ``"<name>"``).
        mask, labels_path, detection_path, **options: as in :func:`count_file` (``channel`` does not apply).

    Example:
        >>> x = np.zeros((8, 8, 8), np.float32); x[2, 3, 4] = 0.7; x[6, 6, 6] = 0.4
        >>> report = count_array(x, np.diag([0.5, 0.5, 2.0, 1.0]), name="demo", max_count=2)
        >>> [round(p, 6) for p in report["count"]["pmf"]], report["lesions"][0]["argmax_world_mm"]
        ([0.18, 0.54, 0.28], [1.0, 1.5, 8.0])
    """
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"data must be a 3-D (X, Y, Z) array, got shape {data.shape}")
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float32)
    from .io import _check_affine

    affine = np.eye(4) if affine is None else _check_affine(pathlib.Path(f"<{name}>"), affine)
    volume = Volume(np.ascontiguousarray(data), affine, name, pathlib.Path(f"<{name}>"))
    mask_volume, mask_name = _mask_volume(mask, name + "_mask")
    settings = _settings(options, mask_name)
    report, count_s, write_s, _ = _count_and_write(volume, settings, mask_volume, labels_path, detection_path)
    report["timings_s"] = {"read_s": 0.0, "read_cpu_s": 0.0, "count_s": count_s, "write_s": write_s}
    return report
