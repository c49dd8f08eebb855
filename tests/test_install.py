"""The README's Install block, run verbatim in a brand-new virtual environment (no system site-packages).

Marked ``install`` (part of ``make test``; ``-m 'not install'`` skips it): it installs torch from the
local wheel or the index (~45 s on 2 cores) and compiles the library (~1-2 min), in a copy of the
source tree so that the repository's own build folders are never touched.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _install_subsection(readme: str, title: str) -> str:
    section = re.search(r"^## Install\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert section, "README.md has no '## Install' section"
    sub = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^### |\Z)", section.group(1), flags=re.S | re.M)
    assert sub, f"the README's Install section has no '### {title}' subsection"
    return sub.group(1)


def _first_bash_block(text: str, where: str) -> str:
    block = re.search(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    assert block, f"{where} has no ```bash block"
    return block.group(1)


def readme_install_block(readme: str) -> str:
    """The ```bash block of the README's ``## Install`` / ``### From source`` subsection, as written."""
    return _first_bash_block(_install_subsection(readme, "From source"), "Install / From source")


def readme_wheel_block(readme: str) -> str:
    """The ```bash block of the README's wheel route (the first subsection of ``## Install``)."""
    return _first_bash_block(_install_subsection(readme, "The wheel: build once, install anywhere"),
                             "Install / The wheel")


def test_readme_leads_with_the_wheel_that_make_wheel_builds():
    """The wheel route comes first and names the file `make wheel` writes (version from pyproject.toml)."""
    import tomllib

    readme = (ROOT / "README.md").read_text()
    install = re.search(r"^## Install\n(.*?)(?=^## )", readme, flags=re.S | re.M).group(1)
    assert install.index("### The wheel") < install.index("### From source")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    wheel = f"dist/lesioncount-{version}-py3-none-linux_x86_64.whl"
    commands = [line.split("#")[0].strip() for line in readme_wheel_block(readme).splitlines()]
    assert commands[0] == "make wheel", commands
    assert f"pip install {wheel}" in commands, (wheel, commands)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^wheel:", makefile, flags=re.M) and re.search(r"^wheel-test:", makefile, flags=re.M)


def test_readme_install_block_names_the_build_requirements():
    block = readme_install_block((ROOT / "README.md").read_text())
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    # without build isolation pip installs nothing for the build: the backend must be installed first
    first_build = next(i for i, c in enumerate(commands) if "--no-build-isolation" in c)
    before = " ".join(commands[:first_build])
    for requirement in ("torch", "scikit-build-core", "ninja"):
        assert requirement in before, f"{requirement} is not installed before the build: {commands}"


def _source_copy(dest: pathlib.Path) -> pathlib.Path:
    """Tracked and untracked (not ignored) files of the working tree: what a fresh clone plus local edits holds."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.install
@pytest.mark.skipif(shutil.which("git") is None, reason="git is needed to list the source files")
def test_readme_install_block_verbatim_in_a_fresh_venv(tmp_path):
    block = readme_install_block((ROOT / "README.md").read_text())
    src = _source_copy(tmp_path / "lesioncount")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # really fresh: no --system-site-packages
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LESIONCOUNT_", "PYTHON", "VIRTUAL_ENV", "CONDA", "CMAKE_"))}
    own_bin = str(pathlib.Path(sys.executable).parent)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != own_bin]
    env.update(PATH=os.pathsep.join([str(venv / "bin")] + path), VIRTUAL_ENV=str(venv))
    t0 = time.perf_counter()
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=src, env=env, capture_output=True,
                         text=True, timeout=1200)
    elapsed = time.perf_counter() - t0
    assert run.returncode == 0, f"README Install block failed after {elapsed:.0f} s:\n{block}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    check = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import lesioncount, pathlib; print(lesioncount.has_ops()); print(pathlib.Path(lesioncount.__file__).parent)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    has_ops, location = check.stdout.split()
    assert has_ops == "True", check.stdout + check.stderr
    assert pathlib.Path(location).is_relative_to(venv), f"imported from {location}, not the fresh venv"
    print(f"README Install block in a fresh venv: {elapsed:.0f} s")
