"""``lesioncount merge`` (shards of ``count --num-parts``) and the Python API for one file or array
(:func:`lesioncount.report.count_file` / :func:`count_array`) fanned out with concurrent.futures."""
from __future__ import annotations

import concurrent.futures
import csv
import functools
import json
import pathlib

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from lesioncount.cli import main  # noqa: E402
from lesioncount.io import find_cases  # noqa: E402
from lesioncount.report import count_array, count_file, lesion_rows, summary_row  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AFFINE = np.array([[0.0, -1.2, 0.0, 10.0], [0.8, 0.0, 0.0, -5.0], [0.0, 0.0, 3.0, 2.5], [0.0, 0.0, 0.0, 1.0]])
SHAPE = (24, 20, 16)
TIMING_COLUMNS = ("read_s", "count_s", "write_s")


def _folder(path: pathlib.Path, n: int, seed: int = 0) -> pathlib.Path:
    from lesioncount.synthetic import realistic_probability_maps

    maps = realistic_probability_maps(n, SHAPE, num_lesions=(1, 4), radius=(1.5, 2.5), seed=seed).numpy()
    path.mkdir(parents=True)
    for b, m in enumerate(maps):
        nib.save(nib.Nifti1Image(m, AFFINE), str(path / f"case_{b:02d}.nii.gz"))
    return path


def _count(*argv) -> int:
    return main(["count", "-q", *[str(a) for a in argv]])


def _merge(out, *extra) -> int:
    return main(["merge", str(out), "-q", *extra])


def _rows(path, drop=TIMING_COLUMNS):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def _shards(inp, out, n, *extra):
    for part in range(n):
        assert _count("-i", inp, "-o", out, "--num-parts", n, "--part-id", part, *extra) in (0, 1)


def test_merge_equals_one_unsharded_run_and_is_idempotent(tmp_path, capsys):
    inp = _folder(tmp_path / "in", 7, seed=1)
    np.save(inp / "broken.npy", np.full((4, 4), 0.5))  # fails in whichever shard gets it
    whole = tmp_path / "whole"
    assert _count("-i", inp, "-o", whole) == 1
    out = tmp_path / "sharded"
    _shards(inp, out, 3)
    assert not (out / "summary.csv").exists()
    assert _merge(out) == 1  # merged, one case failed
    for name in ("summary.csv", "lesions.csv", "errors.csv"):
        assert _rows(out / name) == _rows(whole / name), name  # same rows, same (whole-list) order
    assert [r["case"] for r in _rows(out / "errors.csv")] == ["broken"]
    first = {name: (out / name).read_bytes() for name in ("summary.csv", "lesions.csv", "errors.csv")}
    assert _merge(out) == 1  # idempotent: byte for byte
    assert {name: (out / name).read_bytes() for name in first} == first
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.endswith(".lock")]
    # rerunning one shard makes the merged files stale: the shard removes them, merge writes them again
    assert _count("-i", inp, "-o", out, "--num-parts", 3, "--part-id", 1, "--skip-existing") in (0, 1)
    assert not (out / "summary.csv").exists()
    assert _merge(out) == 1 and (out / "summary.csv").read_bytes() == first["summary.csv"]
    capsys.readouterr()
    # a complete, error-free split merges with exit 0
    ok = tmp_path / "ok"
    _shards(_folder(tmp_path / "in2", 4, seed=2), ok, 2)
    assert _merge(ok) == 0
    assert [r["case"] for r in _rows(ok / "summary.csv")] == ["case_00", "case_01", "case_02", "case_03"]


def test_merge_refuses_missing_overlapping_and_mismatched_shards(tmp_path, capsys):
    inp = _folder(tmp_path / "in", 5, seed=3)
    out = tmp_path / "out"

    def refused(*expected):
        assert _merge(out) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("lesioncount merge: error: "), err
        for text in expected:
            assert text in err, (text, err)
        assert not (out / "summary.csv").exists()

    out.mkdir()
    refused("no shard outputs")
    assert _count("-i", inp, "-o", out, "--num-parts", 3, "--part-id", 0) == 0
    refused("missing shard outputs", "summary.part-1-of-3.csv", "errors.part-2-of-3.csv", "part(s) 1, 2")
    _shards(inp, out, 3, "--skip-existing")
    assert _merge(out) == 0
    (out / "summary.csv").unlink()
    # settings that differ between shards
    assert _count("-i", inp, "-o", out, "--num-parts", 3, "--part-id", 2, "--threshold", 0.3, "--overwrite") == 0
    refused("different settings", "threshold: part 0 0.1, part 1 0.1, part 2 0.3")
    assert _count("-i", inp, "-o", out, "--num-parts", 3, "--part-id", 2, "--overwrite") == 0
    # the same case in two shards
    summary = out / "summary.part-0-of-3.csv"
    original = summary.read_text()
    extra = [line for line in (out / "summary.part-1-of-3.csv").read_text().splitlines()[1:]][0]
    summary.write_text(original + extra + "\n")
    refused("overlapping shards", "'case_01'")
    summary.write_text(original)
    # a stale split with another N beside this one
    (out / "summary.part-0-of-4.csv").write_text(original)
    refused("different --num-parts", "N=3", "N=4")
    (out / "summary.part-0-of-4.csv").unlink()
    # shards of another input (other cases) cannot be parts of this split
    other = _folder(tmp_path / "other", 7, seed=4)
    assert _count("-i", other, "-o", out, "--num-parts", 3, "--part-id", 1, "--overwrite") == 0
    refused("split different case lists", "part 1 of 7 cases")
    assert _count("-i", inp, "-o", out, "--num-parts", 3, "--part-id", 1, "--overwrite") == 0
    # a missing lesions file while the other shards have one
    (out / "lesions.part-2-of-3.csv").unlink()
    refused("lesions.part-2-of-3.csv")
    assert _count("-i", inp, "-o", out, "--num-parts", 3, "--part-id", 2, "--skip-existing") == 0
    assert _merge(out) == 0
    assert _merge(tmp_path / "nowhere") == 2 and "no such folder" in capsys.readouterr().err


