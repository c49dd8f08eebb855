"""Every ``>>>`` example in the package's docstrings runs and prints what it shows.

Module examples run in their module's namespace (as ``pytest --doctest-modules`` runs them). The
examples of the top-level API (``lesioncount.__all__``, the functions users copy first) must also be
self-contained: they run with no names given, so a missing import fails as it would for a user.
Examples marked ``# doctest: +SKIP`` (they train, read files or need a GPU) are not run.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lesioncount

# every Python module (not the compiled _C* libraries; __main__ would run the CLI on import)
MODULES = sorted(m.name for m in pkgutil.walk_packages(lesioncount.__path__, prefix="lesioncount.")
                 if not m.name.split(".")[-1].startswith("_C") and not m.name.endswith("__main__"))


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run_as_written(name, tmp_path, monkeypatch):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:  # an optional extra (nnU-Net, MONAI, nilearn) that is not installed
        if exc.name and exc.name.split(".")[0] in {"nnunetv2", "monai", "nilearn", "batchgenerators"}:
            pytest.skip(f"{name} needs the optional {exc.name}")
        raise
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):  # globals: a copy of the module's
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed (output above)"


SKIPPED_ONLY: set[str] = set()  # public objects whose every example is +SKIP (none today)
PUBLIC = sorted(n for n in lesioncount.__all__ if getattr(getattr(lesioncount, n), "__doc__", None)
                and ">>>" in getattr(lesioncount, n).__doc__)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", PUBLIC)
def test_public_api_examples_are_self_contained(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    finder = doctest.DocTestFinder(exclude_empty=True, recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(getattr(lesioncount, name), f"lesioncount.{name}", globs={}):
        runner.run(test)  # no names given: an example that uses a name it did not import fails
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 or name in SKIPPED_ONLY, f"lesioncount.{name}: no example ran"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of lesioncount.{name} failed"
