"""MONAI adapters: a count loss, a cumulative count metric and a post-processing dictionary transform.

Needs MONAI (``pip install monai``; the ``[monai]`` extra). They follow MONAI's conventions: channel-first ``(B, C, ...)``
network outputs, ``sigmoid=`` / ``softmax=`` / ``other_act=`` to turn them into probabilities,
``include_background``, ``reduction=``; metrics accumulate with ``metric(y_pred, y)`` and report
with ``aggregate()`` / ``reset()``; dictionary transforms take ``keys``.

The lesion map of an output is the union of the lesion channels: with ``softmax=True`` the summed
probability of the foreground classes (exactly, in log space: ``logsumexp(z[fg]) - logsumexp(z[bg])``
is its logit), with ``sigmoid=True`` one channel's logit, without activation the (summed)
probabilities of the selected channels. Which channels: every channel except channel 0 when
``include_background=False`` (the default here, unlike DiceLoss: background is never a lesion; a
single-channel output is always kept), or ``lesion_channels`` explicitly.

Targets are what MONAI pipelines already carry: a label map ``(B, 1, ...)`` of class indices, a
one-hot mask ``(B, C, ...)``, a binary mask for a one-channel output, or plain counts ``(B,)``. Masks
are counted with the same threshold / connectivity / min-size rule as the prediction, so the count
loss can be added to ``DiceCELoss`` on the very same ``(output, label)`` pair.

Example:
    >>> from monai.losses import DiceCELoss
    >>> from lesioncount.monai import LesionCountLoss
    >>> dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    >>> count = LesionCountLoss(softmax=True)                 # lesion = every non-background class
    >>> logits = torch.randn(2, 2, 16, 32, 32, requires_grad=True); label = torch.zeros(2, 1, 16, 32, 32)
    >>> loss = dice_ce(logits, label) + 0.01 * count(logits, label); loss.backward()
"""
from __future__ import annotations

from typing import Callable, Hashable, Mapping, Sequence

import torch

from .losses import _reduce, count_nll_terms
from ._adapters import (
    check_count_options,
    count_term,
    lesion_map,
    resolve_channels,
    resolve_connectivity,
    target_counts,
)
from ._extras import require
from .counting import count_distribution

require("monai", "the MONAI adapters (lesioncount.monai)")

from monai.config import KeysCollection  # noqa: E402
from monai.metrics import CumulativeIterationMetric  # noqa: E402
from monai.transforms import MapTransform, Transform  # noqa: E402
from monai.utils import LossReduction, convert_to_tensor  # noqa: E402
from torch.nn.modules.loss import _Loss  # noqa: E402

from . import metrics as _metrics  # noqa: E402

__all__ = ["CountDistribution", "CountDistributiond", "LesionCountLoss", "LesionCountMetric"]


class _LesionMapMixin:
    """Shared argument handling: activation flags, channel selection and the count rule."""

    def _init_lesion_map(self, include_background, sigmoid, softmax, other_act, lesion_channels, threshold,
                         connectivity, min_size, max_count, max_lesions):
        if sigmoid and softmax:
            raise ValueError("`sigmoid` and `softmax` are mutually exclusive; set at most one to True")
        if other_act is not None and not callable(other_act):
            raise TypeError(f"`other_act` must be None or a callable, got {type(other_act).__name__}")
        if other_act is not None and (sigmoid or softmax):
            raise ValueError("`other_act` is an alternative to `sigmoid`/`softmax`; set `sigmoid=False` and `softmax=False`")
        (self.threshold, self.connectivity, self.min_size, self.max_count,
         self.max_lesions) = check_count_options(threshold, connectivity, min_size, max_count, max_lesions)
        self.include_background = bool(include_background)
        self.sigmoid, self.softmax, self.other_act = bool(sigmoid), bool(softmax), other_act
        self.lesion_channels = lesion_channels
        if lesion_channels is not None:  # the form now; the range needs C and is checked per call
            if not _all_ints(lesion_channels) or (not isinstance(lesion_channels, int) and not list(lesion_channels)):
                raise ValueError(f"`lesion_channels` must be None, a channel index >= 0 or a non-empty sequence of "
                                 f"them, got {lesion_channels!r}")

    @property
    def _activation(self) -> str:
        return "softmax" if self.softmax else "sigmoid" if self.sigmoid else "none"

    def _lesion(self, input: torch.Tensor, name: str = "input"):
        """(x (B, *spatial), from_logits, channels, connectivity) of a channel-first output."""
        input = convert_to_tensor(input, track_meta=False)
        if not isinstance(input, torch.Tensor) or input.dim() not in (4, 5):
            raise ValueError(f"`{name}` must be channel-first (B, C, H, W) or (B, C, D, H, W), got "
                             f"{tuple(getattr(input, 'shape', ()))}")
        activation = self._activation
        if self.other_act is not None:
            input = self.other_act(input)
            activation = "none"
        channels = resolve_channels(input.shape[1], self.lesion_channels, self.include_background, activation)
        x, from_logits = lesion_map(input, channels, activation)
        return x, from_logits, channels, resolve_connectivity(self.connectivity, input.dim() - 2)

    def _counts(self, target, input_shape, channels, connectivity, name: str = "target") -> torch.Tensor:
        target = convert_to_tensor(target, track_meta=False)
        return target_counts(target, num_channels=input_shape[1], channels=channels, spatial_shape=input_shape[2:],
                             threshold=self.threshold, connectivity=connectivity, min_size=self.min_size, name=name)


