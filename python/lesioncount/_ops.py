"""Loads the compiled operator library and attaches fake (meta) kernels and autograd to its ops.

The library is a plain shared object (``lesioncount/_C.so``) registering ``torch.ops.lesioncount.*``
with ``TORCH_LIBRARY``. When it cannot be loaded (or ``LESIONCOUNT_DISABLE_OPS=1`` is set) the public
functions fall back to :mod:`lesioncount._reference` and :func:`has_ops` returns ``False``.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

_LOAD_ERROR: str | None = None
_FALLBACK_WARNED = False


def _load_library() -> bool:
    global _LOAD_ERROR
    if os.environ.get("LESIONCOUNT_DISABLE_OPS", "") not in ("", "0"):
        _LOAD_ERROR = "disabled by LESIONCOUNT_DISABLE_OPS"
        return False
    try:
        spec = importlib.util.find_spec("lesioncount._C")
        if spec is None or spec.origin is None:
            _LOAD_ERROR = "compiled library lesioncount/_C.so not found (package built without it?)"
            return False
        torch.ops.load_library(spec.origin)
        return True
    except (OSError, RuntimeError, ImportError) as exc:  # e.g. built against another torch
        _LOAD_ERROR = f"could not load the compiled library: {exc}"
        return False


HAS_OPS = _load_library()


def has_ops() -> bool:
    """Whether the compiled C++/CUDA ops are loaded (otherwise the pure torch/SciPy fallback runs)."""
    return HAS_OPS


def warn_fallback() -> None:
    """Warns once that the slow reference implementation is used."""
    global _FALLBACK_WARNED
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED = True
        warnings.warn(
            f"lesioncount: using the pure torch/SciPy fallback ({_LOAD_ERROR}); results are the same "
            "but much slower",
            RuntimeWarning,
            stacklevel=3,
        )


_OP_NAMES = (
    "label", "region_max", "_region_topk", "_region_max_backward", "poisson_binomial",
    "_poisson_binomial_backward",
)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# Looked up once at import so that torch.compile traces a plain dict lookup.
_KERNELS = {
    (op, device_type): HAS_OPS
    and torch._C._dispatch_has_kernel_for_dispatch_key(f"lesioncount::{op}", key)
    for op in _OP_NAMES
    for device_type, key in _DISPATCH_KEYS.items()
}


def has_kernel(op_name: str, device: torch.device) -> bool:
    """Whether the compiled library has a kernel of ``lesioncount::op_name`` for ``device``."""
    return _KERNELS.get((op_name, device.type), False)


def max_components(spatial_shape, connectivity: int) -> int:
    """An upper bound on the number of components a volume of ``spatial_shape`` can hold.

    Face connectivity (4 in 2D, 6 in 3D) allows a checkerboard: ceil(N / 2). Full connectivity (8,
    26) needs a free voxel between components along every axis: prod(ceil(n / 2)). 18-connectivity
    uses the face bound, which is safe because it has more neighbours than 6.
    """
    n = 1
    for s in spatial_shape:
        n *= int(s)
    if connectivity in (8, 26):
        b = 1
        for s in spatial_shape:
            b *= (int(s) + 1) // 2
        return b
    return (n + 1) // 2


if HAS_OPS:
    _lib = torch.ops.lesioncount

    @torch.library.register_fake("lesioncount::label")
    def _label_fake(input, threshold, connectivity, min_size, check_probabilities=False):
        item = 1
        for s in input.shape[1:]:
            item = item * s
        dtype = torch.int64 if item >= 2**31 else torch.int32
        labels = torch.empty(input.shape, dtype=dtype, device=input.device)
        num = torch.empty((input.shape[0],), dtype=torch.int64, device=input.device)
        return labels, num

    @torch.library.register_fake("lesioncount::region_max")
    def _region_max_fake(input, labels, num_regions):
        torch._check(labels.shape == input.shape, lambda: "region_max: `labels` must have the shape of `input`")
        values = input.new_empty((input.shape[0], num_regions))
        argmax = input.new_empty((input.shape[0], num_regions), dtype=torch.int64)
        return values, argmax

    @torch.library.register_fake("lesioncount::_region_topk")
    def _region_topk_fake(input, labels, k):
        torch._check(labels.shape == input.shape, lambda: "_region_topk: `labels` must have the shape of `input`")
        values = input.new_empty((input.shape[0], k))
        argmax = input.new_empty((input.shape[0], k), dtype=torch.int64)
        ids = input.new_empty((input.shape[0], k), dtype=torch.int64)
        return values, argmax, ids

    @torch.library.register_fake("lesioncount::_region_max_backward")
    def _region_max_backward_fake(grad_values, argmax, input_shape):
        return grad_values.new_empty(input_shape)

    @torch.library.register_fake("lesioncount::poisson_binomial")
    def _poisson_binomial_fake(probs, max_count, log_space, from_logits):
        torch._check(probs.dim() == 2, lambda: "poisson_binomial: `probs` must have shape (B, K)")
        return probs.new_empty((probs.shape[0], max_count + 1))

    @torch.library.register_fake("lesioncount::_poisson_binomial_backward")
    def _poisson_binomial_backward_fake(grad, probs, max_count, log_space, from_logits):
        return torch.empty_like(probs, memory_format=torch.contiguous_format)

    # ---- autograd ----
    def _region_max_setup(ctx, inputs, output):
        input, _labels, _num_regions = inputs
        _values, argmax = output
        ctx.save_for_backward(argmax)
        ctx.input_shape = input.shape
        ctx.mark_non_differentiable(argmax)

    def _sparse_region_grad(grad_values, argmax, input_shape):
        # One gradient per region at its argmax voxel: the C++ op where the device has it.
        if has_kernel("_region_max_backward", grad_values.device):
            return _lib._region_max_backward(grad_values, argmax, input_shape)
        return scatter_region_grad(grad_values, argmax, input_shape)

    def _region_max_backward(ctx, grad_values, _grad_argmax):
        (argmax,) = ctx.saved_tensors
        return _sparse_region_grad(grad_values, argmax, ctx.input_shape), None, None

    torch.library.register_autograd(
        "lesioncount::region_max", _region_max_backward, setup_context=_region_max_setup
    )

    def _region_topk_setup(ctx, inputs, output):
        input, _labels, _k = inputs
        _values, argmax, ids = output
        ctx.save_for_backward(argmax)
        ctx.input_shape = input.shape
        ctx.mark_non_differentiable(argmax, ids)

    def _region_topk_backward(ctx, grad_values, _grad_argmax, _grad_ids):
        (argmax,) = ctx.saved_tensors
        return _sparse_region_grad(grad_values, argmax, ctx.input_shape), None, None

    torch.library.register_autograd(
        "lesioncount::_region_topk", _region_topk_backward, setup_context=_region_topk_setup
    )

    def _pb_setup(ctx, inputs, output):
        probs, max_count, log_space, from_logits = inputs
        ctx.save_for_backward(probs)
        ctx.max_count = max_count
        ctx.log_space = log_space
        ctx.from_logits = from_logits

    def _pb_backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        grad_probs = _lib._poisson_binomial_backward(
            grad, probs, ctx.max_count, ctx.log_space, ctx.from_logits
        )
        return grad_probs, None, None, None

    torch.library.register_autograd(
        "lesioncount::poisson_binomial", _pb_backward, setup_context=_pb_setup
    )


def scatter_region_grad(grad_values: torch.Tensor, argmax: torch.Tensor, input_shape) -> torch.Tensor:
    """Sparse backward of region_max: one gradient per region, placed at its argmax voxel.

    ``grad_values`` and ``argmax`` are (B, R); absent regions (argmax -1) contribute nothing.
    Returns a tensor of ``input_shape`` (B, ...).
    """
    batch = argmax.shape[0]
    item = 1
    for s in input_shape[1:]:
        item = item * s
    grad_flat = grad_values.new_zeros((batch, item))
    present = argmax >= 0
    grad_flat.scatter_add_(1, argmax.clamp_min(0), torch.where(present, grad_values, 0))
    return grad_flat.reshape(input_shape)


if HAS_OPS:

    def _pb_double_backward(ctx, *grads):
        raise NotImplementedError(
            "lesioncount.poisson_binomial supports first-order gradients only (no double backward); "
            "use lesioncount._reference.poisson_binomial for higher-order derivatives"
        )

    def _pb_backward_setup(ctx, inputs, output):
        pass

    torch.library.register_autograd(
        "lesioncount::_poisson_binomial_backward", _pb_double_backward, setup_context=_pb_backward_setup
    )

    def _region_max_backward_setup(ctx, inputs, output):
        _grad_values, argmax, _shape = inputs
        ctx.save_for_backward(argmax)

    def _region_max_double_backward(ctx, grad_grad_input):
        # _region_max_backward is linear in grad_values: its adjoint gathers at the argmax voxels.
        (argmax,) = ctx.saved_tensors
        flat = grad_grad_input.reshape(argmax.shape[0], -1)
        gathered = flat.gather(1, argmax.clamp_min(0))
        return torch.where(argmax >= 0, gathered, 0), None, None

    torch.library.register_autograd(
        "lesioncount::_region_max_backward", _region_max_double_backward,
        setup_context=_region_max_backward_setup,
    )
