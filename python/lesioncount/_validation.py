"""Argument checks shared by the public functions. Every error names the argument at fault."""
from __future__ import annotations

import contextlib
import math

import torch

#: THE connectivity rule (the one home of these facts in Python; C++: csrc/common/connectivity.h).
#: Valid connectivities (neighbour counts, as in cc3d) per number of spatial dimensions: 2D faces
#: (4) or faces and corners (8); 3D faces (6), faces and edges (18) or all neighbours (26).
CONNECTIVITIES = {2: (4, 8), 3: (6, 18, 26)}
#: Every valid connectivity, 2D first.
ALL_CONNECTIVITIES = CONNECTIVITIES[2] + CONNECTIVITIES[3]
#: The default per number of spatial dimensions: the paper's 18 in 3D, its 2D analogue 8.
DEFAULT_CONNECTIVITY = {2: 8, 3: 18}
_LABEL_DTYPES = (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def vmap_active() -> bool:
    """True inside ``torch.func.vmap`` (also nested in other torch.func transforms)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    vmap = torch._C._functorch.TransformType.Vmap
    return any(level.key() == vmap for level in torch._C._functorch.get_interpreter_stack())


def tracing() -> bool:
    """True under torch.compile tracing, CUDA-graph capture or ``torch.func.vmap``, where
    data-dependent checks (host syncs, ``.item()``) must be skipped. The compiled kernels check
    their inputs themselves while reading them."""
    if torch.compiler.is_compiling() or vmap_active():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def require_static_under_vmap(argument: str, what: str) -> None:
    """Raises when a data-dependent size would be needed inside ``torch.func.vmap``."""
    if vmap_active():
        raise RuntimeError(
            f"lesioncount: under torch.func.vmap {what} depends on the data of each item, which vmap "
            f"cannot read; pass `{argument}` (a static size) to vmap this call"
        )


def plain_values(t: torch.Tensor, what: str) -> torch.Tensor:
    """The values of ``t`` as an ordinary tensor, for code that reads data outside torch (SciPy):
    peels torch.func's gradient-tracking wrappers (the caller uses the values only, no gradient);
    a vmapped tensor cannot be peeled into per-item values, so it raises."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            raise RuntimeError(
                f"lesioncount: {what} is computed by SciPy in the fallback (the compiled library is not "
                f"loaded), which torch.func.vmap cannot batch; build the compiled ops (lesioncount.has_ops()) "
                f"or loop over the items"
            )
        t = functorch.get_unwrapped(t)
    return t


def outside_transforms():
    """A context in which the peeled values of :func:`plain_values` can be read (``.numpy()``):
    torch.func's interpreter stack is set aside (the results are constants to the transforms)."""
    if not torch._C._are_functorch_transforms_active():
        return contextlib.nullcontext()
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    return temporarily_clear_interpreter_stack()


def check_not_meta(t: torch.Tensor, name: str = "input") -> None:
    """Meta tensors have shapes but no values; lesioncount's results depend on the values."""
    if t.device.type == "meta":
        raise ValueError(
            f"`{name}` is a meta tensor: lesioncount needs the values (the candidates and their number "
            f"depend on the data). For shape propagation trace with torch.compile or "
            f"torch._subclasses.FakeTensorMode (with max_lesions for a static number of candidates)"
        )


def canonical_spatial(input: torch.Tensor, name: str = "input") -> torch.Tensor:
    """Returns ``input`` as (B, H, W) (2D) or (B, D, H, W) (3D); drops a singleton channel of
    a (B, 1, D, H, W) tensor."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(input).__name__}")
    check_not_meta(input, name)
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


def default_connectivity(spatial_rank: int) -> int:
    """The default connectivity for ``spatial_rank`` (2 or 3) spatial dimensions
    (:data:`DEFAULT_CONNECTIVITY`: the paper's 18 in 3D, 8 in 2D).

    Example:
        >>> default_connectivity(3), default_connectivity(2)
        (18, 8)
    """
    if spatial_rank not in DEFAULT_CONNECTIVITY:
        raise ValueError(f"`spatial_rank` must be 2 or 3, got {spatial_rank!r}")
    return DEFAULT_CONNECTIVITY[spatial_rank]


def connectivity_text(spatial_rank: int | None = None) -> str:
    """The valid connectivities in words, for messages: ``"4, 8 (2D), 6, 18, 26 (3D)"`` (both ranks)
    or ``"6, 18, 26"`` (one rank).

    Example:
        >>> connectivity_text(), connectivity_text(3)
        ('4, 8 (2D), 6, 18, 26 (3D)', '6, 18, 26')
    """
    if spatial_rank is not None:
        return ", ".join(map(str, CONNECTIVITIES[spatial_rank]))
    return ", ".join(f"{connectivity_text(r)} ({r}D)" for r in sorted(CONNECTIVITIES))


def check_connectivity(connectivity, spatial_rank: int) -> int:
    """``connectivity`` checked against the input's number of spatial dimensions (the last ones after
    the batch dimension). A 3-D connectivity on a 3-dimensional tensor is almost always a single
    volume (D, H, W) passed without its batch dimension: the message says so."""
    allowed = CONNECTIVITIES[spatial_rank]
    if isinstance(connectivity, bool) or not isinstance(connectivity, int) or connectivity not in allowed:
        hint = ""
        if spatial_rank == 2 and connectivity in CONNECTIVITIES[3]:
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
    if threshold != threshold:  # NaN; not math.isnan, which torch.compile(dynamic=True) cannot trace
        raise ValueError("`threshold` must not be NaN")
    if probability and not (0.0 <= threshold < 1.0):
        raise ValueError(f"`threshold` is a probability and must lie in [0, 1), got {threshold}")
    return threshold


# Largest number of count bins / candidate columns a caller may ask for: (B, M+1) and (B, K)
# outputs are allocated (2**31 float64 bins are 16 GiB per item), so a larger request is an error
# naming the argument rather than an allocation failure or a dispatcher overflow (>= 2**63).
MAX_SIZE_ARGUMENT = 2**31 - 2


def check_nonneg_int(value, name: str, allow_none: bool = False, maximum: int | None = None):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int{' or None' if allow_none else ''}, got {value!r}")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    """Rejects truthy stand-ins (``"no"`` is truthy): flags must be real bools."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool (True or False), got {value!r}")
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


def check_count_options(threshold, connectivity, min_size, max_count, max_lesions, spatial_rank=None):
    """Validates the shared count options; returns them normalised (connectivity may stay None)."""
    threshold = check_threshold(threshold, probability=True)
    check_nonneg_int(min_size, "min_size")
    if isinstance(max_count, bool) or not isinstance(max_count, int) or not 1 <= max_count <= MAX_SIZE_ARGUMENT:
        raise ValueError(f"`max_count` must be an int in [1, {MAX_SIZE_ARGUMENT}] (bins 0..M-1 and 'M or more'), "
                         f"got {max_count!r}")
    check_nonneg_int(max_lesions, "max_lesions", allow_none=True, maximum=MAX_SIZE_ARGUMENT)
    if connectivity is not None:
        if isinstance(connectivity, bool) or not isinstance(connectivity, int) or connectivity not in ALL_CONNECTIVITIES:
            raise ValueError(f"`connectivity` must be None (auto: {DEFAULT_CONNECTIVITY[3]} in 3D, "
                             f"{DEFAULT_CONNECTIVITY[2]} in 2D) or one of {connectivity_text()}, got {connectivity!r}")
        if spatial_rank is not None:
            check_connectivity(connectivity, spatial_rank)
    return threshold, connectivity, min_size, max_count, max_lesions