def test_merge_waits_for_running_shards_and_reports_interrupted_ones(tmp_path, capsys):
    from lesioncount.commands.count import LOCK_NAME, FolderLock

    inp = _folder(tmp_path / "in", 4, seed=5)
    out = tmp_path / "out"
    _shards(inp, out, 2)
    with FolderLock(out / LOCK_NAME, "count part 1 of 2", shared=True):  # a shard still running
        assert _merge(out) == 2
        assert "is in use by another lesioncount run" in capsys.readouterr().err
    # a shard stopped by a signal: its manifest says so, its unprocessed cases are rows of its errors file
    manifest_path = out / ".lesioncount.part-1-of-2.manifest"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(complete=False, interrupted_by="SIGTERM")
    manifest_path.write_text(json.dumps(manifest))
    (out / "summary.part-1-of-2.csv").write_text((out / "summary.part-1-of-2.csv").read_text().splitlines()[0] + "\n")
    with open(out / "errors.part-1-of-2.csv", "a", newline="") as f:
        csv.writer(f).writerows([[c, f"{c}.nii.gz", "not processed: interrupted by SIGTERM"] for c in manifest["cases"]])
    (out / "lesions.part-1-of-2.csv").write_text((out / "lesions.part-0-of-2.csv").read_text().splitlines()[0] + "\n")
    assert _merge(out) == 1
    err = capsys.readouterr().err
    assert "part 1 of 2 was interrupted (SIGTERM)" in err
    assert [r["case"] for r in _rows(out / "errors.csv")] == ["case_01", "case_03"]
    assert [r["case"] for r in _rows(out / "summary.csv")] == ["case_00", "case_02"]


# ----------------------------------------------------------------------------- the Python API


def _without_timings(report):
    return {k: v for k, v in report.items() if k != "timings_s"}


def test_count_file_returns_the_case_json_of_the_command(tmp_path):
    inp = _folder(tmp_path / "in", 2, seed=6)
    mask = np.zeros(SHAPE, np.uint8)
    mask[:, :12] = 1
    nib.save(nib.Nifti1Image(mask, AFFINE), str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "out"
    options = dict(threshold=0.2, min_volume=5.0, max_count=3)
    assert _count("-i", inp, "-o", out, "--threshold", 0.2, "--min-volume", 5.0, "--max-count", 3,
                  "--mask", tmp_path / "mask.nii.gz", "--save-labels") == 0
    for path in find_cases(inp):
        report = count_file(path, mask=tmp_path / "mask.nii.gz", labels_path=tmp_path / f"{path.name[:-7]}_l.nii.gz",
                            **options)
        cli = json.loads((out / f"{report['case']}.json").read_text())
        assert _without_timings(report) == _without_timings(cli)
        assert set(report["timings_s"]) == {"read_s", "read_cpu_s", "count_s", "write_s"}
        assert (tmp_path / f"{report['case']}_l.nii.gz").read_bytes() == (out / f"{report['case']}_labels.nii.gz").read_bytes()
    # count_array: the same numbers for the array in memory (a name instead of a file)
    img = nib.load(str(inp / "case_00.nii.gz"))
    data = np.asanyarray(img.dataobj)
    from_array = count_array(data, img.affine, name="case_00", mask=mask, **options)  # (the header's float32 affine)
    from_file = count_file(inp / "case_00.nii.gz", mask=mask, **options)
    for key in ("count", "lesions", "n_candidates", "baseline", "settings", "affine", "shape"):
        assert from_array[key] == from_file[key], key
    assert from_file["settings"]["mask"] == from_array["settings"]["mask"] == "array"
    with pytest.raises(TypeError, match="unknown option"):
        count_file(inp / "case_00.nii.gz", treshold=0.2)
    with pytest.raises(ValueError, match="3-D"):
        count_array(data[0])


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_fanning_a_folder_out_with_concurrent_futures(tmp_path, executor):
    """The example of count_file's docstring: the same reports as `lesioncount count`, in case order."""
    inp = _folder(tmp_path / "in", 4, seed=7)
    out = tmp_path / "out"
    assert _count("-i", inp, "-o", out, "--min-volume", 10.0) == 0
    count = functools.partial(count_file, threshold=0.1, min_volume=10.0)
    if executor == "threads":
        pool = concurrent.futures.ThreadPoolExecutor(2)
    else:  # spawn: a fresh interpreter per worker (fork after torch's threads started is unsafe)
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    with pool:
        reports = list(pool.map(count, find_cases(inp)))
    assert [r["case"] for r in reports] == [f"case_{b:02d}" for b in range(4)]
    for report in reports:
        assert _without_timings(report) == _without_timings(json.loads((out / f"{report['case']}.json").read_text()))
    rows = [summary_row(r) for r in reports]
    assert [{k: str(v) for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows] == _rows(out / "summary.csv")
    lesions = [{k: str(v) for k, v in row.items()} for r in reports for row in lesion_rows(r)]
    assert lesions == _rows(out / "lesions.csv", drop=())
