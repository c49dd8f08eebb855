"""Argument checks shared by the public functions. Every error names the argument at fault."""
from __future__ import annotations

import math

import torch

_CONNECTIVITIES = {2: (4, 8), 3: (6, 18, 26)}
_LABEL_DTYPES = (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tracing() -> bool:
    """True under torch.compile tracing or CUDA-graph capture, where data-dependent checks (host
    syncs) must be skipped."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def canonical_spatial(input: torch.Tensor, name: str = "input") -> torch.Tensor:
    """Returns ``input`` as (B, H, W) (2D) or (B, D, H, W) (3D); drops a singleton channel of
    a (B, 1, D, H, W) tensor."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() == 5:
        if input.shape[1] != 1:
            raise ValueError(
                f"`{name}` with 5 dimensions must be (B, 1, D, H, W) with a single channel, got shape "
                f"{tuple(input.shape)}; select the lesion channel first"
            )
        return input.squeeze(1)
    if input.dim() in (3, 4):
        return input
    raise ValueError(
        f"`{name}` must have shape (B, H, W) for 2D or (B, D, H, W) / (B, 1, D, H, W) for 3D, got "
        f"{input.dim()} dimensions {tuple(input.shape)}"
        + ("; a single image (H, W) needs its batch dimension: x[None]" if input.dim() == 2 else "")
    )


def check_connectivity(connectivity, spatial_rank: int) -> int:
    """``connectivity`` checked against the input's number of spatial dimensions (the last ones after
    the batch dimension). A 3-D connectivity on a 3-dimensional tensor is almost always a single
    volume (D, H, W) passed without its batch dimension: the message says so."""
    allowed = _CONNECTIVITIES[spatial_rank]
    if isinstance(connectivity, bool) or not isinstance(connectivity, int) or connectivity not in allowed:
        hint = ""
        if spatial_rank == 2 and connectivity in _CONNECTIVITIES[3]:
            hint = (
                ". The input has 3 dimensions and was read as a batch of 2-D images (B, H, W); a single "
                "3-D volume (D, H, W) has the same shape, so add its batch dimension: volume[None] -> "
                "(1, D, H, W) (for a batch of 2-D images use connectivity 4 or 8)"
            )
        raise ValueError(
            f"`connectivity` must be one of {allowed} for {spatial_rank}D input (neighbour count, as in "
            f"cc3d), got {connectivity!r}{hint}"
        )
    return connectivity


def check_label_dtype(input: torch.Tensor, name: str = "input") -> None:
    if input.dtype not in _LABEL_DTYPES:
        raise TypeError(
            f"`{name}` must be bool, uint8, float16, bfloat16, float32 or float64, got {input.dtype}"
        )


def check_threshold(threshold, *, probability: bool) -> float:
    if isinstance(threshold, torch.Tensor):
        raise TypeError("`threshold` must be a Python float, not a tensor")
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("`threshold` must not be NaN")
    if probability and not (0.0 <= threshold < 1.0):
        raise ValueError(f"`threshold` is a probability and must lie in [0, 1), got {threshold}")
    return threshold


def check_nonneg_int(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int{' or None' if allow_none else ''}, got {value!r}")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}")
    return value


def out_of_range_hint(input: torch.Tensor, lo: float, hi: float, logits_option: str = "from_logits=True") -> str:
    """What to do about values outside [0, 1] given as probabilities, for error messages.

    Whole numbers in [0, hi] with hi > 1 (a label map, a uint8 0..255 or other integer image) are
    not logits: say so, instead of suggesting ``logits_option``. One extra pass, on the error path only.

    Example:
        >>> out_of_range_hint(torch.tensor([0.0, 255.0]), 0.0, 255.0)[:45]
        'the values are whole numbers in [0, 255]: thi'
    """
    if lo >= 0.0 and hi > 1.0 and math.isfinite(hi) and bool((input == torch.round(input)).all()):
        return (
            f"the values are whole numbers in [{lo:g}, {hi:g}]: this looks like a label map or an integer "
            f"(e.g. uint8 0..255) image, not probabilities; pass the network's probabilities, or rescale the "
            f"image to [0, 1] (e.g. divide by {hi:g}); {logits_option} is only for raw network logits"
        )
    return f"pass {logits_option} if these are logits"


def check_values(input: torch.Tensor, *, probabilities: bool, name: str = "input") -> None:
    """Rejects NaN, and values outside [0, 1] when ``probabilities``. One pass (and, on CUDA, one
    host sync); skipped while tracing."""
    if input.numel() == 0 or not input.is_floating_point():
        return
    if input.device.type == "cuda" and not torch.compiler.is_compiling():
        # No host sync on the GPU: a device-side assertion fires (asynchronously) instead.
        lo, hi = torch.aminmax(input.detach())
        ok = (lo >= 0) & (hi <= 1) if probabilities else (lo == lo) & (hi == hi)
        what = "probabilities in [0, 1] (pass from_logits=True for logits)" if probabilities else "no NaN"
        torch._assert_async(ok, f"`{name}` must hold {what}")
        return
    if tracing():
        return
    lo, hi = torch.aminmax(input.detach())
    lo, hi = float(lo), float(hi)
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"`{name}` contains NaN")
    if probabilities and (lo < 0.0 or hi > 1.0):
        raise ValueError(
            f"`{name}` must hold probabilities in [0, 1], got values in [{lo:.6g}, {hi:.6g}]; "
            f"{out_of_range_hint(input.detach(), lo, hi)}"
        )


def check_same_device(*named_tensors) -> None:
    devices = {name: t.device for name, t in named_tensors if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"`{n}` on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {desc}")
