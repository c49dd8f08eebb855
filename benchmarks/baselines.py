"""Baselines the benchmarks compare lesioncount against.

- ``published_count_distribution``: the paper's published count function re-implemented from its
  description (Schroeter et al., MIDL 2022): SciPy labelling per item on the detached array
  (18-connectivity, threshold 0.1, strict ``>``), one dense float mask per lesion stacked to
  ``(B, 20, *spatial)`` (at most 20 lesions, zero padded), lesion probability ``max(mask * S)`` in
  torch (autograd flows through the dense masks), and a Python loop running the Poisson-binomial
  recursion over the lesions into bins ``0..M-1`` and a tail bin ``>= M``. Loss ``-log P(C = c)``.
- ``torch_poisson_binomial``: a pure torch DP (float64, loop over the K candidates, vectorised over
  the batch and the M+1 bins), differentiable by autograd.
- label helpers for SciPy / cc3d / scikit-image with each library's fastest options.
- a peak-memory probe (``python benchmarks/baselines.py memprobe ...``) run in a subprocess.

This file is importable without lesioncount (only the memory probe for ``lesioncount`` needs it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# connectivity (neighbour count) -> scipy generate_binary_structure rank / skimage connectivity
CONN_RANK = {4: 1, 8: 2, 6: 1, 18: 2, 26: 3}


def load_synthetic():
    """``lesioncount.synthetic``; loaded from the source tree when lesioncount is not importable."""
    try:
        from lesioncount import synthetic  # noqa: PLC0415

        return synthetic
    except ImportError:
        import importlib.util

        path = ROOT / "python" / "lesioncount" / "synthetic.py"
        spec = importlib.util.spec_from_file_location("_lesioncount_synthetic", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


# --------------------------------------------------------------------------------------------------
# labelling baselines (each at its best: precomputed structure, preallocated output, no copies)
# --------------------------------------------------------------------------------------------------


def scipy_structure(ndim: int, connectivity: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.generate_binary_structure(ndim, CONN_RANK[connectivity])


def scipy_label(mask: np.ndarray, structure: np.ndarray, out: np.ndarray | None = None) -> int:
    """``scipy.ndimage.label`` into a preallocated int32 array; returns the component count."""
    from scipy import ndimage

    if out is None:
        out = np.empty(mask.shape, np.int32)
    return int(ndimage.label(mask, structure=structure, output=out))


def cc3d_label(mask_u8: np.ndarray, connectivity: int):
    """``cc3d.connected_components`` on a uint8 view of the mask (fastest variant measured:
    bool, uint8, ``binary_image=True`` and ``out_dtype=uint32`` are all within noise);
    returns (labels, N)."""
    import cc3d

    return cc3d.connected_components(mask_u8, connectivity=connectivity, return_N=True)


def skimage_label(mask: np.ndarray, connectivity: int):
    from skimage import measure

    return measure.label(mask, connectivity=CONN_RANK[connectivity], return_num=True)


# --------------------------------------------------------------------------------------------------
# the published count function, re-implemented from the paper's description
# --------------------------------------------------------------------------------------------------


def published_count_distribution(
    probs: torch.Tensor,
    threshold: float = 0.1,
    max_lesions: int = 20,
    max_count: int = 4,
):
    """Count distribution the way the paper's published function computes it.

    Args:
        probs: ``(B, D, H, W)`` probabilities (may require grad).
    Returns:
        ``(pmf, lesion_probs, num)``: pmf ``(B, max_count + 1)`` (bins ``0..max_count-1`` and
        ``>= max_count``), lesion_probs ``(B, max_lesions)`` (zero padded), num: list of the
        candidate counts per item *before* truncation to ``max_lesions``.
    """
    from scipy import ndimage

    B = probs.shape[0]
    spatial = tuple(probs.shape[1:])
    structure = ndimage.generate_binary_structure(len(spatial), 2)  # 18-connectivity in 3D
    s = probs.detach().cpu().numpy()
    # dense per-lesion masks on the input's device (the GPU benchmark runs this on CUDA tensors)
    masks = torch.zeros((B, max_lesions) + spatial, dtype=probs.dtype, device=probs.device)
    num = []
    for b in range(B):
        lab, n = ndimage.label(s[b] > threshold, structure=structure)
        num.append(int(n))
        lab_t = torch.from_numpy(lab).to(probs.device)
        for k in range(min(n, max_lesions)):
            masks[b, k] = (lab_t == k + 1).to(probs.dtype)
    # lesion probability = max over the lesion of S (dense masked max; autograd through the masks)
    lesion_probs = (masks * probs.unsqueeze(1)).flatten(2).amax(dim=2)  # (B, max_lesions)
    # Poisson-binomial recursion, one lesion at a time, bins 0..M-1 and the tail M+
    M = max_count
    pmf = [torch.ones(B, dtype=probs.dtype, device=probs.device)] + [torch.zeros(B, dtype=probs.dtype, device=probs.device) for _ in range(M)]
    for k in range(max_lesions):
        p = lesion_probs[:, k]
        q = 1 - p
        new = [pmf[0] * q]
        for j in range(1, M):
            new.append(pmf[j] * q + pmf[j - 1] * p)
        if M > 0:
            new.append(pmf[M] + pmf[M - 1] * p)
        pmf = new
    return torch.stack(pmf, dim=1), lesion_probs, num


def published_count_loss(probs: torch.Tensor, target_counts: torch.Tensor, max_count: int = 4):
    """``sum_b -log P(C_b = c_b)`` with the published approach (targets >= max_count -> tail)."""
    pmf, _, _ = published_count_distribution(probs, max_count=max_count)
    c = target_counts.clamp(max=max_count).view(-1, 1)
    return -torch.log(pmf.gather(1, c)).sum()


# --------------------------------------------------------------------------------------------------
# pure torch Poisson-binomial DP
# --------------------------------------------------------------------------------------------------


def torch_poisson_binomial(probs: torch.Tensor, max_count: int) -> torch.Tensor:
    """Poisson-binomial pmf (B, M+1) with a tail bin, float64 DP in plain torch (autograd)."""
    B, K = probs.shape
    M = int(max_count)
    p = probs.to(torch.float64)
    if M == 0:
        return torch.ones(B, 1, dtype=probs.dtype, device=probs.device) + 0 * p.sum(1, keepdim=True).to(probs.dtype)
    pmf = F.pad(torch.ones(B, 1, dtype=torch.float64, device=probs.device), (0, M))
    # unbind once: slicing p[:, k] per step would make autograd build a dense (B, K) gradient per step
    for pk in p.t().unsqueeze(-1).unbind(0):  # K tensors of shape (B, 1)
        new = pmf * (1 - pk) + F.pad(pmf[:, :-1] * pk, (1, 0))
        new = new + F.pad(pmf[:, M:] * pk, (M, 0))  # the tail bin keeps its mass
        pmf = new
    return pmf.to(probs.dtype)


# --------------------------------------------------------------------------------------------------
# peak memory probe (run in a fresh subprocess)
# --------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memprobe_main(argv):
    ap = argparse.ArgumentParser(prog="baselines.py memprobe")
    ap.add_argument("impl", choices=["lesioncount", "published"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--shape", type=int, nargs="+", default=[64, 192, 192])
    ap.add_argument("--max-count", type=int, default=4)
    args = ap.parse_args(argv)
    syn = load_synthetic()
    targets = torch.arange(args.batch, dtype=torch.int64) % (args.max_count + 1)
    if args.impl == "lesioncount":
        import lesioncount

        def step(x):
            r = lesioncount.count_distribution(x, threshold=0.1, connectivity=18, max_count=args.max_count)
            loss = -r.log_pmf.gather(1, targets.view(-1, 1)).sum()
            loss.backward()

    else:

        def step(x):
            published_count_loss(x, targets, max_count=args.max_count).backward()

    # warm-up on a small input: library loading, thread pools, lazy initialisation
    step(syn.realistic_probability_maps(args.batch, (16, 32, 32), seed=1).requires_grad_(True))
    x = syn.realistic_probability_maps(args.batch, tuple(args.shape), seed=0).requires_grad_(True)
    gc.collect()
    base_kb = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    step(x)
    peak_kb = _status_kb("VmHWM")
    print(
        json.dumps(
            {
                "impl": args.impl,
                "input_bytes": x.numel() * x.element_size(),
                "rss_before_bytes": base_kb * 1024,
                "peak_above_before_bytes": (peak_kb - base_kb) * 1024,
            }
        )
    )


def peak_memory_above_input(impl: str, batch: int = 4, shape=(64, 192, 192), max_count: int = 4) -> dict:
    """Peak resident memory of one forward+backward above the state before it, in a subprocess.

    Method: a fresh Python process runs one warm-up step on a small input, builds the input,
    records VmRSS,
    resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``), runs one step and
    reads VmHWM. ``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc serve every allocation above 64 KiB
    with mmap and return it on free, so RSS follows live memory (no malloc arena reuse hiding the
    second step's allocations). The figure includes the input's gradient (same size as the input).
    """
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, str(Path(__file__).resolve()), "memprobe", impl, "--batch", str(batch),
           "--max-count", str(max_count), "--shape", *[str(s) for s in shape]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "memprobe":
        _memprobe_main(sys.argv[2:])
    else:
        print("usage: python benchmarks/baselines.py memprobe {lesioncount,published} [--batch B] [--shape D H W]")
        sys.exit(2)
