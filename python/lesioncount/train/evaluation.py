"""Evaluate trained UNets on a test split: the paper's Table 1 and Table C.1 and its figures.

For every model (checkpoint) the test volumes are run through the network once (no_grad, batched,
mixed precision on GPU) and every statistic is accumulated batch by batch, so memory stays at one
batch of volumes plus per-case numbers:

- **this method**: the count distribution of the logits at the candidate threshold (paper: 0.1,
  18-connectivity, bins 0..3 and 4+); its most likely count gives the count accuracy and the
  class-averaged (macro) F1; its pmf the count ECE / MCE (top-label, torchmetrics binning), the NLL
  and the accuracy after discarding the most uncertain cases (highest pmf entropy);
- **the baseline**: the number of connected components of ``probability > 0.5`` (``cc_count``),
  scored with the same accuracy / F1 and, as a one-hot pmf, the same ECE / MCE;
- **segmentation**: voxel-wise F1 (Dice, pooled over all test voxels) at 0.5, and the voxel-wise
  ECE / MCE (torchmetrics binary calibration error), accumulated as per-bin sums;
- **threshold sweep** (Table C.1): count accuracy and F1 of both methods for thresholds 0.1..0.9.

:func:`write_report` writes ``report.md``, ``table1.csv``, ``threshold_sweep.csv``,
``accuracy_vs_discarded.csv``, ``per_case.csv`` and PNG figures (reliability diagrams, accuracy vs
discarded fraction, threshold sweep, one example count distribution per model).

Example:
    >>> from lesioncount.train.evaluation import evaluate_checkpoints, write_report
    >>> results = evaluate_checkpoints({"multitask": "runs/mt/best.pt"}, device="cpu")   # doctest: +SKIP
    >>> write_report(results, "eval/")                                                    # doctest: +SKIP
"""
from __future__ import annotations

import math
import pathlib
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from .._tables import CC_COUNT, COUNT_DISTRIBUTION, markdown_table, write_csv, write_markdown
from .._validation import DEFAULT_CONNECTIVITY
from ..metrics import VoxelStats  # noqa: F401 (re-exported: its home is lesioncount.metrics)
from .config import ConfigError, TrainConfig

__all__ = [
    "DISCARD_FRACTIONS",
    "ModelEvaluation",
    "SWEEP_THRESHOLDS",
    "VoxelStats",
    "evaluate_checkpoints",
    "evaluate_model",
    "load_model",
    "summarize",
    "write_report",
]

SWEEP_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))  # 0.1 .. 0.9
DISCARD_FRACTIONS = tuple(round(0.05 * k, 2) for k in range(0, 11))  # 0 .. 0.5
THIS_METHOD = COUNT_DISTRIBUTION
BASELINE = CC_COUNT
MC_METHOD = "MC-dropout cc_count"


# ----------------------------------------------------------------------------------------------
# model loading and prediction
# ----------------------------------------------------------------------------------------------

def load_model(checkpoint, device="cpu"):
    """Rebuild the network of a training checkpoint (a UNet, or a UNet with a count head) and load its
    weights (eval mode).

    Returns ``(model, config, checkpoint_dict)``; ``config`` is the run's :class:`TrainConfig`.

    Example:
        >>> model, config, ckpt = load_model("runs/tiny/best.pt")   # doctest: +SKIP
        >>> config.base_filters, ckpt["epoch"]                      # doctest: +SKIP
        (4, 2)
    """
    from .count_heads import build_model
    from .loop import load_checkpoint

    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    try:
        config = TrainConfig.from_dict(ckpt["config"], source=str(checkpoint))
    except ConfigError as exc:
        raise ValueError(f"{checkpoint}: its saved config is invalid: {exc}") from None
    in_channels = int(ckpt.get("in_channels", 5))
    model = build_model(config, in_channels)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(f"{checkpoint}: the weights do not fit the model {config.model!r} (in_channels={in_channels}, "
                         f"base_filters={config.base_filters}, levels={config.levels}): {exc}") from None
    return model.to(device).eval(), config, ckpt


