"""Cost of the count loss in a UNet training step (forward + backward + Adam step).

The paper's claim to check: adding the count NLL to the segmentation loss costs little. Targets:
at most 15 % more per step on a CPU at a small size, at most 5 % on a GPU at the paper's size.

| device | batch                         | UNet                               | precision |
|--------|-------------------------------|------------------------------------|-----------|
| cpu    | 2 x 5 x 32 x 64 x 64          | 5 levels, ``LESIONCOUNT_BENCH_TRAIN_FILTERS`` (default 16) base filters | float32 |
| cuda   | 2 x 5 x 64 x 192 x 192        | 5 levels, 32 base filters (the paper's) | bf16 autocast (count term in float32) |

The step is :func:`lesioncount.train.loop.train_step`, the training loop's own step, with the same
model, optimizer and batch for both variants (``seg_only``: BCE; ``with_count``: BCE + 0.001 x count
NLL at threshold 0.1, 18-connectivity, bins 0..3, 4+). The batch is two synthetic phantoms; the
output bias of the (untrained) UNet is shifted once so that 2 % of the voxels exceed the candidate
threshold, which gives tens to hundreds of scattered candidates per item, like a network early in
multi-task training (an untrained network would give one giant component). CUDA work is
synchronised inside the timed call.

Run::

    python -m pytest benchmarks/bench_train.py --benchmark-columns=median,iqr,rounds
    python benchmarks/bench_train.py            # the overhead table (both devices when available)

``test_count_term_overhead`` times both variants interleaved (A B A B ...) in one loop so that load
from other processes hits both alike, and asserts the median of the per-pair ratios against the target; it also
prints the count term alone (count NLL of fixed logits + its backward), the added cost without the
noise of the whole step.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import pytest
import torch


from lesioncount.train.loop import train_step

CPU_FILTERS = int(os.environ.get("LESIONCOUNT_BENCH_TRAIN_FILTERS", "16"))
SETTINGS = {
    "cpu": {"shape": (32, 64, 64), "batch": 2, "base_filters": CPU_FILTERS, "amp": None, "limit": 1.15, "rounds": 5,
            "warmup": 1},
    "cuda": {"shape": (64, 192, 192), "batch": 2, "base_filters": 32, "amp": torch.bfloat16, "limit": 1.05,
             "rounds": 15, "warmup": 3},
}
COUNT_WEIGHT = 1e-3
CANDIDATE_FRACTION = 0.02


def _devices():
    return [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="CUDA is not available"))]


class StepBench:
    """Model, optimizer and one batch on ``device``; :meth:`step` runs one synchronised training step."""

    def __init__(self, device: str):
        from lesioncount.train.data import PhantomDataset
        from lesioncount.train.model import UNet3D

        s = SETTINGS[device]
        self.device = torch.device(device)
        self.settings = s
        data = PhantomDataset(s["batch"], shape=s["shape"], seed=0, cache_bytes=0)
        items = [data[i] for i in range(s["batch"])]
        self.image = torch.stack([it["image"] for it in items]).to(self.device)
        self.mask = torch.stack([it["mask"] for it in items]).to(self.device)
        self.counts = torch.stack([it["count"] for it in items]).to(self.device)
        torch.manual_seed(0)
        self.model = UNet3D(in_channels=self.image.shape[1], base_filters=s["base_filters"], levels=5,
                            dropout=0.1).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, weight_decay=1e-5)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        with torch.no_grad():  # shift the output so that CANDIDATE_FRACTION of voxels exceed 0.1
            logits = self.model.eval()(self.image).float()
            q = torch.quantile(logits.flatten()[:: max(1, logits.numel() // 2**24)], 1 - CANDIDATE_FRACTION)
            self.model.head.bias -= q - math.log(0.1 / 0.9)
            import lesioncount

            self.candidates = lesioncount.count_distribution(self.model(self.image).float(), from_logits=True,
                                                             max_count=4).num_lesions.tolist()
        self.model.train()

    def step(self, with_count: bool) -> None:
        train_step(self.model, self.optimizer, self.image, self.mask, self.counts,
                   count_weight=COUNT_WEIGHT if with_count else 0.0, amp_dtype=self.settings["amp"])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def count_term_alone(self, rounds: int) -> float:
        """Median seconds of the count term by itself: count NLL of the (fixed) logits + its backward."""
        from lesioncount.train.loop import count_loss_term

        with torch.no_grad():
            logits = self.model(self.image).float()
        times = []
        for _ in range(rounds + 1):
            x = logits.detach().requires_grad_(True)
            start = time.perf_counter()
            loss, _ = count_loss_term(x, self.counts)
            loss.backward()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    def interleaved(self, rounds: int) -> dict:
        """Median seconds per step of both variants, timed alternately; and their ratio."""
        for _ in range(self.settings["warmup"]):
            self.step(False)
            self.step(True)
        times = {False: [], True: []}
        for r in range(rounds):
            for with_count in ((False, True) if r % 2 == 0 else (True, False)):
                start = time.perf_counter()
                self.step(with_count)
                times[with_count].append(time.perf_counter() - start)
        seg, both = statistics.median(times[False]), statistics.median(times[True])
        # the ratio of each adjacent pair cancels load that drifts over seconds; its median is the estimate
        paired = statistics.median(b / a for a, b in zip(times[False], times[True]))
        return {"seg_only_s": seg, "with_count_s": both, "ratio": paired, "ratio_of_medians": both / seg,
                "ratio_of_minima": min(times[True]) / min(times[False]), "rounds": rounds}


_BENCHES: dict[str, StepBench] = {}


def _bench(device: str) -> StepBench:
    if device not in _BENCHES:
        _BENCHES[device] = StepBench(device)
    return _BENCHES[device]


@pytest.mark.parametrize("variant", ["seg_only", "with_count"])
@pytest.mark.parametrize("device", _devices())
def test_train_step(benchmark, device, variant):
    bench = _bench(device)
    s = bench.settings
    with_count = variant == "with_count"
    benchmark.extra_info.update({"device": device, "variant": variant, "shape": list(s["shape"]),
                                 "batch": s["batch"], "base_filters": s["base_filters"],
                                 "amp": str(s["amp"]), "candidates": bench.candidates,
                                 "loadavg_1m": os.getloadavg()[0]})
    benchmark.pedantic(bench.step, args=(with_count,), rounds=s["rounds"], warmup_rounds=s["warmup"],
                       iterations=1)


@pytest.mark.parametrize("device", _devices())
def test_count_term_overhead(device):
    bench = _bench(device)
    result = bench.interleaved(SETTINGS[device]["rounds"])
    alone = bench.count_term_alone(SETTINGS[device]["rounds"])
    print(f"\n{device}: seg only {result['seg_only_s'] * 1e3:.1f} ms, with count {result['with_count_s'] * 1e3:.1f} ms,"
          f" ratio {result['ratio']:.3f} (limit {SETTINGS[device]['limit']}), count term alone {alone * 1e3:.1f} ms"
          f" ({alone / result['seg_only_s']:.1%} of a step), candidates {bench.candidates}")
    assert result["ratio"] <= SETTINGS[device]["limit"], result


def main(argv=None) -> int:
    """Print the overhead table: median step time with / without the count term, per device."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", action="append", choices=("cpu", "cuda"),
                        help="device(s) to time (default: cpu, and cuda when available)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant")
    args = parser.parse_args(argv)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.2f}")
    print(f"| device | batch x C x D x H x W | base filters | amp | candidates | seg only (ms) | with count (ms) "
          f"| ratio (median of pairs) | ratio of minima | limit | count term alone (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for device in devices:
        bench = _bench(device)
        s = bench.settings
        r = bench.interleaved(args.rounds or s["rounds"])
        shape = " x ".join(map(str, (s["batch"], bench.image.shape[1], *s["shape"])))
        amp = "none" if s["amp"] is None else str(s["amp"]).replace("torch.", "")
        print(f"| {device} | {shape} | {s['base_filters']} | {amp} | {bench.candidates} | "
              f"{r['seg_only_s'] * 1e3:.1f} | {r['with_count_s'] * 1e3:.1f} | {r['ratio']:.3f} | "
              f"{r['ratio_of_minima']:.3f} | {s['limit']} | "
              f"{bench.count_term_alone(args.rounds or s['rounds']) * 1e3:.1f} |")
        failed |= r["ratio"] > s["limit"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
