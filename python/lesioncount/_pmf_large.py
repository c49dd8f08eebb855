"""Full Poisson-binomial pmf for large K: a product tree with tilted, windowed FFT products.

The dynamic program behind :func:`lesioncount.poisson_binomial` costs O(K*M); the full pmf
(M = K) is O(K^2), hours for the millions of candidates of a noise map. This module computes the
same (B, M+1) pmf / log-pmf in O(K log^2 K) time and O(K log K) memory (O(K) per tree level):

* candidates with p exactly 0 are dropped (zero padding is exact), those with p exactly 1 shift
  the counts; the others are the leaves ``(q_k + p_k x)`` of a balanced product tree whose node
  polynomials are kept as **log coefficients**, so nothing underflows;
* each product ``c = a * b`` is cut into blocks of output bins. A block is computed from an
  exponentially tilted copy of ``a`` and ``b`` (coefficient i scaled by e^{theta i}, theta chosen
  from the block's log slope, taken from the max-plus product of the two concave log sequences),
  which makes the block's bins the largest values of its FFT product. Every bin therefore has
  float64 *relative* accuracy up to a factor e^L (L = ``_DROP``), not only the bins near the mode;
* the tilted factors are cut to windows around their tilted modes (wide enough that the mass left
  out is below 1e-20 by Bernstein's inequality), so one node of n bins costs O(n log n).

The tilts, blocks and windows are chosen without gradient; they only rescale exact identities
(``(a e^{theta i}) * (b e^{theta i}) = c e^{theta n}``), so the autograd gradient of the result is
the gradient of the pmf itself, computed by the same tree backwards (O(K log^2 K)).
"""
from __future__ import annotations

import math

import torch
import torch.utils.checkpoint

__all__ = ["full_pmf_large", "use_large_path"]

# Largest log drop of a block's bins below the block's largest term (relative error ~ eps * e^L).
_DROP = 5.0


def use_large_path(K: int, M: int, log: bool = True) -> bool:
    """Whether :func:`full_pmf_large` is expected to beat the O(K*M) dynamic program.

    The DP costs about K*M steps (linear: ~0.25 ns each, log space: ~10 ns each on the 2-core
    test machine); the product tree costs about 2.5 us (linear) / 35 us (log, tilted) per
    candidate whatever M is, so the crossover is a bound on min(M, K), measured in BENCHMARKS.md
    (K = 10^4: linear 24 ms tree vs 23 ms DP; log 0.34 s tree vs 1.06 s DP).

    Args:
        K: number of candidates (columns of ``probs``).
        M: ``max_count`` (bins 0..M-1 plus the tail bin).
        log: whether the log-pmf is wanted.

    Returns:
        ``True`` when min(M, K) >= 12000 (linear) or >= 8000 (log).

    Example:
        >>> use_large_path(10**6, 10**6), use_large_path(10**6, 50)
        (True, False)
    """
    return min(int(M), int(K)) >= (_CROSS_LOG if log else _CROSS_LIN)


_CROSS_LOG = 8_000
_CROSS_LIN = 12_000


