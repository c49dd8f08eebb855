"""The training loop: segmentation pre-training, then segmentation + lesion-count multi-task training.

Loss per step (``logits`` of shape (B, 1, D, H, W), ``mask`` (B, 1, D, H, W) in {0, 1}, ``count`` (B,))::

    seg   = BCEWithLogits(logits, mask, pos_weight=3)                         (mean over voxels)
    count = mean_b -log P(C_b = count_b)   from count_distribution(logits, threshold=0.1,
                                           connectivity=18, max_count=4, from_logits=True)
    loss  = seg + w(epoch) * count,   w(epoch) = w1 * exp(w2 * (epoch - pretrain_epochs))

with ``w = 0`` during the ``pretrain_epochs`` segmentation-only epochs and always with
``post_hoc_only``. Both losses are computed in float32 from the logits, also under mixed precision.
Adam + ExponentialLR (one step per epoch); the checkpoint with the best validation voxel-wise F1 is
kept as ``best.pt``; ``last.pt`` is written after every epoch and ``resume`` continues from it with
the same result as an uninterrupted run (on CPU, fixed seed): the shuffling order and the
augmentation of every item are functions of (seed, epoch, index), and the checkpoint carries every
process's RNG state (dropout).

Distributed data parallel: launched with ``torchrun``, the loop reads RANK / WORLD_SIZE /
LOCAL_RANK, joins the process group (NCCL on CUDA, Gloo on CPU), shards the training set with a
``DistributedSampler`` (or, with ``samples_per_epoch``, :class:`FixedLengthSampler`) and the
validation set without padding, all-reduces the validation sums, and
lets only rank 0 write files (config.yaml, metrics.csv, tb/, last.pt, best.pt) and print.

Example:
    >>> from lesioncount.train.config import TrainConfig
    >>> from lesioncount.train.loop import train
    >>> cfg = TrainConfig(out_dir="runs/tiny", epochs=2, pretrain_epochs=1, num_train=4, num_val=2,
    ...                   shape=(16, 32, 32), base_filters=4, levels=3, progress=False)
    >>> result = train(cfg)                                           # doctest: +SKIP
    >>> result.history[-1]["count_weight"]                            # doctest: +SKIP
    0.001
"""
from __future__ import annotations

import csv
import math
import os
import pathlib
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .._validation import DEFAULT_CONNECTIVITY
from ..losses import _reduce as _reduce_count_nll
from .config import ConfigError, TrainConfig, save_config

__all__ = [
    "CheckpointError",
    "DistContext",
    "TrainResult",
    "Trainer",
    "count_loss_term",
    "load_checkpoint",
    "resolve_amp_dtype",
    "resolve_device",
    "segmentation_loss",
    "setup_distributed",
    "train",
    "train_step",
]

# count_loss / val_count_nll: mean -log P(C = true count) over the items where it is finite;
# count_infeasible / val_count_infeasible: fraction of items with more lesions than candidates
# (P(C = true count) = 0, no gradient).
METRIC_COLUMNS = ("epoch", "train_loss", "seg_loss", "count_loss", "count_infeasible", "count_weight",
                  "val_seg_f1", "val_count_accuracy", "val_count_nll", "val_count_infeasible", "lr",
                  "epoch_time_s")

# settings that may change between a run and its resumption (they do not change the results)
_RESUMABLE_CHANGES = {"out_dir", "epochs", "progress", "log_every", "num_workers", "device"}
# Settings added after checkpoints had been written: a saved config without the key was trained with
# this value (the behaviour before the setting existed), so resuming compares against it.
_VALUE_WHEN_ABSENT = {"samples_per_epoch": 0}


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------

def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor, pos_weight: float = 3.0) -> torch.Tensor:
    """Voxel-wise BCE-with-logits (mean), positives weighted by ``pos_weight``; computed in float32.

    Shapes: ``logits`` and ``mask`` (B, 1, D, H, W) (any equal shapes); returns a scalar.

    Example:
        >>> segmentation_loss(torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2), pos_weight=3.0)
        tensor(2.0794)
    """
    logits = logits.float()
    weight = torch.tensor(pos_weight, dtype=torch.float32, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, mask.to(torch.float32), pos_weight=weight)


