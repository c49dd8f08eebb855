"""evaluate-model: Table 1 / C.1 numbers against independent recomputation, and the CLI outputs."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from torch.utils.data import Dataset

import lesioncount
from lesioncount import cli
from lesioncount.train import evaluation, loop
from lesioncount.train.config import TrainConfig

tm = pytest.importorskip("torchmetrics.functional.classification")
STRUCT18 = ndi.generate_binary_structure(3, 2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NoisyMasks(Dataset):
    """Items whose single image channel is the lesion mask plus Gaussian noise (so a 1x1x1 conv is a
    decent, imperfect lesion detector): counts 0..6 cover every count bin including "4+"."""

    def __init__(self, n=14, shape=(8, 16, 16), seed=0):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            mask = np.zeros(shape, dtype=np.float32)
            for _ in range(i % 7):
                d, h, w = rng.integers(1, shape[0] - 2), rng.integers(1, shape[1] - 3), rng.integers(1, shape[2] - 3)
                mask[d:d + 2, h:h + rng.integers(1, 3), w:w + 2] = 1
            count = ndi.label(mask > 0, structure=STRUCT18)[1]
            image = mask + rng.normal(0, 0.09, size=shape).astype(np.float32)
            self.items.append({"image": torch.from_numpy(image)[None], "mask": torch.from_numpy(mask)[None],
                               "count": torch.tensor(count), "name": f"case{i:02d}"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _detector():
    net = torch.nn.Conv3d(1, 1, kernel_size=1)
    with torch.no_grad():
        net.weight.fill_(8.0)
        net.bias.fill_(-4.0)
    return net.eval()


def _reference_pmf(probs: np.ndarray, threshold: float, max_count: int = 4) -> np.ndarray:
    labels, k = ndi.label(probs > threshold, structure=STRUCT18)
    p = ndi.maximum(probs, labels, index=np.arange(1, k + 1)) if k else np.zeros(0)
    pmf = np.zeros(max(k, max_count) + 1)
    pmf[0] = 1.0
    for pk in p:
        pmf[1:] = pmf[1:] * (1 - pk) + pmf[:-1] * pk
        pmf[0] *= 1 - pk
    return np.concatenate([pmf[:max_count], [pmf[max_count:].sum()]])


def _macro_f1(pred: np.ndarray, target: np.ndarray, classes: int = 5) -> float:
    """Macro F1 over the count bins present in predictions or targets (torchmetrics' convention)."""
    scores = []
    for c in range(classes):
        tp = np.sum((pred == c) & (target == c))
        fp = np.sum((pred == c) & (target != c))
        fn = np.sum((pred != c) & (target == c))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def test_evaluate_model_matches_independent_computation():
    data = NoisyMasks()
    ev = evaluation.evaluate_model(_detector(), data, name="detector", batch_size=4)
    rows = {r["method"].split(" (")[0]: r for r in ev.summary["rows"]}

    with torch.no_grad():
        logits = torch.cat([_detector()(data[i]["image"][None]) for i in range(len(data))]).double()
    probs = torch.sigmoid(logits)[:, 0].numpy()
    masks = np.stack([data[i]["mask"][0].numpy() for i in range(len(data))]) > 0.5
    counts = np.array([int(data[i]["count"]) for i in range(len(data))])
    bins = np.minimum(counts, 4)
    assert set(bins.tolist()) == {0, 1, 2, 3, 4}

    pmf = np.stack([_reference_pmf(probs[i], 0.1) for i in range(len(data))])
    np.testing.assert_allclose(ev.pmf.numpy(), pmf, atol=1e-5)
    ours_pred = pmf.argmax(1)
    assert rows["count distribution"]["count_accuracy"] == pytest.approx(np.mean(ours_pred == bins))
    assert rows["count distribution"]["count_f1"] == pytest.approx(_macro_f1(ours_pred, bins))
    ece = tm.multiclass_calibration_error(torch.from_numpy(pmf).float(), torch.from_numpy(bins), num_classes=5,
                                          n_bins=10, norm="l1")
    mce = tm.multiclass_calibration_error(torch.from_numpy(pmf).float(), torch.from_numpy(bins), num_classes=5,
                                          n_bins=10, norm="max")
    assert rows["count distribution"]["count_ece"] == pytest.approx(float(ece), abs=1e-4)
    assert rows["count distribution"]["count_mce"] == pytest.approx(float(mce), abs=1e-4)
    expected_counts = []
    for i in range(len(data)):
        labels, k = ndi.label(probs[i] > 0.1, structure=STRUCT18)
        expected_counts.append(np.sum(ndi.maximum(probs[i], labels, index=np.arange(1, k + 1))) if k else 0.0)
    assert rows["count distribution"]["count_mae"] == pytest.approx(np.mean(np.abs(np.array(expected_counts) - counts)),
                                                                    rel=1e-4)

    cc = np.array([ndi.label(probs[i] > 0.5, structure=STRUCT18)[1] for i in range(len(data))])
    np.testing.assert_array_equal(ev.baseline_counts.numpy(), cc)
    cc_bins = np.minimum(cc, 4)
    assert rows["cc_count"]["count_accuracy"] == pytest.approx(np.mean(cc_bins == bins))
    assert rows["cc_count"]["count_f1"] == pytest.approx(_macro_f1(cc_bins, bins))
    # a hard count is a one-hot pmf: every confidence is 1, so ECE = MCE = 1 - accuracy
    assert rows["cc_count"]["count_ece"] == pytest.approx(1 - np.mean(cc_bins == bins), abs=1e-6)

    pred = probs > 0.5
    tp, fp, fn = np.sum(pred & masks), np.sum(pred & ~masks), np.sum(~pred & masks)
    for row in rows.values():
        assert row["seg_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        voxel_ece = tm.binary_calibration_error(torch.from_numpy(probs.reshape(-1)).float(),
                                                torch.from_numpy(masks.reshape(-1).astype(np.int64)), n_bins=10)
        voxel_mce = tm.binary_calibration_error(torch.from_numpy(probs.reshape(-1)).float(),
                                                torch.from_numpy(masks.reshape(-1).astype(np.int64)), n_bins=10,
                                                norm="max")
        assert row["seg_ece"] == pytest.approx(float(voxel_ece), abs=1e-5)
        assert row["seg_mce"] == pytest.approx(float(voxel_mce), abs=1e-5)

    # Table C.1: both methods at every threshold 0.1 .. 0.9
    assert ev.sweep_thresholds == evaluation.SWEEP_THRESHOLDS
    for r in ev.summary["sweep"]:
        t = r["threshold"]
        if r["method"] == evaluation.THIS_METHOD:
            predicted = np.stack([_reference_pmf(probs[i], t) for i in range(len(data))]).argmax(1)
        else:
            predicted = np.minimum([ndi.label(probs[i] > t, structure=STRUCT18)[1] for i in range(len(data))], 4)
        assert r["accuracy"] == pytest.approx(np.mean(predicted == bins)), (t, r["method"])
        assert r["f1"] == pytest.approx(_macro_f1(predicted, bins)), (t, r["method"])

    # accuracy after discarding the most uncertain fraction (highest entropy first)
    entropy = -np.sum(np.where(pmf > 0, pmf * np.log(np.where(pmf > 0, pmf, 1)), 0), axis=1)
    order = np.argsort(-entropy, kind="stable")
    for r in ev.summary["discarded"]:
        drop = int(math.floor(r["fraction"] * len(data) + 1e-9))
        kept = order[drop:]
        assert r["accuracy"] == pytest.approx(np.mean(ours_pred[kept] == bins[kept])), r["fraction"]


def test_voxel_stats_stream_equals_one_shot_metric():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 1000, generator=gen) ** 3
    probs[0, :5] = 1.0  # the extra bin of confidence exactly 1
    mask = torch.rand(3, 1000, generator=gen) < probs
    stats = evaluation.VoxelStats(threshold=0.5, n_bins=10)
    for b in range(3):
        stats.update(probs[b], mask[b])
    ece, mce = lesioncount.metrics.voxel_calibration_errors(probs, mask, n_bins=10)
    assert stats.calibration_errors() == pytest.approx((float(ece), float(mce)), abs=1e-6)
    assert stats.f1() == pytest.approx(float(lesioncount.metrics.segmentation_f1(probs, mask, threshold=0.5)))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval_run")
    loop.train(TrainConfig(out_dir=str(out), data="phantom", num_train=2, num_val=2, num_test=4, shape=(16, 32, 32),
                           base_filters=4, levels=3, epochs=2, pretrain_epochs=1, batch_size=2, device="cpu",
                           progress=False, seed=1))
    return out


