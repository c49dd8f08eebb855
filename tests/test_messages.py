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


# ---------------------------------------------------------------------------------------------------
# values that are not probabilities, volumes without their batch dimension


def test_integer_map_is_called_a_label_or_uint8_image_not_logits():
    import torch

    from lesioncount._validation import check_values

    x = torch.zeros(1, 4, 8, 8)
    x[0, 1, 2:4, 2:4] = 255.0
    with pytest.raises(ValueError) as info:
        check_values(x, probabilities=True)
    msg = str(info.value)
    assert "[0, 255]" in msg and "label map or an integer (e.g. uint8 0..255) image" in msg
    assert "divide by 255" in msg and "only for raw network logits" in msg
    x[0, 1, 2, 2] = 2.5  # not whole numbers: logits are possible, the old advice stays
    with pytest.raises(ValueError, match="pass from_logits=True if these are logits"):
        check_values(x, probabilities=True)


def test_count_cli_on_a_uint8_map_says_rescale(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    import numpy as np

    from lesioncount.cli import main

    data = np.zeros((12, 12, 8), dtype=np.uint8)
    data[3:6, 3:6, 2:4] = 255
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "in" / "seg.nii.gz"))
    assert main(["count", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--workers", "1"]) == 1
    err = (tmp_path / "out" / "errors.csv").read_text()
    assert "label map or an integer (e.g. uint8 0..255) image" in err and "--from-logits" in err


@pytest.mark.parametrize("fn", ["count_distribution", "cc_count", "label"])
def test_volume_without_batch_dimension_says_add_it(fn):
    import torch

    import lesioncount

    volume = torch.rand(8, 16, 16) * 0.2  # (D, H, W): one volume, no batch dimension
    call = {"count_distribution": lambda: lesioncount.count_distribution(volume),
            "cc_count": lambda: lesioncount.cc_count(volume),
            "label": lambda: lesioncount.label(volume, 0.1, 18)}[fn]
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    assert "single 3-D volume (D, H, W)" in msg and "volume[None] -> (1, D, H, W)" in msg
    assert lesioncount.count_distribution(volume[None]).pmf.shape[0] == 1  # the advice works


def test_2d_batch_with_2d_connectivity_still_fine_and_single_image_hint():
    import torch

    import lesioncount

    assert lesioncount.cc_count(torch.zeros(3, 8, 8), connectivity=8).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match=r"single image \(H, W\) needs its batch dimension"):
        lesioncount.count_distribution(torch.zeros(8, 8), connectivity=8)


# ---------------------------------------------------------------------------------------------------
# lesioncount --version


def test_version_names_package_torch_and_compiled_ops(capsys):
    import importlib.metadata

    import torch

    import lesioncount
    from lesioncount.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"lesioncount {importlib.metadata.version('lesioncount')} (torch {torch.__version__},")
    assert lines[1].startswith("compiled ops: loaded (" if lesioncount.has_ops() else "compiled ops: not loaded")
    assert lines[2].startswith("CUDA kernels: ")
    if torch.version.cuda is None:
        assert lines[2] == "CUDA kernels: no (this torch is a CPU-only build)"


def test_version_without_compiled_ops_says_why():
    import os
    import subprocess
    import sys

    env = dict(os.environ, LESIONCOUNT_DISABLE_OPS="1")
    out = subprocess.run([sys.executable, "-m", "lesioncount", "--version"], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout
    assert "compiled ops: not loaded, the pure torch/SciPy fallback runs (disabled by LESIONCOUNT_DISABLE_OPS)" in out


# ---------------------------------------------------------------------------------------------------
# 4-D NIfTI with several volumes: no volume is picked silently


def _four_d(tmp_path, volumes: int):
    nib = pytest.importorskip("nibabel")
    import numpy as np

    rng = np.random.default_rng(0)
    data = (rng.random((10, 10, 6, volumes)) ** 6).astype(np.float32)
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    path = folder / f"stack{volumes}.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path, data


def test_read_probability_map_of_a_multi_volume_nifti_needs_a_channel(tmp_path):
    import numpy as np

    from lesioncount.io import CaseReadError, read_probability_map

    path, data = _four_d(tmp_path, 3)
    with pytest.raises(CaseReadError, match=r"stack3\.nii\.gz: 4-D image of shape \(10, 10, 6, 3\) holds 3 volumes; "
                                            r"which one is the lesion probability map is not guessed: choose it "
                                            r"with channel=N \(CLI: --channel N\)"):
        read_probability_map(path)
    np.testing.assert_array_equal(read_probability_map(path, channel=2).data, data[..., 2])
    single, data1 = _four_d(tmp_path, 1)
    np.testing.assert_array_equal(read_probability_map(single).data, data1[..., 0])  # a singleton 4th axis is fine


@pytest.mark.parametrize("command", ["count", "plot"])
def test_cli_multi_volume_nifti_fails_without_channel_and_works_with_it(tmp_path, capsys, command):
    from lesioncount.cli import main

    path, _ = _four_d(tmp_path, 2)
    if command == "count":
        def run(*extra):
            return main(["count", "-i", str(path), "-o", str(tmp_path / f"out{len(extra)}"), "--workers", "1", *extra])
    else:
        pytest.importorskip("matplotlib")

        def run(*extra):
            return main(["plot", "-i", str(path), "-o", str(tmp_path / f"p{len(extra)}.png"), *extra])
    assert run() != 0
    captured = capsys.readouterr()
    assert "holds 2 volumes" in captured.out + captured.err + (
        (tmp_path / "out0" / "errors.csv").read_text() if command == "count" else "")
    assert run("--channel", "1") == 0


def test_python_api_with_compiled_kernel_names_a_uint8_image():
    # the compiled CPU labeler checks values itself; its failure is re-explained by the Python check
    import torch

    import lesioncount as lc

    x = torch.randint(0, 256, (1, 4, 8, 8)).float()
    with pytest.raises(ValueError, match="uint8"):
        lc.count_distribution(x)
