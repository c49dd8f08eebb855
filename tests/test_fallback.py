"""LESIONCOUNT_DISABLE_OPS=1 forces the pure torch/SciPy reference; results match the compiled ops."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import HAS_OPS

# The case is run both in a subprocess with the library disabled and (when available) here.
CASE = textwrap.dedent(
    """
    import numpy as np
    import torch
    import lesioncount as lc

    def run_case():
        rng = np.random.default_rng(1234)
        out = {}
        x = torch.from_numpy(rng.random((2, 6, 7, 8)) ** 6)  # sparse-ish foreground above 0.1
        x[:, 0, 0, 0] = 0.95
        for conn in (6, 18, 26):
            labels, num = lc.label(x, 0.1, conn, 0)
            out[f"labels{conn}"] = labels
            out[f"num{conn}"] = num
        labels, num = lc.label(x, 0.1, 18, 2)
        out["labels_min2"], out["num_min2"] = labels, num
        x2 = torch.from_numpy(rng.random((3, 11, 9))).float()
        out["labels2d"], out["num2d"] = lc.label(x2, 0.5, 8)
        labels, num = lc.label(x, 0.1, 18, 0)
        xg = x.clone().requires_grad_(True)
        v, a = lc.region_max(xg, labels, int(num.max()))
        (g,) = torch.autograd.grad(v.sum(), xg)
        out["rm_values"], out["rm_argmax"], out["rm_grad"] = v.detach(), a, g
        p = torch.from_numpy(rng.random((3, 9)))
        for log in (False, True):
            for fl in (False, True):
                pg = p.clone().requires_grad_(True)
                pmf = lc.poisson_binomial(pg, max_count=4, log=log, from_logits=fl)
                (gp,) = torch.autograd.grad(pmf[:, :3].sum(), pg)
                out[f"pb{log}{fl}"], out[f"pbgrad{log}{fl}"] = pmf.detach(), gp
        xg = x.clone().requires_grad_(True)
        res = lc.count_distribution(xg, max_count=5)
        loss = lc.CountLoss(max_count=5)(xg, torch.tensor([3, 1]))
        (gl,) = torch.autograd.grad(loss, xg)
        out["cd_pmf"], out["cd_log_pmf"] = res.pmf.detach(), res.log_pmf.detach()
        out["cd_num"], out["cd_loss"], out["cd_grad"] = res.num_lesions, loss.detach(), gl
        res8 = lc.count_distribution(x, max_count=3, max_lesions=2)
        out["cd8_pmf"], out["cd8_trunc"] = res8.pmf, res8.truncated
        out["cc"] = lc.cc_count(x)
        return out
    """
)

SCRIPT = CASE + textwrap.dedent(
    """
    import sys, warnings
    if __name__ == "__main__":
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import lesioncount as lc
            flags = [lc.has_ops(), lc.has_ops()]
            out = run_case()
            out2 = run_case()
            flags.append(lc.has_ops())
        msgs = [(str(m.message), m.filename) for m in w]
        out["_flags"] = flags
        out["_warnings"] = msgs
        out["_torch_ops_loaded"] = hasattr(torch.ops, "lesioncount") and hasattr(torch.ops.lesioncount, "label")
        for k, v in out2.items():
            assert torch.equal(v, out[k]) if isinstance(v, torch.Tensor) else v == out[k], k
        torch.save(out, sys.argv[1])
    """
)


def _run_fallback(tmp_path) -> dict:
    script = tmp_path / "fallback_case.py"
    script.write_text(SCRIPT)
    dest = tmp_path / "out.pt"
    env = dict(os.environ)
    env["LESIONCOUNT_DISABLE_OPS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(script), str(dest)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, f"fallback subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(dest, weights_only=False)


@pytest.fixture(scope="module")
def fallback_out(tmp_path_factory):
    return _run_fallback(tmp_path_factory.mktemp("fallback"))


def test_fallback_reports_no_ops_and_warns_once(fallback_out):
    assert fallback_out["_flags"] == [False, False, False]
    ours = [
        (m, f)
        for m, f in fallback_out["_warnings"]
        if "lesioncount" in m.lower() or "LESIONCOUNT" in m or "lesioncount" in f.replace("\\", "/").split("/site-packages/")[-1]
    ]
    ours = [(m, f) for m, f in ours if "/torch/" not in f.replace("\\", "/")]
    assert len(ours) == 1, fallback_out["_warnings"]


def test_fallback_results_are_sane(fallback_out):
    out = fallback_out
    import scipy.ndimage as ndi
    import numpy as np

    for conn, r in ((6, 1), (18, 2), (26, 3)):
        lab = out[f"labels{conn}"]
        assert lab.dtype == torch.int32
        for b in range(lab.shape[0]):
            # labels of a fresh SciPy run on the recovered foreground
            exp, n = ndi.label(lab[b].numpy() > 0, structure=ndi.generate_binary_structure(3, r))
            np.testing.assert_array_equal(lab[b].numpy(), exp)
            assert int(out[f"num{conn}"][b]) == n
    torch.testing.assert_close(out["cd_pmf"].sum(1), torch.ones(2, dtype=out["cd_pmf"].dtype))
    assert torch.isfinite(out["cd_loss"]) and torch.isfinite(out["cd_grad"]).all()


@pytest.mark.skipif(not HAS_OPS, reason="compiled lesioncount ops not available")
def test_fallback_matches_compiled(fallback_out):
    ns: dict = {}
    exec(CASE, ns)  # noqa: S102
    compiled = ns["run_case"]()
    for k, v in compiled.items():
        f = fallback_out[k]
        assert isinstance(f, torch.Tensor)
        assert f.dtype == v.dtype and f.shape == v.shape, k
        if v.is_floating_point():
            torch.testing.assert_close(f, v, rtol=1e-10, atol=1e-12, msg=f"{k} differs")
        else:
            assert torch.equal(f, v), k
