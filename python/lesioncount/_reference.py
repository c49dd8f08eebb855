"""Pure torch / SciPy reference implementations of every lesioncount op.

These are used for two things:

* the fallback when the compiled library cannot be loaded (or is disabled with
  ``LESIONCOUNT_DISABLE_OPS=1``), and
* the oracle the test-suite compares the compiled ops against.

They favour clarity and exactness over speed: labelling goes through ``scipy.ndimage.label``
item by item (on the CPU), ``region_max`` is a couple of vectorised ``scatter_reduce`` calls,
and the Poisson-binomial DP loops over candidates in float64 (or in log space) with ordinary
torch ops, so autograd differentiates it without any custom backward.

Inputs are expected in canonical form (see ``docs/API.md``): rank 3 means 2D ``(B, H, W)``,
rank 4 means 3D ``(B, D, H, W)``. Argument validation here is deliberately light; the public
wrappers validate fully.
"""

from __future__ import annotations

import itertools
import math
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from ._validation import CONNECTIVITIES

__all__ = [
    "CONNECTIVITY_TO_RANK",
    "label",
    "region_max",
    "region_max_backward",
    "region_topk",
    "poisson_binomial",
    "poisson_binomial_jvp",
    "poisson_binomial_bruteforce",
]

# neighbour count -> (spatial rank, scipy generate_binary_structure connectivity)
# connectivity -> (spatial rank, SciPy ``generate_binary_structure`` connectivity), derived from the
# one rule (_validation.CONNECTIVITIES): the i-th valid connectivity of a rank is SciPy's i + 1
# (4 -> (2, 1), 8 -> (2, 2), 6 -> (3, 1), 18 -> (3, 2), 26 -> (3, 3)).
CONNECTIVITY_TO_RANK = {c: (rank, i + 1) for rank, valid in CONNECTIVITIES.items() for i, c in enumerate(valid)}

_LABEL_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)


def _structure(spatial_rank: int, connectivity: int) -> np.ndarray:
    import scipy.ndimage as ndi

    valid = {c: r for c, (rank, r) in CONNECTIVITY_TO_RANK.items() if rank == spatial_rank}
    if connectivity not in valid:
        raise ValueError(
            f"connectivity={connectivity} is not valid for {spatial_rank}D input; "
            f"expected one of {sorted(valid)}"
        )
    return ndi.generate_binary_structure(spatial_rank, valid[connectivity])


# --------------------------------------------------------------------------------------------
# label
# --------------------------------------------------------------------------------------------


def label(input: Tensor, threshold: float, connectivity: int, min_size: int) -> Tuple[Tensor, Tensor]:
    """Connected-component labelling of ``input > threshold``, per batch item.

    Returns ``(labels, num)``: labels int32 (int64 if an item has >= 2**31 voxels) with the
    same shape as ``input``, numbered like ``scipy.ndimage.label`` (raster order of the first
    voxel), and ``num`` int64 ``(B,)``. Components with fewer than ``min_size`` voxels are
    removed and the rest renumbered consecutively in the same order.
    """
    import scipy.ndimage as ndi

    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() not in (3, 4):
        raise ValueError(
            f"input must have rank 3 (B, H, W) or 4 (B, D, H, W), got shape {tuple(input.shape)}"
        )
    if input.dtype not in _LABEL_DTYPES:
        raise ValueError(f"input dtype {input.dtype} is not supported by label")
    if int(min_size) < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    spatial_rank = input.dim() - 1
    structure = _structure(spatial_rank, int(connectivity))

    device = input.device
    B = input.shape[0]
    spatial = tuple(input.shape[1:])
    nvox = math.prod(spatial)
    out_np_dtype = np.int64 if nvox >= 2**31 else np.int32
    out_torch_dtype = torch.int64 if nvox >= 2**31 else torch.int32

    if input.is_floating_point() and B > 0 and bool(torch.isnan(input).any()):
        raise ValueError("input contains NaN")

    fg = (input.detach().to(torch.float64) > float(threshold)).cpu().numpy()
    labels_np = np.zeros((B,) + spatial, dtype=out_np_dtype)
    num_np = np.zeros((B,), dtype=np.int64)
    for b in range(B):
        out = np.zeros(spatial, dtype=out_np_dtype)
        n = ndi.label(fg[b], structure=structure, output=out)
        n = int(n)
        if min_size > 0 and n > 0:
            sizes = np.bincount(out.ravel(), minlength=n + 1)
            keep = sizes >= min_size
            keep[0] = False
            remap = np.zeros(n + 1, dtype=out_np_dtype)
            remap[keep] = np.arange(1, int(keep.sum()) + 1, dtype=out_np_dtype)
            out = remap[out]
            n = int(keep.sum())
        labels_np[b] = out
        num_np[b] = n

    labels = torch.from_numpy(labels_np).to(device=device, dtype=out_torch_dtype)
    num = torch.from_numpy(num_np).to(device)
    return labels, num


