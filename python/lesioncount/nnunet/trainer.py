"""``nnUNetTrainerCount``: nnU-Net v2's trainer plus the count term of Schroeter et al. (MIDL 2022).

What changes against ``nnUNetTrainer`` (everything else, including deep supervision, data
augmentation, the schedule of the learning rate, checkpoints, DDP and the final validation, is
nnU-Net's own code):

- loss = nnU-Net's loss (Dice + CE, deep-supervised) + ``w(epoch) * count term``. The count term is
  computed on the **full-resolution output only** (``output[0]`` under deep supervision), on the
  lesion logit of each voxel (softmax: ``logsumexp(z[lesion]) - logsumexp(z[other])``, exact; region
  training: the region's sigmoid logit), against the number of lesions in the patch's ground truth,
  counted with the same threshold / connectivity / min-size rule. ``w(epoch) = w1 * exp(w2 *
  (epoch - pretrain_epochs))`` from ``pretrain_epochs`` on (0 before), capped at ``max_weight``.
  Before ``pretrain_epochs`` the term is still computed (without gradient) so it can be logged.
- logged per epoch with ``self.logger.log`` next to nnU-Net's pseudo-Dice (and printed to the
  training log): ``count_weight``, ``train_count_loss``, ``val_count_loss``, ``val_count_accuracy``,
  ``val_count_f1``, ``val_count_mae``, ``val_count_ece``, ``val_count_infeasible``. Like the
  pseudo-Dice they are measured on nnU-Net's validation *patches*; case-level counts come from
  ``nnUNetv2_predict --save_probabilities`` + ``lesioncount evaluate``.

Options: class attributes (subclass to make a trainer variant, nnU-Net's convention), overridable
with environment variables (which ``lesioncount nnunet-train`` sets from its ``--count-*`` flags,
and which reach DDP workers too), see :data:`COUNT_OPTIONS`.

Example:
    >>> # with nnUNet_preprocessed / nnUNet_results set and a planned, preprocessed dataset
    >>> from lesioncount.nnunet import nnUNetTrainerCount                       # doctest: +SKIP
    >>> trainer = nnUNetTrainerCount(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))  # doctest: +SKIP
    >>> trainer.run_training()                                                   # doctest: +SKIP
"""
from __future__ import annotations

import math
import os
from typing import List

import numpy as np
import torch

from .._extras import require

require("nnunetv2", "the nnU-Net trainer (lesioncount.nnunet)")

import torch.distributed as dist  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.collate_outputs import collate_outputs  # noqa: E402

from .. import metrics as _metrics  # noqa: E402
from .._adapters import (  # noqa: E402
    check_count_options,
    count_term,
    lesion_map,
    resolve_connectivity,
    target_counts,
)
from ..losses import count_nll, count_nll_terms, count_weight_schedule  # noqa: E402
from .options import COUNT_LOG_KEYS, COUNT_OPTIONS, CountOptionError, parse_option  # noqa: E402

__all__ = ["COUNT_LOG_KEYS", "COUNT_OPTIONS", "nnUNetTrainerCount"]


class _CountAugmentedLoss(torch.nn.Module):
    """nnU-Net's loss plus ``trainer.count_weight *`` the count term of the full-resolution output."""

    def __init__(self, base: torch.nn.Module, trainer: "nnUNetTrainerCount"):
        super().__init__()
        self.base = base
        self._trainer = [trainer]  # a list: not a registered submodule, no reference cycle in state_dict

    def forward(self, output, target):
        loss = self.base(output, target)
        trainer = self._trainer[0]
        full_output = output[0] if isinstance(output, (list, tuple)) else output
        full_target = target[0] if isinstance(target, (list, tuple)) else target
        weight = trainer.count_weight
        if weight > 0 and torch.is_grad_enabled():
            term = trainer.compute_count_term(full_output, full_target)
            loss = loss + weight * term.loss.to(loss.dtype)
        else:
            with torch.no_grad():
                term = trainer.compute_count_term(full_output, full_target)
            if weight > 0:
                loss = loss + weight * term.loss.to(loss.dtype)
        trainer._last_count_term = term
        return loss


