"""Overhead of the count term per nnU-Net v2 training step (nnUNetTrainerCount vs nnU-Net's own loss).

Writes the phantom as an nnU-Net raw dataset, runs nnU-Net's fingerprinting, planning and
preprocessing (3d_fullres), builds ``nnUNetTrainerCount`` and times ``train_step`` (forward, loss,
backward, gradient clipping, SGD step: nnU-Net's own method) on the same prefetched batches in
three modes, interleaved per batch (rotating order) so that drifts of the machine hit all modes:

- ``nnunet``: nnU-Net's loss alone (the trainer's loss swapped for nnU-Net's ``DeepSupervisionWrapper(DC_and_CE_loss)``);
- ``count``: nnU-Net's loss + w * count term (w > 0: the count term's forward and backward);
- ``count_logged``: weight 0 (segmentation pre-training epochs): the term computed without
  gradient, for the log only.

Also times the count term alone (forward + backward on a fixed network output). Reports medians.

    python benchmarks/bench_nnunet_step.py --shape 32 64 64 --steps 10 --json out/nnunet_step.json
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64), help="phantom (D, H, W) = patch size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (after 2 warm-up rounds)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the network initialisation")

    args = parser.parse_args(argv)

    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_nnunet_"))
    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
                      nnUNet_results=str(root / "res"), nnUNet_compile="f", nnUNet_n_proc_DA="1",
                      nnUNet_def_n_proc="1", LESIONCOUNT_NNUNET_PRETRAIN_EPOCHS="0")
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import lesioncount
    from lesioncount.nnunet import nnUNetTrainerCount, write_phantom_dataset

    write_phantom_dataset(root / "raw", 990, num_cases=6, shape=tuple(args.shape))
    extract_fingerprints([990], num_processes=1)
    plans_id = plan_experiments([990])
    preprocess([990], plans_id, configurations=("3d_fullres",), num_processes=(1,))
    os.environ["nnUNet_n_proc_DA"] = "0"
    torch.set_num_threads(args.threads or os.cpu_count())

    pre = root / "pre" / "Dataset990_LesionPhantom"
    plans = load_json(str(pre / f"{plans_id}.json"))
    plans["continue_training"] = False
    trainer = nnUNetTrainerCount(plans, "3d_fullres", 0, load_json(str(pre / "dataset.json")), torch.device("cpu"))
    torch.manual_seed(args.seed)
    trainer.on_train_start()
    trainer.network.train()

    count_loss, nnunet_loss = trainer.loss, trainer.loss.base
    cfg = trainer.configuration_manager
    batches = [next(trainer.dataloader_train) for _ in range(args.steps + 2)]

    def step(mode, batch):
        trainer.loss = nnunet_loss if mode == "nnunet" else count_loss
        trainer.count_weight = 1e-3 if mode == "count" else 0.0
        t0 = time.perf_counter()
        nnUNetTrainer.train_step(trainer, batch)
        return time.perf_counter() - t0

    modes = ("nnunet", "count", "count_logged")
    times = {m: [] for m in modes}
    candidates = []
    for i, batch in enumerate(batches):
        order = modes[i % 3:] + modes[:i % 3]
        for m in order:
            t = step(m, batch)
            if i >= 2:
                times[m].append(t)
        if i >= 2:  # candidates of the last count-term computation of the round
            candidates.append(int(trainer._last_count_term.result.num_lesions.sum()))

    # the count term alone, forward + backward, on a fixed output of the network
    batch = batches[0]
    with torch.no_grad():
        out0 = trainer.network(batch["data"])[0]
    term_times = []
    for _ in range(args.steps):
        o = out0.clone().requires_grad_(True)
        t0 = time.perf_counter()
        trainer.compute_count_term(o, batch["target"][0]).loss.backward()
        term_times.append(time.perf_counter() - t0)

    med = {m: statistics.median(v) for m, v in times.items()}
    result = {
        "patch_size": cfg.patch_size, "batch_size": cfg.batch_size,
        "features_per_stage": cfg.network_arch_init_kwargs.get("features_per_stage"),
        "torch_threads": torch.get_num_threads(), "compiled_ops": lesioncount.has_ops(), "steps": args.steps,
        "seed": args.seed,
        "median_s": med, "all_s": times,
        "min_s": {m: min(v) for m, v in times.items()},
        "count_overhead_s": med["count"] - med["nnunet"], "count_overhead_ratio": med["count"] / med["nnunet"] - 1,
        "logged_overhead_s": med["count_logged"] - med["nnunet"],
        # same batch, same round: robust to the load of a shared machine
        "count_overhead_paired_median_s": statistics.median(c - n for c, n in zip(times["count"], times["nnunet"])),
        "logged_overhead_paired_median_s": statistics.median(c - n for c, n in zip(times["count_logged"], times["nnunet"])),
        "count_term_alone_median_s": statistics.median(term_times),
        "candidates_per_batch_median": statistics.median(candidates),
    }
    print(f"nnU-Net 3d_fullres, patch {cfg.patch_size}, batch {cfg.batch_size}, features "
          f"{result['features_per_stage']}, {result['torch_threads']} threads, compiled ops {result['compiled_ops']}")
    for m in modes:
        print(f"  {m:>13}: median {med[m] * 1e3:8.1f} ms, min {min(times[m]) * 1e3:8.1f} ms per train_step "
              f"(n={len(times[m])})")
    print(f"  count term overhead: {result['count_overhead_s'] * 1e3:+.1f} ms per step "
          f"({result['count_overhead_ratio'] * 100:+.1f} %), paired median "
          f"{result['count_overhead_paired_median_s'] * 1e3:+.1f} ms; logged only (weight 0): "
          f"{result['logged_overhead_s'] * 1e3:+.1f} ms (paired {result['logged_overhead_paired_median_s'] * 1e3:+.1f} ms); the term alone (fwd+bwd): "
          f"{result['count_term_alone_median_s'] * 1e3:.1f} ms; candidates per batch (median) "
          f"{result['candidates_per_batch_median']}")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2, default=list))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