def _all_ints(channels) -> bool:
    if isinstance(channels, int) and not isinstance(channels, bool):
        return True
    try:
        return all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels)
    except TypeError:
        return False


class LesionCountLoss(_LesionMapMixin, _Loss):
    """-log P(C = c): the count loss of Schroeter et al. (MIDL 2022), MONAI style.

    Args:
        include_background: keep channel 0 in the lesion map (default False; ignored for one channel).
        sigmoid: the output holds sigmoid logits (one lesion channel).
        softmax: the output holds softmax logits over classes (lesion = the union of the selected ones).
        other_act: a callable turning the output into probabilities (instead of sigmoid/softmax).
        lesion_channels: explicit lesion channel(s) (overrides ``include_background``).
        threshold: candidate threshold, a probability (paper: 0.1).
        connectivity: 6/18/26 (3D) or 4/8 (2D); None: 18 in 3D, 8 in 2D (paper: 18).
        min_size: ignore candidates (and true lesions) with fewer voxels.
        max_count: M, count bins 0..M-1 and "M or more" (paper: 4).
        max_lesions: static number of candidates (torch.compile); None: all.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (or ``monai.utils.LossReduction``).

    Infeasible items, whose true count has P(C = c) = 0 exactly (e.g. more true lesions than
    candidates: no candidate exists whose probability could be raised, the segmentation loss has to
    create it), follow the rule of :func:`lesioncount.count_nll_terms`, as in
    :class:`lesioncount.CountLoss`: ``"mean"`` (over the feasible items) and ``"sum"`` leave them
    out and they carry no gradient; ``"none"`` returns +inf there.

    Shapes: ``input`` (B, C, [D,] H, W); ``target`` (B,) counts, (B, 1, [D,] H, W) label map or binary
    mask, or (B, C, [D,] H, W) one-hot. Output: scalar, or (B,) with ``reduction="none"``.

    Example:
        >>> loss_fn = LesionCountLoss(sigmoid=True)
        >>> logits = torch.full((1, 1, 8, 16, 16), -6.0, requires_grad=True)
        >>> with torch.no_grad(): logits[0, 0, 4, 8, 8] = 3.0
        >>> loss_fn(logits, torch.tensor([1]))            # -log sigmoid(3)
        tensor(0.0486, grad_fn=<DivBackward0>)
    """

    def __init__(self, include_background: bool = False, sigmoid: bool = False, softmax: bool = False,
                 other_act: Callable | None = None, lesion_channels: int | Sequence[int] | None = None,
                 threshold: float = 0.1, connectivity: int | None = None, min_size: int = 0, max_count: int = 4,
                 max_lesions: int | None = None, reduction: LossReduction | str = LossReduction.MEAN):
        try:
            reduction = LossReduction(reduction).value
        except ValueError:
            raise ValueError(f"`reduction` must be one of {[r.value for r in LossReduction]}, got {reduction!r}") from None
        super().__init__(reduction=reduction)
        self._init_lesion_map(include_background, sigmoid, softmax, other_act, lesion_channels, threshold,
                              connectivity, min_size, max_count, max_lesions)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, from_logits, channels, connectivity = self._lesion(input)
        with torch.no_grad():
            counts = self._counts(target, input.shape, channels, connectivity)
        term = count_term(x, from_logits, counts, threshold=self.threshold, connectivity=connectivity,
                          min_size=self.min_size, max_count=self.max_count, max_lesions=self.max_lesions)
        if self.reduction == LossReduction.MEAN.value:
            return term.loss
        terms = count_nll_terms(term.result.log_pmf, counts)
        return _reduce(terms, self.reduction, True)


