"""Loads the compiled operator libraries and attaches fake (meta) kernels and autograd to their ops.

The libraries are plain shared objects on the LibTorch stable ABI (one build loads on every torch from
2.10 on): ``lesioncount/_C.so`` defines ``torch.ops.lesioncount.*`` and registers the CPU kernels;
``lesioncount/_C_cuda.so``, present in builds with CUDA kernels, registers the CUDA kernels and is
loaded only under a CUDA build of torch. When ``_C`` cannot be loaded (or ``LESIONCOUNT_DISABLE_OPS=1``
is set) the public functions fall back to :mod:`lesioncount._reference` and :func:`has_ops` returns
``False``; :func:`has_cuda_ops` and :func:`build_info` say what the CUDA side has and why.
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
_CUDA_LOAD_ERROR: str | None = None


def _built_with(name: str) -> str:
    try:
        from . import _build_info
    except ImportError:
        return ""
    return str(getattr(_build_info, name, ""))


def _load_cuda_library() -> bool:
    """Loads ``lesioncount/_C_cuda.so`` (the CUDA kernels) when torch is a CUDA build."""
    global _CUDA_LOAD_ERROR
    if not HAS_OPS:
        _CUDA_LOAD_ERROR = f"the compiled library is not loaded ({_LOAD_ERROR})"
        return False
    if torch.version.cuda is None:
        _CUDA_LOAD_ERROR = "this torch is a CPU-only build"
        return False
    spec = importlib.util.find_spec("lesioncount._C_cuda")
    if spec is None or spec.origin is None:
        _CUDA_LOAD_ERROR = (f"torch has CUDA {torch.version.cuda}, but this build of lesioncount has no CUDA kernels "
                            "(built against a CPU-only torch or with LESIONCOUNT_CUDA=OFF): install the wheel, or "
                            "rebuild with LESIONCOUNT_CUDA=ON where nvcc is installed")
        return False
    built = _built_with("CUDA_VERSION")
    if built and built.split(".")[0] != torch.version.cuda.split(".")[0]:
        # a second CUDA runtime of another major version in the process is not worth the risk
        _CUDA_LOAD_ERROR = (f"the CUDA kernels were built with CUDA {built}, this torch uses CUDA {torch.version.cuda}: "
                            f"use a CUDA {built.split('.')[0]} build of torch, or rebuild lesioncount from source")
        return False
    try:
        torch.ops.load_library(spec.origin)
        return True
    except (OSError, RuntimeError) as exc:  # e.g. the CUDA runtime the kernels were built with is missing
        _CUDA_LOAD_ERROR = (f"could not load the CUDA kernels ({exc}); they were built with CUDA {built or '?'}, "
                            f"this torch uses CUDA {torch.version.cuda}")
        return False


HAS_CUDA_OPS = _load_cuda_library()


def has_ops() -> bool:
    """Whether the compiled C++/CUDA ops are loaded (otherwise the pure torch/SciPy fallback runs)."""
    return HAS_OPS


def has_cuda_ops() -> bool:
    """Whether the compiled CUDA kernels are loaded, so that CUDA tensors run on the GPU kernels.

    False under a CPU-only torch, for a build without CUDA kernels, or when the kernels could not be
    loaded; :func:`build_info` gives the reason (``"cuda_ops_error"``). Example::

        >>> import lesioncount
        >>> lesioncount.has_cuda_ops() in (True, False)
        True
    """
    return HAS_CUDA_OPS


def build_info() -> dict:
    """What the loaded lesioncount libraries are and how they were built.

    Returns a dict with ``ops`` / ``cuda_ops`` (bool: CPU and CUDA kernels loaded), ``ops_error`` /
    ``cuda_ops_error`` (why not, else None), ``built_against_torch`` (the torch whose headers compiled
    the libraries), ``stable_abi_target`` (the oldest torch they load on), ``cuda_version`` and
    ``cuda_architectures`` of the CUDA kernels ("" when built without them) and ``torch`` (the torch
    running now). Example::

        >>> import lesioncount
        >>> info = lesioncount.build_info()
        >>> sorted(info)[:3]
        ['built_against_torch', 'cuda_architectures', 'cuda_ops']
    """
    return {
        "ops": HAS_OPS,
        "ops_error": None if HAS_OPS else _LOAD_ERROR,
        "cuda_ops": HAS_CUDA_OPS,
        "cuda_ops_error": None if HAS_CUDA_OPS else _CUDA_LOAD_ERROR,
        "built_against_torch": _built_with("TORCH_VERSION"),
        "stable_abi_target": _built_with("STABLE_ABI_TARGET"),
        "cuda_version": _built_with("CUDA_VERSION"),
        "cuda_architectures": _built_with("CUDA_ARCHITECTURES"),
        "torch": torch.__version__,
    }


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
# Per device type: whether the compiled library has its kernels there. Every op has a CPU and a
# CUDA kernel (the CUDA ones only in a CUDA build), so this is "library loaded, and built for this
# device"; looked up once at import so that torch.compile traces a plain dict lookup.
_KERNELS = {
    device_type: HAS_OPS
    and all(torch._C._dispatch_has_kernel_for_dispatch_key(f"lesioncount::{op}", key) for op in _OP_NAMES)
    for device_type, key in _DISPATCH_KEYS.items()
}


def compiled(device: torch.device) -> bool:
    """Whether the compiled kernels run on ``device`` (else the pure torch/SciPy fallback does)."""
    return _KERNELS.get(device.type, False)


def has_kernel(op_name: str, device: torch.device) -> bool:
    """Whether the compiled library has a kernel of ``lesioncount::op_name`` for ``device``.

    Every op has a kernel on each device the library was built for, so this is :func:`compiled`
    (``has_kernel("label", torch.device("cuda"))``: were the CUDA kernels compiled).
    """
    return op_name in _OP_NAMES and compiled(device)


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
        # One gradient per region at its argmax voxel.
        return _lib._region_max_backward(grad_values, argmax, input_shape)

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


# ---- eager entry points: forward-mode AD and torch.func ----
#
# torch.library.register_autograd gives the ops reverse mode only: under forward-mode AD
# (torch.autograd.forward_ad, torch.func.jvp / jacfwd) an op with no forward formula silently
# yields zero tangents, and torch.func.grad / jacrev reject it. So eager calls go through the
# autograd.Functions below, which add the forward formulas (jvp) and vmap rules (through the
# register_vmap rules of the ops: the vmapped dimension is folded into the batch dimension, which
# every op already loops over). Under torch.compile (which cannot trace a custom jvp) the ops are
# called directly and their registered autograd applies; both routes call the same kernels.
if HAS_OPS:

    def _fold_batch(info, in_dims, args):
        """Moves each tensor's vmapped dimension into its batch dimension (dim 0)."""
        size = info.batch_size
        folded = []
        for arg, dim in zip(args, in_dims):
            if isinstance(arg, torch.Tensor):
                arg = arg.movedim(dim, 0) if dim is not None else arg.unsqueeze(0).expand(size, *arg.shape)
                arg = arg.reshape(size * arg.shape[1], *arg.shape[2:])
            folded.append(arg)
        return folded

    def _unfold(size, batch, *outputs):
        return tuple(o.reshape(size, batch, *o.shape[1:]) for o in outputs)

    def _batch_of(in_dims, args):
        for arg, dim in zip(args, in_dims):
            if isinstance(arg, torch.Tensor):
                return arg.shape[dim + 1] if dim is not None else arg.shape[0]
        raise AssertionError("no tensor argument")

    def _vmap_rule(op, num_tensor_outputs):
        def rule(info, in_dims, *args):
            batch = _batch_of(in_dims, args)
            out = op(*_fold_batch(info, in_dims, args))
            outs = out if isinstance(out, tuple) else (out,)
            unfolded = _unfold(info.batch_size, batch, *outs)
            if num_tensor_outputs == 1:
                return unfolded[0], 0
            return unfolded, (0,) * num_tensor_outputs
        return rule

    for _name, _outputs in (("label", 2), ("region_max", 2), ("_region_topk", 3), ("poisson_binomial", 1),
                            ("_poisson_binomial_backward", 1)):
        torch.library.register_vmap(f"lesioncount::{_name}", _vmap_rule(getattr(_lib, _name), _outputs))

    def _region_max_backward_vmap(info, in_dims, grad_values, argmax, input_shape):
        batch = input_shape[0]
        grad_values, argmax = _fold_batch(info, in_dims[:2], (grad_values, argmax))
        out = _lib._region_max_backward(grad_values, argmax, [info.batch_size * batch, *input_shape[1:]])
        return out.reshape(info.batch_size, *input_shape), 0

    torch.library.register_vmap("lesioncount::_region_max_backward", _region_max_backward_vmap)

    def _gather_at_argmax(tangent_input, argmax):
        """Forward-mode derivative of a region maximum: the input's tangent at the argmax voxel."""
        flat = tangent_input.reshape(argmax.shape[0], -1)
        if flat.shape[1] == 0:
            return tangent_input.new_zeros(argmax.shape)
        gathered = flat.gather(1, argmax.clamp_min(0))
        return torch.where(argmax >= 0, gathered, torch.zeros((), dtype=gathered.dtype, device=gathered.device))

    class _PoissonBinomialBackwardFunction(torch.autograd.Function):
        """The backward kernel as a Function, so that torch.func transforms (which differentiate
        the backward pass itself) get a clear error for a second derivative instead of a
        torch-internal one."""

        generate_vmap_rule = True

        @staticmethod
        def forward(grad, probs, max_count, log_space, from_logits):
            return _lib._poisson_binomial_backward(grad, probs, max_count, log_space, from_logits)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, *grads):
            _pb_double_backward(ctx, *grads)

        @staticmethod
        def jvp(ctx, *tangents):
            _pb_double_backward(ctx, *tangents)

    class _RegionMaxBackwardFunction(torch.autograd.Function):
        """The sparse scatter of region_max's backward as a Function: linear in ``grad_values``, so
        its derivatives are the same scatter (forward mode) and a gather (reverse mode)."""

        generate_vmap_rule = True

        @staticmethod
        def forward(grad_values, argmax, input_shape):
            return _sparse_region_grad(grad_values, argmax, input_shape)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _region_max_backward_setup(ctx, inputs, output)
            ctx.save_for_forward(inputs[1])
            ctx.input_shape = inputs[2]

        @staticmethod
        def backward(ctx, grad_grad_input):
            return _region_max_double_backward(ctx, grad_grad_input)

        @staticmethod
        def jvp(ctx, tangent_grad_values, *_):
            (argmax,) = ctx.saved_tensors
            return _sparse_region_grad(tangent_grad_values, argmax, ctx.input_shape)

    def _eager_region_grad(ctx, grad_values):
        (argmax,) = ctx.saved_tensors
        return _RegionMaxBackwardFunction.apply(grad_values, argmax, list(ctx.input_shape)), None, None

    class _RegionValuesFunction(torch.autograd.Function):
        """Shared by region_max and _region_topk: ``(values, argmax, *indices)``, where each value's
        derivative is that of its argmax voxel (reverse: a scatter there; forward: a gather)."""

        generate_vmap_rule = True

        @staticmethod
        def setup_context(ctx, inputs, output):
            argmax = output[1]
            ctx.save_for_backward(argmax)
            ctx.save_for_forward(argmax)
            ctx.input_shape = inputs[0].shape
            ctx.num_index_outputs = len(output) - 1
            ctx.mark_non_differentiable(*output[1:])

        @staticmethod
        def backward(ctx, grad_values, *_grad_indices):
            return _eager_region_grad(ctx, grad_values)

        @staticmethod
        def jvp(ctx, tangent_input, *_):
            (argmax,) = ctx.saved_tensors
            return (_gather_at_argmax(tangent_input, argmax),) + (None,) * ctx.num_index_outputs

    class _RegionMaxFunction(_RegionValuesFunction):
        @staticmethod
        def forward(input, labels, num_regions):
            return _lib.region_max(input, labels, num_regions)

    class _RegionTopkFunction(_RegionValuesFunction):
        @staticmethod
        def forward(input, labels, k):
            return _lib._region_topk(input, labels, k)

    class _PoissonBinomialFunction(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(probs, max_count, log_space, from_logits):
            return _lib.poisson_binomial(probs, max_count, log_space, from_logits)

        @staticmethod
        def setup_context(ctx, inputs, output):
            _pb_setup(ctx, inputs, output)
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def backward(ctx, grad):
            (probs,) = ctx.saved_tensors
            grad_probs = _PoissonBinomialBackwardFunction.apply(grad, probs, ctx.max_count, ctx.log_space,
                                                                ctx.from_logits)
            return grad_probs, None, None, None

        @staticmethod
        def jvp(ctx, tangent_probs, *_):
            from ._reference import poisson_binomial_jvp

            (probs,) = ctx.saved_tensors
            return poisson_binomial_jvp(probs, tangent_probs, ctx.max_count, ctx.log_space, ctx.from_logits)


def region_max_op(input, labels, num_regions: int):
    """``lesioncount::region_max`` with reverse and forward-mode AD (eager) or as traced by torch.compile."""
    if torch.compiler.is_compiling():
        return _lib.region_max(input, labels, num_regions)
    return _RegionMaxFunction.apply(input, labels, num_regions)


def region_topk_op(input, labels, k: int):
    """``lesioncount::_region_topk`` with reverse and forward-mode AD (eager) or as traced by torch.compile."""
    if torch.compiler.is_compiling():
        return _lib._region_topk(input, labels, k)
    return _RegionTopkFunction.apply(input, labels, k)


def poisson_binomial_op(probs, max_count: int, log_space: bool, from_logits: bool):
    """``lesioncount::poisson_binomial`` with reverse and forward-mode AD (eager) or as traced by torch.compile."""
    if torch.compiler.is_compiling():
        return _lib.poisson_binomial(probs, max_count, log_space, from_logits)
    return _PoissonBinomialFunction.apply(probs, max_count, log_space, from_logits)