def _check(probs: torch.Tensor, from_logits: bool) -> None:
    if not isinstance(probs, torch.Tensor):
        raise TypeError("`probs` must be a torch.Tensor")
    if probs.dim() != 2:
        raise ValueError(f"`probs` must have shape (B, K), got {probs.dim()} dimensions {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"`probs` must be a floating tensor, got {probs.dtype}")
    if probs.numel() and not torch.compiler.is_compiling():
        if bool(torch.isnan(probs).any()):
            raise ValueError("`probs` contains NaN")
        if not from_logits and (bool((probs < 0).any()) or bool((probs > 1).any())):
            raise ValueError("`probs` must lie in [0, 1] (pass from_logits=True for logits)")


def _slopes(la: torch.Tensor) -> torch.Tensor:
    """Forward differences of concave log sequences (N, n) -> (N, n-1), -inf past the valid prefix,
    made non-increasing (rounding can break concavity by an ulp)."""
    nxt = la[:, 1:]
    s = torch.where(torch.isneginf(nxt), torch.full_like(nxt, -math.inf), nxt - la[:, :-1])
    return torch.cummin(s, dim=1).values


def _block_tilts(blk, valid, ctil, g_in, g_out, T):
    """First and last bin of each block and its tilt theta (minus the block's secant slope, or
    for a single bin the middle of its in and out slopes)."""
    N, n_out = blk.shape
    dev = blk.device
    bins = torch.arange(n_out, device=dev)
    lo = torch.full((N, T), n_out, device=dev, dtype=torch.long).scatter_reduce(
        1, blk, bins.expand(N, -1).masked_fill(~valid, n_out), "amin")
    hi = torch.full((N, T), -1, device=dev, dtype=torch.long).scatter_reduce(
        1, blk, bins.expand(N, -1).masked_fill(~valid, -1), "amax")
    used = hi >= lo
    lo = torch.where(used, lo, torch.zeros_like(lo))
    hi = torch.where(used, hi, torch.zeros_like(hi))
    gl = g_in.gather(1, lo)
    gr = g_out.gather(1, hi)
    gl = torch.where(torch.isfinite(gl), gl, gr + 1.0)
    gr = torch.where(torch.isfinite(gr), gr, gl - 1.0)
    ch = ctil.gather(1, hi)
    cl = ctil.gather(1, lo)
    span = (hi - lo).to(torch.float64)
    secant = (ch - cl) / span.clamp_min(1.0)
    slope = torch.where((hi > lo) & torch.isfinite(secant), secant, 0.5 * (gl + gr))
    slope = torch.where(torch.isfinite(slope), slope, torch.zeros_like(slope))
    return lo, hi, -slope


def _product_level(la: torch.Tensor, lb: torch.Tensor, va: torch.Tensor, vb: torch.Tensor):
    """Log coefficients of the products of pairs of polynomials given by log coefficients.

    la, lb: (N, m+1) float64 log coefficients, -inf past the valid lengths va, vb (N,) int64.
    Returns (N, 2m+1) log coefficients and their valid lengths va + vb - 1.
    """
    N, m1 = la.shape
    m = m1 - 1
    dev = la.device
    vc = va + vb - 1
    n_out = 2 * m + 1
    with torch.no_grad():
        sa = _slopes(la.detach())
        sb = _slopes(lb.detach())
        # max-plus product of concave sequences: its slopes are the merged slopes
        sc = torch.sort(torch.cat([sa, sb], dim=1), dim=1, descending=True).values  # (N, 2m)
        ctil = torch.cat([la[:, :1] + lb[:, :1], la[:, :1] + lb[:, :1] + torch.cumsum(sc, 1)], 1).detach()
        # curvature at each bin -> block density sqrt(kappa / (8 L)); blocks no wider than wblk
        big = torch.finfo(torch.float64).max
        s_left = torch.cat([torch.full((N, 1), math.inf, device=dev, dtype=torch.float64), sc], 1)
        s_right = torch.cat([sc, torch.full((N, 1), -math.inf, device=dev, dtype=torch.float64)], 1)
        kappa = (s_left - s_right).nan_to_num(nan=big, posinf=big)
        # window of each tilted factor: its tilted mode +- (10 sigma + 40), sigma <= sqrt(m) / 2
        W = min(m + 1, 2 * int(math.ceil(4.5 * math.sqrt(m) + 27.0)) + 1)
        if W > 16:  # FFT products: widen the windows to fill the transform length (free accuracy)
            W = min(m + 1, (1 << (2 * W - 2).bit_length()) // 2)
        wh = W // 2
        wblk = max(1, wh)
        dens = torch.clamp(torch.sqrt(kappa.clamp_min(0) / (4.0 * _DROP)), min=1.0 / wblk)
        # a bin whose density reaches 1 starts its own block (ceil keeps ids consecutive)
        dens = torch.where(dens >= 1.0, torch.ones_like(dens), dens)
        bins = torch.arange(n_out, device=dev)
        valid = bins[None, :] < vc[:, None]
        dens = torch.where(valid, dens, torch.zeros_like(dens))
        u = torch.cumsum(dens, 1) - dens[:, :1]
        blk = torch.floor(u + 1e-9).long()  # (N, n_out) block id per bin
        blk = torch.where(valid, blk, torch.zeros_like(blk))
        g_in = torch.cat([sc[:, :1] + 1.0, sc], 1)  # slope into bin n (n=0: anything above sc0)
        g_out = torch.cat([sc, sc[:, -1:] - 1.0], 1)  # slope out of bin n
        nb = bins.to(torch.float64)
        for _ in range(64):
            T = int(blk.max()) + 1
            lo, hi, theta = _block_tilts(blk, valid, ctil, g_in, g_out, T)
            # a posteriori check on the max-plus bound: a bin more than L below its block's
            # largest tilted value becomes its own block (happens at kinks of the log pmf)
            tilted = torch.where(valid, ctil + theta.gather(1, blk) * nb, torch.full_like(ctil, -math.inf))
            top = torch.full((N, T), -math.inf, device=dev, dtype=torch.float64).scatter_reduce(
                1, blk, tilted, "amax")
            unsafe = valid & (top.gather(1, blk) - tilted > _DROP)
            if not bool(unsafe.any()):
                break
            # an unsafe bin starts a new block (a run of them splits the block at each one)
            cut = unsafe.clone()
            cut = cut | torch.cat([torch.zeros_like(blk[:, :1], dtype=torch.bool), blk[:, 1:] != blk[:, :-1]], 1)
            cut[:, 0] = False
            blk = torch.where(valid, torch.cumsum(cut.long(), 1), torch.zeros_like(blk))
        slope = -theta
        # tilted modes of a and b: number of slopes above the tilt slope
        ia = torch.searchsorted((-sa).contiguous(), (-slope).contiguous(), right=False)
        ib = torch.searchsorted((-sb).contiguous(), (-slope).contiguous(), right=False)
        ia = torch.minimum(ia, (va - 1)[:, None])
        ib = torch.minimum(ib, (vb - 1)[:, None])
        sta = (ia - wh).clamp(0, m + 1 - W)
        stb = (ib - wh).clamp(0, m + 1 - W)
        offs = torch.arange(W, device=dev)
        idx_a = sta[..., None] + offs  # (N, T, W)
        idx_b = stb[..., None] + offs
    rows = torch.arange(N, device=dev)[:, None, None]
    with torch.no_grad():
        # tilts are applied relative to the tilted modes (small exponents, no cancellation of
        # large logs): c_n = e^{-theta (n - ia - ib)} a_ia b_ib sum_i a'_i b'_{n-i}
        ref_a = la.gather(1, ia).detach()
        ref_b = lb.gather(1, ib).detach()
        ref_a = torch.where(torch.isfinite(ref_a), ref_a, torch.zeros_like(ref_a))
        ref_b = torch.where(torch.isfinite(ref_b), ref_b, torch.zeros_like(ref_b))
    ta = la[rows, idx_a] - ref_a[..., None] + theta[..., None] * (idx_a - ia[..., None]).to(torch.float64)
    tb = lb[rows, idx_b] - ref_b[..., None] + theta[..., None] * (idx_b - ib[..., None]).to(torch.float64)
    with torch.no_grad():
        shift_a = ta.amax(-1, keepdim=True)
        shift_b = tb.amax(-1, keepdim=True)
        shift_a = torch.where(torch.isfinite(shift_a), shift_a, torch.zeros_like(shift_a))
        shift_b = torch.where(torch.isfinite(shift_b), shift_b, torch.zeros_like(shift_b))
    ea = torch.exp(ta - shift_a)
    eb = torch.exp(tb - shift_b)
    L = 2 * W - 1
    nfft = 1 << (L - 1).bit_length() if L > 1 else 1
    if W <= 16:
        # short windows: direct (exact) convolution, cheaper than an FFT
        conv = ea.new_zeros(ea.shape[:-1] + (L,))
        for i in range(W):
            conv = conv + torch.nn.functional.pad(ea[..., i : i + 1] * eb, (i, L - W - i))
    else:
        conv = torch.fft.irfft(torch.fft.rfft(ea, nfft) * torch.fft.rfft(eb, nfft), nfft)[..., :L]
    # each output bin reads its block's product
    with torch.no_grad():
        off = bins[None, :] - (sta + stb).gather(1, blk)
        ok = valid & (off >= 0) & (off < L)
        off = off.clamp(0, L - 1)
    picked = conv[torch.arange(N, device=dev)[:, None], blk, off]  # (N, n_out)
    with torch.no_grad():
        lift = (shift_a + shift_b)[..., 0] + ref_a + ref_b
        base = lift.gather(1, blk) - theta.gather(1, blk) * (bins[None, :] - (ia + ib).gather(1, blk)).to(torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    lc = torch.log(picked.clamp_min(tiny)) + base
    lc = torch.where(ok, lc, torch.full_like(lc, -math.inf))
    return lc, vc


def _log_pmf_active(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """log pmf (n+1,) of the count of n Bernoulli trials with log p / log q given (n,)."""
    n = lp.shape[0]
    dev = lp.device
    if n == 0:
        return lp.new_zeros(1) + 0.0 * lp.sum()
    size = 1 << (n - 1).bit_length() if n > 1 else 1
    pad = size - n
    la = torch.stack([lq, lp], 1)  # (n, 2)
    if pad:
        la = torch.cat([la, torch.tensor([[0.0, -math.inf]], dtype=la.dtype, device=dev).expand(pad, 2)], 0)
    v = torch.cat([torch.full((n,), 2, device=dev, dtype=torch.long), torch.ones(pad, device=dev, dtype=torch.long)])
    ckpt = la.requires_grad and torch.is_grad_enabled()
    while la.shape[0] > 1:
        if ckpt and la.shape[0] <= la.numel() // 64:
            # keep only each level's input for backward (O(K) per level), recompute the rest
            la, v = torch.utils.checkpoint.checkpoint(
                _product_level, la[0::2], la[1::2], v[0::2], v[1::2], use_reentrant=False)
        else:
            la, v = _product_level(la[0::2], la[1::2], v[0::2], v[1::2])
    return la[0, : n + 1]


def _pmf_active_linear(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """pmf (n+1,) of the count of n Bernoulli trials, by a plain float64 FFT product tree.

    Absolute error ~1e-16 per bin (FFT rounding is relative to the largest bin), so bins far in
    the tail lose their relative accuracy: used for the linear pmf only.
    """
    n = p.shape[0]
    if n == 0:
        return p.new_ones(1) + 0.0 * p.sum()
    size = 1 << (n - 1).bit_length() if n > 1 else 1
    leaves = torch.stack([q, p], 1)
    if size > n:
        pad = leaves.new_tensor([[1.0, 0.0]]).expand(size - n, 2)
        leaves = torch.cat([leaves, pad], 0)
    a = leaves
    while a.shape[0] > 1:
        x, y = a[0::2], a[1::2]
        m1 = x.shape[1]
        L = 2 * m1 - 1
        if m1 <= 16:
            c = x.new_zeros((x.shape[0], L))
            for i in range(m1):
                c = c + torch.nn.functional.pad(x[:, i : i + 1] * y, (i, L - m1 - i))
        else:
            nfft = 1 << (L - 1).bit_length()
            c = torch.fft.irfft(torch.fft.rfft(x, nfft) * torch.fft.rfft(y, nfft), nfft)[:, :L]
        a = c
    return a[0, : n + 1].clamp_min(0.0)


def full_pmf_large(probs: torch.Tensor, max_count: int | None = None, log: bool = False,
                   from_logits: bool = False) -> torch.Tensor:
    """Truncated Poisson-binomial pmf by a tilted FFT product tree, O(K log^2 K).

    Same semantics as :func:`lesioncount.poisson_binomial` (bins 0..M-1 hold P(C = j), bin M the
    tail P(C >= M), computed as the sum of the upper bins, not as 1 minus the lower ones), for
    large K, where the O(K*M) dynamic program is too slow.

    Args:
        probs: (B, K) probabilities in [0, 1], or logits with ``from_logits=True``; any float dtype.
            p = 0 (logit -inf) is exact zero padding; p = 1 (logit +inf) shifts the count.
        max_count: M >= 0; ``None`` means M = K (the full pmf).
        log: return the log-pmf.
        from_logits: read ``probs`` as logits.

    Returns:
        (B, M+1) in ``probs``' dtype, computed in float64; differentiable in ``probs`` (the
        gradient is taken through the same tree, O(K log^2 K)).

    Accuracy (float64; measured against the float64 DP and exact rationals in
    tests/test_pmf_large.py):

    * ``log=False``: a plain FFT product tree; absolute error <= ~1e-15 per bin (K <= 2*10^4:
      < 1e-13 in the tests, typically 1e-16). FFT rounding is absolute, so bins below ~1e-15
      (e.g. the far tails, or a tail bin P(C >= M) ~ 1e-150) are rounding noise in [0, 1e-15]
      (negatives are clamped to 0): use ``log=True`` for them.
    * ``log=True``: every bin, however far in the tail, is read from a product tilted so that
      the bin is within e^5 of that product's largest term: relative error ~1e-14 per tree
      level, i.e. the log-pmf is exact to ~1e-12 (absolute, for |log P| <= 1, or relative to
      |log P| beyond), down to bins like log P(C = 0) = sum log(1 - p_k) = -3e4. The tail bin
      is a logsumexp of the upper bins. This path is ~30x slower than ``log=False``.
    * Bins that are exactly zero (fewer counts than the p = 1 candidates, more than the p > 0
      ones) are exactly 0 (-inf in log); the gradient of a -inf log bin is taken as 0.

    Example:
        >>> import torch, lesioncount
        >>> full_pmf_large(torch.tensor([[0.5189, 0.7840]]), max_count=4)
        tensor([[0.1039, 0.4893, 0.4068, 0.0000, 0.0000]])
    """
    _check(probs, from_logits)
    B, K = probs.shape
    M = K if max_count is None else max_count
    if isinstance(M, bool) or not isinstance(M, int) or M < 0:
        raise ValueError(f"`max_count` must be a non-negative int or None, got {max_count!r}")
    x = probs.to(torch.float64)
    dev = x.device
    if M == 0:  # P(C >= 0) = 1 whatever the probabilities
        base = x.new_zeros((B, 1)) if log else x.new_ones((B, 1))
        return (base + 0.0 * x.sum(1, keepdim=True)).to(probs.dtype)
    ninf = -math.inf
    rows = []
    for b in range(B):
        xb = x[b]
        if from_logits:
            one = torch.isposinf(xb)
            zero = torch.isneginf(xb)
        else:
            one = xb == 1.0
            zero = xb == 0.0
        act = ~(one | zero)
        n1 = int(one.sum())
        xa = xb[act]
        # the gradient for candidates at exactly 0 or 1 (p-space only: d sigmoid = 0 at +-inf):
        # dP(j)/dp_k = P_{-k}(j-1) - P_{-k}(j), with P_{-k} = P (p_k = 0) or P shifted by one (p_k = 1);
        # added as zero-valued terms s * g with s = sum (p_k - p_k.detach())
        s0 = s1 = None
        if not from_logits and probs.requires_grad and torch.is_grad_enabled():
            s0 = (xb - xb.detach())[zero].sum()
            s1 = (xb - xb.detach())[one].sum()
        width = max(M + 2, K + 2)
        if log:
            if from_logits:
                lp = -torch.nn.functional.softplus(-xa)
                lq = -torch.nn.functional.softplus(xa)
            else:
                lp = torch.log(xa)
                lq = torch.log1p(-xa)
            la = _log_pmf_active(lp, lq)  # (n+1,): log P(active count = i), relative accuracy
            total = n1 + la.shape[0]
            out = torch.cat([torch.full((n1,), ninf, dtype=torch.float64, device=dev), la,
                             torch.full((width - total,), ninf, dtype=torch.float64, device=dev)])
            if s0 is not None:
                with torch.no_grad():
                    lf = out.detach()
                    fin = torch.isfinite(lf)
                    before = torch.cat([lf.new_full((1,), ninf), lf[:-1]])
                    after = torch.cat([lf[1:], lf.new_full((1,), ninf)])
                    # d log P(j) / dp_k = (P_{-k}(j-1) - P_{-k}(j)) / P(j), from log ratios (capped
                    # at e^700 so that the zero-valued correction stays finite); 0 at -inf bins
                    r0 = torch.where(fin, torch.exp((before - lf).clamp(max=700.0)) - 1.0, torch.zeros_like(lf))
                    r1 = torch.where(fin, 1.0 - torch.exp((after - lf).clamp(max=700.0)), torch.zeros_like(lf))
                out = out + torch.where(fin, s0 * r0 + s1 * r1, torch.zeros_like(lf))
            head = out[:M]
            if M < total:  # the tail bin is the sum of the upper bins (no 1 - sum cancellation)
                tail = torch.logsumexp(out[M:total], 0, keepdim=True)
            else:
                tail = out[M : M + 1]
            row = torch.cat([head, tail])
        else:
            if from_logits:
                pp, qq = torch.sigmoid(xa), torch.sigmoid(-xa)
            else:
                pp, qq = xa, 1.0 - xa
            pa = _pmf_active_linear(pp, qq)
            total = n1 + pa.shape[0]
            pf = torch.cat([pa.new_zeros(n1), pa, pa.new_zeros(width - total)])
            if s0 is not None:
                with torch.no_grad():
                    d = pf.detach()
                    g0 = torch.cat([d.new_zeros(1), d[:-1]]) - d  # p_k = 0
                    g1 = d - torch.cat([d[1:], d.new_zeros(1)])  # p_k = 1
                pf = pf + s0 * g0 + s1 * g1
            row = torch.cat([pf[:M], pf[M:].sum(0, keepdim=True)])
        rows.append(row)
    if not rows:
        return probs.new_zeros((0, M + 1))
    return torch.stack(rows).to(probs.dtype)