def _table1(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_report_matches_functional_metrics(tiny_checkpoint, tmp_path, capsys):
    from lesioncount import metrics
    from lesioncount.train.data import build_datasets

    out = tmp_path / "eval"
    code = cli.main(["evaluate-model", "--checkpoint", f"multitask={tiny_checkpoint / 'best.pt'}",
                     "--checkpoint", str(tiny_checkpoint / "last.pt"), "-o", str(out), "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "| multitask | count distribution (tau=0.1) |" in printed
    expected = {"report.md", "table1.csv", "threshold_sweep.csv", "accuracy_vs_discarded.csv", "per_case.csv",
                "accuracy_vs_discarded.png", "threshold_sweep.png"}
    names = {p.name for p in out.iterdir()}
    assert expected <= names
    pngs = sorted(out.glob("*.png"))
    # four shared figures (accuracy vs discarded, threshold sweep, uncertainty curves, entropy
    # histograms) + reliability & count distribution per model
    assert len(pngs) == 4 + 2 * 2
    assert {"uncertainty_curves.png", "entropy_histograms.png"} <= names
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    report = (out / "report.md").read_text()
    assert "## Table C.1" in report and "![reliability_multitask](reliability_multitask.png)" in report

    rows = _table1(out / "table1.csv")
    assert [(r["model"], r["method"]) for r in rows] == [
        ("multitask", "count distribution (tau=0.1)"), ("multitask", "cc_count (tau=0.5)"),
        (tiny_checkpoint.name, "count distribution (tau=0.1)"), (tiny_checkpoint.name, "cc_count (tau=0.5)")]

    # recompute the multitask rows with the functional metrics
    model, config, _ = evaluation.load_model(tiny_checkpoint / "best.pt")
    _, _, test_set = build_datasets("phantom", num_train=2, num_val=2, num_test=4, shape=(16, 32, 32), seed=1,
                                    connectivity=18)
    with torch.no_grad():
        logits = torch.cat([model(test_set[i]["image"][None]) for i in range(len(test_set))]).float()
    masks = torch.cat([test_set[i]["mask"][None] for i in range(len(test_set))])
    counts = torch.stack([test_set[i]["count"] for i in range(len(test_set))])
    result = lesioncount.count_distribution(logits, threshold=0.1, connectivity=18, max_count=4, from_logits=True)
    baseline = lesioncount.cc_count(torch.sigmoid(logits), threshold=0.5, connectivity=18)
    probs = torch.sigmoid(logits)
    seg_f1 = float(metrics.segmentation_f1(probs, masks, threshold=0.5))
    seg_ece, seg_mce = (float(v) for v in metrics.voxel_calibration_errors(probs, masks, n_bins=10))
    ours, base = rows[0], rows[1]
    assert float(ours["count_accuracy"]) == pytest.approx(float(metrics.count_accuracy(result.most_likely_count, counts)))
    assert float(ours["count_f1"]) == pytest.approx(
        float(metrics.count_precision_recall_f1(result.most_likely_count, counts)["f1"]))
    ece, mce = metrics.count_calibration_errors(result.pmf, counts, max_count=4)
    assert float(ours["count_ece"]) == pytest.approx(float(ece), abs=1e-5)
    assert float(ours["count_mce"]) == pytest.approx(float(mce), abs=1e-5)
    assert float(base["count_accuracy"]) == pytest.approx(float(metrics.count_accuracy(baseline, counts)))
    assert float(base["count_f1"]) == pytest.approx(float(metrics.count_precision_recall_f1(baseline, counts)["f1"]))
    for row in (ours, base):
        assert float(row["seg_f1"]) == pytest.approx(seg_f1)
        assert float(row["seg_ece"]) == pytest.approx(seg_ece, abs=1e-5)
        assert float(row["seg_mce"]) == pytest.approx(seg_mce, abs=1e-5)

    with (out / "per_case.csv").open(newline="") as fh:
        per_case = [r for r in csv.DictReader(fh) if r["model"] == "multitask"]
    assert [r["case"] for r in per_case] == [test_set[i]["name"] for i in range(len(test_set))]
    assert [int(r["true_count"]) for r in per_case] == counts.tolist()
    assert [int(r["cc_count_0.5"]) for r in per_case] == baseline.tolist()
    with (out / "threshold_sweep.csv").open(newline="") as fh:
        sweep = list(csv.DictReader(fh))
    assert len(sweep) == 2 * 9 * 2  # models x thresholds x methods


def test_cli_errors_name_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert cli.main(["evaluate-model", "--checkpoint", str(missing), "-o", str(tmp_path / "o")]) == 2
    assert "nope.pt not found" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(3)}, junk)
    assert cli.main(["evaluate-model", "--checkpoint", f"x={junk}", "-o", str(tmp_path / "o")]) == 2
    assert "junk.pt: not a lesioncount training checkpoint" in capsys.readouterr().err


class HiddenLesions(Dataset):
    """Masks with 1, 2, 5 lesions; in item 1 only one of the two lesions shows in the image and in
    item 2 only three of five, so their true count (bin) exceeds the number of candidates."""

    def __init__(self, shape=(8, 16, 16)):
        self.items = []
        for i, (lesions, visible) in enumerate(((1, 1), (2, 1), (5, 3))):
            mask = np.zeros(shape, dtype=np.float32)
            image = np.zeros(shape, dtype=np.float32)
            for j in range(lesions):
                h, w = 1 + 3 * j, 1 + 3 * (j % 2)
                mask[2:4, h:h + 2, w:w + 2] = 1
                if j < visible:
                    image[2:4, h:h + 2, w:w + 2] = 0.7 + 0.05 * j
            assert ndi.label(mask > 0, structure=STRUCT18)[1] == lesions
            self.items.append({"image": torch.from_numpy(image)[None], "mask": torch.from_numpy(mask)[None],
                               "count": torch.tensor(lesions), "name": f"case{i}"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_count_nll_infeasible_fraction_and_feasible_mean(tmp_path):
    data = HiddenLesions()
    ev = evaluation.evaluate_model(_detector(), data, name="hidden", batch_size=2, sweep_thresholds=(0.5,))
    ours, base = ev.summary["rows"]
    with torch.no_grad():
        probs = torch.sigmoid(torch.cat([_detector()(data[i]["image"][None]) for i in range(3)]).double())
    pmfs = [_reference_pmf(probs[i, 0].numpy(), 0.1) for i in range(3)]
    candidates = [ndi.label(probs[i, 0].numpy() > 0.1, structure=STRUCT18)[1] for i in range(3)]
    assert candidates == [1, 1, 3]  # case 1: 2 lesions > 1 candidate; case 2: bin 4+ > 3 candidates
    assert ours["count_nll"] == math.inf  # honest: P(C = true count) = 0 for two cases
    assert ours["count_infeasible"] == pytest.approx(2 / 3)
    assert ours["count_nll_feasible"] == pytest.approx(-math.log(pmfs[0][1]), rel=1e-5)
    assert math.isnan(base["count_infeasible"]) and math.isnan(base["count_nll_feasible"])

    paths = evaluation.write_report({"models": {"hidden": ev}}, tmp_path, plots=False)
    row = _table1(paths["table1"])[0]
    assert float(row["count_nll"]) == math.inf
    assert float(row["count_infeasible"]) == pytest.approx(2 / 3)
    assert float(row["count_nll_feasible"]) == pytest.approx(-math.log(pmfs[0][1]), rel=1e-5)
    header = next(line for line in paths["report"].read_text().splitlines() if "count_nll" in line and "|" in line)
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[cells.index("count_nll"):cells.index("count_nll") + 3] == [
        "count_nll", "count_infeasible", "count_nll_feasible"]
