"""CUDA-vs-CPU parity smoke (seconds), also the small workload compute-sanitizer runs.

Checks against the CPU kernels: `label` at every connectivity, with and without min_size, on a few
odd shapes and dtypes, and the NaN flag; `poisson_binomial` forward + backward; `count_distribution`
forward + backward, with and without a static `max_lesions`. Prints one line per failure and a last
line `parity smoke: N mismatches in M checks`; exit code 0 when everything matched.

    python3 benchmarks/gpu_sanitize_case.py                 # on the GPU
    LC_GPU_DRY_RUN=1 python3 benchmarks/gpu_sanitize_case.py   # on the CUDA-on-CPU runtime
    compute-sanitizer --tool memcheck --kernel-name kns=lesioncount --error-exitcode 98 \\
        python3 benchmarks/gpu_sanitize_case.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lesioncount  # noqa: E402  (loads the library)

import gpu_device  # noqa: E402
from gpu_device import DEVICE  # noqa: E402


def main() -> int:
    ok, why = gpu_device.available()
    if not ok:
        print(f"parity smoke: cannot run ({why})", flush=True)
        return 2
    torch.manual_seed(0)
    label = gpu_device.label_op()
    bad = checks = 0

    def check(cond: bool, what: str) -> None:
        nonlocal bad, checks
        checks += 1
        if not cond:
            bad += 1
            print("MISMATCH", what, flush=True)

    cases = [
        ((2, 7, 9, 11), (6, 18, 26)),
        ((1, 1, 5, 1), (6, 18, 26)),
        ((3, 4, 4, 4), (6, 18, 26)),
        ((2, 13, 17), (4, 8)),
        ((1, 1, 1), (4, 8)),
    ]
    for shape, conns in cases:
        for dtype in (torch.float32, torch.float16, torch.uint8):
            x = torch.rand(shape)
            x = (x > 0.5).to(dtype) if dtype == torch.uint8 else x.to(dtype)
            xd = x.to(DEVICE).clone()
            for conn in conns:
                for min_size in (0, 3):
                    exp = torch.ops.lesioncount.label(x, 0.5, conn, min_size)
                    got = label(xd, 0.5, conn, min_size)
                    gpu_device.sync()
                    check(torch.equal(got[0].cpu(), exp[0]) and torch.equal(got[1].cpu(), exp[1]),
                          f"label {tuple(shape)} {dtype} c{conn} min_size={min_size}")
    # NaN path: the item is flagged (num = -1) without a host sync
    x = torch.rand(2, 5, 6, 7).to(DEVICE)
    x[1, 0, 0, 0] = float("nan")
    _, num = label(x, 0.5, 26, 0)
    check(int(num[1]) == -1, "label: NaN item not flagged")

    # poisson_binomial forward + backward
    p = torch.rand(5, 37, dtype=torch.float64)
    w = torch.rand(5, 7, dtype=torch.float64)
    pc = p.clone().requires_grad_(True)
    exp = lesioncount.poisson_binomial(pc, max_count=6)
    (exp * w).sum().backward()
    pd = p.to(DEVICE).clone().requires_grad_(True)
    with gpu_device.active():
        got = lesioncount.poisson_binomial(pd, max_count=6)
        (got * w.to(DEVICE)).sum().backward()
    gpu_device.sync()
    check(torch.allclose(got.detach().cpu(), exp.detach(), rtol=1e-9, atol=1e-12), "poisson_binomial forward")
    check(torch.allclose(pd.grad.cpu(), pc.grad, rtol=1e-9, atol=1e-12), "poisson_binomial backward")

    # count_distribution forward + backward, dynamic and static candidate bound
    probs = torch.rand(3, 9, 10, 11) ** 3
    targets = torch.tensor([[0], [2], [5]])
    xc = probs.clone().requires_grad_(True)
    ref = lesioncount.count_distribution(xc, threshold=0.5, connectivity=18, max_count=6)
    (-ref.log_pmf.gather(1, targets).sum()).backward()
    bound = max(8, int(ref.num_lesions.max()))
    for max_lesions in (None, bound):
        xd = probs.to(DEVICE).clone().requires_grad_(True)  # a copy: .to(cpu) would alias probs
        with gpu_device.active():
            r = lesioncount.count_distribution(xd, threshold=0.5, connectivity=18, max_count=6, max_lesions=max_lesions)
            (-r.log_pmf.gather(1, targets.to(DEVICE)).sum()).backward()
        gpu_device.sync()
        check(torch.allclose(r.pmf.detach().cpu(), ref.pmf.detach(), rtol=1e-5, atol=1e-6),
              f"count_distribution pmf (max_lesions={max_lesions})")
        check(torch.allclose(xd.grad.cpu(), xc.grad, rtol=1e-4, atol=1e-6),
              f"count_distribution grad (max_lesions={max_lesions})")
    print(f"parity smoke ({gpu_device.device_name()}): {bad} mismatches in {checks} checks", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