# --------------------------------------------------------------------------------------------
# region_max
# --------------------------------------------------------------------------------------------


def _region_argmax(input: Tensor, labels: Tensor, num_regions: int) -> Tuple[Tensor, Tensor]:
    """argmax (B, R) int64 (-1 where absent) and the presence mask (B, R) bool. No autograd."""
    B = input.shape[0]
    R = int(num_regions)
    x = input.detach().reshape(B, math.prod(input.shape[1:]))
    lab = labels.reshape(B, math.prod(labels.shape[1:])).to(torch.int64)
    N = x.shape[1]
    if B == 0 or R == 0 or N == 0:
        return (
            torch.full((B, R), -1, dtype=torch.int64, device=input.device),
            torch.zeros((B, R), dtype=torch.bool, device=input.device),
        )
    if bool((lab < 0).any()) or bool((lab > R).any()):
        raise ValueError(f"labels must lie in [0, num_regions={R}]")
    if x.is_floating_point() and bool(torch.isnan(x[lab > 0]).any()):
        raise ValueError("input contains NaN inside a labelled region")
    # one bucket per (item, label); label 0 (background) is bucket 0 of each item and dropped
    seg = lab + (R + 1) * torch.arange(B, device=lab.device, dtype=torch.int64).unsqueeze(1)
    seg = seg.reshape(-1)
    xf = x.reshape(-1)
    nseg = B * (R + 1)
    count = torch.zeros(nseg, dtype=torch.int64, device=x.device).scatter_add_(
        0, seg, torch.ones_like(seg)
    )
    vmax = torch.zeros(nseg, dtype=x.dtype, device=x.device).scatter_reduce(
        0, seg, xf, reduce="amax", include_self=False
    )
    flat = torch.arange(N, device=x.device, dtype=torch.int64).repeat(B)
    cand = torch.where(xf == vmax[seg], flat, torch.full_like(flat, N))
    amin = torch.full((nseg,), N, dtype=torch.int64, device=x.device).scatter_reduce(
        0, seg, cand, reduce="amin", include_self=True
    )
    present = (count > 0).reshape(B, R + 1)[:, 1:]
    argmax = amin.reshape(B, R + 1)[:, 1:]
    argmax = torch.where(present, argmax, torch.full_like(argmax, -1))
    return argmax.contiguous(), present.contiguous()


def region_max(input: Tensor, labels: Tensor, num_regions: int) -> Tuple[Tensor, Tensor]:
    """Per-item, per-label max of ``input`` and the smallest flat index reaching it.

    ``values`` (B, num_regions) in ``input.dtype`` and ``argmax`` (B, num_regions) int64; column
    ``r-1`` is label ``r``; absent labels give value 0 and argmax -1. ``values`` is differentiable
    in ``input`` through ordinary autograd (a gather at ``argmax``), so the gradient is sparse:
    exactly one voxel per present region.
    """
    if input.shape != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal input shape {tuple(input.shape)}"
        )
    if int(num_regions) < 0:
        raise ValueError(f"num_regions must be >= 0, got {num_regions}")
    B = input.shape[0]
    R = int(num_regions)
    argmax, present = _region_argmax(input, labels, R)
    x = input.reshape(B, math.prod(input.shape[1:]))
    if x.shape[1] == 0 or R == 0:
        return torch.zeros((B, R), dtype=input.dtype, device=input.device), argmax
    gathered = x.gather(1, argmax.clamp(min=0))
    values = torch.where(present, gathered, torch.zeros_like(gathered))
    return values, argmax


