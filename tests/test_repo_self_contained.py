"""Nothing in the repository points at files outside it (README, CMakeLists.txt, docs, comments, tests)."""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# documents that lived beside the repository once; ../ paths reaching out of it
OUTSIDE = re.compile(r"(?<![\w-])(\.\./)*shared/|\bDESIGN\.md\b|\bBUILD\.md\b|(?<![\w.])\.\./\.\./|`\.\./")
TEXT_SUFFIXES = {".md", ".txt", ".py", ".cpp", ".h", ".cu", ".cmake", ".toml", ".yaml", ".yml", ".sh", ".cfg", ""}


@pytest.mark.skipif(shutil.which("git") is None, reason="git lists the repository's files")
def test_no_reference_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    hits = []
    for name in files:
        path = ROOT / name
        if path.name == pathlib.Path(__file__).name or path.suffix not in TEXT_SUFFIXES or not path.is_file():
            continue
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{name}:{lineno}: {line.strip()}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_cmake_build_facts_are_documented_in_the_repository():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    doc = ROOT / "docs" / "BUILDING.md"
    assert "docs/BUILDING.md" in cmake and doc.is_file()
    text = doc.read_text()
    for fact in ("find_package(Torch)", "--no-build-isolation", "C++20", "C++17", "LESIONCOUNT_CUDA",
                 "CMAKE_CUDA_ARCHITECTURES", "_GLIBCXX_USE_CXX11_ABI"):
        assert fact in text, fact
