"""Every code block of README.md runs as written.

```python blocks are executed, in order, in a namespace that holds small stand-ins for what the README
leaves to the reader (their network and data): ``README_STANDINS`` below names each one. ```bash
blocks are checked line by line: every ``lesioncount ...`` line parses with the real command-line
parser (subcommand and options exist), ``make X`` names a Makefile target, ``bash FILE`` and
``--config FILE`` name files of the repository, ``python -m M`` / ``torchrun -m M`` modules import.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import pathlib
import re
import shlex

import pytest
import torch

import lesioncount
from lesioncount.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```language block of README.md."""
    blocks = []
    for m in re.finditer(r"^```" + language + r"\n(.*?)^```", README, flags=re.S | re.M):
        blocks.append((README.count("\n", 0, m.start()) + 1, m.group(1)))
    return blocks


def _lesion_masks(batch: int, shape=(8, 16, 16)) -> torch.Tensor:
    """(B, 1, D, H, W) 0/1 float ground truth with 1, 2, ... separate cubic lesions per item."""
    masks = torch.zeros(batch, 1, *shape)
    for b in range(batch):
        for j in range(b + 1):
            masks[b, 0, 2:5, 2 + 5 * j:5 + 5 * j, 3:7] = 1.0
    return masks


def README_STANDINS() -> dict:
    """What the README's snippets take from the reader's own code, as small deterministic stand-ins."""
    torch.manual_seed(0)
    masks = _lesion_masks(2)
    model = torch.nn.Sequential(  # "your segmentation network": 1 input channel -> 1 lesion logit
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(), torch.nn.Conv3d(4, 1, 3, padding=1))
    images = masks + 0.3 * torch.randn_like(masks)  # "a training batch" whose lesions are bright
    # MONAI snippet: 3-class logits (background + 2 lesion classes) and label maps (B, 1, D, H, W)
    label = (masks * 1 + _lesion_masks(2).roll(6, dims=-1) * (masks == 0) * 2).long()
    logits = torch.randn(2, 3, 8, 16, 16, requires_grad=True)
    val_logits = torch.randn(2, 3, 8, 16, 16)
    return {"model": model, "images": images, "masks": masks, "label": label, "logits": logits,
            "val_logits": val_logits, "val_label": label.clone()}


PYTHON_BLOCKS = readme_blocks("python")


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 2


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"README.md:{n}" for n, _ in PYTHON_BLOCKS])
def test_python_block_runs(line, code):
    for module in re.findall(r"^\s*(?:from|import)\s+([A-Za-z_][\w]*)", code, flags=re.M):
        if module not in ("torch", "lesioncount") and importlib.util.find_spec(module) is None:
            pytest.skip(f"README.md:{line} needs {module}, which is not installed (an optional extra)")
    namespace = README_STANDINS()
    params_before = [p.detach().clone() for p in namespace["model"].parameters()]
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    loss = namespace.get("loss")
    if loss is not None:  # a training step: finite on the first batch, and the step changed the model
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0
        assert math.isfinite(float(loss.detach())), f"README.md:{line}: the loss of the first step is {float(loss.detach())}"
    if "optimizer" in namespace:
        params_after = list(namespace["model"].parameters())
        assert all(torch.isfinite(p).all() for p in params_after)
        assert any(not torch.equal(a, b) for a, b in zip(params_before, params_after)), "optimizer.step() changed nothing"


def test_first_snippet_is_a_full_training_step():
    """The opening snippet defines everything it uses except the reader's model and data."""
    _, code = PYTHON_BLOCKS[0]
    for name in ("optimizer.step()", "loss.backward()", "logits = model(images)", "true_counts ="):
        assert name in code


# ---------------------------------------------------------------------------------------------------
# bash blocks


def _commands(code: str) -> list[str]:
    """Logical lines (backslash continuations joined), comments and blank lines removed."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for raw in joined.splitlines():
        words = shlex.split(raw, comments=True)
        if words:
            out.append(words)
    return out


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.M))


BASH_LINES = [(n, words) for n, code in readme_blocks("bash") for words in _commands(code)]


@pytest.mark.parametrize("line,words", BASH_LINES, ids=[f"README.md:{n}:{' '.join(w)[:50]}" for n, w in BASH_LINES])
def test_bash_line_names_existing_commands(line, words):
    program = words[0]
    where = f"README.md block at line {line}: {' '.join(words)}"
    if program == "lesioncount":
        parser = build_parser()
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                args = parser.parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"{where}\ndoes not parse: {err.getvalue()}")
        assert callable(args.func)
        config = getattr(args, "config", None)
        if config:
            assert (ROOT / config).is_file(), f"{where}: no file {config}"
    elif program == "make":
        assert words[1] in _make_targets(), f"{where}: no Makefile target {words[1]}"
    elif program == "bash":
        assert (ROOT / words[1]).is_file(), f"{where}: no file {words[1]}"
    elif program in ("torchrun", "python") and "-m" in words:
        module = words[words.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        if "--config" in words:
            assert (ROOT / words[words.index("--config") + 1]).is_file()
    elif program == "python" and "-c" in words:
        compile(words[words.index("-c") + 1], where, "exec")
    elif program == "pip":
        assert words[1] in ("install", "uninstall"), where
    else:  # nnU-Net's own commands and shell built-ins: checked where they run (integration tests)
        assert program in ("export", "nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict"), (
            f"{where}: unknown command {program}; add a check here")


def test_bash_checks_catch_a_wrong_subcommand():
    """The parser check above rejects what is not a lesioncount command."""
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        build_parser().parse_args(["count-lesions", "-i", "x"])
    assert lesioncount.__name__ == "lesioncount"