def count_loss_term(logits: torch.Tensor, counts: torch.Tensor, *, threshold: float = 0.1,
                    connectivity: int = DEFAULT_CONNECTIVITY[3], max_count: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Count NLL ``-log P(C = count)`` of the count distribution of ``logits`` (float32).

    The distribution is computed from the logits in log space (``from_logits=True``), outside any
    autocast region, so it stays exact under mixed precision. Infeasible items (true count with
    probability exactly 0, e.g. more true lesions than candidates) follow the one rule of
    :func:`lesioncount.count_nll_terms`: NLL +inf, no gradient, left out of the mean.

    Shapes: ``logits`` (B, 1, D, H, W), ``counts`` (B,) int. Returns ``(loss, nll)``: ``loss`` a
    scalar differentiable in ``logits`` (the gradient reaches one voxel per candidate lesion; the
    mean over the feasible items), ``nll`` (B,) detached per-item values (inf where infeasible).

    Example:
        >>> logits = torch.full((2, 1, 4, 8, 8), -9.0); logits[:, 0, 1, 2, 2] = 2.0
        >>> loss, nll = count_loss_term(logits, torch.tensor([1, 2]))    # item 1: 2 lesions, 1 candidate
        >>> loss, nll                                                    # -log sigmoid(2), item 1 left out
        (tensor(0.1269), tensor([0.1269,    inf]))
    """
    import lesioncount

    counts = torch.as_tensor(counts)
    if counts.dim() != 1 or counts.shape[0] != logits.shape[0] or counts.dtype.is_floating_point:
        raise ValueError(f"`counts` must be a (B,) integer tensor with B = {logits.shape[0]}, got "
                         f"{tuple(counts.shape)} {counts.dtype}")
    if counts.device.type == "cpu" and bool((counts < 0).any()):  # checked where it costs no device sync
        raise ValueError(f"`counts` must be >= 0, got {counts.tolist()}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        result = lesioncount.count_distribution(logits.float(), threshold=threshold, connectivity=connectivity,
                                                max_count=max_count, from_logits=True)
        target = counts.to(result.log_pmf.device, non_blocking=True)
        terms = lesioncount.count_nll_terms(result.log_pmf, target)
        loss = _reduce_count_nll(terms, "mean", True)  # the rule's reduction, without re-gathering
    return loss, terms.nll.detach()


class StepOutput(NamedTuple):
    """Detached results of :func:`train_step`: scalars ``loss``, ``seg_loss``, ``count_loss`` (0 when
    the count term is off) and the per-item ``count_nll`` (B,) (None when off)."""

    loss: torch.Tensor
    seg_loss: torch.Tensor
    count_loss: torch.Tensor
    count_nll: torch.Tensor | None


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, image: torch.Tensor, mask: torch.Tensor,
               counts: torch.Tensor | None = None, *, count_weight: float = 0.0, pos_weight: float = 3.0,
               count_threshold: float = 0.1, connectivity: int = DEFAULT_CONNECTIVITY[3], max_count: int = 4,
               amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None) -> StepOutput:
    """One optimisation step: forward (under autocast with ``amp_dtype``), ``seg + count_weight * count``
    in float32, backward, optimizer step. No host synchronisation except the one inside the count
    distribution (to learn the number of candidates).

    Shapes: ``image`` (B, C, D, H, W), ``mask`` (B, 1, D, H, W), ``counts`` (B,) (needed when
    ``count_weight > 0``).

    Example:
        >>> net = UNet3D(base_filters=4, levels=3); opt = torch.optim.Adam(net.parameters())   # doctest: +SKIP
        >>> out = train_step(net, opt, image, mask, counts, count_weight=1e-3)                  # doctest: +SKIP
    """
    from .count_heads import has_count_head, head_count_loss

    # a count-head model (lesioncount.train.count_heads) runs its head only while the count term is on
    use_head = count_weight > 0 and has_count_head(model)
    with (torch.autocast(device_type=image.device.type, dtype=amp_dtype) if amp_dtype is not None
          else nullcontext()):
        output = model(image, with_count=True) if use_head else model(image)
    logits, count_logits = output if use_head else (output, None)
    logits = logits.float()
    seg = segmentation_loss(logits, mask, pos_weight)
    if count_weight > 0 and counts is None:
        raise ValueError("train_step: `counts` are needed when count_weight > 0")
    if use_head:  # the paper's parametric baselines: cross-entropy of the count classes
        count_loss, nll = head_count_loss(count_logits, counts, max_count=max_count)
        loss = seg + count_weight * count_loss
    elif count_weight > 0:
        count_loss, nll = count_loss_term(logits, counts, threshold=count_threshold, connectivity=connectivity,
                                          max_count=max_count)
        loss = seg + count_weight * count_loss
    else:
        count_loss, nll = torch.zeros((), device=logits.device), None
        loss = seg
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return StepOutput(loss.detach(), seg.detach(), count_loss.detach(), nll)


# ----------------------------------------------------------------------------------------------
# devices, precision, distributed
# ----------------------------------------------------------------------------------------------

@dataclass
class DistContext:
    """Where this process sits in a (possibly single-process) run.

    Attributes: ``rank``, ``world_size``, ``local_rank`` (from torchrun's environment), ``device``,
    ``distributed`` (a process group was initialised by :func:`setup_distributed`).

    Example:
        >>> ctx = DistContext()
        >>> ctx.is_main, ctx.all_reduce_sum(torch.ones(2))     # single process: a no-op
        (True, tensor([1., 1.]))
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op without a process group)."""
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes (in place; returned for chaining)."""
        if self.distributed:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") from None


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``"cuda"`` -> ``cuda:LOCAL_RANK``.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(preference)
    except RuntimeError as exc:
        raise ConfigError(f"`device`: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"`device` is {preference!r} but CUDA is not available (torch {torch.__version__})")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"`device` {device} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise ConfigError(f"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {preference!r}")
    return device


def resolve_amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``mode`` on ``device``: ``auto`` -> bf16 on CUDA when supported (else fp16),
    none on CPU; ``none`` -> None.

    Example:
        >>> resolve_amp_dtype("auto", torch.device("cpu")) is None
        True
    """
    if mode == "none":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("`amp` fp16 needs a CUDA device (use bf16 or none on CPU)")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def setup_distributed(device_preference: str = "auto") -> DistContext:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group when WORLD_SIZE > 1.

    NCCL on CUDA devices, Gloo on CPU. Without those variables: a single-process context.

    Example:
        >>> ctx = setup_distributed("cpu"); (ctx.rank, ctx.world_size, ctx.distributed)
        (0, 1, False)
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    device = resolve_device(device_preference, local_rank)
    distributed = world_size > 1
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not torch.distributed.is_initialized():
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            torch.distributed.init_process_group(backend=backend, init_method="env://", rank=rank,
                                                 world_size=world_size, **kwargs)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       distributed=distributed)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochAugmented(Dataset):
    """Applies ``transform(item, generator)`` with a generator seeded by (seed, epoch, index).

    The augmentation of an item therefore depends neither on the worker that loads it nor on the
    order of loading, which keeps runs reproducible and resumable. Call :meth:`set_epoch` before
    each epoch.

    Example:
        >>> ds = EpochAugmented(base, RandomAffineFlip(), seed=0)   # doctest: +SKIP
        >>> ds.set_epoch(3); item = ds[0]                          # doctest: +SKIP
    """

    def __init__(self, base: Dataset, transform, seed: int) -> None:
        self.base = base
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        """``key``: an index, or ``(epoch, index)`` as yielded by :class:`EpochTaggedSampler` (which
        keeps persistent DataLoader workers, whose dataset copies never see :meth:`set_epoch`, right)."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        item = self.base[index]
        if self.transform is None:
            return item
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, index))
        return self.transform(item, generator)


