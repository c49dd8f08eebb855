"""Training configuration: one dataclass, its YAML form and its command-line flags.

The resolved configuration is built in three layers, each overriding the one before:

1. the defaults of :class:`TrainConfig` (the paper's recipe: UNet with 5 levels and 32 base filters,
   BCE with pos_weight 3, 20 segmentation-only epochs, then count weight 0.001 * exp(0.06 * t),
   Adam 1e-4 / weight decay 1e-5, exponential learning-rate decay 0.995 per epoch);
2. a YAML file given with ``--config FILE`` (keys are the field names; ``-`` and ``_`` both work);
3. flags given on the command line.

The result is written next to the run as ``OUT_DIR/config.yaml`` so the run can be reproduced with
``lesioncount train --config OUT_DIR/config.yaml``.

Example:
    >>> from lesioncount.train.config import TrainConfig
    >>> cfg = TrainConfig(out_dir="runs/a", epochs=2, pretrain_epochs=1, base_filters=4)
    >>> cfg.count_weight_at(0), round(cfg.count_weight_at(1), 6)   # epoch 0: segmentation only
    (0.0, 0.001)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
from dataclasses import dataclass, fields
from typing import Any

from .._validation import CONNECTIVITIES as _VALID_CONNECTIVITIES
from .._validation import DEFAULT_CONNECTIVITY

__all__ = [
    "ConfigError",
    "TrainConfig",
    "add_train_arguments",
    "config_from_args",
    "load_config_file",
    "save_config",
]

DATA_SOURCES = ("phantom", "anatomy", "nnunet")
# "unet": counting by this method (post hoc / multi-task); the others: the paper's parametric count heads
MODEL_TYPES = ("unet", "bottleneck", "multihead", "downstream")
AMP_MODES = ("auto", "bf16", "fp16", "none")
CONNECTIVITIES = _VALID_CONNECTIVITIES[3]  # 3-D volumes: the rule of lesioncount._validation


class ConfigError(ValueError):
    """A configuration value (from a file or a flag) is missing, unknown or out of range."""


@dataclass
class TrainConfig:
    """Every setting of a training run (see the module docstring for how it is resolved).

    Times are in epochs, counted from 0: epochs ``0 .. pretrain_epochs - 1`` train the segmentation
    loss alone; from epoch ``pretrain_epochs`` on, the count NLL is added with weight
    ``count_weight * exp(count_weight_growth * (epoch - pretrain_epochs))``.

    Example:
        >>> TrainConfig(out_dir="run", shape=[16, 32, 32]).shape
        (16, 32, 32)
    """

    out_dir: str | None = None
    # data
    data: str = "phantom"
    data_dir: str | None = None
    num_train: int = 40  # nnunet: 0 = all training cases left after validation / test
    num_val: int = 10
    num_test: int = 10
    shape: tuple[int, int, int] = (32, 64, 64)
    connectivity: int = DEFAULT_CONNECTIVITY[3]
    augment: bool = True
    num_workers: int = 0
    # model: "unet" (this method) or a parametric count-head baseline (lesioncount.train.count_heads)
    model: str = "unet"
    # width of the count network of a head model; its learning rate (None: 1e-5 for multihead, as in
    # the paper, else lr)
    count_head_filters: int = 32
    count_head_lr: float | None = None
    base_filters: int = 32
    levels: int = 5
    dropout: float = 0.1
    # initial foreground probability of the output head (its bias starts at logit(prior)); None keeps
    # PyTorch's default init. Lesions are ~0.1% of voxels: starting near the prior spares the network
    # thousands of Adam steps of only pushing the background down (Lin et al.'s focal-loss prior init).
    output_prior: float | None = 0.01
    # optimisation
    epochs: int = 100
    # cases drawn per epoch; 0: one pass over the training set. A fixed number keeps the steps per
    # epoch (and the schedules, which count epochs) independent of the training-set size.
    samples_per_epoch: int = 0
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_gamma: float = 0.995
    pos_weight: float = 3.0
    # count term
    pretrain_epochs: int = 20
    count_weight: float = 1e-3
    count_weight_growth: float = 0.06
    max_count: int = 4
    count_threshold: float = 0.1
    post_hoc_only: bool = False
    # validation
    val_threshold: float = 0.5
    # runtime
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0
    progress: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.shape, (list, tuple)):
            self.shape = tuple(self.shape)
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that is out of range."""
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"`{name}` must be {what}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)

        need(self.data in DATA_SOURCES, "data", f"one of {DATA_SOURCES}")
        need(self.data_dir is None or isinstance(self.data_dir, str), "data_dir", "a folder path")
        if self.data == "nnunet" and not self.data_dir:
            raise ConfigError("`data_dir` is required with data='nnunet' (the nnU-Net raw dataset folder)")
        for name in ("num_train", "num_val", "num_test"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an int >= 0")
        if self.data != "nnunet":  # nnunet: 0 = every training case not used for validation / test
            need(self.num_train >= 1, "num_train", "an int >= 1")
        need(is_int(self.num_val) and self.num_val >= 1, "num_val", "an int >= 1")
        need(isinstance(self.shape, tuple) and len(self.shape) == 3
             and all(is_int(s) and s >= 1 for s in self.shape), "shape", "three positive ints (D, H, W)")
        need(self.connectivity in CONNECTIVITIES, "connectivity", f"one of {CONNECTIVITIES}")
        need(isinstance(self.augment, bool), "augment", "true or false")
        need(is_int(self.num_workers) and self.num_workers >= 0, "num_workers", "an int >= 0")
        need(self.model in MODEL_TYPES, "model", f"one of {MODEL_TYPES}")
        need(is_int(self.count_head_filters) and self.count_head_filters >= 1, "count_head_filters", "an int >= 1")
        need(self.count_head_lr is None or (is_num(self.count_head_lr) and self.count_head_lr > 0), "count_head_lr",
             "a number > 0 or null")
        if self.model != "unet" and self.post_hoc_only:
            raise ConfigError(f"`post_hoc_only` trains no count term, but model={self.model!r} is a count-head "
                              f"model that only learns from it; use model='unet' for the post hoc baseline")
        if self.model == "multihead" and self.levels < 3:
            raise ConfigError(f"model='multihead' reads the second-to-last decoder block and needs `levels` >= 3, "
                              f"got {self.levels}")
        need(is_int(self.base_filters) and self.base_filters >= 1, "base_filters", "an int >= 1")
        need(is_int(self.levels) and self.levels >= 1, "levels", "an int >= 1")
        need(is_num(self.dropout) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
        need(self.output_prior is None or (is_num(self.output_prior) and 0 < self.output_prior < 1),
             "output_prior", "a probability in (0, 1) or null")
        factor = 2 ** (self.levels - 1)
        if any(s % factor for s in self.shape):
            raise ConfigError(f"`shape` {list(self.shape)} must be divisible by 2**(levels-1) = {factor} "
                              f"in every dimension for a UNet with {self.levels} levels")
        need(is_int(self.epochs) and self.epochs >= 1, "epochs", "an int >= 1")
        need(is_int(self.samples_per_epoch) and self.samples_per_epoch >= 0, "samples_per_epoch",
             "an int >= 0 (0: one pass over the training set)")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an int >= 1")
        need(is_num(self.lr) and self.lr > 0, "lr", "a number > 0")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(is_num(self.lr_gamma) and 0 < self.lr_gamma <= 1, "lr_gamma", "a number in (0, 1]")
        need(is_num(self.pos_weight) and self.pos_weight > 0, "pos_weight", "a number > 0")
        need(is_int(self.pretrain_epochs) and self.pretrain_epochs >= 0, "pretrain_epochs", "an int >= 0")
        need(is_num(self.count_weight) and self.count_weight >= 0, "count_weight", "a number >= 0")
        need(is_num(self.count_weight_growth), "count_weight_growth", "a finite number")
        need(is_int(self.max_count) and self.max_count >= 1, "max_count", "an int >= 1")
        need(is_num(self.count_threshold) and 0 <= self.count_threshold < 1, "count_threshold",
             "a probability in [0, 1)")
        need(isinstance(self.post_hoc_only, bool), "post_hoc_only", "true or false")
        need(is_num(self.val_threshold) and 0 <= self.val_threshold < 1, "val_threshold",
             "a probability in [0, 1)")
        need(isinstance(self.device, str) and bool(self.device), "device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        need(self.amp in AMP_MODES, "amp", f"one of {AMP_MODES}")
        need(is_int(self.seed) and self.seed >= 0, "seed", "an int >= 0")
        need(isinstance(self.progress, bool), "progress", "true or false")
        need(is_int(self.log_every) and self.log_every >= 1, "log_every", "an int >= 1")

    # ------------------------------------------------------------------------------------------
    def count_weight_at(self, epoch: int) -> float:
        """Weight of the count NLL in epoch ``epoch`` (0-based); 0 during pre-training / post-hoc.

        :func:`lesioncount.count_weight_schedule` (the one schedule, also nnU-Net's) with
        ``w1 = count_weight``, ``w2 = count_weight_growth``, ``pretrain_epochs`` and no cap:
        ``count_weight * exp(count_weight_growth * (epoch - pretrain_epochs))`` from epoch
        ``pretrain_epochs`` on (paper: 0.001 * exp(0.06 t)).

        Example:
            >>> cfg = TrainConfig(pretrain_epochs=20)
            >>> cfg.count_weight_at(19), round(cfg.count_weight_at(30), 6)
            (0.0, 0.001822)
        """
        from ..losses import count_weight_schedule

        if self.post_hoc_only:
            return 0.0
        return count_weight_schedule(epoch, self.count_weight, self.count_weight_growth, self.pretrain_epochs)

    def to_dict(self) -> dict:
        """Plain dict of every field (tuples as lists), ready for YAML / checkpoints.

        Example:
            >>> TrainConfig(shape=(16, 32, 32)).to_dict()["shape"]
            [16, 32, 32]
        """
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        """Build from a dict of field values; unknown keys raise :class:`ConfigError` naming ``source``.

        Example:
            >>> TrainConfig.from_dict({"base-filters": 8, "levels": 3}).base_filters
            8
        """
        return cls(**_normalise_keys(values, source))


_FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


def _normalise_keys(values: dict, source: str) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of setting names to values, got {type(values).__name__}")
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in _FIELD_NAMES:
            raise ConfigError(f"{source}: unknown setting {key!r}; valid settings: {', '.join(_FIELD_NAMES)}")
        out[name] = value
    return out


def load_config_file(path) -> dict:
    """Read a YAML config file into a dict of (normalised) field names -> values.

    Raises :class:`ConfigError` naming the file when it is missing, not YAML, not a mapping or has
    unknown keys.

    Example:
        >>> load_config_file("configs/tiny_cpu.yaml")["base_filters"]   # doctest: +SKIP
        4
    """
    from .._extras import require

    yaml = require("yaml", "reading training config files")
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if values is None:
        return {}
    return _normalise_keys(values, str(path))


def save_config(config: TrainConfig, path) -> None:
    """Write ``config`` as YAML to ``path`` (loadable with ``--config``).

    Example:
        >>> save_config(TrainConfig(out_dir="run"), "run/config.yaml")   # doctest: +SKIP
    """
    from .._extras import require

    yaml = require("yaml", "writing training config files")
    pathlib.Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# command-line flags
# ----------------------------------------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Data flags shared by ``train`` and ``evaluate-model`` (defaults suppressed: unset = not given).

    Example:
        >>> p = argparse.ArgumentParser(); add_data_arguments(p)
        >>> vars(p.parse_args(["--data", "anatomy", "--shape", "16", "32", "32"]))
        {'data': 'anatomy', 'shape': [16, 32, 32]}
    """
    d = TrainConfig()
    S = argparse.SUPPRESS
    g = parser.add_argument_group("data")
    g.add_argument("--data", choices=DATA_SOURCES, default=S,
                   help=f"data source: embedded synthetic phantoms, phantoms on MNI152 anatomy, or an "
                        f"nnU-Net raw dataset folder (default {d.data})")
    g.add_argument("--data-dir", default=S, help="nnU-Net raw dataset folder (with --data nnunet)")
    g.add_argument("--num-train", type=int, default=S, help=f"training cases (default {d.num_train})")
    g.add_argument("--num-val", type=int, default=S, help=f"validation cases (default {d.num_val})")
    g.add_argument("--num-test", type=int, default=S, help=f"test cases (default {d.num_test})")
    g.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=S,
                   help=f"volume shape (default {' '.join(map(str, d.shape))})")
    g.add_argument("--connectivity", type=int, choices=CONNECTIVITIES, default=S,
                   help=f"lesion connectivity for counts and candidates (default {d.connectivity})")
    g.add_argument("--seed", type=int, default=S, help=f"random seed (default {d.seed})")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every training flag to ``parser``. Unset flags are absent from the parsed namespace, so a
    config file's value survives unless the flag is given.

    Example:
        >>> p = argparse.ArgumentParser(); add_train_arguments(p)
        >>> config_from_args(p.parse_args(["-o", "run", "--epochs", "3"])).epochs
        3
    """
    d = TrainConfig()
    S = argparse.SUPPRESS
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML file of settings (field names as keys); flags override it")
    parser.add_argument("-o", "--out-dir", default=S, help="output folder (checkpoints, metrics.csv, tb/)")
    parser.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                        help="continue from OUT_DIR/last.pt (or the given checkpoint) at the next epoch")
    add_data_arguments(parser)
    g = parser.add_argument_group("data loading")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=S,
                   help="disable random affine + flip augmentation")
    g.add_argument("--num-workers", type=int, default=S, help=f"DataLoader workers (default {d.num_workers})")
    g = parser.add_argument_group("model")
    g.add_argument("--base-filters", type=int, default=S, help=f"UNet base filters (default {d.base_filters})")
    g.add_argument("--levels", type=int, default=S, help=f"UNet levels (default {d.levels})")
    g.add_argument("--dropout", type=float, default=S, help=f"dropout (default {d.dropout})")
    g.add_argument("--output-prior", type=float, default=S,
                   help=f"initial foreground probability of the output (head bias = logit; default {d.output_prior})")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, help=f"total epochs (default {d.epochs})")
    g.add_argument("--samples-per-epoch", type=int, default=S,
                   help="cases drawn per epoch, whole shuffled passes cut to length (default 0: one pass "
                        "over the training set)")
    g.add_argument("--batch-size", type=int, default=S, help=f"per-process batch size (default {d.batch_size})")
    g.add_argument("--lr", type=float, default=S, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--weight-decay", type=float, default=S, help=f"Adam weight decay (default {d.weight_decay})")
    g.add_argument("--lr-gamma", type=float, default=S, help=f"ExponentialLR gamma per epoch (default {d.lr_gamma})")
    g.add_argument("--pos-weight", type=float, default=S, help=f"BCE pos_weight (default {d.pos_weight})")
    g = parser.add_argument_group("count loss")
    g.add_argument("--pretrain-epochs", type=int, default=S,
                   help=f"segmentation-only epochs before the count term starts (default {d.pretrain_epochs})")
    g.add_argument("--count-weight", type=float, default=S, help=f"w1 in w1*exp(w2*t) (default {d.count_weight})")
    g.add_argument("--count-weight-growth", type=float, default=S,
                   help=f"w2 in w1*exp(w2*t) (default {d.count_weight_growth})")
    g.add_argument("--max-count", type=int, default=S, help=f"count bins 0..M-1 and M+ (default {d.max_count})")
    g.add_argument("--count-threshold", type=float, default=S,
                   help=f"candidate threshold of the count distribution (default {d.count_threshold})")
    g.add_argument("--post-hoc-only", action="store_true", default=S,
                   help="train the segmentation loss only (the post-hoc counting baseline)")
    g.add_argument("--model", choices=MODEL_TYPES, default=S,
                   help="unet: count with the count distribution (this method); bottleneck / multihead / "
                        "downstream: the paper's parametric count-head baselines, trained with cross-entropy "
                        f"under the same count-weight schedule (default {d.model})")
    g.add_argument("--count-head-filters", type=int, default=S,
                   help=f"width of a count head's convolutions (default {d.count_head_filters})")
    g.add_argument("--count-head-lr", type=float, default=S,
                   help="learning rate of a count head (default: 1e-5 for multihead, as in the paper; else --lr)")
    g = parser.add_argument_group("runtime")
    g.add_argument("--val-threshold", type=float, default=S,
                   help=f"threshold of the validation segmentation F1 (default {d.val_threshold})")
    g.add_argument("--device", default=S, help="auto | cpu | cuda | cuda:N (default auto; DDP uses LOCAL_RANK)")
    g.add_argument("--amp", choices=AMP_MODES, default=S,
                   help="mixed precision on GPU (default auto: bf16 where supported, none on CPU)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=S, help="no progress bar")
    g.add_argument("--log-every", type=int, default=S, help=f"progress-bar update period in steps (default {d.log_every})")


def config_from_args(args: argparse.Namespace, keys: tuple[str, ...] = _FIELD_NAMES) -> TrainConfig:
    """Resolve defaults <- ``--config`` file <- given flags into a validated :class:`TrainConfig`.

    Example:
        >>> p = argparse.ArgumentParser(); add_train_arguments(p)
        >>> config_from_args(p.parse_args(["-o", "r", "--no-augment"])).augment
        False
    """
    values: dict = {}
    config_path = getattr(args, "config", None)
    if config_path:
        values.update(load_config_file(config_path))
    for name in keys:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    source = f"{config_path} + flags" if config_path else "flags"
    try:
        return TrainConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except TypeError as exc:  # pragma: no cover - all keys are checked above
        raise ConfigError(f"{source}: {exc}") from None


def replace(config: TrainConfig, **changes) -> TrainConfig:
    """A validated copy of ``config`` with ``changes`` applied.

    Example:
        >>> replace(TrainConfig(), epochs=3).epochs
        3
    """
    return dataclasses.replace(config, **changes)