class LesionCountMetric(_LesionMapMixin, CumulativeIterationMetric):
    """Count metrics accumulated over iterations (and synchronised across DDP ranks by MONAI).

    Each call ``metric(y_pred, y)`` computes the count distribution of every item and buffers its
    pmf, true count, expected count and NLL; ``aggregate()`` returns the metrics of
    :func:`lesioncount.metrics.count_metrics` over all buffered items: ``"accuracy"``,
    ``"precision"``, ``"recall"``, ``"f1"`` (macro over the bins 0..M-1, M+), ``"ece"``, ``"mce"``,
    ``"count_mae"``, ``"nll"``.

    Args:
        metric_name: one name (``aggregate()`` returns a tensor) or a sequence (a list, in that order),
            like MONAI's ``ConfusionMatrixMetric``.
        n_bins: confidence bins of ECE/MCE.
        include_background, sigmoid, softmax, other_act, lesion_channels, threshold, connectivity,
            min_size, max_count, max_lesions: as in :class:`LesionCountLoss` (``y_pred`` usually holds
            probabilities after ``Activations``, so neither flag is set by default).

    Shapes: ``y_pred`` (B, C, [D,] H, W) or a list of (C, [D,] H, W); ``y`` as the loss's ``target``
    (or a list of per-item tensors). The call returns the (B, M+1) pmf of the batch.

    Example:
        >>> metric = LesionCountMetric(metric_name=["accuracy", "f1"])
        >>> probs = torch.zeros(2, 1, 8, 16, 16); probs[0, 0, 2, 2, 2] = 0.9
        >>> _ = metric(probs, torch.tensor([1, 0]))
        >>> metric.aggregate()
        [tensor(1., dtype=torch.float64), tensor(1., dtype=torch.float64)]
    """

    def __init__(self, metric_name: str | Sequence[str] = "accuracy", n_bins: int = 10,
                 include_background: bool = False, sigmoid: bool = False, softmax: bool = False,
                 other_act: Callable | None = None, lesion_channels: int | Sequence[int] | None = None,
                 threshold: float = 0.1, connectivity: int | None = None, min_size: int = 0, max_count: int = 4,
                 max_lesions: int | None = None):
        super().__init__()
        self._init_lesion_map(include_background, sigmoid, softmax, other_act, lesion_channels, threshold,
                              connectivity, min_size, max_count, max_lesions)
        self.metric_name = self._check_names(metric_name)
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"`n_bins` must be an int >= 1, got {n_bins!r}")
        self.n_bins = n_bins

    @staticmethod
    def _check_names(metric_name):
        names = (metric_name,) if isinstance(metric_name, str) else tuple(metric_name)
        bad = [n for n in names if n not in _metrics.COUNT_METRIC_NAMES]
        if not names or bad:
            raise ValueError(f"`metric_name` must be one of {_metrics.COUNT_METRIC_NAMES} (or a sequence of them), "
                             f"got {metric_name!r}")
        return metric_name if isinstance(metric_name, str) else list(names)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None):  # type: ignore[override]
        if y is None:
            raise ValueError("`y` (true counts or masks) is required")
        x, from_logits, channels, connectivity = self._lesion(y_pred, "y_pred")
        counts = self._counts(y, y_pred.shape, channels, connectivity, "y")
        with torch.no_grad():
            r = count_distribution(x, threshold=self.threshold, connectivity=connectivity, min_size=self.min_size,
                                   max_count=self.max_count, from_logits=from_logits, max_lesions=self.max_lesions)
        counts = counts.to(r.pmf.device)
        nll = count_nll_terms(r.log_pmf, counts).nll  # tail bin for counts >= M; +inf where infeasible
        f64 = torch.float64
        return [r.pmf.to(f64), counts.to(f64), r.expected_count.to(f64), nll.to(f64)]

    def __call__(self, y_pred, y=None, **kwargs):
        ret = super().__call__(y_pred, y, **kwargs)
        return ret[0] if isinstance(ret, (list, tuple)) else ret

    def aggregate(self, metric_name: str | Sequence[str] | None = None):  # type: ignore[override]
        """The count metrics of every item buffered since the last ``reset()``.

        Args:
            metric_name: overrides the constructor's ``metric_name`` for this call.

        Returns:
            a float64 scalar tensor (one name) or a list of them (a sequence of names).
        """
        names = self.metric_name if metric_name is None else self._check_names(metric_name)
        buffers = self.get_buffer()
        if not isinstance(buffers, list) or len(buffers) != 4 or buffers[0].numel() == 0:
            raise ValueError("LesionCountMetric.aggregate() needs at least one call with items first")
        pmf, target, expected, nll = buffers
        pmf = pmf.reshape(-1, self.max_count + 1)
        target = target.reshape(-1).round().to(torch.int64)
        # log_pmf only enters through the NLL at the target bin: rebuild a log-pmf that has it exactly
        log_pmf = pmf.clamp_min(0).log()
        log_pmf = log_pmf.scatter(1, target.clamp_max(self.max_count).view(-1, 1), -nll.reshape(-1, 1))
        m = _metrics.count_metrics(pmf, target, max_count=self.max_count, n_bins=self.n_bins,
                                   expected_count=expected.reshape(-1), log_pmf=log_pmf)
        if isinstance(names, str):
            return m[names]
        return [m[n] for n in names]


