"""Large CPU outputs (label maps, sparse gradients): correct, and no fresh memory for their zeros.

Issue 16, item 7 (cold start): label maps of 8 MiB and more are mapped straight from the kernel
(csrc/cpu/output_alloc.h). With huge pages everywhere, a realistic map (a few percent foreground)
touched every 2 MiB page on every call, i.e. zeroed ~36 MB of fresh memory per call, which on a VM
whose freed memory goes back to the hypervisor made the first calls of a process 5-10x slower than
later ones. These tests measure memory, not time (robust on a busy machine): the growth of the
process's anonymous resident memory (RssAnon) across one count_distribution forward + backward in a
fresh subprocess must stay well below the label map's size, because only the pages holding labels
or gradient values may be written. The correctness tests cover the mapped path (>= 8 MiB) with
mostly-background and mostly-foreground blocks in one output.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import lesioncount as lc
from lesioncount import _reference as ref

pytestmark = [
    pytest.mark.skipif(not lc.has_ops(), reason="compiled ops not loaded"),
]

CHILD = r"""
import json, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
import lesioncount
from lesioncount.synthetic import realistic_probability_maps

def rss_anon_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")

x = realistic_probability_maps(4, (64, 192, 192), seed=0)
small = realistic_probability_maps(1, (8, 32, 32), seed=1).requires_grad_(True)
r = lesioncount.count_distribution(small, max_count=4)   # first-use costs of small objects
r.log_pmf[:, 0].sum().backward()
del r
growth = []
for _ in range(3):
    xg = x.detach().requires_grad_(True)
    before = rss_anon_kib()
    r = lesioncount.count_distribution(xg, max_count=4)      # label + region_max read the whole map
    r.log_pmf[:, 0].sum().backward()
    total = int(r.labels.sum()) + int(xg.grad.count_nonzero())  # read every page of both outputs
    growth.append(rss_anon_kib() - before)                   # labels and gradient still alive
    foreground = int((r.labels != 0).sum())
    del r, xg, total
print(json.dumps({"growth_kib": growth, "label_map_kib": x.numel() * 4 // 1024,
                  "foreground_voxels": foreground}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("threads", [1, 2])
def test_count_distribution_touches_little_fresh_memory(threads):
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    map_kib = info["label_map_kib"]  # 36,864 KiB (4 x 64x192x192 int32)
    assert info["foreground_voxels"] < 0.01 * map_kib * 256  # the premise: a sparse map (< 1% labels)
    # Pages holding labels (~875 of 9,216 here) + gradient spots + small tensors; the code before
    # the fix grew by the whole map (~36,900 KiB) on every call.
    for growth in info["growth_kib"]:
        assert growth < map_kib / 4, (
            f"one count_distribution call grew RssAnon by {growth} KiB for a {map_kib} KiB label map "
            f"with {info['foreground_voxels']} labelled voxels: its zeros were given fresh memory "
            f"(per call: {info['growth_kib']})"
        )


def _mixed_volume(seed: int) -> np.ndarray:
    """(2, 40, 160, 192) bool: 2.46 Mvoxels (9.8 MB of int32 labels, the mapped path). Item 0 is
    i.i.d. 50% foreground (dense blocks); item 1 holds a few cubes in its first half and a dense
    slab in its last 10 slices (sparse and dense blocks inside one item)."""
    rng = np.random.default_rng(seed)
    fg = np.zeros((2, 40, 160, 192), dtype=bool)
    fg[0] = rng.random((40, 160, 192)) < 0.5
    for _ in range(12):
        z, y, x = rng.integers(0, 16), rng.integers(0, 150), rng.integers(0, 180)
        fg[1, z : z + 3, y : y + 5, x : x + 7] = True
    fg[1, 30:] = rng.random((10, 160, 192)) < 0.5
    return fg


@pytest.mark.parametrize("threads", [1, 2])
def test_large_label_map_matches_scipy(threads):
    fg = _mixed_volume(7)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for conn in (6, 26):
            for dtype in (torch.float32, torch.float16, torch.uint8):
                x = torch.from_numpy(fg).to(dtype) * (0.9 if dtype.is_floating_point else 1)
                labels, num = lc.label(x, 0.5, conn)
                assert labels.dtype == torch.int32 and labels.is_contiguous()
                for b in range(2):
                    want, n = ref.label(torch.from_numpy(fg[b : b + 1]), 0.5, conn, 0)
                    assert int(num[b]) == int(n[0])
                    assert torch.equal(labels[b : b + 1], want.to(torch.int32))
                # the mapped output behaves like any tensor: writable, zeros read as zeros
                labels[1, :30] += 1
                assert int((labels[1, :30] == 1).sum()) == int((~torch.from_numpy(fg[1, :30])).sum())
    finally:
        torch.set_num_threads(old)


def test_large_sparse_gradient_is_exact():
    """region_max's backward on the mapped path: one value per region at its argmax, zeros elsewhere."""
    fg = _mixed_volume(8)
    rng = np.random.default_rng(9)
    x = torch.from_numpy(np.where(fg, rng.random(fg.shape, dtype=np.float32) * 0.8 + 0.2, 0.0).astype(np.float32))
    labels, num = lc.label(x, 0.1, 26)
    xg = x.clone().requires_grad_(True)
    values, argmax = lc.region_max(xg, labels, int(num.max()))
    weights = torch.rand(values.shape)
    (values * weights).sum().backward()
    grad = xg.grad
    assert grad.shape == x.shape and grad.is_contiguous()
    want = torch.zeros(2, x[0].numel())
    present = argmax >= 0
    for b in range(2):
        want[b, argmax[b][present[b]]] = weights[b][present[b]]
    assert torch.equal(grad.reshape(2, -1), want)
    grad.add_(1.0)  # writable everywhere
    assert float(grad.sum()) == pytest.approx(float(want.sum()) + grad.numel(), rel=1e-6)
