"""Lesion-wise detection evaluation: matching candidates to ground-truth lesions, lesion F1 and Dice,
count errors, FROC, AP and detection maps.

The predicted lesions are the candidates of :func:`lesioncount.count_distribution` (connected
components of ``probs > threshold`` with the connectivity and size rule), each with its existence
probability p_k (the maximum over the component), its peak voxel and its size. The ground-truth
lesions are the connected components of the nonzero mask with the same connectivity and size rule.

Matching (:func:`match_lesions`) is done once per case and is one-to-one:

* eligibility ``rule``: ``"overlap"`` (any shared voxel; ISLES'22, ATLAS, MSSEG-2), ``"iou"``
  (IoU >= ``iou_threshold``; picai_eval's default 0.1), or ``"peak"`` (the candidate's peak voxel lies
  in the ground-truth lesion dilated by a ball of radius ``max_distance`` mm, or voxels without
  ``spacing``; ``max_distance=0`` is MONAI's / CAMELYON's "detection point inside the lesion");
* ``assignment="hungarian"`` (default): ``scipy.optimize.linear_sum_assignment`` maximising
  sum over matched pairs of (1 + w), w the pair's IoU (rules "overlap"/"iou") or the candidate's p_k
  (rule "peak", IoU breaking ties) -- the +1 favours more matches, then more overlap; exactly
  picai_eval's ``evaluate_case`` assignment. ``"greedy"``: eligible pairs in decreasing w (ties: lower
  ground-truth id, then lower candidate id), each taken when both ends are still free;
* ``unmatched="fp"`` (default): every candidate left unmatched is a false positive.
  ``"ignore"``: an unmatched candidate that is eligible for some ground-truth lesion (a second hit on
  an already found lesion) is neither TP nor FP -- picai_eval's
  ``allow_unmatched_candidates_with_minimal_overlap=True`` and MONAI's ``compute_fp_tp_probs_nd``
  (which keeps only the highest-probability hit of each lesion).

Scores then follow from that one matching (as in picai_eval and MONAI): a TP candidate is scored by
its p_k, so lowering a score threshold s keeps the candidates with p_k >= s.

* Lesion-wise precision, recall, F1 count every candidate (the hard prediction at the candidate
  threshold): P = TP/(TP+FP), R = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN); pooled over cases ("micro") and
  as the mean of per-case values (a case with no lesion and no candidate scores 1).
* Lesion-wise Dice, BraTS 2023 style: each ground-truth lesion scores the Dice 2|G & C|/(|G| + |C|)
  with its matched candidate's voxels C (0 when missed); each false-positive candidate adds a 0; the
  case's score is sum_g Dice_g / (G + FP) (1 when G + FP = 0). BraTS 2023 matches many-to-one (every
  component touching the 1-voxel-dilated lesion is merged into it); here the matching is one-to-one.
* Count errors: |K - G| (K candidates, G lesions) and E|C - G| = sum_j P(C = j) |j - G| under the
  exact Poisson-binomial count distribution of the candidates (no tail bin).
* FROC: sensitivity against false positives per scan as the score threshold decreases through the
  distinct p_k (the curve starts at (0, 0)); sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FPs per scan
  read off with linear interpolation (``np.interp``: MONAI's ``compute_froc_score``, LUNA16) or as the
  last operating point with at most that many FPs (``"step"``: picai_eval's ``lesion_TPR_at_FPR``);
  CPM = their mean. AP: the step integral sum_i (R_i - R_{i-1}) P_i over the distinct score thresholds
  (scikit-learn's ``average_precision_score``; picai_eval's ``AP``).

Arrays are numpy (the matching uses SciPy); tensors are accepted as inputs. SciPy is needed
(``pip install 'lesioncount[eval]'``).

Example:
    >>> import numpy as np
    >>> from lesioncount import detection
    >>> probs = np.zeros((1, 8, 8), np.float32); probs[0, 1:3, 1:3] = 0.9; probs[0, 5, 5] = 0.3
    >>> gt = np.zeros((1, 8, 8), bool); gt[0, 1:3, 1:4] = True
    >>> cand = detection.find_candidates(probs, threshold=0.1, connectivity=6)
    >>> gt_labels, _ = detection.ground_truth_lesions(gt, connectivity=6)
    >>> m = detection.match_lesions(gt_labels, cand.labels, cand.probs, cand.peaks)
    >>> m.tp, m.fp, m.fn, round(float(m.gt_iou[0]), 4)
    (1, 1, 0, 0.6667)
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Sequence

import numpy as np
import torch

from ._extras import require
from ._validation import DEFAULT_CONNECTIVITY

__all__ = [
    "FROC_FP_RATES",
    "Candidates",
    "LesionMatch",
    "average_precision",
    "detection_map",
    "detection_metrics",
    "expected_abs_count_error",
    "find_candidates",
    "froc",
    "ground_truth_lesions",
    "match_lesions",
    "precision_recall_curve",
    "recall_by_size",
    "scored_candidates",
    "write_detection_map",
]

#: False positives per scan at which FROC sensitivities are read (LUNA16's CPM points).
FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

_RULES = ("overlap", "iou", "peak")
_ASSIGNMENTS = ("hungarian", "greedy")
_UNMATCHED = ("fp", "ignore")


def _numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception:  # pragma: no cover - exotic objects
            raise TypeError(f"`{name}` must be a numpy array or torch tensor, got {type(x).__name__}") from None
    return x


def _check_labels(labels, name: str) -> np.ndarray:
    a = _numpy(labels, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"`{name}` must be an integer label map (0 background, 1..K), got dtype {a.dtype}")
    if a.size and int(a.min()) < 0:
        raise ValueError(f"`{name}` must be >= 0 (0 background, 1..K), got minimum {int(a.min())}")
    return a


def _check_spacing(spacing, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    s = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if s.shape[0] != ndim or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"`spacing` must hold {ndim} positive voxel sizes (mm), got {list(np.asarray(spacing).reshape(-1))}")
    return s


# ---------------------------------------------------------------------------------- candidates
@dataclasses.dataclass
class Candidates:
    """The predicted lesions of one item (K candidates, spatial shape S = (D, H, W) or (H, W)).

    Attributes:
        labels: S int64 label map, 0 background, candidate k is label k+1 (SciPy's raster order).
        probs: (K,) float64 existence probability p_k (maximum of the probability over the candidate).
        peaks: (K, len(S)) int64 index of each candidate's peak voxel (first voxel reaching p_k).
        sizes: (K,) int64 number of voxels.
    """

    labels: np.ndarray
    probs: np.ndarray
    peaks: np.ndarray
    sizes: np.ndarray

    @property
    def num(self) -> int:
        """K, the number of candidates."""
        return int(self.probs.shape[0])


def scored_candidates(result, item: int = 0) -> Candidates:
    """The :class:`Candidates` of item ``item`` of a :class:`~lesioncount.CountResult`.

    Args:
        result: output of :func:`lesioncount.count_distribution` without ``max_lesions`` truncation
            (every candidate of ``labels`` must have a column).
        item: batch index.

    Returns:
        :class:`Candidates` (numpy).

    Example:
        >>> import torch, lesioncount
        >>> r = lesioncount.count_distribution(torch.rand(1, 4, 8, 8), threshold=0.9)
        >>> scored_candidates(r).probs.shape == (int(r.num_lesions[0]),)
        True
    """
    labels = result.labels[item].detach().cpu().numpy().astype(np.int64, copy=False)
    ids = result.lesion_ids[item].detach().cpu().numpy()
    present = ids > 0
    k = int(result.num_lesions[item])
    if bool(result.truncated[item]) or int(present.sum()) != k:
        raise ValueError(f"item {item} of `result` has {k} candidates but {int(present.sum())} columns "
                         "(count_distribution with max_lesions dropped some): detection needs every candidate")
    order = np.argsort(ids[present], kind="stable")
    ids = ids[present][order]
    if not np.array_equal(ids, np.arange(1, k + 1)):
        raise ValueError("`result.lesion_ids` must hold the labels 1..K")
    probs = result.lesion_probs[item].detach().cpu().double().numpy()[present][order]
    flat = result.argmax[item].detach().cpu().numpy()[present][order]
    peaks = np.stack(np.unravel_index(flat, labels.shape), axis=1).astype(np.int64) if k else \
        np.zeros((0, labels.ndim), np.int64)
    sizes = np.bincount(labels.reshape(-1), minlength=k + 1)[1:k + 1].astype(np.int64)
    return Candidates(labels=labels, probs=probs, peaks=peaks, sizes=sizes)


def find_candidates(probs, threshold: float = 0.1, connectivity: int = DEFAULT_CONNECTIVITY[3], min_size: int = 0,
                    from_logits: bool = False) -> Candidates:
    """Candidates of one probability map: components of ``probs > threshold`` with their p_k.

    Args:
        probs: (D, H, W) or (H, W) probabilities (or logits with ``from_logits=True``), array or tensor.
        threshold, connectivity, min_size, from_logits: as in :func:`lesioncount.count_distribution`.

    Returns:
        :class:`Candidates`; ``probs`` are probabilities also for logit input.

    Example:
        >>> p = np.zeros((1, 6, 6), np.float32); p[0, 0, 0] = 0.7; p[0, 4, 4] = 0.4
        >>> c = find_candidates(p, 0.1, connectivity=6)
        >>> c.probs.round(4).tolist(), c.peaks.tolist(), c.sizes.tolist()
        ([0.7, 0.4], [[0, 0, 0], [0, 4, 4]], [1, 1])
    """
    from .counting import count_distribution

    x = probs if isinstance(probs, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(_numpy(probs, "probs")))
    if x.dim() not in (2, 3):
        raise ValueError(f"`probs` must be one item of shape (H, W) or (D, H, W), got {tuple(x.shape)}")
    with torch.no_grad():
        r = count_distribution(x.unsqueeze(0), threshold=threshold, connectivity=connectivity, min_size=min_size,
                               max_count=1, from_logits=from_logits)
    return scored_candidates(r, 0)


def ground_truth_lesions(mask, connectivity: int = DEFAULT_CONNECTIVITY[3], min_size: int = 0) -> tuple[np.ndarray, int]:
    """Ground-truth lesions: connected components of the nonzero voxels, with the candidates' rules.

    Args:
        mask: (D, H, W) or (H, W) mask (nonzero = lesion), array or tensor.
        connectivity, min_size: as for the candidates (:func:`lesioncount.label`).

    Returns:
        ``(labels, G)``: int64 label map (0 background, lesions 1..G in raster order) and G.

    Example:
        >>> m = np.zeros((1, 4, 4), np.uint8); m[0, 0, 0] = m[0, 3, 3] = 1
        >>> ground_truth_lesions(m, connectivity=26)[1]
        2
    """
    from .ops import label

    m = _numpy(mask, "mask")
    if m.ndim not in (2, 3):
        raise ValueError(f"`mask` must be one item of shape (H, W) or (D, H, W), got {m.shape}")
    if m.dtype.kind == "f" and not np.isfinite(m).all():
        raise ValueError("`mask` contains NaN or infinite values")
    fg = torch.from_numpy(np.ascontiguousarray(m != 0)).unsqueeze(0)
    labels, num = label(fg, 0.5, connectivity, min_size)
    return labels[0].numpy().astype(np.int64, copy=False), int(num[0])


# ------------------------------------------------------------------------------------ matching
@dataclasses.dataclass
class LesionMatch:
    """One-to-one matching of one case (G ground-truth lesions, K candidates); see :func:`match_lesions`.

    Attributes:
        gt_sizes: (G,) int64 voxels per ground-truth lesion (lesion g is label g+1).
        cand_sizes: (K,) int64 voxels per candidate (candidate k is label k+1).
        cand_probs: (K,) float64 p_k.
        intersection: (G, K) int64 shared voxels.
        eligible: (G, K) bool, the pair satisfies the matching rule.
        gt_match: (G,) int64 matched candidate index (0-based) or -1 (missed).
        cand_match: (K,) int64 matched lesion index (0-based) or -1.
        cand_ignored: (K,) bool, unmatched but eligible and ``unmatched="ignore"``: neither TP nor FP.
        rule, assignment, unmatched: the settings used.
    """

    gt_sizes: np.ndarray
    cand_sizes: np.ndarray
    cand_probs: np.ndarray
    intersection: np.ndarray
    eligible: np.ndarray
    gt_match: np.ndarray
    cand_match: np.ndarray
    cand_ignored: np.ndarray
    rule: str
    assignment: str
    unmatched: str

    @property
    def n_gt(self) -> int:
        """G."""
        return int(self.gt_sizes.shape[0])

    @property
    def n_candidates(self) -> int:
        """K."""
        return int(self.cand_sizes.shape[0])

    @property
    def iou(self) -> np.ndarray:
        """(G, K) float64 intersection over union of every pair."""
        union = self.gt_sizes[:, None] + self.cand_sizes[None, :] - self.intersection
        return np.where(union > 0, self.intersection / np.maximum(union, 1), 0.0)

    @property
    def cand_is_tp(self) -> np.ndarray:
        """(K,) bool."""
        return self.cand_match >= 0

    @property
    def cand_is_fp(self) -> np.ndarray:
        """(K,) bool: unmatched and not ignored."""
        return (self.cand_match < 0) & ~self.cand_ignored

    @property
    def tp(self) -> int:
        return int((self.gt_match >= 0).sum())

    @property
    def fn(self) -> int:
        return int((self.gt_match < 0).sum())

    @property
    def fp(self) -> int:
        return int(self.cand_is_fp.sum())

    def _pair(self, matrix: np.ndarray) -> np.ndarray:
        out = np.zeros(self.n_gt, np.float64)
        hit = self.gt_match >= 0
        out[hit] = matrix[np.nonzero(hit)[0], self.gt_match[hit]]
        return out

    @property
    def gt_iou(self) -> np.ndarray:
        """(G,) IoU with the matched candidate (0 when missed)."""
        return self._pair(self.iou)

    @property
    def gt_dice(self) -> np.ndarray:
        """(G,) Dice 2|G & C|/(|G| + |C|) with the matched candidate (0 when missed)."""
        den = self.gt_sizes[:, None] + self.cand_sizes[None, :]
        return self._pair(np.where(den > 0, 2 * self.intersection / np.maximum(den, 1), 0.0))

    @property
    def gt_score(self) -> np.ndarray:
        """(G,) p_k of the matched candidate (0 when missed)."""
        out = np.zeros(self.n_gt, np.float64)
        hit = self.gt_match >= 0
        out[hit] = self.cand_probs[self.gt_match[hit]]
        return out

    @property
    def lesion_dice(self) -> float:
        """BraTS-2023-style lesion-wise Dice of the case: sum_g Dice_g / (G + FP); 1 when G + FP = 0."""
        den = self.n_gt + self.fp
        return 1.0 if den == 0 else float(self.gt_dice.sum() / den)

    @property
    def f1(self) -> float:
        """Lesion-wise F1 of the case, 2TP/(2TP+FP+FN); 1 when there is no lesion and no candidate."""
        den = 2 * self.tp + self.fp + self.fn
        return 1.0 if den == 0 else 2 * self.tp / den


def _intersections(gt_labels: np.ndarray, n_gt: int, cand_labels: np.ndarray, n_cand: int) -> np.ndarray:
    g = gt_labels.reshape(-1)
    c = cand_labels.reshape(-1)
    both = (g > 0) & (c > 0)
    pair = (g[both] - 1).astype(np.int64) * max(n_cand, 1) + (c[both] - 1)
    return np.bincount(pair, minlength=n_gt * n_cand)[: n_gt * n_cand].reshape(n_gt, n_cand).astype(np.int64)


def _peak_eligibility(gt_labels, n_gt, peaks, max_distance, spacing) -> np.ndarray:
    """(G, K): peak k within ``max_distance`` (mm) of a voxel of lesion g."""
    ndimage = require("scipy.ndimage", "lesion matching by peak distance")
    n_cand = peaks.shape[0]
    out = np.zeros((n_gt, n_cand), bool)
    if n_gt == 0 or n_cand == 0:
        return out
    if max_distance == 0:
        hit = gt_labels[tuple(peaks.T)]
        k = np.nonzero(hit > 0)[0]
        out[hit[k] - 1, k] = True
        return out
    margin = np.ceil(max_distance / spacing).astype(np.int64)
    boxes = ndimage.find_objects(gt_labels, max_label=n_gt)
    for g, box in enumerate(boxes):
        if box is None:
            continue
        lo = np.array([s.start for s in box]) - margin
        hi = np.array([s.stop for s in box]) + margin
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, gt_labels.shape)
        inside = np.all((peaks >= lo) & (peaks < hi), axis=1)
        if not inside.any():
            continue
        sub = gt_labels[tuple(slice(a, b) for a, b in zip(lo, hi))] == g + 1
        dist = ndimage.distance_transform_edt(~sub, sampling=spacing)
        k = np.nonzero(inside)[0]
        local = peaks[k] - lo
        out[g, k] = dist[tuple(local.T)] <= max_distance * (1 + 1e-9)
    return out


def match_lesions(gt_labels, cand_labels, cand_probs, cand_peaks=None, *, rule: str = "overlap",
                  iou_threshold: float = 0.1, max_distance: float = 0.0, spacing=None,
                  assignment: str = "hungarian", unmatched: str = "fp") -> LesionMatch:
    """Match the candidates of one case to its ground-truth lesions, one-to-one.

    Args:
        gt_labels: S int label map of the ground-truth lesions, 1..G (:func:`ground_truth_lesions`).
        cand_labels: S int label map of the candidates, 1..K (``Candidates.labels``).
        cand_probs: (K,) p_k of candidate k (label k+1).
        cand_peaks: (K, len(S)) peak voxel indices (needed for ``rule="peak"``).
        rule: "overlap" (any shared voxel), "iou" (IoU >= ``iou_threshold``) or "peak" (peak within
            ``max_distance`` of the lesion).
        iou_threshold: in (0, 1], for ``rule="iou"``.
        max_distance: >= 0, mm when ``spacing`` is given, else voxels, for ``rule="peak"``.
        spacing: (len(S),) voxel size in mm (the peak rule's distances), or None.
        assignment: "hungarian" or "greedy" (see the module docstring).
        unmatched: "fp" or "ignore" (unmatched eligible candidates are not FPs).

    Returns:
        :class:`LesionMatch`.

    Example:
        >>> g = np.array([[1, 1, 0, 0, 2]]); c = np.array([[1, 1, 1, 0, 0]])
        >>> m = match_lesions(g, c, [0.8], rule="iou", iou_threshold=0.5)
        >>> m.gt_match.tolist(), m.tp, m.fp, m.fn
        ([0, -1], 1, 0, 1)
    """
    if rule not in _RULES:
        raise ValueError(f"`rule` must be one of {_RULES}, got {rule!r}")
    if assignment not in _ASSIGNMENTS:
        raise ValueError(f"`assignment` must be one of {_ASSIGNMENTS}, got {assignment!r}")
    if unmatched not in _UNMATCHED:
        raise ValueError(f"`unmatched` must be one of {_UNMATCHED}, got {unmatched!r}")
    g = _check_labels(gt_labels, "gt_labels")
    c = _check_labels(cand_labels, "cand_labels")
    if g.shape != c.shape:
        raise ValueError(f"`gt_labels` {g.shape} and `cand_labels` {c.shape} must have the same shape")
    probs = _numpy(cand_probs, "cand_probs").astype(np.float64).reshape(-1)
    n_cand = probs.shape[0]
    n_gt = int(g.max()) if g.size else 0
    if c.size and int(c.max()) > n_cand:
        raise ValueError(f"`cand_labels` has label {int(c.max())} but `cand_probs` holds only {n_cand} candidates")
    gt_sizes = np.bincount(g.reshape(-1), minlength=n_gt + 1)[1:].astype(np.int64)
    cand_sizes = np.bincount(c.reshape(-1), minlength=n_cand + 1)[1:n_cand + 1].astype(np.int64)
    inter = _intersections(g, n_gt, c, n_cand)
    union = gt_sizes[:, None] + cand_sizes[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    if rule == "overlap":
        eligible = inter > 0
        weight = iou
    elif rule == "iou":
        t = float(iou_threshold)
        if not (0 < t <= 1):
            raise ValueError(f"`iou_threshold` must lie in (0, 1], got {iou_threshold!r}")
        eligible = iou >= t
        weight = iou
    else:
        d = float(max_distance)
        if not (math.isfinite(d) and d >= 0):
            raise ValueError(f"`max_distance` must be a finite number >= 0, got {max_distance!r}")
        if cand_peaks is None:
            raise ValueError("rule='peak' needs `cand_peaks` (K, ndim) peak voxel indices")
        peaks = _numpy(cand_peaks, "cand_peaks").astype(np.int64).reshape(n_cand, g.ndim) if n_cand else \
            np.zeros((0, g.ndim), np.int64)
        if n_cand and (np.any(peaks < 0) or np.any(peaks >= np.array(g.shape))):
            raise ValueError(f"`cand_peaks` must be voxel indices inside the shape {g.shape}")
        eligible = _peak_eligibility(g, n_gt, peaks, d, _check_spacing(spacing, g.ndim))
        weight = np.broadcast_to(probs[None, :], (n_gt, n_cand)) + 1e-6 * iou  # p_k, IoU breaks ties
    gt_match = np.full(n_gt, -1, np.int64)
    cand_match = np.full(n_cand, -1, np.int64)
    if eligible.any():
        if assignment == "hungarian":
            optimize = require("scipy.optimize", "lesion matching (linear_sum_assignment)")
            score = np.where(eligible, 1.0 + weight, 0.0)
            rows, cols = optimize.linear_sum_assignment(score, maximize=True)
            keep = eligible[rows, cols]
            rows, cols = rows[keep], cols[keep]
        else:
            gi, ki = np.nonzero(eligible)
            order = np.lexsort((ki, gi, -weight[gi, ki]))
            rows, cols, used_g, used_k = [], [], set(), set()
            for j in order:
                a, b = int(gi[j]), int(ki[j])
                if a not in used_g and b not in used_k:
                    used_g.add(a), used_k.add(b)
                    rows.append(a), cols.append(b)
            rows, cols = np.array(rows, np.int64), np.array(cols, np.int64)
        gt_match[rows] = cols
        cand_match[cols] = rows
    ignored = (cand_match < 0) & eligible.any(axis=0) if unmatched == "ignore" else np.zeros(n_cand, bool)
    return LesionMatch(gt_sizes=gt_sizes, cand_sizes=cand_sizes, cand_probs=probs, intersection=inter,
                       eligible=eligible, gt_match=gt_match, cand_match=cand_match, cand_ignored=ignored,
                       rule=rule, assignment=assignment, unmatched=unmatched)


# -------------------------------------------------------------------------------- count errors
def expected_abs_count_error(lesion_probs, true_count: int) -> float:
    """E|C - c| under the exact Poisson-binomial count distribution of the candidates.

    Args:
        lesion_probs: (K,) existence probabilities p_k.
        true_count: c, the number of ground-truth lesions.

    Returns:
        sum_j P(C = j) |j - c| (float).

    Example:
        >>> expected_abs_count_error([0.5, 0.5], 1)        # P(C=0,1,2) = 1/4, 1/2, 1/4
        0.5
    """
    from .ops import poisson_binomial

    p = torch.as_tensor(_numpy(lesion_probs, "lesion_probs"), dtype=torch.float64).reshape(1, -1)
    if isinstance(true_count, bool) or int(true_count) != true_count or true_count < 0:
        raise ValueError(f"`true_count` must be a non-negative integer, got {true_count!r}")
    pmf = poisson_binomial(p, p.shape[1])[0].numpy()
    return float(np.sum(pmf * np.abs(np.arange(pmf.shape[0]) - int(true_count))))


# --------------------------------------------------------------------------------- aggregates
def _safe(num, den, empty=float("nan")):
    return float(num) / float(den) if den else empty


def detection_metrics(matches: Sequence[LesionMatch], lesion_probs: Sequence | None = None) -> dict[str, float]:
    """Lesion-wise detection metrics over cases (hard: every candidate is a prediction).

    Args:
        matches: N :class:`LesionMatch`, one per case.
        lesion_probs: N (K_i,) p_k arrays for E|C - G|; ``None`` uses each match's ``cand_probs`` (all
            candidates, also those ignored by ``unmatched="ignore"``).

    Returns:
        dict: ``n_cases``, ``n_gt``, ``n_candidates``, ``tp``, ``fp``, ``fn``, ``ignored``; pooled
        ``precision``, ``recall``, ``f1`` (NaN when undefined); ``f1_case_mean``; ``lesion_dice``
        (mean over cases of the BraTS-style case score); ``count_abs_diff`` (mean |K - G|) and
        ``expected_abs_count_error`` (mean E|C - G|).

    Example:
        >>> m = match_lesions(np.array([[1, 0, 2]]), np.array([[1, 0, 0]]), [0.9])
        >>> d = detection_metrics([m]); d["recall"], d["precision"], d["lesion_dice"]
        (0.5, 1.0, 0.5)
    """
    if len(matches) == 0:
        raise ValueError("`matches` is empty: no case to score")
    tp = sum(m.tp for m in matches)
    fp = sum(m.fp for m in matches)
    fn = sum(m.fn for m in matches)
    probs = [m.cand_probs for m in matches] if lesion_probs is None else list(lesion_probs)
    if len(probs) != len(matches):
        raise ValueError(f"`lesion_probs` must hold one array per case ({len(matches)}), got {len(probs)}")
    return {
        "n_cases": len(matches),
        "n_gt": sum(m.n_gt for m in matches),
        "n_candidates": sum(m.n_candidates for m in matches),
        "tp": tp, "fp": fp, "fn": fn,
        "ignored": int(sum(int(m.cand_ignored.sum()) for m in matches)),
        "precision": _safe(tp, tp + fp),
        "recall": _safe(tp, tp + fn),
        "f1": _safe(2 * tp, 2 * tp + fp + fn),
        "f1_case_mean": float(np.mean([m.f1 for m in matches])),
        "lesion_dice": float(np.mean([m.lesion_dice for m in matches])),
        "count_abs_diff": float(np.mean([abs(m.n_candidates - m.n_gt) for m in matches])),
        "expected_abs_count_error": float(np.mean([expected_abs_count_error(p, m.n_gt)
                                                   for p, m in zip(probs, matches)])),
    }


def recall_by_size(matches: Sequence[LesionMatch], edges: Sequence[float], voxel_volumes: Sequence[float] | None = None
                   ) -> list[dict]:
    """Recall of the ground-truth lesions grouped by size.

    Args:
        matches: N :class:`LesionMatch`.
        edges: increasing bin edges e_1 < ... < e_B; bins [0, e_1), [e_1, e_2), ..., [e_B, inf).
        voxel_volumes: N voxel volumes in mm^3 (sizes and edges in mm^3), or None (voxels).

    Returns:
        B+1 dicts ``{"lower", "upper", "n_gt", "tp", "recall"}`` (recall NaN for an empty bin).

    Example:
        >>> m = match_lesions(np.array([[1, 0, 2, 2, 2]]), np.array([[0, 0, 1, 1, 0]]), [0.9])
        >>> [(r["n_gt"], r["recall"]) for r in recall_by_size([m], [2])]
        [(1, 0.0), (1, 1.0)]
    """
    e = [float(v) for v in edges]
    if any(b <= a for a, b in zip(e, e[1:])) or any(v < 0 or not math.isfinite(v) for v in e):
        raise ValueError(f"`edges` must be finite, >= 0 and increasing, got {list(edges)}")
    vols = [1.0] * len(matches) if voxel_volumes is None else [float(v) for v in voxel_volumes]
    if len(vols) != len(matches):
        raise ValueError(f"`voxel_volumes` must hold one value per case ({len(matches)}), got {len(vols)}")
    sizes = np.concatenate([m.gt_sizes * v for m, v in zip(matches, vols)]) if matches else np.zeros(0)
    hit = np.concatenate([m.gt_match >= 0 for m in matches]) if matches else np.zeros(0, bool)
    lowers = [0.0] + e
    uppers = e + [math.inf]
    rows = []
    for lo, hi in zip(lowers, uppers):
        sel = (sizes >= lo) & (sizes < hi)
        n, t = int(sel.sum()), int(hit[sel].sum())
        rows.append({"lower": lo, "upper": hi, "n_gt": n, "tp": t, "recall": _safe(t, n)})
    return rows


def _scores(matches):
    """Scores and TP flags of the counted candidates (not ignored), and the number of lesions."""
    scores = np.concatenate([m.cand_probs[~m.cand_ignored] for m in matches]) if matches else np.zeros(0)
    is_tp = np.concatenate([m.cand_is_tp[~m.cand_ignored] for m in matches]) if matches else np.zeros(0, bool)
    n_gt = sum(m.n_gt for m in matches)
    return scores, is_tp, n_gt


def _operating_points(scores, is_tp):
    """Distinct score thresholds (descending) and cumulative TP / FP counts at score >= threshold."""
    s = _numpy(scores, "scores").astype(np.float64).reshape(-1)
    t = _numpy(is_tp, "is_tp").astype(bool).reshape(-1)
    if s.shape != t.shape:
        raise ValueError(f"`scores` {s.shape} and `is_tp` {t.shape} must have one entry per candidate")
    if s.size and not np.isfinite(s).all():
        raise ValueError("`scores` must be finite")
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1] if s.size else np.zeros(0, np.int64)
    tps = np.cumsum(t)[last]
    fps = np.cumsum(~t)[last]
    return s[last], tps.astype(np.int64), fps.astype(np.int64)


def froc(scores, is_tp, n_targets: int, n_images: int, fp_rates: Sequence[float] = FROC_FP_RATES,
         interpolation: str = "linear") -> dict:
    """Free-response ROC: sensitivity against false positives per scan, and CPM.

    Args:
        scores: (N,) scores of every counted candidate over all scans (p_k).
        is_tp: (N,) bool, the candidate is matched (TP) rather than a false positive.
        n_targets: number of ground-truth lesions over all scans (>= 1).
        n_images: number of scans (>= 1).
        fp_rates: false positives per scan at which the sensitivity is read.
        interpolation: "linear" (``np.interp`` on the curve, MONAI / LUNA16) or "step" (the last
            operating point with at most that many FPs per scan; 0 when there is none; picai_eval).

    Returns:
        dict: ``thresholds`` (P+1,) (inf, then the distinct scores descending), ``fps_per_image``
        (P+1,), ``sensitivity`` (P+1,) (the curve, from (0, 0)), ``fp_rates`` (F,), ``sensitivities``
        (F,), ``cpm`` (their mean).

    Example:
        >>> r = froc([0.9, 0.8, 0.3], [True, False, True], n_targets=2, n_images=1, fp_rates=(0.5, 1))
        >>> r["fps_per_image"].tolist(), r["sensitivity"].tolist(), r["sensitivities"].tolist()
        ([0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0], [0.5, 1.0])
    """
    if interpolation not in ("linear", "step"):
        raise ValueError(f"`interpolation` must be 'linear' or 'step', got {interpolation!r}")
    if int(n_targets) < 1 or int(n_images) < 1:
        raise ValueError(f"`n_targets` and `n_images` must be >= 1, got {n_targets} and {n_images}")
    thr, tps, fps = _operating_points(scores, is_tp)
    fpi = np.r_[0.0, fps / float(n_images)]
    sens = np.r_[0.0, tps / float(n_targets)]
    rates = np.asarray(fp_rates, dtype=np.float64).reshape(-1)
    if interpolation == "linear":
        at = np.interp(rates, fpi, sens)
    else:
        at = np.array([sens[fpi <= r][-1] if np.any(fpi <= r) else 0.0 for r in rates])
    return {"thresholds": np.r_[np.inf, thr], "fps_per_image": fpi, "sensitivity": sens, "fp_rates": rates,
            "sensitivities": at, "cpm": float(at.mean()) if at.size else float("nan")}


def precision_recall_curve(scores, is_tp, n_targets: int) -> dict:
    """Lesion-level precision and recall at each distinct score threshold (descending).

    Args:
        scores: (N,) candidate scores; is_tp: (N,) bool; n_targets: ground-truth lesions (missed ones
            included: recall never reaches 1 while some lesion has no candidate).

    Returns:
        dict with (P,) ``thresholds``, ``precision``, ``recall``.

    Example:
        >>> r = precision_recall_curve([0.9, 0.8, 0.3], [True, False, True], n_targets=3)
        >>> r["precision"].round(4).tolist(), r["recall"].round(4).tolist()
        ([1.0, 0.5, 0.6667], [0.3333, 0.3333, 0.6667])
    """
    if int(n_targets) < 1:
        raise ValueError(f"`n_targets` must be >= 1, got {n_targets}")
    thr, tps, fps = _operating_points(scores, is_tp)
    return {"thresholds": thr, "precision": tps / np.maximum(tps + fps, 1), "recall": tps / float(n_targets)}


def average_precision(scores, is_tp, n_targets: int) -> float:
    """AP = sum_i (R_i - R_{i-1}) P_i over the distinct score thresholds (R_0 = 0), no interpolation.

    Equals scikit-learn's ``average_precision_score`` on the candidates plus one score-0 positive per
    missed lesion, and picai_eval's ``Metrics.AP``. Lesions never detected cap the recall below 1.

    Example:
        >>> average_precision([0.9, 0.8, 0.3], [True, False, True], n_targets=3)   # 1/3 * 1 + 1/3 * 2/3
        0.5555555555555556
    """
    r = precision_recall_curve(scores, is_tp, n_targets)
    recall = np.r_[0.0, r["recall"]]
    return float(np.sum(np.diff(recall) * r["precision"]))


def froc_from_matches(matches: Sequence[LesionMatch], fp_rates: Sequence[float] = FROC_FP_RATES,
                      interpolation: str = "linear") -> dict:
    """:func:`froc` and :func:`average_precision` of matched cases (p_k scores, ignored candidates left out).

    Returns:
        the :func:`froc` dict plus ``ap``, ``n_targets``, ``n_images``; with no ground-truth lesion the
        curve is undefined and ``cpm``/``ap`` are NaN.

    Example:
        >>> m = match_lesions(np.array([[1, 0, 2]]), np.array([[1, 0, 2]]), [0.9, 0.4])
        >>> froc_from_matches([m])["ap"]
        1.0
    """
    scores, is_tp, n_gt = _scores(list(matches))
    n = len(matches)
    if n_gt == 0:
        rates = np.asarray(fp_rates, dtype=np.float64)
        return {"thresholds": np.zeros(0), "fps_per_image": np.zeros(0), "sensitivity": np.zeros(0),
                "fp_rates": rates, "sensitivities": np.full(rates.shape, np.nan), "cpm": float("nan"),
                "ap": float("nan"), "n_targets": 0, "n_images": n}
    out = froc(scores, is_tp, n_gt, n, fp_rates, interpolation)
    out.update(ap=average_precision(scores, is_tp, n_gt), n_targets=n_gt, n_images=n)
    return out


__all__.append("froc_from_matches")


# ------------------------------------------------------------------------------ detection maps
def detection_map(labels, lesion_probs, lesion_ids=None) -> torch.Tensor:
    """Each candidate painted with its p_k over its voxels (a picai_eval-style detection map).

    Candidates do not overlap (they are the components of one label map), so the map is well defined;
    background is 0. Adjacent candidates cannot touch under the labelling connectivity; with a
    connectivity below 26 two candidates may touch diagonally, and an evaluator that relabels the map
    with 26-connectivity (picai_eval) then sees them as one.

    Args:
        labels: S int candidate label map (``CountResult.labels[b]``), 0 background.
        lesion_probs: (K,) p_k (``CountResult.lesion_probs[b]``).
        lesion_ids: (K,) label of each column (``CountResult.lesion_ids[b]``; 0 = padding, skipped);
            ``None``: column k is label k+1.

    Returns:
        float32 tensor of shape S on the labels' device.

    Example:
        >>> lab = torch.tensor([[1, 1, 0, 2]]); detection_map(lab, torch.tensor([0.9, 0.4]))
        tensor([[0.9000, 0.9000, 0.0000, 0.4000]])
    """
    lab = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(_check_labels(labels, "labels"))
    if lab.is_floating_point() or lab.dtype == torch.bool:
        raise TypeError(f"`labels` must be an integer label map, got {lab.dtype}")
    p = torch.as_tensor(lesion_probs).detach().to(device=lab.device, dtype=torch.float32).reshape(-1)
    ids = (torch.arange(1, p.numel() + 1, device=lab.device) if lesion_ids is None
           else torch.as_tensor(lesion_ids, device=lab.device).reshape(-1).long())
    if ids.numel() != p.numel():
        raise ValueError(f"`lesion_ids` ({ids.numel()}) and `lesion_probs` ({p.numel()}) must have one entry per column")
    top = int(lab.max()) if lab.numel() else 0
    size = max(top, int(ids.max()) if ids.numel() else 0) + 1
    lut = torch.zeros(size, dtype=torch.float32, device=lab.device)
    assigned = torch.zeros(size, dtype=torch.bool, device=lab.device)
    keep = ids > 0
    lut[ids[keep]] = p[keep]
    assigned[ids[keep]] = True
    assigned[0] = True
    present = torch.zeros(size, dtype=torch.bool, device=lab.device)
    present[lab.reshape(-1).long()] = True
    missing = torch.nonzero(present & ~assigned).reshape(-1)
    if missing.numel():
        raise ValueError(f"labels {missing[:5].tolist()} have no probability in `lesion_probs` "
                         "(candidates dropped by max_lesions?)")
    return lut[lab.long()]


def write_detection_map(path, dmap, affine, *, commit: bool = True):
    """Write a detection map as a float32 NIfTI with the input's affine, atomically (nibabel; extra ``io``).

    Args:
        path: ``.nii``/``.nii.gz`` file.
        dmap: (X, Y, Z) float map (:func:`detection_map`), in the input's voxel order.
        affine: (4, 4) voxel-to-world matrix (``Volume.affine`` of the input).
        commit: True (default): written to a hidden temporary file, fsync'ed and renamed onto ``path``
            (:func:`lesioncount.io.atomic_file`: never a partial ``path``). False: the finished
            temporary file is left for the caller to ``os.replace`` onto ``path`` (or remove), as
            ``lesioncount count --save-detection-map`` does.

    Returns:
        ``path`` as a :class:`pathlib.Path`, or with ``commit=False`` the temporary file.

    Example:
        >>> write_detection_map("out/case_detection.nii.gz", detection_map(r.labels[0], r.lesion_probs[0],
        ...                     r.lesion_ids[0]), volume.affine)                    # doctest: +SKIP
    """
    from .io import _nibabel, _save_nifti_atomic

    nib = _nibabel()
    path = pathlib.Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise ValueError(f"`path` must end in .nii or .nii.gz, got {path.name!r}")
    d = _numpy(dmap, "dmap").astype(np.float32, copy=False)
    if d.ndim != 3:
        raise ValueError(f"`dmap` must be a 3-D (X, Y, Z) map, got shape {d.shape}")
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"`affine` must be 4x4, got shape {a.shape}")
    img = nib.Nifti1Image(d, a)
    img.header.set_data_dtype(np.float32)
    img.header.set_xyzt_units("mm")
    img.header["intent_name"] = b"detection p_k"
    return _save_nifti_atomic(path, img, commit=commit)
