"""Cold start of ``count_distribution`` forward + backward: the first calls in a fresh process.

Each of ``--procs`` fresh Python processes loads the same input (B=4 realistic 64x192x192 float32
maps from ``lesioncount.synthetic``, generated once by the parent and saved to a temporary file, so
the children do no numpy work before the timed calls), sets ``torch.set_num_threads(--threads)``
and times each of its first ``--calls`` calls of::

    r = lesioncount.count_distribution(x, max_count=4)      # x requires grad
    (-r.log_pmf.gather(1, targets)).sum().backward()

Per call it also records the CPU time of the process (all threads; less sensitive than wall time
to other processes on a busy machine), the minor page faults (``ru_minflt``) the call caused and the growth of
the process's anonymous resident memory (``RssAnon``) while its result and gradient are alive:
the fresh memory the call touched. The parent prints,
per call index, the median over processes, then first call vs steady state (median of calls 10-15
of each process, then the median over processes) and their ratio.

Usage (repository root)::

    .venv/bin/python benchmarks/bench_cold_start.py [--procs 7] [--calls 15] [--threads 2] [--pause 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import lesioncount
x0, targets = torch.load(sys.argv[1])
calls = int(sys.argv[3])
def rss_anon_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0
times, cpu, faults, fresh = [], [], [], []
for i in range(calls):
    x = x0.detach().requires_grad_(True)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    m0 = rss_anon_kib()
    c0 = time.process_time()
    t0 = time.perf_counter()
    r = lesioncount.count_distribution(x, max_count=4)
    loss = -r.log_pmf.gather(1, targets.view(-1, 1)).sum()
    loss.backward()
    t1 = time.perf_counter()
    cpu.append((time.process_time() - c0) * 1e3)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    fresh.append((rss_anon_kib() - m0) / 1024)  # result and gradient still alive
    times.append((t1 - t0) * 1e3)
    del r, loss, x
print(json.dumps({"ms": times, "cpu_ms": cpu, "minflt": faults, "rss_mib": fresh}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, default=7, help="fresh processes (default 7)")
    ap.add_argument("--calls", type=int, default=15, help="calls per process (default 15, >= 15)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--pause", type=float, default=3.0,
                    help="seconds to wait before each process (default 3): memory freed by the previous "
                         "one is then no longer warm on VMs that hand free memory back to the host")
    ap.add_argument("--json", help="also write the raw per-process results here")
    args = ap.parse_args()
    if args.calls < 15:
        ap.error("--calls must be >= 15 (steady state is calls 10-15)")

    import torch
    from lesioncount.synthetic import realistic_probability_maps

    x, masks, counts = realistic_probability_maps(4, (64, 192, 192), seed=0, return_masks=True)
    targets = counts.clamp(max=4)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "input.pt")
        torch.save((x, targets), path)
        runs = []
        load0 = os.getloadavg()[0]
        for _ in range(args.procs):
            time.sleep(args.pause)
            out = subprocess.run([sys.executable, "-c", CHILD, path, str(args.threads), str(args.calls)],
                                 check=True, capture_output=True, text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        load1 = os.getloadavg()[0]

    print(f"count_distribution fwd+bwd, B=4 64x192x192 float32, max_count=4, {args.threads} threads; "
          f"{args.procs} fresh processes; load average {load0:.2f} -> {load1:.2f}")
    print(f"{'call':>4} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'median cpu ms':>14} "
          f"{'median minflt':>14} {'RssAnon +MiB':>13}")
    for i in range(args.calls):
        ms = [r["ms"][i] for r in runs]
        print(f"{i + 1:>4} {statistics.median(ms):>10.2f} {min(ms):>8.2f} {max(ms):>8.2f} "
              f"{statistics.median(r['cpu_ms'][i] for r in runs):>14.2f} "
              f"{statistics.median(r['minflt'][i] for r in runs):>14.0f} "
              f"{statistics.median(r['rss_mib'][i] for r in runs):>13.1f}")
    summary = {}
    for key, name in (("ms", "wall"), ("cpu_ms", "cpu")):
        first = statistics.median(r[key][0] for r in runs)
        steady = statistics.median(statistics.median(r[key][9:15]) for r in runs)
        summary[name] = {"first_ms": first, "steady_ms": steady, "ratio": first / steady}
        print(f"{name}: first call {first:.2f} ms, steady state (calls 10-15) {steady:.2f} ms, "
              f"ratio {first / steady:.2f}x")
    print(f"fresh anonymous memory per call (RssAnon growth, median): first "
          f"{statistics.median(r['rss_mib'][0] for r in runs):.1f} MiB, steady "
          f"{statistics.median(statistics.median(r['rss_mib'][9:15]) for r in runs):.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "summary": summary, "load": [load0, load1]}, f)


if __name__ == "__main__":
    main()