class CountDistribution(_LesionMapMixin, Transform):
    """Array transform: the count distribution of one channel-first item (C, [D,] H, W).

    Returns a dict of tensors: ``pmf`` (M+1,), ``log_pmf`` (M+1,), ``expected`` (), ``most_likely``
    () int64 (M stands for "M or more"), ``entropy`` (), ``lesion_probs`` (K,), ``argmax`` (K,) flat
    voxel indices, and ``labels`` (1, [D,] H, W) candidate labels when ``save_labels``.

    Args:
        save_labels: also return the candidate label map.
        include_background, sigmoid, softmax, other_act, lesion_channels, threshold, connectivity,
            min_size, max_count, max_lesions: as in :class:`LesionCountLoss`.

    Example:
        >>> probs = torch.zeros(2, 8, 16, 16); probs[1, 2, 2, 2] = 0.8          # background + lesion channel
        >>> CountDistribution()(probs)["pmf"]
        tensor([0.2000, 0.8000, 0.0000, 0.0000, 0.0000])
    """

    def __init__(self, save_labels: bool = False, include_background: bool = False, sigmoid: bool = False,
                 softmax: bool = False, other_act: Callable | None = None,
                 lesion_channels: int | Sequence[int] | None = None, threshold: float = 0.1,
                 connectivity: int | None = None, min_size: int = 0, max_count: int = 4,
                 max_lesions: int | None = None):
        self._init_lesion_map(include_background, sigmoid, softmax, other_act, lesion_channels, threshold,
                              connectivity, min_size, max_count, max_lesions)
        self.save_labels = bool(save_labels)

    def __call__(self, img) -> dict[str, torch.Tensor]:
        img = convert_to_tensor(img, track_meta=False)
        if not isinstance(img, torch.Tensor) or img.dim() not in (3, 4):
            raise ValueError(f"`img` must be one channel-first item (C, H, W) or (C, D, H, W), got "
                             f"{tuple(getattr(img, 'shape', ()))}")
        x, from_logits, _, connectivity = self._lesion(img.unsqueeze(0), "img")
        with torch.no_grad():
            r = count_distribution(x, threshold=self.threshold, connectivity=connectivity, min_size=self.min_size,
                                   max_count=self.max_count, from_logits=from_logits, max_lesions=self.max_lesions)
        out = {
            "pmf": r.pmf[0], "log_pmf": r.log_pmf[0], "expected": r.expected_count[0],
            "most_likely": r.most_likely_count[0], "entropy": r.entropy[0],
            "lesion_probs": r.lesion_probs[0], "argmax": r.argmax[0],
        }
        if self.save_labels:
            out["labels"] = r.labels[0].unsqueeze(0)
        return out


class CountDistributiond(MapTransform):
    """Dictionary transform: adds the count distribution of ``d[key]`` to the data dictionary.

    For every key, writes ``d[f"{key}{postfix}_pmf"]``, ``..._log_pmf``, ``..._expected``,
    ``..._most_likely``, ``..._entropy``, ``..._lesion_probs``, ``..._argmax`` (and ``..._labels``
    with ``save_labels``), see :class:`CountDistribution`. Use it in post-processing after
    ``decollate_batch`` (one channel-first item per dictionary), e.g. after ``Activationsd``.

    Args:
        keys: keys of the channel-first predictions.
        postfix: inserted between the key and the field name (default ``"_count"``).
        allow_missing_keys: don't raise when a key is missing.
        **kwargs: the arguments of :class:`CountDistribution`.

    Example:
        >>> post = CountDistributiond(keys="pred", softmax=True)
        >>> d = post({"pred": torch.randn(2, 8, 16, 16)})
        >>> d["pred_count_pmf"].shape
        torch.Size([5])
    """

    def __init__(self, keys: KeysCollection, postfix: str = "_count", allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        if not isinstance(postfix, str):
            raise TypeError(f"`postfix` must be a str, got {type(postfix).__name__}")
        self.postfix = postfix
        self.counter = CountDistribution(**kwargs)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            for field, value in self.counter(d[key]).items():
                d[f"{key}{self.postfix}_{field}"] = value
        return d