class nnUNetTrainerCount(nnUNetTrainer):
    """nnU-Net v2 trainer with the count term of Schroeter et al. added to nnU-Net's loss.

    Constructed exactly like ``nnUNetTrainer`` (nnU-Net's ``run_training`` / ``nnUNetv2_train -tr
    nnUNetTrainerCount`` do it). The count options are the ``count_*`` class attributes below,
    overridden by the environment variables of :data:`COUNT_OPTIONS`; they are validated when the
    trainer is created (errors name the attribute and its variable).

    Shapes inside a step: network output (B, C, [D,] H, W) per deep-supervision level; the count term
    uses level 0 and the level-0 target (B, 1, [D,] H, W) label map (region training: (B, R, ...)).

    Example:
        >>> class nnUNetTrainerCount_w01(nnUNetTrainerCount):   # a variant, nnU-Net style   # doctest: +SKIP
        ...     count_w1 = 0.01
        ...     count_pretrain_epochs = 50
    """

    count_w1: float = 1e-3
    count_w2: float = 0.06
    count_pretrain_epochs: int = 20
    count_max_weight: float | None = 1.0
    count_threshold: float = 0.1
    count_connectivity: int | None = None
    count_min_size: int = 0
    count_max_count: int = 4
    count_max_lesions: int | None = None
    count_labels: tuple | None = None
    count_num_epochs: int | None = None
    count_num_iterations_per_epoch: int | None = None
    count_num_val_iterations_per_epoch: int | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._read_count_options()
        if self.count_num_epochs is not None:
            self.num_epochs = self.count_num_epochs
        if self.count_num_iterations_per_epoch is not None:
            self.num_iterations_per_epoch = self.count_num_iterations_per_epoch
        if self.count_num_val_iterations_per_epoch is not None:
            self.num_val_iterations_per_epoch = self.count_num_val_iterations_per_epoch
        self._count_channels, self._count_activation, self._count_label_values = self._resolve_count_channels()
        self.count_weight = 0.0
        self._last_count_term = None
        local = getattr(self.logger, "local_logger", self.logger)  # nnU-Net >= 2.6: MetaLogger wraps LocalLogger
        for key in COUNT_LOG_KEYS:
            local.my_fantastic_logging.setdefault(key, [])
        if hasattr(self.logger, "update_config"):
            self.logger.update_config({"lesioncount": self.count_settings()})

    # ------------------------------------------------------------------------------ options
    def _read_count_options(self) -> None:
        for attr, (env, _parse, _help) in COUNT_OPTIONS.items():
            text = os.environ.get(env)
            if text is not None:
                setattr(self, attr, parse_option(attr, text))
        for attr in ("count_w1", "count_w2"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise CountOptionError(f"`{attr}` ({COUNT_OPTIONS[attr][0]}) must be a finite number, got {value!r}")
        if self.count_w1 < 0:
            raise CountOptionError(f"`count_w1` ({COUNT_OPTIONS['count_w1'][0]}) must be >= 0, got {self.count_w1}")
        for attr in ("count_pretrain_epochs", "count_min_size"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CountOptionError(f"`{attr}` ({COUNT_OPTIONS[attr][0]}) must be an int >= 0, got {value!r}")
        for attr in ("count_num_epochs", "count_num_iterations_per_epoch", "count_num_val_iterations_per_epoch"):
            value = getattr(self, attr)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CountOptionError(f"`{attr}` ({COUNT_OPTIONS[attr][0]}) must be None or an int >= 1, got {value!r}")
        m = self.count_max_weight
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m >= 0):
            raise CountOptionError(f"`count_max_weight` ({COUNT_OPTIONS['count_max_weight'][0]}) must be None or >= 0, got {m!r}")
        try:
            check_count_options(self.count_threshold, self.count_connectivity, self.count_min_size,
                                self.count_max_count, self.count_max_lesions)
        except (TypeError, ValueError) as exc:
            raise CountOptionError(f"nnUNetTrainerCount option: {exc} (attributes count_threshold, count_connectivity, "
                             f"count_max_count, count_max_lesions; variables LESIONCOUNT_NNUNET_*)") from None

    def _resolve_count_channels(self):
        """(output channels of the lesion map, activation, label values counted in the target)."""
        lm = self.label_manager
        env = COUNT_OPTIONS["count_labels"][0]
        wanted = self.count_labels
        if isinstance(wanted, (str, int)):
            wanted = (wanted,)
        if lm.has_regions:
            regions = list(lm.foreground_regions)
            if wanted is None:
                if len(regions) != 1:
                    raise CountOptionError(f"region training with {len(regions)} regions: choose the lesion region "
                                     f"index with `count_labels` ({env}), e.g. {env}=0")
                return (0,), "sigmoid", None
            if len(wanted) != 1:
                raise CountOptionError(f"`count_labels` ({env}) must name one region index in region training, got {wanted!r}")
            try:
                index = int(wanted[0])
            except (TypeError, ValueError):
                raise CountOptionError(f"`count_labels` ({env}) must be a region index in region training, got {wanted!r}") from None
            if not 0 <= index < len(regions):
                raise CountOptionError(f"`count_labels` ({env}) region index must be in [0, {len(regions)}), got {index}")
            return (index,), "sigmoid", None
        names = {str(k): int(v) for k, v in self.dataset_json["labels"].items() if not isinstance(v, (list, tuple))}
        foreground = [int(v) for v in lm.foreground_labels]
        if wanted is None:
            values = tuple(foreground)
        else:
            values = []
            for w in wanted:
                if isinstance(w, str) and w in names:
                    values.append(names[w])
                    continue
                try:
                    values.append(int(w))
                except (TypeError, ValueError):
                    raise CountOptionError(f"`count_labels` ({env}): {w!r} is neither a label name of dataset.json "
                                     f"({sorted(names)}) nor a label value") from None
            values = tuple(sorted(set(values)))
            bad = [v for v in values if v not in foreground]
            if bad:
                raise CountOptionError(f"`count_labels` ({env}): {bad} are not foreground labels of this dataset "
                                 f"(foreground labels: {foreground})")
        if not values:
            raise CountOptionError(f"`count_labels` ({env}): no foreground label to count")
        # nnU-Net requires consecutive labels 0..N-1 and maps label value v to output channel v
        return tuple(values), "softmax", tuple(values)

    def count_settings(self) -> dict:
        """The count options in effect (also printed to the training log and logged as config)."""
        return {attr: getattr(self, attr) for attr in COUNT_OPTIONS} | {
            "lesion_channels": list(self._count_channels), "activation": self._count_activation}

    def count_weight_at(self, epoch: int) -> float:
        """``w1 * exp(w2 * (epoch - pretrain_epochs))`` from ``pretrain_epochs`` on, capped; 0 before.

        Example:
            >>> trainer.count_weight_at(trainer.count_pretrain_epochs)   # doctest: +SKIP
            0.001
        """
        return count_weight_schedule(epoch, self.count_w1, self.count_w2, self.count_pretrain_epochs,
                                     self.count_max_weight)

    # --------------------------------------------------------------------------- count term
    def compute_count_term(self, output: torch.Tensor, target: torch.Tensor):
        """The count term of one full-resolution output against its target.

        Args:
            output: (B, C, [D,] H, W) network logits (level 0 of deep supervision).
            target: (B, 1, [D,] H, W) label map (region training: (B, R[+1], ...) region masks, the
                last channel being the ignore mask when the dataset has an ignore label).

        Returns:
            :class:`lesioncount._adapters.CountTerm` (``loss`` differentiable, ``nll`` (B,), ``counts``
            (B,), ``result``).
        """
        spatial = tuple(output.shape[2:])
        connectivity = resolve_connectivity(self.count_connectivity, len(spatial))
        lm = self.label_manager
        mask = None
        if lm.has_regions:
            if lm.has_ignore_label:
                mask = ~(target[:, -1] > 0.5)
                target = target[:, :-1]
            num_channels = target.shape[1]
        else:
            num_channels = output.shape[1]
            if lm.has_ignore_label:
                mask = target[:, 0] != lm.ignore_label
        x, from_logits = lesion_map(output, self._count_channels, self._count_activation)
        with torch.no_grad():
            counts = target_counts(target, num_channels=num_channels, channels=self._count_channels,
                                   spatial_shape=spatial, threshold=self.count_threshold, connectivity=connectivity,
                                   min_size=self.count_min_size, mask=mask)
        return count_term(x, from_logits, counts, threshold=self.count_threshold, connectivity=connectivity,
                          min_size=self.count_min_size, max_count=self.count_max_count,
                          max_lesions=self.count_max_lesions, mask=mask)

    def _build_loss(self):
        return _CountAugmentedLoss(super()._build_loss(), self)

    # ------------------------------------------------------------------------------ training
    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"lesioncount count term: {self.count_settings()}")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.count_weight = self.count_weight_at(self.current_epoch)
        self.logger.log("count_weight", self.count_weight, self.current_epoch)

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        term = self._last_count_term
        out["count_loss"] = np.float64(float(term.loss.detach()))
        return out

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        values = np.asarray(collate_outputs(train_outputs)["count_loss"], dtype=np.float64).reshape(-1)
        if self.is_ddp:
            gathered = [None for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, values)
            values = np.concatenate(gathered)
        self.logger.log("train_count_loss", float(values.mean()), self.current_epoch)

    def validation_step(self, batch: dict) -> dict:
        out = super().validation_step(batch)
        term = self._last_count_term
        r = term.result
        out["count_pmf"] = r.pmf.detach().double().cpu().numpy()
        out["count_log_pmf"] = r.log_pmf.detach().double().cpu().numpy()
        out["count_expected"] = r.expected_count.detach().double().cpu().numpy()
        out["count_target"] = term.counts.detach().cpu().numpy()
        return out

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        M = self.count_max_count
        parts = {k: np.concatenate([o[k].reshape(-1) for o in val_outputs])
                 for k in ("count_pmf", "count_log_pmf", "count_expected", "count_target")}
        if self.is_ddp:
            gathered = [None for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, parts)
            parts = {k: np.concatenate([g[k] for g in gathered]) for k in parts}
        pmf = torch.from_numpy(parts["count_pmf"].reshape(-1, M + 1))
        log_pmf = torch.from_numpy(parts["count_log_pmf"].reshape(-1, M + 1))
        target = torch.from_numpy(parts["count_target"].astype(np.int64))
        expected = torch.from_numpy(parts["count_expected"])
        m = _metrics.count_metrics(pmf, target, max_count=M, expected_count=expected, log_pmf=log_pmf)
        terms = count_nll_terms(log_pmf, target)
        epoch = self.current_epoch
        self.logger.log("val_count_loss", float(count_nll(log_pmf, target)), epoch)  # mean over feasible items
        self.logger.log("val_count_accuracy", float(m["accuracy"]), epoch)
        self.logger.log("val_count_f1", float(m["f1"]), epoch)
        self.logger.log("val_count_mae", float(m["count_mae"]), epoch)
        self.logger.log("val_count_ece", float(m["ece"]), epoch)
        self.logger.log("val_count_infeasible", float(terms.infeasible.double().mean()), epoch)

    def on_epoch_end(self):
        get = self.logger.get_value
        self.print_to_log_file(
            f"count term: weight {get('count_weight', step=-1):.4g}, train {get('train_count_loss', step=-1):.4f}, "
            f"val {get('val_count_loss', step=-1):.4f}; val count accuracy {get('val_count_accuracy', step=-1):.4f}, "
            f"F1 {get('val_count_f1', step=-1):.4f}, MAE {get('val_count_mae', step=-1):.4f}, "
            f"ECE {get('val_count_ece', step=-1):.4f}, infeasible {get('val_count_infeasible', step=-1):.3f}")
        super().on_epoch_end()