def region_max_backward(grad_values: Tensor, argmax: Tensor, input_shape) -> Tensor:
    """Sparse backward of region_max: scatter ``grad_values`` to the argmax voxel of each region.

    Absent regions (argmax -1) contribute nothing. Returns a tensor of ``input_shape``.
    """
    input_shape = tuple(input_shape)
    B = input_shape[0]
    grad = torch.zeros((B, math.prod(input_shape[1:])), dtype=grad_values.dtype, device=grad_values.device)
    if argmax.numel() == 0 or grad.shape[1] == 0:
        return grad.reshape(input_shape)
    present = argmax >= 0
    idx = argmax.clamp(min=0)
    src = torch.where(present, grad_values, torch.zeros_like(grad_values))
    grad.scatter_add_(1, idx, src)
    return grad.reshape(input_shape)


def region_topk(input: Tensor, labels: Tensor, k: int, num_regions: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The ``k`` regions with the largest maxima per item, as the ``_region_topk`` op: ties to the
    smaller label, in label order, padded with value 0, argmax -1 and id 0.

    ``num_regions`` bounds the labels (a data-free bound keeps the shapes static): region_max over
    all of them, then a stable descending sort (torch.topk would pick among equal maxima
    arbitrarily). ``values`` is differentiable in ``input`` (a gather at ``argmax``).
    """
    k = int(k)
    values_all, argmax_all = region_max(input, labels, num_regions)
    present_all = argmax_all >= 0
    fill = torch.full((), -math.inf, dtype=values_all.dtype, device=values_all.device)
    key = torch.where(present_all, values_all.detach(), fill)
    kept = min(k, int(num_regions))
    _, order = torch.sort(key, dim=1, descending=True, stable=True)
    top, _ = torch.sort(order[:, :kept], dim=1)  # label order among the kept regions
    values = torch.gather(values_all, 1, top)
    argmax = torch.gather(argmax_all, 1, top)
    ids = torch.where(argmax >= 0, top + 1, 0)
    values = torch.where(argmax >= 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if kept < k:  # fewer possible regions than columns asked for: pad
        pad = k - kept
        values = torch.nn.functional.pad(values, (0, pad))
        argmax = torch.nn.functional.pad(argmax, (0, pad), value=-1)
        ids = torch.nn.functional.pad(ids, (0, pad))
    return values, argmax, ids


# --------------------------------------------------------------------------------------------
# poisson_binomial
# --------------------------------------------------------------------------------------------


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """log(exp(a) + exp(b)) with finite gradients when both are -inf (gradient 0 there)."""
    m = torch.maximum(a, b).detach()
    finite = torch.isfinite(m)
    m_safe = torch.where(finite, m, torch.zeros_like(m))
    s = torch.exp(a - m_safe) + torch.exp(b - m_safe)
    pos = s > 0
    s_safe = torch.where(pos, s, torch.ones_like(s))
    return torch.where(pos, m_safe + torch.log(s_safe), torch.full_like(s, -math.inf))


def _safe_log(x: Tensor) -> Tensor:
    """log(x) for x >= 0, -inf at 0 with a zero (not NaN) gradient there."""
    pos = x > 0
    return torch.where(pos, torch.log(torch.where(pos, x, torch.ones_like(x))), torch.full_like(x, -math.inf))


def _safe_log1m(x: Tensor) -> Tensor:
    """log(1 - x) for x <= 1, -inf at 1 with a zero (not NaN) gradient there."""
    lt1 = x < 1
    return torch.where(
        lt1, torch.log1p(-torch.where(lt1, x, torch.zeros_like(x))), torch.full_like(x, -math.inf)
    )


def _log_dp_step(lpmf: Tensor, lp: Tensor, lq: Tensor, M: int) -> Tensor:
    """One candidate of the log-space DP: L'(c) = log(P(c) q + P(c-1) p), tail L'(M) = log(P(M) + P(M-1) p)."""
    B = lpmf.shape[0]
    neg_inf = torch.full((B, 1), -math.inf, dtype=lpmf.dtype, device=lpmf.device)
    zeros = torch.zeros((B, 1), dtype=lpmf.dtype, device=lpmf.device)
    stay = torch.cat([lq.expand(B, M), zeros], 1)
    prev = torch.cat([neg_inf, lpmf[:, :M]], 1)
    return _logaddexp(lpmf + stay, prev + lp)


def _log_prefixes(p: Tensor, M: int) -> Tensor:
    """(B, K+1, M+1) log-pmfs of the first 0..K candidates (probabilities, float64)."""
    lp, lq = _safe_log(p), _safe_log1m(p)
    lpmf = torch.full((p.shape[0], M + 1), -math.inf, dtype=torch.float64, device=p.device)
    lpmf[:, 0] = 0.0
    prefixes = [lpmf]
    for k in range(p.shape[1]):
        lpmf = _log_dp_step(lpmf, lp[:, k : k + 1], lq[:, k : k + 1], M)
        prefixes.append(lpmf)
    return torch.stack(prefixes, 1)


def _adjoint_grad(p: Tensor, prefixes: Tensor, grad: Tensor, M: int) -> Tensor:
    """dL/dp (B, K) for the upstream gradient ``grad`` (B, M+1) of L = log P_K: the adjoint of the
    linear recursion P_k = A(p_k) P_{k-1}, in signed logarithms (see _LogPmfFromProbabilities)."""
    B, K = p.shape
    lp, lq = _safe_log(p), _safe_log1m(p)
    final = prefixes[:, K]
    alive = final > -math.inf
    # lambda = g / P as a signed log; 0 where P = 0 (no finite derivative there)
    llam = torch.where(alive, _safe_log(grad.abs()) - torch.where(alive, final, torch.zeros_like(final)),
                       torch.full_like(final, -math.inf))
    slam = torch.where(grad < 0, -1.0, 1.0).to(torch.float64)
    neg_inf = torch.full((B, 1), -math.inf, dtype=torch.float64, device=p.device)
    ones = torch.ones((B, 1), dtype=torch.float64, device=p.device)
    zeros = torch.zeros((B, 1), dtype=torch.float64, device=p.device)
    out = torch.zeros((B, K), dtype=torch.float64, device=p.device)
    for k in range(K - 1, -1, -1):
        before = prefixes[:, k]  # the pmf before candidate k
        # dP'(c)/dp_k = P(c-1) - P(c) for c < M; tail: P(M-1)
        plus = torch.cat([neg_inf, before[:, :M]], 1)
        minus = torch.cat([before[:, :M], neg_inf], 1)
        lg, sg = _signed_logsumexp(torch.cat([llam + plus, llam + minus], 1), torch.cat([slam, -slam], 1))
        out[:, k] = sg * torch.exp(lg)
        # lambda_{k-1}(c) = lambda(c) q_k (1 in the tail) + lambda(c+1) p_k  (c < M)
        stay = torch.cat([lq[:, k : k + 1].expand(B, M), zeros], 1)
        next_l = torch.cat([llam[:, 1:], neg_inf], 1)
        next_s = torch.cat([slam[:, 1:], ones], 1)
        llam, slam = _signed_logsumexp(torch.stack([llam + stay, next_l + lp[:, k : k + 1]], -1),
                                       torch.stack([slam, next_s], -1))
    return out


class _LogPmfFromProbabilities(torch.autograd.Function):
    """Log-space DP for probabilities with exact derivatives at p = 0 and p = 1.

    Autograd through ``log p`` / ``log(1 - p)`` is wrong there: a bin that becomes exactly 0
    (P(C = 0) after a candidate with p = 1) cannot carry its derivative in log space, although later
    bins depend on it (eq. 3). The backward pass therefore runs the adjoint of the *linear*
    recursion P_k = A(p_k) P_{k-1} with every quantity held as a signed logarithm (nothing
    underflows, nothing is divided by a probability): lambda_{k-1} = A(p_k)^T lambda_k from
    lambda_K = g / P (0 where P = 0: such a bin's gradient is 0 by convention), and
    dL/dp_k = lambda_k . (dA/dp_k) P_{k-1}. Forward mode: :func:`poisson_binomial_jvp`. O(K*M) time;
    the backward pass recomputes and holds the K prefixes, O(K*M) memory (this is the slow
    reference, not the kernels).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(p: Tensor, M: int) -> Tensor:
        return _log_prefixes(p, M)[:, -1].clone()  # not a view: forward AD needs its own layout

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])
        ctx.M = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        (p,) = ctx.saved_tensors
        return _adjoint_grad(p, _log_prefixes(p, ctx.M), grad, ctx.M), None

    @staticmethod
    def jvp(ctx, tangent, _):
        (p,) = ctx.saved_tensors
        return poisson_binomial_jvp(p, tangent, ctx.M, True, False)


