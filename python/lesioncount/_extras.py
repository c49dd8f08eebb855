"""Optional dependencies: import them lazily and name the pip extra that provides them when missing."""
from __future__ import annotations

import importlib
from types import ModuleType

# module name -> (pip extra, distribution name)
_EXTRA_FOR_MODULE = {
    "nibabel": ("io", "nibabel"),
    "matplotlib": ("plot", "matplotlib"),
    "matplotlib.pyplot": ("plot", "matplotlib"),
    "torchmetrics": ("eval", "torchmetrics"),
    "yaml": ("train", "pyyaml"),
    "tqdm": ("io", "tqdm"),
    "torch.utils.tensorboard": ("train", "tensorboard"),
    "nilearn": ("anatomy", "nilearn"),
    "nnunetv2": ("nnunet", "nnunetv2"),
    "monai": ("monai", "monai"),
}


class MissingExtraError(ImportError):
    """Raised when an optional dependency is missing; the message names the extra to install."""


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install 'lesioncount[extra]'``.

    Example:
        >>> nib = require("nibabel", "reading NIfTI files")   # doctest: +SKIP
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra, dist = _EXTRA_FOR_MODULE.get(module, (None, module.split(".")[0]))
        what = f" for {purpose}" if purpose else ""
        hint = f"pip install 'lesioncount[{extra}]'" if extra else f"pip install {dist}"
        raise MissingExtraError(f"{dist} is needed{what} but is not installed: {hint}") from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (no error raised)."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
