"""``lesioncount nnunet-predict`` against nnU-Net's own prediction, on the CPU (real commands, wall time).

Writes the phantom as an nnU-Net raw dataset, plans and preprocesses it (3d_fullres), trains a tiny
``nnUNetTrainerCount`` model (``lesioncount nnunet-train``, 1 epoch of 2 iterations: the weights do
not matter for the timing) and predicts ``--cases`` cases with three pipelines, once each per round
(rotating order, so that drifts of the shared machine hit all three):

- ``plain``: ``nnUNetv2_predict`` (segmentations only);
- ``in_memory``: ``lesioncount nnunet-predict`` (segmentations + CASE.json, no .npz);
- ``saved``: ``nnUNetv2_predict --save_probabilities`` then ``lesioncount count`` on its folder
  (the route nnunet-predict replaces; both commands timed, summed).

Reports the medians over rounds of each pipeline's wall time (process start included: every
pipeline starts one or two fresh processes), the per-case overhead of ``in_memory`` over ``plain``
and the time ``in_memory`` saves against ``saved``, and the medians of nnunet-predict's own per-case
timings (``CASE.json``: predict_s, export_s, count_s, write_s). ``nnUNetv2_predict`` starts with
nnU-Net's trainer search, which imports every trainer module nnU-Net ships (timm, torchvision);
``nnunet-predict`` resolves its trainer directly, so whole-command differences mix that start-up
difference with the per-case cost. Needs nnU-Net's own commands to import
(make test-integration's .venv-integration: timm with a matching torchvision).

    .venv-integration/bin/python benchmarks/bench_nnunet_predict.py --cases 4 --rounds 3 --json out/nnunet_predict.json
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def _bin(name: str) -> str:
    path = pathlib.Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def _timed(cmd, env) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64), help="phantom (D, H, W)")
    parser.add_argument("--cases", type=int, default=4, help="cases predicted per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each runs the three pipelines once)")
    parser.add_argument("--npp", type=int, default=1, help="nnU-Net -npp (preprocessing processes) for every pipeline")
    parser.add_argument("--nps", type=int, default=1, help="nnU-Net -nps (export processes) for every pipeline")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_nnunet_predict_"))
    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
               nnUNet_results=str(root / "res"), nnUNet_compile="f", nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1")
    from lesioncount.nnunet import TRAINER_DIR, write_phantom_dataset

    env["nnUNet_extTrainer"] = str(TRAINER_DIR)
    num_train = max(5, args.cases)
    write_phantom_dataset(root / "raw", 990, num_cases=num_train + args.cases, shape=tuple(args.shape))
    raw = root / "raw" / "Dataset990_LesionPhantom"
    images = root / "imagesTs"
    images.mkdir()
    for i in range(num_train, num_train + args.cases):  # test cases out of the training set
        for p in (raw / "imagesTr").glob(f"phantom_{i:03d}_*.nii.gz"):
            shutil.move(str(p), str(images / p.name))
        (raw / "labelsTr" / f"phantom_{i:03d}.nii.gz").unlink()
    meta = json.loads((raw / "dataset.json").read_text())
    meta["numTraining"] = num_train
    (raw / "dataset.json").write_text(json.dumps(meta, indent=2))
    t0 = time.perf_counter()
    _timed([_bin("nnUNetv2_plan_and_preprocess"), "-d", "990", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    env["nnUNet_n_proc_DA"] = "0"  # single-threaded augmentation in training (planning needs >= 1)
    _timed([sys.executable, "-m", "lesioncount", "nnunet-train", "990", "3d_fullres", "0", "-device", "cpu",
            "--num-epochs", "1", "--num-iterations-per-epoch", "2", "--num-val-iterations-per-epoch", "1"], env)
    print(f"setup (planning, tiny training) {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    common = ["-i", images, "-d", "990", "-c", "3d_fullres", "-f", "0", "-device", "cpu", "-npp", str(args.npp),
              "-nps", str(args.nps), "--disable_progress_bar"]
    nnunet_predict = [_bin("nnUNetv2_predict"), *common, "-tr", "nnUNetTrainerCount"]
    ours = [sys.executable, "-m", "lesioncount", "nnunet-predict", *common]

    def plain(out):
        return _timed([*nnunet_predict, "-o", out], env)

    def in_memory(out):
        return _timed([*ours, "-o", out], env)

    def saved(out):
        t = _timed([*nnunet_predict, "-o", out, "--save_probabilities"], env)
        return t + _timed([sys.executable, "-m", "lesioncount", "count", "-i", out, "-o", out / "counts", "-q"], env)

    pipelines = {"plain": plain, "in_memory": in_memory, "saved": saved}
    times = {k: [] for k in pipelines}
    case_timings = {}  # nnunet-predict's own per-case timings (CASE.json timings_s), over every round
    names = list(pipelines)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            out = root / f"out_{name}_{r}"
            times[name].append(pipelines[name](out))
            if name == "in_memory":
                for path in out.glob("*.json"):
                    for key, value in json.loads(path.read_text()).get("timings_s", {}).items():
                        case_timings.setdefault(key, []).append(value)
            shutil.rmtree(out)
            print(f"round {r} {name}: {times[name][-1]:.2f} s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "torch": __import__("torch").__version__, "shape": list(args.shape), "cases": args.cases,
        "rounds": args.rounds, "npp": args.npp, "nps": args.nps, "times_s": times, "median_s": med,
        "overhead_per_case_s": (med["in_memory"] - med["plain"]) / args.cases,
        "saved_vs_npz_then_count_s": med["saved"] - med["in_memory"],
        "saved_vs_npz_then_count_per_case_s": (med["saved"] - med["in_memory"]) / args.cases,
        "in_memory_case_median_s": {k: statistics.median(v) for k, v in case_timings.items()},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