def _log_pmf_from_probabilities(p: Tensor, init: Tensor, M: int) -> Tensor:
    return _LogPmfFromProbabilities.apply(p, M)


def poisson_binomial(probs: Tensor, max_count: int, log_space: bool, from_logits: bool) -> Tensor:
    """Truncated Poisson-binomial pmf of ``C = sum_k Bernoulli(p_k)``.

    ``probs`` (B, K) -> (B, M+1) with M = ``max_count``: bins 0..M-1 hold P(C = j) and bin M
    holds the tail P(C >= M). Computed in float64 (or in log space when ``log_space``, in which
    case log-probabilities are returned); the output is cast to ``probs.dtype``. With
    ``from_logits`` the input is read as logits ``z``, ``p = sigmoid(z)``.
    Differentiable through ordinary autograd.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (B, K), got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise ValueError(f"probs must be floating point, got {probs.dtype}")
    M = int(max_count)
    if M < 0:
        raise ValueError(f"max_count must be >= 0, got {max_count}")
    B, K = probs.shape
    out_dtype = probs.dtype
    x = probs.to(torch.float64)
    dev = x.device

    if log_space:
        init = torch.full((B, M + 1), -math.inf, dtype=torch.float64, device=dev)
        init[:, 0] = 0.0
        if M == 0:
            # P(C >= 0) = 1 whatever the probabilities
            out = init + 0.0 * x.sum(dim=1, keepdim=True)
            return out.to(out_dtype)
        if not from_logits:
            return _log_pmf_from_probabilities(x, init, M).to(out_dtype)
        lp = -torch.nn.functional.softplus(-x)
        lq = -torch.nn.functional.softplus(x)
        lpmf = init
        for k in range(K):
            a = lp[:, k : k + 1]
            c = lq[:, k : k + 1]
            first = lpmf[:, :1] + c
            mid = _logaddexp(lpmf[:, 1:M] + c, lpmf[:, : M - 1] + a)
            tail = _logaddexp(lpmf[:, M : M + 1], lpmf[:, M - 1 : M] + a)
            lpmf = torch.cat([first, mid, tail], dim=1)
        return lpmf.to(out_dtype)

    if from_logits:
        p = torch.sigmoid(x)
        q = torch.sigmoid(-x)
    else:
        p = x
        q = 1.0 - x
    init = torch.zeros((B, M + 1), dtype=torch.float64, device=dev)
    init[:, 0] = 1.0
    if M == 0:
        out = init + 0.0 * x.sum(dim=1, keepdim=True)
        return out.to(out_dtype)
    pmf = init
    for k in range(K):
        a = p[:, k : k + 1]
        c = q[:, k : k + 1]
        first = pmf[:, :1] * c
        mid = pmf[:, 1:M] * c + pmf[:, : M - 1] * a
        tail = pmf[:, M : M + 1] + pmf[:, M - 1 : M] * a
        pmf = torch.cat([first, mid, tail], dim=1)
    return pmf.to(out_dtype)


def _signed_logsumexp(logs: Tensor, signs: Tensor) -> Tuple[Tensor, Tensor]:
    """log|sum_i s_i e^{l_i}| and its sign over the last dimension (terms with l = -inf are 0)."""
    top = logs.max(dim=-1, keepdim=True).values
    finite_top = torch.where(top > -math.inf, top, torch.zeros_like(top))
    total = (signs * torch.exp(logs - finite_top)).sum(dim=-1, keepdim=True)
    log_abs = torch.where(total != 0, finite_top + torch.log(total.abs()), torch.full_like(total, -math.inf))
    return log_abs.squeeze(-1), torch.where(total < 0, -1.0, 1.0).to(logs.dtype).squeeze(-1)


def poisson_binomial_jvp(probs: Tensor, tangent: Tensor, max_count: int, log_space: bool,
                         from_logits: bool) -> Tensor:
    """Forward-mode derivative (Jacobian-vector product) of :func:`poisson_binomial`.

    ``probs`` and ``tangent`` are (B, K); returns the (B, M+1) tangent of the pmf (or of the log-pmf
    when ``log_space``) in ``probs.dtype``. It carries the derivative T(c) = dP(c) through the same
    dynamic program (dual numbers), O(K*M):

        T'(c) = T(c) q_k + T(c-1) p_k + dp_k (P(c-1) - P(c)),   tail: T'(M) = T(M) + T(M-1) p_k + dp_k P(M-1)

    with P and T held as (signed) logarithms, so nothing underflows and nothing is divided by a
    probability: exact for p exactly 0 or 1 (eq. 3 of the paper differentiated) and for saturated
    logits. The log-pmf's tangent is T / P; a bin with ``log P = -inf`` gets tangent 0, the same
    convention as the backward kernels use for the gradient of such a bin. With ``from_logits`` the
    input tangent is that of the logits: dp = dz p (1 - p).
    """
    M = int(max_count)
    B, K = probs.shape
    out_dtype = probs.dtype
    x = probs.to(torch.float64)
    v = tangent.to(torch.float64)
    dev = x.device
    if M == 0 or K == 0:
        return torch.zeros((B, M + 1), dtype=out_dtype, device=dev)
    if from_logits:
        lp = -torch.nn.functional.softplus(-x)
        lq = -torch.nn.functional.softplus(x)
        log_dp = _safe_log(v.abs()) + lp + lq
    else:
        lp, lq = _safe_log(x), _safe_log1m(x)
        log_dp = _safe_log(v.abs())
    sign_dp = torch.where(v < 0, -1.0, 1.0).to(torch.float64)
    L = torch.full((B, M + 1), -math.inf, dtype=torch.float64, device=dev)  # log P
    L[:, 0] = 0.0
    LT = torch.full_like(L, -math.inf)  # log |T|
    ST = torch.ones_like(L)  # sign of T
    neg_inf = torch.full((B, 1), -math.inf, dtype=torch.float64, device=dev)
    ones = torch.ones((B, 1), dtype=torch.float64, device=dev)
    zeros = torch.zeros((B, 1), dtype=torch.float64, device=dev)
    for k in range(K):
        a, c = lp[:, k : k + 1], lq[:, k : k + 1]
        ld, sd = log_dp[:, k : k + 1], sign_dp[:, k : k + 1]
        keep = torch.cat([c.expand(B, M), zeros], 1)  # log of the "no success" factor; tail keeps P(M)
        prev_L = torch.cat([neg_inf, L[:, :M]], 1)
        prev_LT = torch.cat([neg_inf, LT[:, :M]], 1)
        prev_ST = torch.cat([ones, ST[:, :M]], 1)
        here_L = torch.cat([L[:, :M], neg_inf], 1)  # P(c) leaves bin c (not the tail)
        logs = torch.stack([LT + keep, prev_LT + a, ld + prev_L, ld + here_L], -1)
        signs = torch.stack([ST, prev_ST, sd.expand(B, M + 1), -sd.expand(B, M + 1)], -1)
        LT, ST = _signed_logsumexp(logs, signs)
        L = _logaddexp(L + keep, prev_L + a)
    if log_space:
        out = torch.where(L > -math.inf, ST * torch.exp(LT - torch.where(L > -math.inf, L, zeros)),
                          torch.zeros_like(L))
    else:
        out = ST * torch.exp(LT)
    return out.to(out_dtype)


def poisson_binomial_bruteforce(probs_1d, max_count: int) -> np.ndarray:
    """Exact float64 truncated Poisson-binomial pmf by enumerating all 2^K outcomes (K <= 12).

    Returns a numpy array of length ``max_count + 1`` (tail bin last).
    """
    p = np.asarray(
        probs_1d.detach().cpu().to(torch.float64).numpy() if isinstance(probs_1d, Tensor) else probs_1d,
        dtype=np.float64,
    ).reshape(-1)
    K = p.shape[0]
    if K > 12:
        raise ValueError(f"brute force limited to K <= 12, got K={K}")
    M = int(max_count)
    out = np.zeros(M + 1, dtype=np.float64)
    full = np.zeros(K + 1, dtype=np.float64)
    for bits in itertools.product((0, 1), repeat=K):
        pr = 1.0
        for b, pk in zip(bits, p):
            pr *= pk if b else (1.0 - pk)
        full[sum(bits)] += pr
    for c in range(K + 1):
        out[min(c, M)] += full[c]
    return out