class EpochTaggedSampler(torch.utils.data.Sampler):
    """Wraps a ``DistributedSampler`` or :class:`FixedLengthSampler` and yields ``(epoch, index)`` pairs for :class:`EpochAugmented`.

    Example:
        >>> from torch.utils.data.distributed import DistributedSampler
        >>> s = EpochTaggedSampler(DistributedSampler(range(4), num_replicas=2, rank=0, shuffle=False))
        >>> s.set_epoch(3); list(s)
        [(3, 0), (3, 2)]
    """

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class FixedLengthSampler(torch.utils.data.Sampler):
    """Draws ``samples_per_epoch`` training indices per epoch, as nnU-Net's fixed-length epochs do.

    The indices are whole shuffled passes over the ``dataset_size`` cases, concatenated and cut at
    ``samples_per_epoch`` (rounded up to a multiple of ``num_replicas``), so every case is drawn as
    evenly as the length allows, whether the set is larger or smaller than an epoch. The shuffle
    depends only on (``seed``, epoch), which keeps resumed and multi-process runs reproducible; rank
    ``r`` takes positions ``r, r + num_replicas, ...``. With this sampler the number of optimiser steps
    per epoch, and so the count-weight schedule in epochs, no longer depends on the training-set size
    (used to compare full and low-data runs at the same training budget).

    Args:
        dataset_size: number of training cases, >= 1.
        samples_per_epoch: cases drawn per epoch (over all ranks), >= 1.
        num_replicas, rank: the process group (1, 0 without DDP).
        seed: shuffle seed.

    Example:
        >>> s = FixedLengthSampler(3, samples_per_epoch=7, seed=0); s.set_epoch(0)
        >>> sorted(list(s)[:6]) == [0, 0, 1, 1, 2, 2], len(s)
        (True, 7)
    """

    def __init__(self, dataset_size: int, samples_per_epoch: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        if dataset_size < 1:
            raise ValueError(f"FixedLengthSampler: dataset_size must be >= 1, got {dataset_size}")
        if samples_per_epoch < 1:
            raise ValueError(f"FixedLengthSampler: samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.total = -(-samples_per_epoch // num_replicas) * num_replicas
        self.per_rank = self.total // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, 4))
        passes = -(-self.total // self.dataset_size)
        order = torch.cat([torch.randperm(self.dataset_size, generator=generator) for _ in range(passes)])
        return iter(order[:self.total][self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.per_rank


def _shard(dataset: Dataset, ctx: DistContext) -> Dataset:
    """This rank's share of ``dataset`` (indices rank, rank + W, ...), without padding."""
    if ctx.world_size == 1:
        return dataset
    return Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))


def _build_data(config: TrainConfig):
    from . import data as data_module

    try:
        train_set, val_set, test_set = data_module.build_datasets(
            config.data, num_train=config.num_train, num_val=config.num_val, num_test=config.num_test,
            shape=tuple(config.shape), seed=config.seed, connectivity=config.connectivity, data_dir=config.data_dir)
    except (ValueError, FileNotFoundError) as exc:  # bad folder / split sizes: report, no traceback
        raise ConfigError(f"data={config.data!r}: {exc}") from exc
    if len(train_set) == 0:
        raise ConfigError(f"the training split of data={config.data!r} is empty")
    if len(val_set) == 0:
        raise ConfigError(f"the validation split of data={config.data!r} is empty")
    return train_set, val_set, test_set


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------

def _rng_state(device: torch.device) -> dict:
    """RNG states as tensors and plain Python values (loadable with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    # .cpu(): RNG states must be CPU ByteTensors even when the checkpoint was mapped to a GPU
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not from this training loop (message names it)."""


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by the training loop (``last.pt`` / ``best.pt``).

    Returns a dict with ``model`` (state dict), ``config`` (dict), ``epoch`` (completed epochs),
    ``best_metric``, ``best_epoch``, ``in_channels`` and, in ``last.pt``, the optimizer, scheduler,
    scaler and RNG states. Raises ``ValueError`` naming the file when it is not such a checkpoint.

    Example:
        >>> ckpt = load_checkpoint("runs/tiny/best.pt")   # doctest: +SKIP
        >>> ckpt["config"]["base_filters"]                # doctest: +SKIP
        4
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)  # no arbitrary pickles
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a lesioncount training checkpoint (expected the keys 'model' and 'config')")
    return ckpt


def _atomic_save(obj, path: pathlib.Path) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`lesioncount.io.atomic_file` (the one atomic
    writer: hidden temporary file, fsync, ``os.replace``; removed if saving fails)."""
    from ..io import atomic_file

    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


# ----------------------------------------------------------------------------------------------
# metrics output
# ----------------------------------------------------------------------------------------------

class _MetricsWriter:
    """metrics.csv (+ TensorBoard when installed) on rank 0."""

    def __init__(self, out_dir: pathlib.Path, start_epoch: int) -> None:
        self.csv_path = out_dir / "metrics.csv"
        kept = []
        if start_epoch > 0 and self.csv_path.exists():  # resuming: drop rows of epochs that will be redone
            with self.csv_path.open(newline="") as fh:
                kept = [row for row in csv.DictReader(fh) if row.get("epoch") and int(row["epoch"]) <= start_epoch]
        with self.csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows({k: row.get(k, "") for k in METRIC_COLUMNS} for row in kept)
        self.tb = None
        from .._extras import MissingExtraError, require

        try:
            tensorboard = require("torch.utils.tensorboard", "TensorBoard logging")
            self.tb = tensorboard.SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=start_epoch + 1)
        except MissingExtraError as exc:
            warnings.warn(f"{exc}; logging to {self.csv_path} only", stacklevel=2)

    def write(self, row: dict) -> None:
        with self.csv_path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=METRIC_COLUMNS).writerow(
                {k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
        if self.tb is not None:
            step = row["epoch"]
            for key in METRIC_COLUMNS[1:]:
                value = row.get(key)
                if value is not None:
                    if key.startswith("val_"):
                        tag = "val/" + key.removeprefix("val_")
                    else:
                        tag = "train/" + key.removeprefix("train_")
                    self.tb.add_scalar(tag, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """Summary of a finished run: ``history`` holds one dict per epoch (the metrics.csv columns).

    Example:
        >>> train(cfg).history[-1]["val_seg_f1"]    # doctest: +SKIP
        0.41
    """

    out_dir: pathlib.Path | None
    best_metric: float
    best_epoch: int
    last_epoch: int
    history: list


class Trainer:
    """Holds model, optimiser, data and the distributed context of one run; :meth:`fit` trains.

    ``resume``: ``"last"`` (OUT_DIR/last.pt) or a checkpoint path to continue from. Without it,
    an OUT_DIR that already holds a run (last.pt) is refused.

    Example:
        >>> trainer = Trainer(TrainConfig(out_dir="run", epochs=1, base_filters=4, levels=3,
        ...                               shape=(16, 32, 32), num_train=2, num_val=1))  # doctest: +SKIP
        >>> trainer.fit().best_metric                                                 # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig, ctx: DistContext | None = None,
                 resume: str | os.PathLike | None = None) -> None:
        if config.out_dir is None:
            raise ConfigError("`out_dir` is required (-o/--out-dir or out_dir: in the config file)")
        self.config = config
        self.ctx = ctx if ctx is not None else setup_distributed(config.device)
        self.device = self.ctx.device
        self.out_dir = pathlib.Path(config.out_dir)
        self.resume_path = None
        last_path = self.out_dir / "last.pt"
        if resume is not None:
            self.resume_path = last_path if str(resume) == "last" else pathlib.Path(resume)
            if not self.resume_path.is_file():
                raise ConfigError(f"--resume: {self.resume_path} not found (no checkpoint to continue from)")
        elif last_path.exists():
            raise ConfigError(f"{self.out_dir} already holds a run ({last_path.name}); pass --resume to continue "
                              f"it or choose another --out-dir")
        self.amp_dtype = resolve_amp_dtype(config.amp, self.device)
        from .._extras import available

        self.show_progress = config.progress and self.ctx.is_main
        if self.show_progress and not available("tqdm"):
            warnings.warn("tqdm is not installed (pip install 'lesioncount[train]'): no progress bar", stacklevel=2)
            self.show_progress = False
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        from .count_heads import build_model, parameter_groups

        train_set, val_set, _ = _build_data(config)
        first = train_set[0]
        self.in_channels = int(first["image"].shape[0])
        if tuple(first["image"].shape[1:]) != tuple(config.shape):
            raise ConfigError(f"the dataset yields volumes of {tuple(first['image'].shape[1:])}, "
                              f"expected shape {tuple(config.shape)}")
        transform = None
        if config.augment:
            from .data import RandomAffineFlip

            transform = RandomAffineFlip(connectivity=config.connectivity)
        self.train_set = EpochAugmented(train_set, transform, config.seed)
        self.val_set = val_set

        torch.manual_seed(config.seed)  # identical initial weights on every rank
        # UNet3D, or a UNet with a count head (same UNet weights for one seed); output bias logit(prior)
        self.model = build_model(config, self.in_channels).to(self.device)
        # dropout draws from the global stream: rank 0 continues it (a 1-process run is rank 0), other
        # ranks get their own
        if self.ctx.rank:
            torch.manual_seed(_mix_seed(config.seed, self.ctx.rank))
        np.random.seed(_mix_seed(config.seed, self.ctx.rank, 1) % 2**32)
        random.seed(_mix_seed(config.seed, self.ctx.rank, 2))
        self.module = self.model
        if self.ctx.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # a count head is unused during the segmentation-only epochs
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=device_ids, find_unused_parameters=config.model != "unet")
        # one group (lr), or the UNet at lr and a count head at its own rate (multihead: 1e-5)
        self.optimizer = torch.optim.Adam(parameter_groups(self.module, config), lr=config.lr,
                                          weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=config.lr_gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        from torch.utils.data.distributed import DistributedSampler

        if config.samples_per_epoch:  # fixed-length epochs (nnU-Net style), independent of the set size
            base_sampler = FixedLengthSampler(len(self.train_set), config.samples_per_epoch,
                                              num_replicas=self.ctx.world_size, rank=self.ctx.rank, seed=config.seed)
        else:  # one pass over the training set per epoch
            base_sampler = DistributedSampler(self.train_set, num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                                              shuffle=True, seed=config.seed, drop_last=False)
        self.sampler = EpochTaggedSampler(base_sampler)
        pin = self.device.type == "cuda"
        loader_generator = torch.Generator().manual_seed(_mix_seed(config.seed, self.ctx.rank, 3))
        self.train_loader = DataLoader(self.train_set, batch_size=config.batch_size, sampler=self.sampler,
                                       num_workers=config.num_workers, pin_memory=pin, drop_last=False,
                                       generator=loader_generator,
                                       persistent_workers=config.num_workers > 0)  # workers keep their caches
        self.val_loader = DataLoader(_shard(val_set, self.ctx), batch_size=config.batch_size, shuffle=False,
                                     num_workers=config.num_workers, pin_memory=pin,
                                     persistent_workers=config.num_workers > 0,
                                     generator=torch.Generator().manual_seed(0))
        self.start_epoch = 0
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.history: list[dict] = []
        if self.resume_path is not None:
            # loaded on the CPU: the RNG states must be CPU ByteTensors (torch.set_rng_state and
            # .numpy() refuse CUDA tensors); model / optimizer states are copied to the parameters' device
            self.load_state_dict(load_checkpoint(self.resume_path, map_location="cpu"),
                                 source=str(self.resume_path))

    # ------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _log(self, message: str) -> None:
        if self.ctx.is_main:
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------
    def state_dict(self, epoch: int) -> dict:
        """Everything needed to resume after ``epoch`` completed epochs (RNG states of every rank)."""
        rng = _rng_state(self.device)
        if self.ctx.distributed:
            states = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(states, rng)
        else:
            states = [rng]
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "rng": states,
            "world_size": self.ctx.world_size,
            "in_channels": self.in_channels,
            "config": self.config.to_dict(),
            "history": self.history,
        }

    def load_state_dict(self, ckpt: dict, source: str = "checkpoint") -> None:
        """Restore a :meth:`state_dict`; settings that change results must match the current config."""
        saved = {**_VALUE_WHEN_ABSENT, **ckpt.get("config", {})}
        current = self.config.to_dict()
        differing = sorted(k for k in current if k not in _RESUMABLE_CHANGES and k in saved and saved[k] != current[k])
        if differing:
            detail = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in differing)
            raise ConfigError(f"{source}: cannot resume with different settings ({detail}); "
                              f"only {', '.join(sorted(_RESUMABLE_CHANGES))} may change")
        for key in ("optimizer", "scheduler", "epoch", "rng"):
            if key not in ckpt:
                raise CheckpointError(f"{source}: has no {key!r} entry; resume needs a last.pt checkpoint")
        self.module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt["epoch"])
        self.best_metric = float(ckpt["best_metric"])
        self.best_epoch = int(ckpt["best_epoch"])
        self.history = list(ckpt.get("history", []))
        states = ckpt["rng"]
        if len(states) == self.ctx.world_size:
            _set_rng_state(states[self.ctx.rank], self.device)
        else:
            warnings.warn(f"{source}: saved with {len(states)} process(es), resuming with {self.ctx.world_size}; "
                          f"random streams are re-seeded, results will differ from an uninterrupted run",
                          stacklevel=2)
            torch.manual_seed(_mix_seed(self.config.seed, self.ctx.rank, self.start_epoch))

    # ------------------------------------------------------------------------------------------
    def train_one_epoch(self, epoch: int) -> dict:
        """One pass over this rank's shard; returns the epoch means (synced over ranks)."""
        config = self.config
        self.model.train()
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        weight = config.count_weight_at(epoch)
        use_count = weight > 0
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        bar = None
        if self.show_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.train_loader), desc=f"epoch {epoch + 1}/{config.epochs}",
                       leave=False, dynamic_ncols=True, file=sys.stderr)
        non_blocking = self.device.type == "cuda"
        for step, batch in enumerate(self.train_loader):
            image = batch["image"].to(self.device, non_blocking=non_blocking)
            mask = batch["mask"].to(self.device, non_blocking=non_blocking)
            counts = batch["count"] if use_count else None  # moved by count_loss_term after a CPU-side check
            out = train_step(self.model, self.optimizer, image, mask, counts, count_weight=weight,
                             pos_weight=config.pos_weight, count_threshold=config.count_threshold,
                             connectivity=config.connectivity, max_count=config.max_count,
                             amp_dtype=self.amp_dtype, scaler=self.scaler)
            loss, seg = out.loss, out.seg_loss
            zero = torch.zeros((), dtype=torch.float64, device=self.device)
            if use_count:
                finite = torch.isfinite(out.count_nll)
                nll_sum = torch.where(finite, out.count_nll, 0).sum().double()
                num_finite, num_items = finite.sum().double(), zero + out.count_nll.shape[0]
            else:
                nll_sum = num_finite = num_items = zero
            # loss, seg, count-NLL sum, finite items, items, steps
            sums += torch.stack([loss.detach().double(), seg.detach().double(), nll_sum, num_finite, num_items,
                                 zero + 1])
            if bar is not None:
                bar.update(1)
                if (step + 1) % config.log_every == 0 or step + 1 == len(self.train_loader):
                    totals = sums.tolist()  # the only host sync of the loop (count term aside), for display
                    postfix = {"loss": f"{totals[0] / totals[5]:.4f}", "seg": f"{totals[1] / totals[5]:.4f}"}
                    if use_count and totals[3]:
                        postfix["count"] = f"{totals[2] / totals[3]:.3f}"
                    bar.set_postfix(postfix)
        if bar is not None:
            bar.close()
        self.ctx.all_reduce_sum(sums)
        loss_sum, seg_sum, nll_sum, num_finite, num_items, steps = sums.tolist()
        steps = max(steps, 1.0)
        if not math.isfinite(loss_sum) and self.ctx.is_main:
            warnings.warn(f"epoch {epoch + 1}: the training loss is not finite ({loss_sum}); with --amp fp16 the "
                          f"gradient scaler skips such steps, otherwise lower --lr", stacklevel=2)
        return {"train_loss": loss_sum / steps, "seg_loss": seg_sum / steps,
                "count_loss": nll_sum / num_finite if use_count and num_finite else None,
                "count_infeasible": (num_items - num_finite) / num_items if use_count and num_items else None,
                "count_weight": weight}

    @torch.no_grad()
    def validate(self) -> dict:
        """Voxel-wise segmentation F1 (at ``val_threshold``), count accuracy and count NLL over the
        whole validation set (sums all-reduced over ranks, so every rank gets the same values)."""
        import lesioncount

        from .count_heads import has_count_head

        config = self.config
        model = self.module
        model.eval()
        head_model = has_count_head(model)
        sums = torch.zeros(7, dtype=torch.float64, device=self.device)  # tp, fp, fn, correct, n, nll, finite
        for batch in self.val_loader:
            image = batch["image"].to(self.device)
            mask = batch["mask"].to(self.device) > 0.5
            counts = batch["count"].to(self.device)
            with self._autocast():
                output = model(image, with_count=True) if head_model else model(image)
            logits, count_logits = output if head_model else (output, None)
            logits = logits.float()
            predicted = torch.sigmoid(logits) > config.val_threshold
            if head_model:  # a count-head baseline: the softmax of its count logits
                log_pmf = torch.log_softmax(count_logits.float(), dim=1)
            else:
                log_pmf = lesioncount.count_distribution(logits, threshold=config.count_threshold,
                                                         connectivity=config.connectivity,
                                                         max_count=config.max_count, from_logits=True).log_pmf
            correct = (log_pmf.argmax(1) == counts.clamp_max(config.max_count)).sum()
            nll = lesioncount.count_nll(log_pmf, counts, reduction="none")
            finite = torch.isfinite(nll)
            sums += torch.stack([(predicted & mask).sum(), (predicted & ~mask).sum(), (~predicted & mask).sum(),
                                 correct, torch.tensor(counts.shape[0], device=self.device),
                                 torch.where(finite, nll, 0).sum(), finite.sum()]).double()
        self.ctx.all_reduce_sum(sums)
        tp, fp, fn, correct, n, nll, num_finite = sums.tolist()
        denominator = 2 * tp + fp + fn
        return {"val_seg_f1": 2 * tp / denominator if denominator > 0 else 1.0,
                "val_count_accuracy": correct / n if n else None,
                "val_count_nll": nll / num_finite if num_finite else None,
                "val_count_infeasible": (n - num_finite) / n if n else None}

    # ------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train the remaining epochs (all, or those after the resumed checkpoint)."""
        config, ctx = self.config, self.ctx
        last_path, best_path = self.out_dir / "last.pt", self.out_dir / "best.pt"
        metrics_writer = None
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.out_dir / "config.yaml")
            metrics_writer = _MetricsWriter(self.out_dir, self.start_epoch)
        ctx.barrier()
        if self.start_epoch >= config.epochs:
            self._log(f"{last_path}: already trained {self.start_epoch} of {config.epochs} epochs; nothing to do")
        else:
            count_term = "off (post hoc only)" if config.post_hoc_only else f"from epoch {config.pretrain_epochs + 1}"
            self._log(f"training on {self.device} (world size {ctx.world_size}, amp "
                      f"{self.amp_dtype or 'off'}): {len(self.train_set)} train / {len(self.val_set)} val cases, "
                      f"epochs {self.start_epoch + 1}..{config.epochs}, count term {count_term}")
        try:
            for epoch in range(self.start_epoch, config.epochs):
                started = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                row = {"epoch": epoch + 1, **self.train_one_epoch(epoch), **self.validate(), "lr": lr}
                self.scheduler.step()
                row["epoch_time_s"] = time.perf_counter() - started
                # a count-head model is selected only among epochs that trained its head (count term on)
                selectable = config.model == "unet" or row["count_weight"] > 0
                improved = selectable and row["val_seg_f1"] > self.best_metric
                if improved:
                    self.best_metric, self.best_epoch = row["val_seg_f1"], epoch + 1
                self.history.append(row)
                state = self.state_dict(epoch + 1)  # collective in DDP: every rank takes part
                if ctx.is_main:
                    _atomic_save(state, last_path)
                    if improved:
                        _atomic_save({k: state[k] for k in ("model", "config", "epoch", "best_metric", "best_epoch",
                                                             "in_channels", "world_size")}, best_path)
                    metrics_writer.write(row)
                    count_text = "" if row["count_loss"] is None else \
                        f" count {row['count_loss']:.4f} (w {row['count_weight']:.2g})"
                    self._log(f"epoch {epoch + 1}/{config.epochs}: loss {row['train_loss']:.4f} seg "
                              f"{row['seg_loss']:.4f}{count_text} | val F1 {row['val_seg_f1']:.4f} count acc "
                              f"{row['val_count_accuracy'] or 0:.3f}{' *' if improved else ''} | lr {lr:.3g} "
                              f"{row['epoch_time_s']:.1f}s")
                ctx.barrier()
        finally:
            if metrics_writer is not None:
                metrics_writer.close()
        return TrainResult(out_dir=self.out_dir, best_metric=self.best_metric, best_epoch=self.best_epoch,
                           last_epoch=max(self.start_epoch, config.epochs),
                           history=self.history)


def train(config: TrainConfig, resume: str | os.PathLike | None = None) -> TrainResult:
    """Run (or resume) the training described by ``config``; sets up and tears down DDP when launched
    by torchrun. Returns a :class:`TrainResult` (every rank gets the same one).

    Example:
        >>> result = train(TrainConfig(out_dir="runs/tiny", epochs=2, pretrain_epochs=1, num_train=4,
        ...                            num_val=2, shape=(16, 32, 32), base_filters=4, levels=3))  # doctest: +SKIP
        >>> [round(row["count_weight"], 4) for row in result.history]                           # doctest: +SKIP
        [0.0, 0.001]
    """
    ctx = setup_distributed(config.device)
    try:
        result = Trainer(config, ctx, resume=resume).fit()
        ctx.barrier()
        return result
    finally:  # also after an error, so that the process group does not leak (no barrier then: peers may be gone)
        if ctx.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
