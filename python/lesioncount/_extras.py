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


def extra_requirements(extra: str) -> list[str]:
    """The requirements of one optional extra of lesioncount, from the installed package's metadata.

    Example:
        >>> extra_requirements("plot")   # doctest: +SKIP
        ['matplotlib']
    """
    import importlib.metadata
    import re

    try:
        requires = importlib.metadata.requires("lesioncount") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    out = []
    for req in requires:
        spec, _, marker = req.partition(";")
        if re.search(r"""extra\s*==\s*["']""" + re.escape(extra) + r"""["']""", marker):
            out.append(spec.strip().replace(" ", ""))
    return out


def install_hint(extra: str) -> str:
    """How to install an optional extra. lesioncount is not on PyPI, so ``pip install 'lesioncount[x]'``
    would fail: the hint names the extra's packages, and the extra from a source checkout.

    Example:
        >>> install_hint("io")   # doctest: +SKIP
        "pip install nibabel scipy tqdm isal (the lesioncount[io] extra; from the lesioncount source folder: pip install --no-build-isolation '.[io]')"
    """
    import shlex

    source = f"from the lesioncount source folder: pip install --no-build-isolation '.[{extra}]'"
    packages = extra_requirements(extra)
    if not packages:
        return f"the lesioncount[{extra}] extra, {source}"
    return f"pip install {' '.join(shlex.quote(p) for p in packages)} (the lesioncount[{extra}] extra; {source})"


class MissingExtraError(ImportError):
    """Raised when an optional dependency is missing; the message names the extra to install."""


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming what to install (:func:`install_hint`).

    Example:
        >>> nib = require("nibabel", "reading NIfTI files")   # doctest: +SKIP
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra, dist = _EXTRA_FOR_MODULE.get(module, (None, module.split(".")[0]))
        what = f" for {purpose}" if purpose else ""
        hint = install_hint(extra) if extra else f"pip install {dist}"
        raise MissingExtraError(f"{dist} is needed{what} but is not installed: {hint}") from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (no error raised)."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
