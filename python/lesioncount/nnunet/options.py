"""Options of ``nnUNetTrainerCount`` and the environment variables that override them.

Kept apart from :mod:`lesioncount.nnunet.trainer` so that the ``lesioncount`` CLI can list them
without importing nnU-Net.
"""
from __future__ import annotations

from .._validation import DEFAULT_CONNECTIVITY, connectivity_text

__all__ = ["COUNT_LOG_KEYS", "COUNT_OPTIONS", "CountOptionError", "parse_option"]


class CountOptionError(ValueError):
    """A count option of the nnU-Net trainer is invalid; the message names the option and its variable."""


def _parse_optional_float(text: str):
    return None if text.strip().lower() in ("", "none") else float(text)


def _parse_optional_int(text: str):
    return None if text.strip().lower() in ("", "none") else int(text)


def _parse_labels(text: str):
    text = text.strip()
    if text.lower() in ("", "none"):
        return None
    return tuple(t.strip() for t in text.split(",") if t.strip())


#: attribute -> (environment variable, parser, help). Values of the environment variables override
#: the class attributes when the trainer is created.
COUNT_OPTIONS = {
    "count_w1": ("LESIONCOUNT_NNUNET_W1", float, "w1 of the weight w1*exp(w2*(epoch - pretrain_epochs)) (default 1e-3)"),
    "count_w2": ("LESIONCOUNT_NNUNET_W2", float, "w2, growth per epoch (default 0.06)"),
    "count_pretrain_epochs": ("LESIONCOUNT_NNUNET_PRETRAIN_EPOCHS", int,
                              "epochs of nnU-Net's loss alone before the count term starts (default 20)"),
    "count_max_weight": ("LESIONCOUNT_NNUNET_MAX_WEIGHT", _parse_optional_float,
                         "cap of the weight; 'none' = uncapped (default 1.0)"),
    "count_threshold": ("LESIONCOUNT_NNUNET_THRESHOLD", float, "candidate threshold, a probability (default 0.1)"),
    "count_connectivity": ("LESIONCOUNT_NNUNET_CONNECTIVITY", _parse_optional_int,
                           f"{connectivity_text()}; 'none' = {DEFAULT_CONNECTIVITY[3]} in 3D, "
                           f"{DEFAULT_CONNECTIVITY[2]} in 2D (default)"),
    "count_min_size": ("LESIONCOUNT_NNUNET_MIN_SIZE", int, "ignore components with fewer voxels (default 0)"),
    "count_max_count": ("LESIONCOUNT_NNUNET_MAX_COUNT", int, "M: count bins 0..M-1 and 'M or more' (default 4)"),
    "count_max_lesions": ("LESIONCOUNT_NNUNET_MAX_LESIONS", _parse_optional_int,
                          "static number of candidates per patch (torch.compile); 'none' = all (default)"),
    "count_labels": ("LESIONCOUNT_NNUNET_LABELS", _parse_labels,
                     "comma-separated lesion label names or values (softmax training; default: every "
                     "foreground label) or the region index (region training; default: the only region)"),
    "count_num_epochs": ("LESIONCOUNT_NNUNET_NUM_EPOCHS", _parse_optional_int,
                         "override nnU-Net's num_epochs (default: nnU-Net's 1000)"),
    "count_num_iterations_per_epoch": ("LESIONCOUNT_NNUNET_ITERATIONS_PER_EPOCH", _parse_optional_int,
                                       "override nnU-Net's num_iterations_per_epoch (250)"),
    "count_num_val_iterations_per_epoch": ("LESIONCOUNT_NNUNET_VAL_ITERATIONS_PER_EPOCH", _parse_optional_int,
                                           "override nnU-Net's num_val_iterations_per_epoch (50)"),
}

#: Keys this trainer logs once per epoch with ``self.logger.log``.
COUNT_LOG_KEYS = ("count_weight", "train_count_loss", "val_count_loss", "val_count_accuracy", "val_count_f1",
                  "val_count_mae", "val_count_ece", "val_count_infeasible")


def parse_option(attr: str, text: str):
    """Parse the text value of option ``attr`` (as an environment variable would hold it).

    Raises :class:`CountOptionError` naming the variable and what it expects.

    Example:
        >>> parse_option("count_max_weight", "none") is None, parse_option("count_w1", "0.01")
        (True, 0.01)
    """
    env, parse, help_ = COUNT_OPTIONS[attr]
    try:
        return parse(text)
    except ValueError:
        raise CountOptionError(f"{env}={text!r} (trainer option `{attr}`): {help_}") from None
