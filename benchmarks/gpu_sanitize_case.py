"""A small CUDA label workload for compute-sanitizer (memcheck / racecheck / synccheck).

Runs every connectivity, with and without min_size, on a few odd shapes and dtypes, and checks the
result against the CPU kernel. Exit code 0 when everything matched.

    compute-sanitizer --tool memcheck --error-exitcode 99 python3 benchmarks/gpu_sanitize_case.py
"""

from __future__ import annotations

import sys

import torch

import lesioncount  # noqa: F401  (loads the library)


def main() -> int:
    torch.manual_seed(0)
    bad = 0
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
            xc = x.cuda()
            for conn in conns:
                for min_size in (0, 3):
                    exp = torch.ops.lesioncount.label(x, 0.5, conn, min_size)
                    got = torch.ops.lesioncount.label(xc, 0.5, conn, min_size)
                    torch.cuda.synchronize()
                    if not (torch.equal(got[0].cpu(), exp[0]) and torch.equal(got[1].cpu(), exp[1])):
                        bad += 1
                        print("MISMATCH", shape, dtype, conn, min_size, flush=True)
    # NaN path
    x = torch.rand(2, 5, 6, 7, device="cuda")
    x[1, 0, 0, 0] = float("nan")
    _, num = torch.ops.lesioncount.label(x, 0.5, 26, 0)
    if int(num[1]) != -1:
        bad += 1
        print("NaN item not flagged", flush=True)
    print(f"sanitize case: {bad} mismatches", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
