"""Messages a newcomer meets (issue 17): install hints that work, value-range and shape errors that say what
the input looks like, and ``lesioncount --version``."""
from __future__ import annotations

import importlib

import pytest

from lesioncount import _extras
from lesioncount._extras import MissingExtraError, install_hint, require


def _hide(monkeypatch, top: str):
    real = importlib.import_module

    def fake_import(name, *a, **k):
        if name.split(".")[0] == top:
            raise ImportError(f"No module named {top!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(_extras.importlib, "import_module", fake_import)


def test_missing_extra_hint_is_installable_without_pypi(monkeypatch):
    """lesioncount is not on PyPI: the hint names the extra's packages and the source-tree install."""
    _hide(monkeypatch, "nibabel")
    with pytest.raises(MissingExtraError) as info:
        require("nibabel", "reading NIfTI files")
    msg = str(info.value)
    assert "pip install 'lesioncount[" not in msg
    assert "pip install nibabel scipy tqdm isal" in msg
    assert "pip install --no-build-isolation '.[io]'" in msg and "source folder" in msg


def test_install_hint_quotes_version_specifiers():
    assert install_hint("nnunet").startswith("pip install 'nnunetv2>=2.8' nibabel")
    assert install_hint("plot").startswith("pip install matplotlib (the lesioncount[plot] extra;")


def test_gzip_backend_hint(monkeypatch):
    from lesioncount import _gunzip

    def missing(name):
        raise ImportError(name)

    monkeypatch.setattr(_gunzip, "_import_backend", missing)
    with pytest.raises(MissingExtraError) as info:
        _gunzip.set_gzip_backend("isal")
    assert "pip install isal" in str(info.value) and "pip install 'lesioncount[" not in str(info.value)
