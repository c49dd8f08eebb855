"""``lesioncount plot``: figures for one probability map: its count distribution and a slice with the
outline of every candidate and its existence probability p_k written next to it.

The slice (``--slice`` along ``--axis``, voxel axes i, j, k = 0, 1, 2) defaults to the one holding the
argmax voxel of the most probable candidate (the middle slice when there is no candidate). It is
shown with the first remaining voxel axis horizontal and the second vertical, increasing upwards
(for an axial RAS NIfTI slice: left-right across, posterior-anterior up). The background is
``--image`` when given (same shape and, unless one of them is ``.npy``, the same affine within
1e-3 mm as the map), else the probability map itself.

``-o OUT.png`` writes one figure with both panels; any other ``-o`` is a folder that receives
``CASE_count_distribution.png`` and ``CASE_slice.png``.

Example:
    lesioncount plot -i preds/case_001.nii.gz --image imagesTs/case_001_0000.nii.gz -o figs/
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from ._options import add_count_options
from ._options import nonneg_int as _nonneg_int

HELP = "plot the count distribution of one map and a slice with its candidates and their probabilities"


def register(subparsers) -> None:
    """Add the ``plot`` subcommand to the ``lesioncount`` parser."""
    p = subparsers.add_parser("plot", help=HELP, description=HELP + ".",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", "--input", required=True, type=pathlib.Path,
                   help="probability (or logit) map: .nii/.nii.gz, nnU-Net .npz, .npy")
    p.add_argument("--image", type=pathlib.Path, default=None,
                   help="image to draw the slice on (same voxel grid); default: the probability map")
    p.add_argument("--image-channel", type=_nonneg_int, default=0, help="channel of a multi-channel --image")
    p.add_argument("-o", "--output", required=True, type=pathlib.Path,
                   help="OUT.png (one figure, two panels) or a folder (two PNG files)")
    add_count_options(
        p, threshold="candidate threshold (a probability)", connectivity="",
        min_size="drop candidates with fewer voxels", min_volume="drop candidates below this many mm^3",
        max_count="M: count bins 0..M-1 and 'M or more'", from_logits="the map holds logits",
        channel="lesion channel of multi-channel maps, 0-based (default: 1 for nnU-Net .npz; a 4-D NIfTI "
                "with several volumes needs it)", checked=True)
    p.add_argument("--allow-missing-geometry", action="store_true",
                   help="nnU-Net .npz without its sibling CASE.nii.gz: identity affine (1 mm voxels) "
                        "instead of failing")
    p.add_argument("--true-count", type=_nonneg_int, default=None, help="mark this count on the bar chart")
    p.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="voxel axis the slice is taken across")
    p.add_argument("--slice", type=_nonneg_int, default=None,
                   help="slice index along --axis (default: the slice of the most probable candidate's argmax)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Count, pick the slice, draw, write. Returns the exit code (0 ok, 1 unreadable/invalid input,
    2 unusable output path)."""
    from .._extras import require

    require("matplotlib", "`lesioncount plot`")
    import numpy as np
    import torch

    from .. import count_distribution
    from .. import plot as plots
    from ..io import CaseReadError, _nnunet_sibling, read_probability_map
    from ..report import min_size_for_volume

    try:
        vol = read_probability_map(args.input, channel=args.channel,
                                   missing_geometry="identity" if args.allow_missing_geometry else "error")
        image = None
        if args.image is not None:
            image = read_probability_map(args.image, channel=args.image_channel)
            if image.data.shape != vol.data.shape:
                raise CaseReadError(args.image, f"image shape {image.data.shape} does not match the map "
                                                f"{args.input.name} of shape {vol.data.shape}")
            with_geometry = [not (p.name.lower().endswith(".npy")
                                  or (p.name.lower().endswith(".npz") and _nnunet_sibling(p) is None))
                             for p in (args.input, args.image)]
            if all(with_geometry) and not np.allclose(image.affine, vol.affine, rtol=1e-5, atol=1e-3):
                raise CaseReadError(args.image, f"affine differs from that of the map {args.input.name} (max "
                                                f"difference {np.abs(image.affine - vol.affine).max():.3g}): "
                                                f"the image is on another voxel grid; resample it to the map's grid")
        min_size = args.min_size
        if args.min_volume is not None:
            min_size = min_size_for_volume(args.min_volume, vol.voxel_volume)
        x = torch.from_numpy(vol.data).unsqueeze(0)
        with torch.inference_mode():
            try:
                r = count_distribution(x, threshold=args.threshold, connectivity=args.connectivity, min_size=min_size,
                                       max_count=args.max_count, from_logits=args.from_logits)
            except (ValueError, RuntimeError) as exc:  # NaN / out-of-range values
                raise CaseReadError(args.input, str(exc)) from None
        shape = vol.data.shape
        if args.slice is not None and args.slice >= shape[args.axis]:
            raise CaseReadError(args.input, f"--slice {args.slice} is out of range: axis {args.axis} has "
                                            f"{shape[args.axis]} slices")
    except (CaseReadError, FileNotFoundError) as exc:
        print(f"lesioncount plot: {exc}", file=sys.stderr)
        return 1

    ids = r.lesion_ids[0].tolist()
    probs = r.lesion_probs[0].double().tolist()
    argmax = r.argmax[0].tolist()
    lesion_probs = {k: p for k, p in zip(ids, probs) if k > 0}
    voxel_of = {k: np.unravel_index(a, shape) for k, a in zip(ids, argmax) if k > 0}
    if args.slice is not None:
        index = args.slice
    elif lesion_probs:
        best = max(lesion_probs, key=lambda k: (lesion_probs[k], -k))
        index = int(voxel_of[best][args.axis])
    else:
        index = shape[args.axis] // 2
    a, b = [d for d in range(3) if d != args.axis]

    def take(volume):
        return np.take(volume, index, axis=args.axis).T  # rows: axis b, columns: axis a

    labels2d = take(r.labels[0].numpy())
    if image is not None:
        background, window = take(image.data), None
    else:
        background, window = take(torch.sigmoid(x[0]).numpy() if args.from_logits else vol.data), (0.0, 1.0)
    positions = {k: (float(v[b]), float(v[a])) for k, v in voxel_of.items() if int(v[args.axis]) == index}

    expected = float(r.expected_count[0])
    ncand = int(r.num_lesions[0])
    count_title = f"{vol.name}: {ncand} candidate(s) > {args.threshold:g}, E[C] = {expected:.2f}"
    slice_title = f"{vol.name}: axis {args.axis}, slice {index} (of {shape[args.axis]})"
    spacing = vol.spacing
    overlay_options = dict(positions=positions, title=slice_title, origin="lower", window=window,
                           aspect=spacing[b] / spacing[a])
    pmf = r.pmf[0]
    out = args.output
    folder = out.parent if out.suffix.lower() == ".png" else out
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"lesioncount plot: error: -o/--output {out}: cannot create the folder {folder} ({exc})", file=sys.stderr)
        return 2
    if out.suffix.lower() == ".png":
        fig, (ax1, ax2) = plots.new_figure(1, 2, figsize=(12, 5.2))
        plots.plot_count_distribution(pmf, args.true_count, ax=ax1, title=count_title)
        plots.plot_slice_overlay(background, labels2d, lesion_probs, ax=ax2, **overlay_options)
        written = [plots.save_figure(fig, out)]
    else:
        written = [
            plots.save_figure(plots.plot_count_distribution(pmf, args.true_count, title=count_title),
                              out / f"{vol.name}_count_distribution.png"),
            plots.save_figure(plots.plot_slice_overlay(background, labels2d, lesion_probs, **overlay_options),
                              out / f"{vol.name}_slice.png"),
        ]
    print(f"{vol.name}: {ncand} candidates, expected count {expected:.3f}, most likely {int(pmf.argmax())}; "
          f"slice {index} along axis {args.axis}; wrote {', '.join(str(w) for w in written)}")
    return 0
