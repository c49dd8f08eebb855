"""Fast gzip decompression (ISA-L / zlib-ng / zlib) and the NIfTI read path built on it.

Every backend must give exactly the bytes of ``gzip.decompress`` and, through
``read_probability_map``, exactly the arrays nibabel gives; the fallback to zlib is tested by making
the fast libraries unimportable (the real selection code runs, nothing is mocked).
"""
from __future__ import annotations

import gzip
import io
import sys
import zlib

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from lesioncount import _gunzip  # noqa: E402
from lesioncount._extras import MissingExtraError  # noqa: E402
from lesioncount.io import (  # noqa: E402
    CaseReadError,
    c_contiguous,
    gunzip,
    gzip_backend,
    read_mask,
    read_probability_map,
    set_gzip_backend,
)


def _installed(name):
    try:
        _gunzip._import_backend(name)
        return True
    except ImportError:
        return False


BACKENDS = [b for b in _gunzip.GZIP_BACKENDS if _installed(b)]
AFFINE = np.array([[0.0, -1.2, 0.0, 10.0], [0.8, 0.0, 0.0, -5.0], [0.0, 0.0, 3.0, 2.5], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture
def fresh_selection(monkeypatch):
    """Forget the chosen backend (restored afterwards), so the next use selects again."""
    monkeypatch.setattr(_gunzip, "_selected", None)
    monkeypatch.delenv("LESIONCOUNT_GZIP", raising=False)


def _hide_fast_libraries(monkeypatch, names=("isal", "zlib-ng")):
    """Make the fast libraries unimportable, as when they are not installed."""
    for name in names:
        for module in {"isal": ("isal", "isal.isal_zlib"), "zlib-ng": ("zlib_ng", "zlib_ng.zlib_ng")}[name]:
            monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError


def _payloads():
    rng = np.random.default_rng(0)
    noise = rng.random(40_000).astype(np.float32).tobytes()
    named = io.BytesIO()
    with gzip.GzipFile(filename="case.nii", mode="wb", fileobj=named, mtime=0) as f:  # FNAME header field
        f.write(noise[:5000])
    chunks = [noise[i:i + 20_000] for i in range(0, len(noise), 20_000)]
    return {
        "single": gzip.compress(noise),
        "level1": gzip.compress(noise, compresslevel=1),
        "fname-header": named.getvalue(),
        "members": b"".join(gzip.compress(c) for c in chunks),
        "members+padding": gzip.compress(noise[:100]) + b"\0" * 9 + gzip.compress(noise[100:300]) + b"\0" * 3,
        "empty-member": gzip.compress(b""),
        "empty-input": b"",
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_gunzip_equals_gzip_decompress(backend, monkeypatch):
    monkeypatch.setattr(_gunzip, "_MEMBER_STEP", 4096)  # later members in several steps
    for name, raw in _payloads().items():
        expected = gzip.decompress(raw)
        assert gunzip(raw, backend) == expected, name
        assert gunzip(memoryview(bytearray(raw)), backend) == expected, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_gunzip_rejects_truncated_corrupt_and_trailing_garbage(backend):
    raw = gzip.compress(np.random.default_rng(1).random(10_000).tobytes())
    with pytest.raises(EOFError):
        gunzip(raw[: len(raw) // 2], backend)
    with pytest.raises(EOFError):
        gunzip(raw[:-3], backend)  # inside the trailer
    bad_crc = bytearray(raw)
    bad_crc[-8] ^= 0xFF
    with pytest.raises(Exception, match="(?i)crc|incorrect"):
        gunzip(bytes(bad_crc), backend)
    with pytest.raises(gzip.BadGzipFile, match="Not a gzipped file"):
        gunzip(raw + b"trailing", backend)
    with pytest.raises(gzip.BadGzipFile):
        gunzip(b"plain text, not gzip", backend)


def test_bad_backend_names_are_errors_naming_the_argument(fresh_selection, monkeypatch):
    with pytest.raises(ValueError, match=r"name must be one of 'auto', 'isal', 'zlib-ng', 'zlib'; got 'lz4'"):
        set_gzip_backend("lz4")
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'gz'"):
        gunzip(gzip.compress(b"x"), backend="gz")
    monkeypatch.setenv("LESIONCOUNT_GZIP", "fastest")
    with pytest.raises(ValueError, match=r"LESIONCOUNT_GZIP must be one of .*got 'fastest'"):
        gzip_backend()


def test_environment_variable_and_set_gzip_backend_choose(fresh_selection, monkeypatch):
    monkeypatch.setenv("LESIONCOUNT_GZIP", "ZLIB")
    assert gzip_backend() == "zlib"
    assert set_gzip_backend("auto") == BACKENDS[0]
    assert gzip_backend() == BACKENDS[0]


def test_auto_prefers_isal_then_zlib_ng(fresh_selection, monkeypatch):
    if BACKENDS[0] == "zlib":
        pytest.skip("no fast gzip library installed (pip install isal zlib-ng)")
    assert gzip_backend() == BACKENDS[0]
    if "zlib-ng" in BACKENDS:
        _hide_fast_libraries(monkeypatch, ("isal",))
        assert set_gzip_backend("auto") == "zlib-ng"


def _nifti_cases(tmp_path):
    """.nii.gz files covering nibabel's read paths: (path, what nibabel returns)."""
    rng = np.random.default_rng(2)
    cases = []

    def save(name, img):
        path = tmp_path / f"{name}.nii.gz"
        nib.save(img, str(path))
        cases.append(path)

    save("f32", nib.Nifti1Image(rng.random((19, 23, 37)).astype(np.float32), AFFINE))  # Z not a multiple of 16
    save("f64", nib.Nifti1Image(rng.random((8, 9, 33)), AFFINE))
    save("thin", nib.Nifti1Image(rng.random((30, 20, 5)).astype(np.float32), AFFINE))  # Z below one slab
    big_endian = nib.Nifti1Image(rng.random((10, 11, 40)).astype(">f4"), AFFINE)
    save("big_endian", big_endian)
    scaled = nib.Nifti1Image(rng.integers(0, 1000, (12, 13, 20)).astype(np.int16), AFFINE)
    scaled.header.set_slope_inter(0.001, 0.0)  # scaled ints: nibabel's scaling path
    save("scaled", scaled)
    save("u8", nib.Nifti1Image(rng.integers(0, 2, (12, 13, 20)).astype(np.uint8), AFFINE))
    save("channels", nib.Nifti1Image(rng.random((10, 12, 18, 3)).astype(np.float32), AFFINE))
    save("nifti2", nib.Nifti2Image(rng.random((9, 10, 17)).astype(np.float32), AFFINE))
    # several gzip members (as bgzip / `cat a.gz b.gz` write them)
    whole = gzip.decompress((tmp_path / "f32.nii.gz").read_bytes())
    multi = tmp_path / "members.nii.gz"
    multi.write_bytes(b"".join(gzip.compress(whole[i:i + 7000]) for i in range(0, len(whole), 7000)))
    cases.append(multi)
    return cases


def _read_map(path):
    """read_probability_map naming the channel of the 4-D file (a multi-volume NIfTI is not guessed)."""
    return read_probability_map(path, channel=1 if path.name == "channels.nii.gz" else None)


def _nibabel_reference(path, channel=1):
    data = np.asanyarray(nib.load(str(path)).dataobj)
    if data.ndim == 4:
        data = data[..., channel]
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float32)
    return np.ascontiguousarray(data)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_probability_map_gives_nibabels_arrays_with_every_backend(backend, tmp_path, fresh_selection):
    set_gzip_backend(backend)
    for path in _nifti_cases(tmp_path):
        vol = _read_map(path)
        ref = _nibabel_reference(path)
        assert vol.data.dtype == ref.dtype and vol.data.shape == ref.shape, path.name
        assert vol.data.tobytes() == ref.tobytes(), path.name  # byte-identical, C order
        assert vol.data.flags.c_contiguous and vol.data.flags.writeable, path.name
        np.testing.assert_array_equal(vol.affine, nib.load(str(path)).affine)
        if path.name == "channels.nii.gz":
            with pytest.raises(CaseReadError, match="holds 3 volumes.*channel=N"):
                read_probability_map(path)
        mask = read_mask(path) if path.name != "channels.nii.gz" else None
        if mask is not None:
            stored = np.asanyarray(nib.load(str(path)).dataobj)
            assert mask.data.dtype == stored.dtype and np.array_equal(mask.data, stored), path.name
            assert mask.data.flags.writeable


def test_fallback_to_zlib_when_the_fast_libraries_are_missing(tmp_path, fresh_selection, monkeypatch):
    paths = _nifti_cases(tmp_path)
    fast = {p: _read_map(p).data for p in paths}  # the preferred backend
    _hide_fast_libraries(monkeypatch)
    monkeypatch.setattr(_gunzip, "_selected", None)
    assert gzip_backend() == "zlib"
    assert _gunzip._current()[1] is zlib
    for path in paths:
        data = _read_map(path).data
        assert data.tobytes() == fast[path].tobytes() == _nibabel_reference(path).tobytes(), path.name
    for name in ("isal", "zlib-ng"):
        with pytest.raises(MissingExtraError, match=rf"name='{name}': the {name} package is not installed: "
                                                    rf"pip install {name} .*the lesioncount\[io\] extra"):
            set_gzip_backend(name)
    assert gzip_backend() == "zlib"  # a failed choice keeps the current one


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_files_are_case_read_errors_with_every_backend(backend, tmp_path, fresh_selection):
    set_gzip_backend(backend)
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(3).random((20, 20, 20)).astype(np.float32), AFFINE), str(good))
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CaseReadError, match=r"truncated\.nii\.gz: cannot decompress, file truncated or corrupt \(EOFError"):
        read_probability_map(truncated)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x55  # corrupt deflate data or a CRC mismatch
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(CaseReadError, match=r"corrupt\.nii\.gz: cannot decompress, file truncated or corrupt"):
        read_probability_map(corrupt)
    short = tmp_path / "short.nii.gz"  # a complete gzip stream holding too few voxels for its header
    short.write_bytes(gzip.compress(gzip.decompress(raw)[:-100]))
    with pytest.raises(CaseReadError, match=r"short\.nii\.gz: cannot read image data"):
        read_probability_map(short)


@pytest.mark.parametrize("shape", [(5, 6, 7), (31, 17, 16), (31, 17, 17), (64, 3, 50), (1, 1, 40)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_c_contiguous_equals_ascontiguousarray(shape, dtype):
    a = np.asfortranarray(np.random.default_rng(4).random(shape) * 100).astype(dtype, order="F")
    for view in (a, a[:, ::-1], a.transpose(2, 1, 0), np.ascontiguousarray(a)):
        out = c_contiguous(view)
        assert out.flags.c_contiguous and out.dtype == view.dtype and out.shape == view.shape
        assert out.tobytes() == np.ascontiguousarray(view).tobytes()
    assert c_contiguous(np.ones((3, 4))).flags.c_contiguous  # other ranks pass through


# ----------------------------------------------------------------------------- lesioncount count


def _count_folder(tmp_path, n=5, shape=(24, 20, 33)):
    from lesioncount.synthetic import realistic_probability_maps

    maps = realistic_probability_maps(n, shape, num_lesions=(1, 4), radius=(1.5, 2.5), seed=11).numpy()
    folder = tmp_path / "in"
    folder.mkdir()
    for b, m in enumerate(maps):
        nib.save(nib.Nifti1Image(m, AFFINE), str(folder / f"case_{b:02d}.nii.gz"))
    return folder


def _outputs_without_timings(out):
    """Every output file's bytes, with the CASE.json timings block cut out."""
    import re

    files = {}
    for path in sorted(out.iterdir()):
        data = path.read_bytes()
        if path.suffix == ".json":
            text = data.decode()
            block = re.search(r',\n "timings_s": \{\n[^{}]*\n \}', text)
            assert block is not None, path.name
            data = (text[:block.start()] + text[block.end():]).encode()
        elif path.name == "summary.csv":  # its last three columns are read_s, count_s, write_s
            lines = data.decode().splitlines()
            assert lines[0].endswith(",read_s,count_s,write_s")
            data = "\n".join(line.rsplit(",", 3)[0] for line in lines).encode()
        files[path.name] = data
    return files


@pytest.mark.usefixtures("one_torch_thread")
def test_count_outputs_are_byte_identical_across_libraries_workers_and_the_fallback(tmp_path, fresh_selection,
                                                                                    monkeypatch):
    from lesioncount.cli import main
    from lesioncount.commands import count as count_command

    folder = _count_folder(tmp_path)
    active, peak = [0], [0]
    real = count_command._process_case

    def tracked(*args):  # the real per-case work, counting how many cases run at once
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            return real(*args)
        finally:
            active[0] -= 1

    monkeypatch.setattr(count_command, "_process_case", tracked)

    def run(name, *extra):
        out = tmp_path / name
        assert main(["count", "-q", "-i", str(folder), "-o", str(out), "--save-labels", *extra]) == 0
        return _outputs_without_timings(out)

    expected = run("serial_zlib", "--workers", "0")
    # CASE.json + CASE_labels.nii.gz per case, summary.csv, lesions.csv, errors.csv; no lock or temporary file left
    assert len(expected) == 5 * 2 + 3
    assert sorted(expected) == sorted([f"case_{b:02d}{end}" for b in range(5) for end in (".json", "_labels.nii.gz")]
                                      + ["errors.csv", "lesions.csv", "summary.csv"])
    assert expected["lesions.csv"].count(b"\n") > 5  # a header and at least one row per case, compared below
    for backend in BACKENDS:
        set_gzip_backend(backend)
        for workers in ("0", "1", "3"):
            peak[0] = 0
            assert run(f"{backend}_{workers}", "--workers", workers) == expected, (backend, workers)
            assert peak[0] <= max(int(workers), 1), "more cases in flight than workers"
    _hide_fast_libraries(monkeypatch)
    monkeypatch.setattr(_gunzip, "_selected", None)
    assert run("fallback", "--workers", "2") == expected
    assert gzip_backend() == "zlib"


def test_count_default_workers_is_the_usable_cores(tmp_path, capsys, monkeypatch):
    from lesioncount.cli import main
    from lesioncount.commands import count as count_command

    monkeypatch.setattr(count_command.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert count_command.default_workers() == 3
    folder = _count_folder(tmp_path, n=2)
    assert main(["count", "-i", str(folder), "-o", str(tmp_path / "out")]) == 0
    assert "3 worker thread(s)" in capsys.readouterr().out
    assert main(["count", "-i", str(folder), "-o", str(tmp_path / "out"), "--overwrite", "--workers", "-2"]) == 2
    assert "--workers must be >= 0, got -2" in capsys.readouterr().err