@dataclass
class ModelEvaluation:
    """Per-case predictions of one model on a test split, plus its streamed voxel statistics.

    Shapes (N cases, T sweep thresholds, M = ``max_count``): ``counts`` (N,) true counts;
    ``pmf``/``log_pmf`` (N, M+1) at ``count_threshold``; ``expected_count``, ``entropy``,
    ``num_candidates`` (N,); ``baseline_counts`` (N,) cc_count at ``baseline_threshold``;
    ``sweep_pmf`` (N, T, M+1) and ``sweep_cc_counts`` (N, T) at ``sweep_thresholds``.

    Example:
        >>> ev = evaluate_model(model, test_set, name="multitask")      # doctest: +SKIP
        >>> ev.pmf.shape, ev.sweep_pmf.shape                            # doctest: +SKIP
        (torch.Size([10, 5]), torch.Size([10, 9, 5]))
    """

    name: str
    checkpoint: str
    case_names: list
    counts: torch.Tensor
    pmf: torch.Tensor
    log_pmf: torch.Tensor
    expected_count: torch.Tensor
    entropy: torch.Tensor
    num_candidates: torch.Tensor
    baseline_counts: torch.Tensor
    sweep_thresholds: tuple
    sweep_pmf: torch.Tensor
    sweep_cc_counts: torch.Tensor
    voxels: VoxelStats
    max_count: int
    count_threshold: float
    baseline_threshold: float
    connectivity: int
    n_bins: int
    summary: dict = field(default_factory=dict)
    # "count distribution" (this method, a UNet) or "count head" (a parametric baseline: pmf = its softmax)
    method: str = COUNT_DISTRIBUTION
    # the attack (lesioncount.train.attack): (N, M+1) pmf under attack, (N,) perturbation norms, settings
    attacked_pmf: torch.Tensor | None = None
    attack_delta_norm: torch.Tensor | None = None
    attack_settings: dict | None = None
    # MC-dropout connected components (lesioncount.train.uncertainty): (N, M+1), samples, threshold
    mc_pmf: torch.Tensor | None = None
    mc_samples: int = 0
    mc_threshold: float = 0.5


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, dataset: Dataset, *, name: str = "model", checkpoint: str = "",
                   device="cpu", batch_size: int = 2, amp_dtype: torch.dtype | None = None,
                   count_threshold: float = 0.1, baseline_threshold: float = 0.5, seg_threshold: float = 0.5,
                   connectivity: int = DEFAULT_CONNECTIVITY[3], max_count: int = 4, n_bins: int = 10,
                   sweep_thresholds=SWEEP_THRESHOLDS, num_workers: int = 0, attack=None,
                   mc_samples: int = 0, mc_threshold: float = 0.5, mc_seed: int = 0) -> ModelEvaluation:
    """Run ``model`` over ``dataset`` and collect everything Table 1 / C.1 need (see module doc).

    A count-head model (:class:`~lesioncount.train.count_heads.CountHeadUNet`) is scored by the
    softmax of its count head (``method = "count head"``); the cc_count baseline, the segmentation
    metrics and the threshold sweep use its segmentation output like any UNet's.

    Args:
        model: logits network, (B, C, D, H, W) -> (B, 1, D, H, W).
        dataset: items ``{"image", "mask", "count", "name"}`` as in :mod:`lesioncount.train.data`.
        count_threshold: candidate threshold of the count distribution (paper 0.1).
        baseline_threshold: threshold of the cc_count baseline (0.5).
        seg_threshold: threshold of the voxel-wise F1.
        sweep_thresholds: thresholds of the Table C.1 sweep (both methods).
        attack: an :class:`~lesioncount.train.attack.AttackConfig` to also run the entropy attack
            on every case (SR / AD); None skips it.
        mc_samples: MC-dropout samples of the probabilistic connected-components baseline at
            ``mc_threshold`` (paper: 50 at 0.5); 0 skips it. Only for models without a count head.

    Returns:
        :class:`ModelEvaluation` (call :func:`summarize` for the metrics).

    Example:
        >>> ev = evaluate_model(model, test_set, name="multitask")   # doctest: +SKIP
        >>> summarize(ev)["rows"][0]["count_accuracy"]                # doctest: +SKIP
    """
    import lesioncount

    device = torch.device(device)
    if len(dataset) == 0:
        raise ValueError(f"{name}: the test split is empty")
    from .count_heads import has_count_head

    model = model.to(device).eval()
    head_model = has_count_head(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    voxels = VoxelStats(threshold=seg_threshold, n_bins=n_bins)
    thresholds = tuple(float(t) for t in sweep_thresholds)
    parts: dict[str, list] = {k: [] for k in ("counts", "pmf", "log_pmf", "expected", "entropy", "num",
                                              "baseline", "sweep_pmf", "sweep_cc", "attacked", "norm", "mc")}
    case_names: list[str] = []
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for batch in loader:
        image = batch["image"].to(device)
        with autocast:
            output = model(image, with_count=True) if head_model else model(image)
        logits, count_logits = output if head_model else (output, None)
        logits = logits.float()
        mask = batch["mask"].to(device)
        voxels.update(torch.sigmoid(logits), mask)
        result = lesioncount.count_distribution(logits, threshold=count_threshold, connectivity=connectivity,
                                                max_count=max_count, from_logits=True)
        parts["counts"].append(batch["count"].reshape(-1).long())
        if head_model:
            log_pmf = torch.log_softmax(count_logits.double(), dim=1).cpu()
            pmf = log_pmf.exp()
            parts["pmf"].append(pmf)
            parts["log_pmf"].append(log_pmf)
            parts["expected"].append((pmf * torch.arange(max_count + 1, dtype=torch.float64)).sum(1))
            parts["entropy"].append(-(pmf * log_pmf.clamp_min(-1e4)).sum(1))
        else:
            parts["pmf"].append(result.pmf.double().cpu())
            parts["log_pmf"].append(result.log_pmf.double().cpu())
            parts["expected"].append(result.expected_count.double().cpu())
            parts["entropy"].append(result.entropy.double().cpu())
        parts["num"].append(result.num_lesions.cpu())
        if attack is not None:
            from .attack import attack_count_entropy, replace_counting

            with torch.enable_grad():
                res = attack_count_entropy(model, image, replace_counting(attack, count_threshold, connectivity,
                                                                          max_count),
                                           index_offset=len(case_names))
            parts["attacked"].append(res.attacked_log_pmf.double().exp().cpu())
            parts["norm"].append(res.delta_norm.double().cpu())
        if mc_samples and not head_model:
            from .uncertainty import mc_dropout_count_pmf

            parts["mc"].append(mc_dropout_count_pmf(model, image, num_samples=mc_samples, threshold=mc_threshold,
                                                    connectivity=connectivity, max_count=max_count,
                                                    seed=mc_seed + len(case_names)))
        parts["baseline"].append(lesioncount.cc_count(logits, threshold=baseline_threshold,
                                                      connectivity=connectivity, from_logits=True).cpu())
        sweep_pmf, sweep_cc = [], []
        for t in thresholds:
            r = lesioncount.count_distribution(logits, threshold=t, connectivity=connectivity,
                                               max_count=max_count, from_logits=True)
            sweep_pmf.append(r.pmf.double().cpu())
            sweep_cc.append(lesioncount.cc_count(logits, threshold=t, connectivity=connectivity,
                                                 from_logits=True).cpu())
        parts["sweep_pmf"].append(torch.stack(sweep_pmf, dim=1))
        parts["sweep_cc"].append(torch.stack(sweep_cc, dim=1))
        names = batch.get("name")
        case_names.extend(list(names) if names is not None else
                          [f"case{len(case_names) + i:04d}" for i in range(image.shape[0])])
    cat = {k: torch.cat(v) for k, v in parts.items() if v}
    evaluation = ModelEvaluation(
        name=name, checkpoint=str(checkpoint), case_names=case_names, counts=cat["counts"], pmf=cat["pmf"],
        log_pmf=cat["log_pmf"], expected_count=cat["expected"], entropy=cat["entropy"], num_candidates=cat["num"],
        baseline_counts=cat["baseline"], sweep_thresholds=thresholds, sweep_pmf=cat["sweep_pmf"],
        sweep_cc_counts=cat["sweep_cc"], voxels=voxels, max_count=max_count, count_threshold=count_threshold,
        baseline_threshold=baseline_threshold, connectivity=connectivity, n_bins=n_bins,
        method="count head" if head_model else THIS_METHOD, attacked_pmf=cat.get("attacked"),
        attack_delta_norm=cat.get("norm"), attack_settings=attack.to_dict() if attack is not None else None,
        mc_pmf=cat.get("mc"), mc_samples=mc_samples if "mc" in cat else 0, mc_threshold=mc_threshold)
    evaluation.summary = summarize(evaluation)
    return evaluation


def _one_hot_pmf(counts: torch.Tensor, max_count: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(counts.clamp(0, max_count), max_count + 1).double()


def summarize(ev: ModelEvaluation, fractions=DISCARD_FRACTIONS) -> dict:
    """Table rows of one :class:`ModelEvaluation` (uses :mod:`lesioncount.metrics`).

    Returns a dict with ``rows`` (Table 1: one row per method with count_accuracy, count_f1,
    count_ece, count_mce, count_nll (+inf when any case is infeasible), count_infeasible (fraction
    of cases whose true count, tail bin M, exceeds the number of candidates: P(C = count) = 0),
    count_nll_feasible (mean NLL over the other cases), count_mae, seg_f1, seg_ece, seg_mce), ``sweep`` (Table C.1:
    rows of threshold, method, accuracy, f1) and ``discarded`` (fraction, accuracy) of this method.

    Example:
        >>> summarize(ev)["rows"][1]["method"]   # doctest: +SKIP
        'cc_count (tau=0.5)'
    """
    from .. import metrics
    from ..losses import count_nll_terms

    M = ev.max_count
    seg_ece, seg_mce = ev.voxels.calibration_errors()
    seg = {"seg_f1": ev.voxels.f1(), "seg_ece": seg_ece, "seg_mce": seg_mce}

    def scores(pmf: torch.Tensor, predicted: torch.Tensor) -> dict:
        prf = metrics.count_precision_recall_f1(predicted, ev.counts, max_count=M)
        ece, mce = metrics.count_calibration_errors(pmf, ev.counts, max_count=M, n_bins=ev.n_bins)
        return {"count_accuracy": float(metrics.count_accuracy(predicted, ev.counts, max_count=M)),
                "count_f1": float(prf["f1"]), "count_ece": float(ece), "count_mce": float(mce)}

    ours = scores(ev.pmf, ev.pmf.argmax(1))
    target_bins = ev.counts.clamp_max(M)
    nll = count_nll_terms(ev.log_pmf, ev.counts).nll  # the one NLL rule: tail bin M, +inf where P = 0
    ours["count_nll"] = float(nll.mean())  # +inf as soon as one case is infeasible (kept honest)
    # infeasible: more true lesions (tail bin: M) than candidates, so P(C = count) = 0 and the NLL is +inf
    # (a count head's softmax is never 0: no case is infeasible for it)
    infeasible = ~torch.isfinite(nll) if ev.method != THIS_METHOD else \
        target_bins > ev.num_candidates.to(target_bins.device)
    ours["count_infeasible"] = float(infeasible.double().mean())
    ours["count_nll_feasible"] = float(nll[~infeasible].mean()) if bool((~infeasible).any()) else float("nan")
    ours["count_mae"] = float((ev.expected_count - ev.counts.double()).abs().mean())
    baseline = scores(_one_hot_pmf(ev.baseline_counts, M), ev.baseline_counts)
    baseline["count_nll"] = float("nan")  # a hard count has no likelihood to speak of
    baseline["count_infeasible"] = float("nan")
    baseline["count_nll_feasible"] = float("nan")
    baseline["count_mae"] = float((ev.baseline_counts - ev.counts).abs().double().mean())
    nan = float("nan")
    attack_cols = {"attack_sr": nan, "attack_ad": nan}
    if ev.attacked_pmf is not None:
        from .attack import attack_scores

        a = attack_scores(ev.pmf.argmax(1), ev.attacked_pmf.argmax(1), ev.counts, max_count=M)
        ours_attack = {"attack_sr": a["success_rate"], "attack_ad": a["accuracy_drop"]}
    else:
        ours_attack = dict(attack_cols)
    method = f"{THIS_METHOD} (tau={ev.count_threshold:g})" if ev.method == THIS_METHOD else ev.method
    rows = [
        {"model": ev.name, "method": method, **ours, **seg, **ours_attack},
        {"model": ev.name, "method": f"{BASELINE} (tau={ev.baseline_threshold:g})", **baseline, **seg,
         **attack_cols},
    ]
    uncertainty = []
    pmfs = [(ev.method, ev.pmf)]
    if ev.mc_pmf is not None:
        mc = scores(ev.mc_pmf, ev.mc_pmf.argmax(1))
        mc_nll = count_nll_terms(torch.log(ev.mc_pmf), ev.counts).nll
        mc_infeasible = ~torch.isfinite(mc_nll)
        mc.update({"count_nll": float(mc_nll.mean()), "count_infeasible": float(mc_infeasible.double().mean()),
                   "count_nll_feasible": float(mc_nll[~mc_infeasible].mean()) if bool((~mc_infeasible).any()) else nan,
                   "count_mae": float(((ev.mc_pmf * torch.arange(M + 1, dtype=torch.float64)).sum(1)
                                       - ev.counts.double()).abs().mean())})
        rows.append({"model": ev.name, "method": f"{MC_METHOD} (n={ev.mc_samples}, tau={ev.mc_threshold:g})", **mc,
                     **seg, **attack_cols})
        pmfs.append((MC_METHOD, ev.mc_pmf))
    from .uncertainty import accuracy_after_discarding

    for label, pmf in pmfs:
        correct = pmf.argmax(1) == target_bins.to(pmf.device)
        entropy = -(pmf * torch.log(pmf.clamp_min(1e-300))).sum(1)
        for most in (True, False):
            acc = accuracy_after_discarding(correct, entropy, list(fractions), most_uncertain=most)
            uncertainty += [{"model": ev.name, "method": label, "discarded": "most" if most else "least",
                             "fraction": float(f), "accuracy": float(a)} for f, a in zip(fractions, acc.tolist())]
    sweep = []
    for j, t in enumerate(ev.sweep_thresholds):
        for method, predicted in ((THIS_METHOD, ev.sweep_pmf[:, j].argmax(1)), (BASELINE, ev.sweep_cc_counts[:, j])):
            prf = metrics.count_precision_recall_f1(predicted, ev.counts, max_count=M)
            sweep.append({"model": ev.name, "threshold": t, "method": method,
                          "accuracy": float(metrics.count_accuracy(predicted, ev.counts, max_count=M)),
                          "f1": float(prf["f1"])})
    accuracies = metrics.accuracy_vs_discarded(ev.pmf, ev.counts, list(fractions), max_count=M)
    discarded = [{"model": ev.name, "fraction": float(f), "accuracy": float(a)}
                 for f, a in zip(fractions, accuracies.tolist())]
    return {"rows": rows, "sweep": sweep, "discarded": discarded, "uncertainty": uncertainty}


# ----------------------------------------------------------------------------------------------
# several checkpoints on one test split
# ----------------------------------------------------------------------------------------------

DATA_KEYS = ("data", "data_dir", "num_train", "num_val", "num_test", "shape", "connectivity", "seed")


def evaluate_checkpoints(checkpoints: dict, *, data_overrides: dict | None = None, split: str = "test",
                         device: str = "auto", batch_size: int | None = None, amp: str = "auto",
                         count_threshold: float | None = None, baseline_threshold: float = 0.5,
                         seg_threshold: float = 0.5, max_count: int | None = None, n_bins: int = 10,
                         num_workers: int = 0, log=print, attack=None, mc_samples: int = 0,
                         mc_threshold: float = 0.5) -> dict:
    """Evaluate several checkpoints on the same split.

    The data settings (source, folder, split sizes, shape, connectivity, seed) come from the first
    checkpoint's training config, overridden by ``data_overrides``, so every model is scored on the
    same cases; a model trained on other data settings is noted in the result (``notes``).

    Args:
        checkpoints: display name -> checkpoint path (``best.pt`` / ``last.pt``).
        split: "test" (default) or "val".
        count_threshold / max_count: default to the first checkpoint's training settings.
        attack: an :class:`~lesioncount.train.attack.AttackConfig` (SR / AD for every model) or None.
        mc_samples / mc_threshold: MC-dropout connected components for every model without a count
            head (0: off).

    Returns:
        dict with ``models`` (name -> :class:`ModelEvaluation`), ``data`` (the data settings used),
        ``split``, ``notes``.

    Example:
        >>> res = evaluate_checkpoints({"post_hoc": "a/best.pt", "multitask": "b/best.pt"})  # doctest: +SKIP
    """
    from .data import build_datasets
    from .loop import resolve_amp_dtype, resolve_device

    if not checkpoints:
        raise ValueError("no checkpoint given")
    if split not in ("test", "val"):
        raise ValueError(f"`split` must be 'test' or 'val', got {split!r}")
    device = resolve_device(device)
    amp_dtype = resolve_amp_dtype(amp, device)
    loaded = {}
    for name, path in checkpoints.items():
        loaded[name] = load_model(path, device)
    first_config = next(iter(loaded.values()))[1]
    data_settings = {k: getattr(first_config, k) for k in DATA_KEYS}
    data_settings.update({k: v for k, v in (data_overrides or {}).items() if v is not None})
    try:
        data_config = TrainConfig.from_dict({**first_config.to_dict(), **data_settings}, source="data settings")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    notes = []
    for name, (_, config, _) in loaded.items():
        differing = [k for k in DATA_KEYS if k not in (data_overrides or {}) and getattr(config, k) != getattr(first_config, k)]
        if differing:
            notes.append(f"{name} was trained with different data settings ({', '.join(differing)}); "
                         f"it is evaluated on the data settings of the first model")
    _, val_set, test_set = build_datasets(
        data_config.data, num_train=data_config.num_train, num_val=data_config.num_val,
        num_test=data_config.num_test, shape=tuple(data_config.shape), seed=data_config.seed,
        connectivity=data_config.connectivity, data_dir=data_config.data_dir)
    dataset = test_set if split == "test" else val_set
    if len(dataset) == 0:
        raise ValueError(f"the {split} split is empty (data={data_config.data!r}, num_{split}="
                         f"{getattr(data_config, 'num_' + split)})")
    channels = int(dataset[0]["image"].shape[0])
    models = {}
    for name, (model, config, ckpt) in loaded.items():
        if model.in_channels != channels:
            raise ValueError(f"{checkpoints[name]}: the model takes {model.in_channels} input channels, "
                             f"the {split} data has {channels}")
        log(f"evaluating {name} ({checkpoints[name]}, epoch {ckpt.get('epoch', '?')}) on {len(dataset)} "
            f"{split} cases")
        models[name] = evaluate_model(
            model, dataset, name=name, checkpoint=str(checkpoints[name]), device=device,
            batch_size=batch_size or config.batch_size, amp_dtype=amp_dtype,
            count_threshold=config.count_threshold if count_threshold is None else count_threshold,
            baseline_threshold=baseline_threshold, seg_threshold=seg_threshold,
            connectivity=data_config.connectivity,
            max_count=config.max_count if max_count is None else max_count, n_bins=n_bins,
            num_workers=num_workers, attack=attack, mc_samples=mc_samples, mc_threshold=mc_threshold,
            mc_seed=data_config.seed)
    return {"models": models, "data": data_config.to_dict(), "split": split, "notes": notes,
            "num_cases": len(dataset)}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

TABLE1_COLUMNS = ("model", "method", "count_accuracy", "count_f1", "count_ece", "count_mce", "count_nll",
                  "count_infeasible", "count_nll_feasible", "count_mae", "seg_f1", "seg_ece", "seg_mce",
                  "attack_sr", "attack_ad")


def _write_csv(path: pathlib.Path, rows: list, columns) -> None:
    """A table of this report through the one writer (:func:`lesioncount._tables.write_csv`); NaN
    is an empty cell here."""
    write_csv(path, columns, rows, nan="")


def _markdown_table(rows: list, columns) -> list[str]:
    """A markdown table of this report (:func:`lesioncount._tables.markdown_table`); NaN is ``n/a``."""
    return markdown_table(rows, columns, nan="n/a")


def write_report(results: dict, out_dir, plots: bool = True, paper_table: str | None = None,
                 reference: str | None = None) -> dict:
    """Write the markdown report, the CSV tables and (with ``plots``) the PNG figures to ``out_dir``.

    Args:
        paper_table: ``"1"`` or ``"C.2"``: add the paper's Table 1 (full data) or Table C.2 (1% of
            the training data) beside ours, matched by model name (``post_hoc``, ``bottleneck``,
            ``multihead``, ``downstream``, ``multitask``; see :data:`PAPER_TABLES`).
        reference: the model the others are compared with, paired on the same cases (exact McNemar,
            bootstrap interval of the accuracy difference; ``paired.csv``); default ``multitask``
            when present, else the first model.

    Returns a dict of the paths written (``report``, ``table1``, ``sweep``, ``discarded``,
    ``uncertainty``, ``paired``, ``per_case`` and ``figures``: a list).

    Example:
        >>> paths = write_report(evaluate_checkpoints({"m": "run/best.pt"}), "eval")   # doctest: +SKIP
        >>> sorted(paths)                                                              # doctest: +SKIP
        ['discarded', 'figures', 'per_case', 'report', 'sweep', 'table1']
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, ModelEvaluation] = results["models"]
    table1 = [row for ev in models.values() for row in ev.summary["rows"]]
    sweep = [row for ev in models.values() for row in ev.summary["sweep"]]
    discarded = [row for ev in models.values() for row in ev.summary["discarded"]]
    paths = {"table1": out / "table1.csv", "sweep": out / "threshold_sweep.csv",
             "discarded": out / "accuracy_vs_discarded.csv", "per_case": out / "per_case.csv",
             "uncertainty": out / "uncertainty.csv", "paired": out / "paired.csv",
             "report": out / "report.md", "figures": []}
    if paper_table is not None and paper_table not in PAPER_TABLES:
        raise ValueError(f"`paper_table` must be one of {sorted(PAPER_TABLES)} or None, got {paper_table!r}")
    if reference is not None and reference not in models:
        raise ValueError(f"`reference` {reference!r} is not one of the evaluated models {list(models)}")
    if reference is None:
        reference = "multitask" if "multitask" in models else next(iter(models))
    uncertainty_rows = [row for ev in models.values() for row in ev.summary.get("uncertainty", [])]
    _write_csv(paths["uncertainty"], uncertainty_rows, ("model", "method", "discarded", "fraction", "accuracy"))
    paired = _paired_rows(models, reference)
    _write_csv(paths["paired"], paired, PAIRED_COLUMNS)
    _write_csv(paths["table1"], table1, TABLE1_COLUMNS)
    _write_csv(paths["sweep"], sweep, ("model", "threshold", "method", "accuracy", "f1"))
    _write_csv(paths["discarded"], discarded, ("model", "fraction", "accuracy"))
    any_ev = next(iter(models.values()))
    M = any_ev.max_count
    bins = [str(j) for j in range(M)] + [f"{M}+"]
    per_case_columns = ["model", "case", "true_count", "most_likely", "expected_count", "entropy_nats",
                        "num_candidates", f"cc_count_{any_ev.baseline_threshold:g}"] + [f"P({b})" for b in bins]
    per_case = []
    for ev in models.values():
        for i, case in enumerate(ev.case_names):
            row = {"model": ev.name, "case": case, "true_count": int(ev.counts[i]),
                   "most_likely": int(ev.pmf[i].argmax()), "expected_count": float(ev.expected_count[i]),
                   "entropy_nats": float(ev.entropy[i]), "num_candidates": int(ev.num_candidates[i]),
                   per_case_columns[7]: int(ev.baseline_counts[i])}
            row.update({f"P({b})": float(ev.pmf[i, j]) for j, b in enumerate(bins)})
            per_case.append(row)
    _write_csv(paths["per_case"], per_case, per_case_columns)

    if plots:
        paths["figures"] = _write_figures(models, out)
        paths["figures"] += _write_uncertainty_figures(models, out)

    data = results.get("data", {})
    lines = [
        "# Lesion counting: model evaluation",
        "",
        f"{results.get('num_cases', len(any_ev.case_names))} {results.get('split', 'test')} cases "
        f"(data: {data.get('data', '?')}, shape {data.get('shape', '?')}, seed {data.get('seed', '?')}, "
        f"connectivity {any_ev.connectivity}); count bins {', '.join(bins)}.",
        "",
        "## Table 1: counting and segmentation",
        "",
        f"Count accuracy / class-averaged F1 of the most likely count; count ECE / MCE top-label over "
        f"{any_ev.n_bins} confidence bins (the cc_count baseline as a one-hot distribution); "
        f"count_nll: mean -log P(C = true count), infinite as soon as one case has more true lesions "
        f"than candidates (P = 0); count_infeasible: the fraction of such cases; count_nll_feasible: the "
        f"mean NLL over the other cases; "
        f"segmentation: voxel-wise F1 at {any_ev.voxels.threshold:g} and voxel-wise ECE / MCE.",
        "",
        *_markdown_table(table1, TABLE1_COLUMNS),
        "",
        "## Table C.1: threshold sweep (count accuracy / F1)",
        "",
    ]
    thresholds = any_ev.sweep_thresholds
    sweep_rows = []
    for ev in models.values():
        for method in (THIS_METHOD, BASELINE):
            cells = {f"{t:g}": next(f"{r['accuracy']:.3f} / {r['f1']:.3f}" for r in ev.summary["sweep"]
                                     if r["method"] == method and r["threshold"] == t) for t in thresholds}
            sweep_rows.append({"model": ev.name, "method": method, **cells})
    lines += _markdown_table(sweep_rows, ["model", "method"] + [f"{t:g}" for t in thresholds])
    lines += ["", "## Accuracy after discarding the most uncertain cases (highest entropy)", ""]
    fractions = [r["fraction"] for r in any_ev.summary["discarded"]]
    disc_rows = [{"model": ev.name, **{f"{f:g}": r["accuracy"] for f, r in zip(fractions, ev.summary["discarded"])}}
                 for ev in models.values()]
    lines += _markdown_table(disc_rows, ["model"] + [f"{f:g}" for f in fractions])
    if paired:
        lines += ["", f"## Paired comparison with `{reference}` (same cases)", "",
                  f"a_only: cases `{reference}` counts right and the other model wrong; b_only: the reverse; "
                  f"exact McNemar p on the discordant cases; 95% paired bootstrap interval of the accuracy "
                  f"difference (reference - other).", ""]
        lines += _markdown_table(paired, PAIRED_COLUMNS)
    attacked = [ev for ev in models.values() if ev.attack_settings is not None]
    if attacked:
        settings = attacked[0].attack_settings
        lines += ["", "## Attack", "",
                  "Entropy-maximising attack on the count distribution (lesioncount.train.attack): "
                  + ", ".join(f"{k}={v}" for k, v in settings.items())
                  + ". attack_sr: share of cases whose most likely count changed; attack_ad: count accuracy "
                    "clean minus attacked.", ""]
        lines += _markdown_table([{"model": ev.name, "method": ev.summary["rows"][0]["method"],
                                   "attack_sr": ev.summary["rows"][0]["attack_sr"],
                                   "attack_ad": ev.summary["rows"][0]["attack_ad"],
                                   "mean_delta_norm": float(ev.attack_delta_norm.mean()),
                                   "max_delta_norm": float(ev.attack_delta_norm.max())} for ev in attacked],
                                 ["model", "method", "attack_sr", "attack_ad", "mean_delta_norm", "max_delta_norm"])
    if uncertainty_rows:
        lines += ["", "## Accuracy after discarding the most / least uncertain cases (entropy of each pmf)", ""]
        ufr = sorted({r["fraction"] for r in uncertainty_rows})
        keyed: dict = {}
        for r in uncertainty_rows:
            keyed.setdefault((r["model"], r["method"], r["discarded"]), {})[f"{r['fraction']:g}"] = r["accuracy"]
        urows = [{"model": k[0], "method": k[1], "discarded": k[2], **v} for k, v in keyed.items()]
        lines += _markdown_table(urows, ["model", "method", "discarded"] + [f"{f:g}" for f in ufr])
    if paper_table is not None:
        lines += ["", f"## Paper's Table {paper_table} beside ours", "",
                  "Paper: Schroeter et al., MIDL 2022 (real MS data, GPU-sized UNet). Ours: the main method of each "
                  "model (count distribution or count head). Accuracy, F1, SR and AD in %, seg ECE in 1e-5 "
                  "(the paper's units). Unmatched model names are left out.", ""]
        lines += _markdown_table(_paper_rows(models, paper_table), PAPER_COLUMNS)
    lines += ["", "## Models", ""]
    lines += [f"- **{ev.name}**: `{ev.checkpoint}`" for ev in models.values()]
    for note in results.get("notes", []):
        lines.append(f"- note: {note}")
    if paths["figures"]:
        lines += ["", "## Figures", ""]
        lines += [f"![{p.stem}]({p.name})" for p in paths["figures"]]
    write_markdown(paths["report"], lines)
    return paths


def _write_figures(models: dict, out: pathlib.Path) -> list:
    from .. import plot

    figures = []
    for ev in models.values():
        fig = plot.plot_reliability_diagram(ev.pmf, ev.counts, max_count=ev.max_count, n_bins=ev.n_bins,
                                            label=f"{ev.name}, {THIS_METHOD}")
        figures.append(plot.save_figure(fig, out / f"reliability_{_safe(ev.name)}.png"))
        i = int(torch.argmax(ev.counts))  # the case with the most lesions: the most interesting bar chart
        fig = plot.plot_count_distribution(ev.pmf[i], true_count=int(ev.counts[i]),
                                           title=f"{ev.name}: {ev.case_names[i]}")
        figures.append(plot.save_figure(fig, out / f"count_distribution_{_safe(ev.name)}.png"))
    first = next(iter(models.values()))
    fractions = [r["fraction"] for r in first.summary["discarded"]]
    fig = plot.plot_accuracy_vs_discarded(fractions, {ev.name: [r["accuracy"] for r in ev.summary["discarded"]]
                                                      for ev in models.values()})
    figures.append(plot.save_figure(fig, out / "accuracy_vs_discarded.png"))
    series = {}
    for ev in models.values():
        for method in (THIS_METHOD, BASELINE):
            series[f"{ev.name}: {method}"] = [r["accuracy"] for r in ev.summary["sweep"] if r["method"] == method]
    fig = plot.plot_threshold_sweep(list(first.sweep_thresholds), series, "count accuracy")
    figures.append(plot.save_figure(fig, out / "threshold_sweep.png"))
    return [pathlib.Path(p) for p in figures]


# The paper's numbers (Table 1: full data; Table C.2: 1% of the training data), keyed by our model
# names: acc, count F1, seg F1 in %, seg ECE in 1e-5, seg MCE, SR and AD in %.
PAPER_TABLES = {
    "1": {
        "bottleneck": {"acc": 87.6, "f1": 67.3, "seg_f1": 69.3, "ece": 8.05, "mce": 0.363, "sr": 86.1, "ad": 74.76},
        "multihead": {"acc": 88.7, "f1": 70.8, "seg_f1": 68.4, "ece": 3.64, "mce": 0.213, "sr": 24.7, "ad": 21.80},
        "downstream": {"acc": 86.7, "f1": 64.2, "seg_f1": 62.0, "ece": 9.51, "mce": 0.160, "sr": 14.4, "ad": 12.43},
        "multitask": {"acc": 88.3, "f1": 70.8, "seg_f1": 66.2, "ece": 0.72, "mce": 0.077, "sr": 8.1, "ad": 7.07},
        "post_hoc": {"mce": 0.234},
    },
    "C.2": {
        "bottleneck": {"acc": 76.6, "f1": 41.5, "seg_f1": 66.7, "ece": 6.13, "mce": 0.306},
        "multihead": {"acc": 80.8, "f1": 47.6, "seg_f1": 58.0, "ece": 5.13, "mce": 0.276},
        "downstream": {"acc": 82.9, "f1": 54.4, "seg_f1": 59.2, "ece": 1.64, "mce": 0.119},
        "multitask": {"acc": 86.0, "f1": 65.1, "seg_f1": 58.4, "ece": 2.70, "mce": 0.524},
        "post_hoc": {"acc": 86.5, "f1": 70.9, "seg_f1": 68.2, "ece": 0.95, "mce": 0.116},
    },
}
PAPER_COLUMNS = ("model", "source", "acc", "f1", "seg_f1", "ece", "mce", "sr", "ad")
PAIRED_COLUMNS = ("reference", "model", "method", "accuracy_a", "accuracy_b", "difference", "a_only", "b_only",
                  "mcnemar_p", "ci_low", "ci_high")


def _paper_rows(models: dict, table: str) -> list:
    nan = float("nan")
    rows = []
    for name, paper in PAPER_TABLES[table].items():
        if name not in models:
            continue
        r = models[name].summary["rows"][0]
        rows.append({"model": name, "source": "paper", **{k: paper.get(k, nan) for k in PAPER_COLUMNS[2:]}})
        rows.append({"model": name, "source": f"ours ({r['method']})", "acc": 100 * r["count_accuracy"],
                     "f1": 100 * r["count_f1"], "seg_f1": 100 * r["seg_f1"], "ece": 1e5 * r["seg_ece"],
                     "mce": r["seg_mce"], "sr": 100 * r["attack_sr"], "ad": 100 * r["attack_ad"]})
    return rows


def _correct(ev: ModelEvaluation, pmf: torch.Tensor | None = None) -> torch.Tensor:
    pmf = ev.pmf if pmf is None else pmf
    return pmf.argmax(1) == ev.counts.clamp_max(ev.max_count)


def _paired_rows(models: dict, reference: str) -> list:
    from .uncertainty import paired_comparison

    ref = models[reference]
    rows = []
    candidates = [(name, ev.summary["rows"][0]["method"], _correct(ev)) for name, ev in models.items()
                  if name != reference]
    candidates.append((reference, f"{BASELINE} (tau={ref.baseline_threshold:g})",
                       ref.baseline_counts.clamp_max(ref.max_count) == ref.counts.clamp_max(ref.max_count)))
    for name, ev in models.items():
        if ev.mc_pmf is not None:
            candidates.append((name, MC_METHOD, _correct(ev, ev.mc_pmf)))
    for name, method, correct in candidates:
        if models[name].case_names != ref.case_names:
            continue  # not the same cases: no pairing
        rows.append({"reference": reference, "model": name, "method": method,
                     **paired_comparison(_correct(ref), correct)})
    return rows


def _write_uncertainty_figures(models: dict, out: pathlib.Path) -> list:
    """Fig. C.4 (accuracy after discarding the most / least uncertain) and Fig. C.5 (entropy of the
    correct vs the incorrect predictions) for every model's main pmf and its MC-dropout pmf."""
    import numpy as np

    from .. import plot

    figures = []
    series = []
    for ev in models.values():
        series.append((f"{ev.name}: {ev.method}", ev.pmf, ev))
        if ev.mc_pmf is not None:
            series.append((f"{ev.name}: {MC_METHOD}", ev.mc_pmf, ev))
    rows = [r for ev in models.values() for r in ev.summary.get("uncertainty", [])]
    if rows:
        fig, axes = plot.new_figure(1, 2, figsize=(11.0, 4.0))
        for ax, which in zip(axes, ("least", "most")):
            for ev in models.values():
                for method in {r["method"] for r in rows if r["model"] == ev.name}:
                    pts = [(r["fraction"], r["accuracy"]) for r in rows
                           if r["model"] == ev.name and r["method"] == method and r["discarded"] == which]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{ev.name}: {method}")
            ax.set_xlabel(f"fraction of the {which} uncertain cases discarded")
            ax.set_ylabel("count accuracy")
            ax.set_title(f"discarding the {which} uncertain")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        figures.append(plot.save_figure(fig, out / "uncertainty_curves.png"))
    fig, axes = plot.new_figure(1, len(series), figsize=(3.2 * len(series), 3.2))
    axes = np.atleast_1d(axes)
    for ax, (label, pmf, ev) in zip(axes, series):
        entropy = (-(pmf * torch.log(pmf.clamp_min(1e-300))).sum(1)).numpy()
        correct = _correct(ev, pmf).numpy()
        edges = np.linspace(0, math.log(pmf.shape[1]), 11)
        ax.hist([entropy[correct], entropy[~correct]], bins=edges, label=["correct", "incorrect"],
                color=["tab:green", "tab:red"])
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("entropy (nats)")
    axes[0].set_ylabel("cases")
    axes[0].legend(fontsize=7)
    figures.append(plot.save_figure(fig, out / "entropy_histograms.png"))
    return [pathlib.Path(p) for p in figures]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
