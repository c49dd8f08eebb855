"""lesioncount.metrics: hand-computed cases, torchmetrics agreement, CountMetric accumulation, reset
and DDP sync, bad input, and the missing-extra path."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lesioncount import metrics
from lesioncount._extras import MissingExtraError

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------
# A small case written out by hand. M = 2: count bins 0, 1, "2+".
#
#  item  pmf                 target (bin)  argmax  confidence  correct  entropy (nats)
#   1    [0.80, 0.20, 0.00]   0 (0)         0       0.80        yes      0.5004
#   2    [0.60, 0.30, 0.10]   1 (1)         0       0.60        no       0.8979
#   3    [0.20, 0.70, 0.10]   1 (1)         1       0.70        yes      0.8018
#   4    [0.10, 0.40, 0.50]   3 (2)         2       0.50        yes      0.9433
#   5    [0.30, 0.40, 0.30]   2 (2)         1       0.40        no       1.0889
#   6    [0.15, 0.25, 0.60]   1 (1)         2       0.60        no       0.9377
#
# accuracy = 3/6 = 0.5
# per bin (TP, FP, FN):  bin 0: (1, 1, 0) -> P 1/2, R 1,   F1 2/3
#                        bin 1: (1, 1, 2) -> P 1/2, R 1/3, F1 2/5
#                        bin 2: (1, 1, 1) -> P 1/2, R 1/2, F1 1/2
# macro P = 1/2, macro R = (1 + 1/3 + 1/2)/3 = 11/18, macro F1 = (2/3 + 2/5 + 1/2)/3 = 47/90
#
# ECE, 2 bins [0, .5), [.5, 1):
#   [0, .5):  item 5: conf 0.4, acc 0            -> gap 0.4,  weight 1/6
#   [.5, 1):  items 1,2,3,4,6: conf (0.8+0.6+0.7+0.5+0.6)/5 = 0.64, acc 3/5 = 0.6 -> gap 0.04, weight 5/6
#   ECE = 0.4/6 + 0.04*5/6 = 0.1;  MCE = 0.4
# ECE, 3 bins [0, 1/3), [1/3, 2/3), [2/3, 1):
#   [1/3, 2/3): items 2,4,5,6: conf 2.1/4 = 0.525, acc 1/4 -> gap 0.275, weight 4/6
#   [2/3, 1):   items 1,3:     conf 0.75, acc 1           -> gap 0.25,  weight 2/6
#   ECE = 0.275*4/6 + 0.25*2/6 = 0.8/3 = 0.26667;  MCE = 0.275
# Expected count on the binned scale (tail counted as 2) vs the clamped target:
#   E = [0.2, 0.5, 0.9, 1.4, 1.0, 1.45], |E - bin| = [0.2, 0.5, 0.1, 0.6, 1.0, 0.45] -> MAE 2.85/6 = 0.475
# NLL = mean of -log [0.8, 0.3, 0.7, 0.5, 0.3, 0.25]
# Accuracy vs discarded (most uncertain first: items 5, 4, 6, 2, 3, 1):
#   drop 0 -> 3/6;  drop 1 (5) -> 3/5;  drop 2 (5, 4) -> 2/4;  drop 3 -> 2/3;  drop 4 -> 2/2;  drop 5 -> 1/1
# ---------------------------------------------------------------------------------------------
HAND_PMF = torch.tensor([
    [0.80, 0.20, 0.00],
    [0.60, 0.30, 0.10],
    [0.20, 0.70, 0.10],
    [0.10, 0.40, 0.50],
    [0.30, 0.40, 0.30],
    [0.15, 0.25, 0.60],
], dtype=torch.float64)
HAND_TARGET = torch.tensor([0, 1, 1, 3, 2, 1])
HAND_NLL = sum(-math.log(p) for p in (0.8, 0.3, 0.7, 0.5, 0.3, 0.25)) / 6


def test_hand_case_accuracy_and_macro_scores():
    pred = HAND_PMF.argmax(1)
    assert pred.tolist() == [0, 0, 1, 2, 1, 2]
    assert float(metrics.count_accuracy(pred, HAND_TARGET, max_count=2)) == pytest.approx(0.5)
    r = metrics.count_precision_recall_f1(pred, HAND_TARGET, max_count=2)
    assert float(r["precision"]) == pytest.approx(0.5)
    assert float(r["recall"]) == pytest.approx(11 / 18)
    assert float(r["f1"]) == pytest.approx(47 / 90)
    per_bin = metrics.count_precision_recall_f1(pred, HAND_TARGET, max_count=2, average="none")
    assert per_bin["recall"].tolist() == pytest.approx([1, 1 / 3, 1 / 2])
    assert per_bin["f1"].tolist() == pytest.approx([2 / 3, 2 / 5, 1 / 2])


def test_hand_case_calibration():
    ece, mce = metrics.count_calibration_errors(HAND_PMF, HAND_TARGET, max_count=2, n_bins=2)
    assert float(ece) == pytest.approx(0.1, abs=1e-6)
    assert float(mce) == pytest.approx(0.4, abs=1e-6)
    ece, mce = metrics.count_calibration_errors(HAND_PMF, HAND_TARGET, n_bins=3)
    assert float(ece) == pytest.approx(0.8 / 3, abs=1e-6)
    assert float(mce) == pytest.approx(0.275, abs=1e-6)
    bins = metrics.reliability_bins(HAND_PMF, HAND_TARGET, n_bins=2)
    assert bins["count"].tolist() == [1, 5, 0]
    assert bins["accuracy"].tolist() == pytest.approx([0.0, 0.6, 0.0], abs=1e-6)
    assert bins["confidence"].tolist() == pytest.approx([0.4, 0.64, 0.0], abs=1e-6)
    assert float(bins["ece"]) == pytest.approx(0.1, abs=1e-6)


def test_hand_case_all_metrics_and_discarded():
    m = metrics.count_metrics(HAND_PMF, HAND_TARGET, n_bins=2)
    assert set(m) == set(metrics.COUNT_METRIC_NAMES)
    assert float(m["accuracy"]) == pytest.approx(0.5)
    assert float(m["f1"]) == pytest.approx(47 / 90)
    assert float(m["ece"]) == pytest.approx(0.1, abs=1e-6)
    assert float(m["count_mae"]) == pytest.approx(0.475)
    assert float(m["nll"]) == pytest.approx(HAND_NLL)
    acc = metrics.accuracy_vs_discarded(HAND_PMF, HAND_TARGET, [0.0, 0.2, 0.34, 0.5, 0.7, 0.9])
    assert acc.tolist() == pytest.approx([3 / 6, 3 / 5, 2 / 4, 2 / 3, 1.0, 1.0])
    ent = metrics.pmf_entropy(HAND_PMF)
    assert ent.tolist() == pytest.approx([0.5004, 0.8979, 0.8018, 0.9433, 1.0889, 0.9377], abs=1e-4)
    # the exact expected count (sum of candidate probabilities) is compared with the raw target
    exact = torch.tensor([0.2, 0.5, 0.9, 3.5, 1.0, 1.45])
    m2 = metrics.count_metrics(HAND_PMF, HAND_TARGET, n_bins=2, expected_count=exact)
    assert float(m2["count_mae"]) == pytest.approx((0.2 + 0.5 + 0.1 + 0.5 + 1.0 + 0.45) / 6)


def test_absent_bins_are_left_out_of_the_macro_average():
    # bins 3 and 4+ never occur: a perfect prediction scores 1, not 3/5
    pred = torch.tensor([0, 1, 2, 2])
    r = metrics.count_precision_recall_f1(pred, pred.clone())
    assert {k: float(v) for k, v in r.items()} == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    # bin 2 predicted but never true: it counts (precision 0, F1 0); bin 3 only as a target: recall 0
    r = metrics.count_precision_recall_f1(torch.tensor([0, 2]), torch.tensor([0, 3]))
    assert float(r["precision"]) == pytest.approx((1 + 0 + 0) / 3)
    assert float(r["recall"]) == pytest.approx((1 + 0 + 0) / 3)


def test_counts_beyond_max_count_share_the_tail_bin():
    assert metrics.count_bins([0, 3, 4, 9], max_count=4).tolist() == [0, 3, 4, 4]
    assert float(metrics.count_accuracy(torch.tensor([5, 7]), torch.tensor([9, 4]))) == 1.0
    assert float(metrics.count_accuracy(torch.tensor([5, 7]), torch.tensor([9, 4]), max_count=8)) == 0.0
    cm = metrics.count_confusion_matrix(torch.tensor([0, 1, 6]), torch.tensor([0, 0, 5]), max_count=2)
    assert cm.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]


def test_macro_scores_match_torchmetrics_on_random_data():
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        n = int(torch.randint(1, 30, (1,), generator=g))
        hi = int(torch.randint(1, 9, (1,), generator=g))  # often fewer than 5 bins present
        pred = torch.randint(0, hi, (n,), generator=g)
        target = torch.randint(0, hi, (n,), generator=g)
        ours = metrics.count_precision_recall_f1(pred, target)
        p, t = pred.clamp_max(4), target.clamp_max(4)
        for name, fn in (("precision", multiclass_precision), ("recall", multiclass_recall), ("f1", multiclass_f1_score)):
            ref = fn(p, t, num_classes=5, average="macro")
            assert float(ours[name]) == pytest.approx(float(ref), abs=1e-6), (trial, name)
        ref_acc = multiclass_accuracy(p, t, num_classes=5, average="micro")
        assert float(metrics.count_accuracy(pred, target)) == pytest.approx(float(ref_acc), abs=1e-6)


def test_reliability_bins_reproduce_torchmetrics_calibration_errors():
    g = torch.Generator().manual_seed(5)
    for trial in range(10):
        logits = torch.randn(40, 5, generator=g, dtype=torch.float64) * (0.5 + trial)
        pmf = torch.softmax(logits, 1)
        pmf[:5] = F.one_hot(torch.arange(5) % 5, 5).double()  # confidence exactly 1.0: torchmetrics' extra bin
        target = torch.randint(0, 7, (40,), generator=g)
        for n_bins in (1, 3, 10, 15):
            bins = metrics.reliability_bins(pmf, target, n_bins=n_bins)
            ece, mce = metrics.count_calibration_errors(pmf, target, n_bins=n_bins)
            assert float(bins["ece"]) == pytest.approx(float(ece), abs=1e-6)
            assert float(bins["mce"]) == pytest.approx(float(mce), abs=1e-6)
            assert int(bins["count"].sum()) == 40
            assert int(bins["count"][-1]) >= 5


def test_pmf_rounding_above_one_is_clamped_not_softmaxed():
    # float DP can give 1 + 1e-16; torchmetrics would treat values outside [0, 1] as logits
    onehot = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).double()
    noisy = onehot.clone()
    noisy[0, 0] = 1 + 1e-12
    noisy[1, 0] = -1e-12
    target = torch.tensor([0, 1, 3, 3])  # 3 of 4 correct, all with confidence 1
    ece, mce = metrics.count_calibration_errors(noisy, target)
    assert float(ece) == pytest.approx(0.25, abs=1e-6)
    assert float(mce) == pytest.approx(0.25, abs=1e-6)


def test_count_metrics_from_count_distribution_result():
    import lesioncount

    g = torch.Generator().manual_seed(11)
    probs = torch.rand(4, 6, 10, 10, generator=g, dtype=torch.float64) ** 12
    r = lesioncount.count_distribution(probs, max_count=4)
    target = torch.tensor([0, 2, 5, 1])
    m = metrics.count_metrics(r.pmf, target, expected_count=r.expected_count, log_pmf=r.log_pmf)
    assert float(m["nll"]) == pytest.approx(float(lesioncount.count_nll(r.log_pmf, target)))
    assert float(m["count_mae"]) == pytest.approx(float((r.expected_count - target.double()).abs().mean()))


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[0.5, 0.5]]) * 3, "probabilities in \\[0, 1\\]"),
    (torch.tensor([[0.2, 0.2, 0.2]]), "sum to 1"),
    (torch.tensor([[float("nan"), 1.0]]), "NaN"),
    (torch.tensor([0.5, 0.5]), "shape \\(N, M\\+1\\)"),
    (torch.tensor([[1, 0]]), "floating"),
])
def test_bad_pmf_is_rejected_with_the_argument_name(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        metrics.count_calibration_errors(bad, torch.tensor([0] * (bad.shape[0] if bad.dim() == 2 else 1)))


def test_bad_targets_and_arguments():
    pmf = torch.full((2, 5), 0.2)
    with pytest.raises(ValueError, match="`target` counts must be >= 0"):
        metrics.count_metrics(pmf, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="whole numbers"):
        metrics.count_metrics(pmf, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="one entry per item"):
        metrics.count_accuracy(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="max_count = 4, but max_count=3"):
        metrics.count_calibration_errors(pmf, torch.tensor([0, 1]), max_count=3)
    with pytest.raises(ValueError, match="fractions"):
        metrics.accuracy_vs_discarded(pmf, torch.tensor([0, 1]), [0.0, 1.0])
    with pytest.raises(ValueError, match="no items"):
        metrics.count_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


def test_segmentation_f1_and_voxel_calibration():
    probs = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]])
    # global: TP 1, FP 1, FN 1 -> 2/4; per item: 0.5 and (both empty) 1.0
    assert float(metrics.segmentation_f1(probs, mask)) == pytest.approx(0.5)
    assert metrics.segmentation_f1(probs, mask, reduction="none").tolist() == pytest.approx([0.5, 1.0])
    assert float(metrics.segmentation_f1(probs, mask, reduction="mean")) == pytest.approx(0.75)
    assert math.isnan(float(metrics.segmentation_f1(probs, mask, reduction="none", empty_score=float("nan"))[1]))
    # voxel calibration, 2 bins: [0, .5): probs 0.25, 0.25 -> conf 0.25, acc 0; [.5, 1): 0.55, 0.75, 0.75 ->
    # conf 0.6833, acc 1 -> ECE = 0.25*2/5 + 0.3167*3/5 = 0.29, MCE = 0.3167
    p = torch.tensor([0.25, 0.25, 0.55, 0.75, 0.75])
    ece, mce = metrics.voxel_calibration_errors(p, torch.tensor([0, 0, 1, 1, 1]), n_bins=2)
    assert float(ece) == pytest.approx(0.29, abs=1e-5)
    assert float(mce) == pytest.approx(0.95 / 3, abs=1e-5)
    with pytest.raises(ValueError, match="binary"):
        metrics.segmentation_f1(probs, mask * 2)
    with pytest.raises(ValueError, match="same shape"):
        metrics.voxel_calibration_errors(p, torch.tensor([0, 1]))


def test_count_metric_accumulates_like_the_functional_metrics_and_resets():
    g = torch.Generator().manual_seed(7)
    pmf = torch.softmax(torch.randn(13, 5, generator=g, dtype=torch.float64) * 2, 1)
    target = torch.randint(0, 7, (13,), generator=g)
    metric = metrics.CountMetric(max_count=4, n_bins=5)
    metric.update(pmf[:6], target[:6])
    metric.update(pmf[6:], target[6:])
    got = metric.compute()
    ref = metrics.count_metrics(pmf, target, n_bins=5)
    assert set(got) == set(metrics.COUNT_METRIC_NAMES)
    for k in ref:
        assert float(got[k]) == pytest.approx(float(ref[k]), abs=1e-6), k
    metric.reset()
    with pytest.raises(ValueError, match="at least one update"), pytest.warns(UserWarning, match="before the ``update``"):
        metric.compute()
    metric.update(pmf[:4], target[:4])
    ref4 = metrics.count_metrics(pmf[:4], target[:4], n_bins=5)
    assert float(metric.compute()["accuracy"]) == pytest.approx(float(ref4["accuracy"]))
    with pytest.raises(ValueError, match="max_count"):
        metric.update(torch.full((2, 4), 0.25), torch.tensor([0, 1]))


def test_count_metric_takes_a_count_result():
    import lesioncount

    probs = torch.zeros(2, 4, 8, 8)
    probs[0, 1, 2, 2] = 0.7
    probs[1, 1, 2, 2] = 0.6
    probs[1, 3, 6, 6] = 0.9
    r = lesioncount.count_distribution(probs, max_count=4)
    metric = metrics.CountMetric()
    metric.update(r, torch.tensor([1, 2]))
    out = metric.compute()
    # exact expected counts 0.7 and 1.5 -> MAE (0.3 + 0.5)/2; NLL from log_pmf: -log 0.7, -log 0.54
    assert float(out["count_mae"]) == pytest.approx(0.4, abs=1e-6)
    assert float(out["nll"]) == pytest.approx((-math.log(0.7) - math.log(0.54)) / 2, abs=1e-6)


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)
        n = 3 + 4 * rank  # uneven shards: 3 and 7 items
        pmf = torch.softmax(torch.randn(n, 5, generator=g, dtype=torch.float64), 1)
        target = torch.randint(0, 6, (n,), generator=g)
        metric = metrics.CountMetric(max_count=4, n_bins=4)
        metric.update(pmf[:2], target[:2])
        metric.update(pmf[2:], target[2:])
        result = metric.compute()
        only_rank0 = metrics.CountMetric(max_count=4, n_bins=4)  # rank 1 sees no items at all
        if rank == 0:
            only_rank0.update(pmf, target)
        result0 = only_rank0.compute()
        torch.save({"pmf": pmf, "target": target, "result": {k: v.cpu() for k, v in result.items()},
                    "result0": {k: v.cpu() for k, v in result0.items()}}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_count_metric_syncs_across_two_gloo_processes(tmp_path):
    import time

    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    # fork: the children inherit torch and torchmetrics already imported (spawn re-imports them,
    # ~10 s on a loaded 2-core machine). The metric only uses 1 intra-op thread.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2,
                                 join=False, start_method=method)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 120 s")
    shards = [torch.load(f"{out}.{r}") for r in range(2)]
    pmf = torch.cat([s["pmf"] for s in shards])
    target = torch.cat([s["target"] for s in shards])
    ref = metrics.count_metrics(pmf, target, n_bins=4)
    ref0 = metrics.count_metrics(shards[0]["pmf"], shards[0]["target"], n_bins=4)
    for s in shards:  # every rank computes the metric of all 10 items
        for k in ref:
            assert float(s["result"][k]) == pytest.approx(float(ref[k]), abs=1e-6), k
            assert float(s["result0"][k]) == pytest.approx(float(ref0[k]), abs=1e-6), k


def test_missing_torchmetrics_names_the_eval_extra(monkeypatch):
    import importlib

    from lesioncount import _extras

    real = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "torchmetrics" or name.startswith("torchmetrics."):
            raise ImportError("No module named 'torchmetrics'")
        return real(name, *a, **k)

    monkeypatch.setattr(_extras.importlib, "import_module", fake_import)
    monkeypatch.delitem(vars(metrics), "CountMetric", raising=False)
    with pytest.raises(MissingExtraError, match=r"lesioncount\[eval\]"):
        metrics.CountMetric
    with pytest.raises(MissingExtraError, match=r"lesioncount\[eval\]"):
        metrics.count_calibration_errors(HAND_PMF, HAND_TARGET)
    assert float(metrics.count_accuracy(HAND_PMF.argmax(1), HAND_TARGET, 2)) == 0.5  # plain torch still works


def test_modules_import_without_torchmetrics_and_matplotlib():
    code = (
        "import sys; sys.modules['torchmetrics'] = None; sys.modules['matplotlib'] = None\n"
        "import torch, lesioncount.metrics as m, lesioncount.plot as p\n"
        "from lesioncount._extras import MissingExtraError\n"
        "print(float(m.count_accuracy(torch.tensor([1, 2]), torch.tensor([1, 3]))))\n"
        "for f in (lambda: m.CountMetric, lambda: p.plot_count_distribution(torch.tensor([0.5, 0.5]))):\n"
        "    try:\n        f()\n    except MissingExtraError as e:\n        print(e)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "0.5"
    assert "lesioncount[eval]" in lines[1] and "torchmetrics" in lines[1]
    assert "lesioncount[plot]" in lines[2] and "matplotlib" in lines[2]


def test_count_metrics_nll_follows_the_infeasible_target_rule():
    import lesioncount

    # item 1's target (2) has probability exactly 0: left out of the NLL mean, counted as infeasible
    pmf = torch.tensor([[0.25, 0.75, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    m = metrics.count_metrics(pmf, torch.tensor([1, 2]), 2, n_bins=5, log_pmf=pmf.log())
    assert float(m["nll"]) == pytest.approx(-math.log(0.75))
    assert float(m["infeasible"]) == pytest.approx(0.5)
    assert float(m["nll"]) == pytest.approx(float(lesioncount.count_nll(pmf.log(), torch.tensor([1, 2]))))
