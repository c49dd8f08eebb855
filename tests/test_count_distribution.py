"""lesioncount.count_distribution: the whole pipeline (label -> region_max -> poisson_binomial)."""

from __future__ import annotations

import math
import os
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lesioncount as lc
from conftest import blobs_volume, make_rng, random_probs, ref, requires_cuda, requires_ops

FIELDS = (
    "pmf",
    "log_pmf",
    "lesion_probs",
    "lesion_ids",
    "num_lesions",
    "labels",
    "argmax",
    "truncated",
    "expected_count",
    "entropy",
    "max_count",
)


def _pipeline(x, threshold=0.1, conn=18, min_size=0, max_count=4):
    """Expected (lesion values sorted descending per item, num, pmf) from the reference ops."""
    labels, num = ref.label(x, threshold, conn, min_size)
    R = int(num.max()) if num.numel() else 0
    vals, _ = ref.region_max(x, labels, R)
    pmf = ref.poisson_binomial(vals.double(), max_count, False, False)
    return vals.double().sort(dim=1, descending=True).values, num, pmf, labels


def _sorted_probs(res, width):
    lp = res.lesion_probs.detach().double()
    s = lp.sort(dim=1, descending=True).values
    if s.shape[1] < width:
        s = torch.cat([s, torch.zeros(s.shape[0], width - s.shape[1], dtype=s.dtype)], dim=1)
    return s


def _entropy(pmf):
    pmf = pmf.double()
    return -(torch.where(pmf > 0, pmf * pmf.clamp_min(1e-300).log(), torch.zeros_like(pmf))).sum(1)


def _check_against_pipeline(res, x, threshold=0.1, conn=18, min_size=0, max_count=4, rtol=1e-12, atol=1e-12):
    vals, num, pmf, labels = _pipeline(x, threshold, conn, min_size, max_count)
    B = x.shape[0]
    assert torch.equal(res.num_lesions.cpu(), num)
    assert res.num_lesions.dtype == torch.int64
    torch.testing.assert_close(res.pmf.detach().double().cpu(), pmf, rtol=rtol, atol=atol)
    K = res.lesion_probs.shape[1]
    assert K >= (int(num.max()) if B else 0)
    torch.testing.assert_close(_sorted_probs(res, vals.shape[1])[:, : vals.shape[1]], vals, rtol=0, atol=0)
    if K > vals.shape[1]:
        assert bool((res.lesion_probs[:, vals.shape[1] :] == 0).all())
    assert torch.equal(res.labels.cpu().reshape(labels.shape).long(), labels.long())
    return vals, num, pmf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fields_and_shapes(dtype):
    x, _ = random_probs(make_rng(1), (3, 6, 7, 8), 0.15, dtype=dtype)
    res = lc.count_distribution(x, max_count=5)
    for f in FIELDS:
        assert hasattr(res, f), f
    B = 3
    assert res.max_count == 5
    assert res.pmf.shape == (B, 6) and res.log_pmf.shape == (B, 6)
    K = res.lesion_probs.shape[1]
    assert res.lesion_probs.shape == (B, K)
    assert res.lesion_ids.shape == (B, K) and res.argmax.shape == (B, K)
    assert res.argmax.dtype == torch.int64
    assert res.num_lesions.shape == (B,) and res.truncated.shape == (B,)
    assert res.truncated.dtype == torch.bool and not bool(res.truncated.any())
    assert res.expected_count.shape == (B,) and res.entropy.shape == (B,)
    assert res.labels.shape == x.shape
    assert res.pmf.is_floating_point()
    _check_against_pipeline(res, x.double() if dtype == torch.float64 else x, max_count=5, rtol=1e-6, atol=1e-6)


def test_candidates_point_at_their_voxels():
    x, _ = random_probs(make_rng(2), (2, 7, 6, 9), 0.2, dtype=torch.float64, unique=True)
    res = lc.count_distribution(x, max_count=6, connectivity=6)
    for b in range(2):
        flat = x[b].reshape(-1)
        lab = res.labels[b].reshape(-1)
        for j in range(res.lesion_probs.shape[1]):
            a = int(res.argmax[b, j])
            if a < 0:
                assert float(res.lesion_probs[b, j]) == 0.0
                continue
            assert float(res.lesion_probs[b, j]) == float(flat[a])
            assert int(lab[a]) == int(res.lesion_ids[b, j])
        n = int(res.num_lesions[b])
        ids = sorted(int(i) for i, a in zip(res.lesion_ids[b], res.argmax[b]) if int(a) >= 0)
        assert ids == list(range(1, n + 1))


@given(
    shape=st.one_of(
        st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)),
    ),
    density=st.floats(0.0, 0.6),
    conn=st.sampled_from([6, 18, 26]),
    min_size=st.sampled_from([0, 2]),
    max_count=st.integers(0, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_pipeline(shape, density, conn, min_size, max_count, seed):
    x, _ = random_probs(make_rng(seed), shape, density, dtype=torch.float64)
    res = lc.count_distribution(x, connectivity=conn, min_size=min_size, max_count=max_count)
    _check_against_pipeline(res, x, conn=conn, min_size=min_size, max_count=max_count)


def test_2d_input_and_channel_dim():
    rng = make_rng(3)
    x2, _ = random_probs(rng, (3, 20, 17), 0.1, dtype=torch.float64)
    res = lc.count_distribution(x2, connectivity=8, max_count=6)
    _check_against_pipeline(res, x2, conn=8, max_count=6)
    x4, _ = random_probs(rng, (2, 5, 6, 7), 0.15, dtype=torch.float64)
    a = lc.count_distribution(x4, max_count=4)
    b = lc.count_distribution(x4.unsqueeze(1), max_count=4)
    assert torch.equal(a.pmf, b.pmf) and torch.equal(a.num_lesions, b.num_lesions)
    assert b.labels.numel() == x4.numel()


def test_expected_count_entropy_and_log_pmf():
    x, _ = random_probs(make_rng(4), (4, 6, 6, 6), 0.12, dtype=torch.float64)
    res = lc.count_distribution(x, connectivity=6, max_count=60)  # M >= K: untruncated
    assert int(res.num_lesions.max()) <= 60
    torch.testing.assert_close(res.expected_count.double(), res.lesion_probs.double().sum(1), rtol=1e-12, atol=1e-12)
    mean = (res.pmf * torch.arange(61, dtype=res.pmf.dtype)).sum(1)
    torch.testing.assert_close(mean.double(), res.expected_count.double(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.entropy.double(), _entropy(res.pmf), rtol=1e-9, atol=1e-12)
    fin = res.pmf > 0
    torch.testing.assert_close(res.log_pmf[fin].exp(), res.pmf[fin], rtol=1e-9, atol=1e-15)
    assert bool((res.log_pmf[~fin] == -math.inf).all()) or bool((res.log_pmf[~fin] < -700).all())
    torch.testing.assert_close(res.pmf.sum(1), torch.ones(4, dtype=res.pmf.dtype), rtol=0, atol=1e-12)


def test_default_max_count_sums_to_one():
    x, _ = random_probs(make_rng(5), (2, 5, 6, 7), 0.2, dtype=torch.float64)
    res = lc.count_distribution(x)
    assert res.pmf.shape[1] == int(res.max_count) + 1
    torch.testing.assert_close(res.pmf.sum(1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_from_logits_matches_probabilities():
    rng = make_rng(6)
    p, fg = random_probs(rng, (3, 6, 7, 8), 0.2, dtype=torch.float64)
    # keep clear of the threshold so logit/sigmoid rounding cannot flip a voxel
    p = torch.where(torch.from_numpy(fg), p.clamp_min(0.12), p.clamp_max(0.08))
    z = torch.logit(p.clamp(1e-6, 1 - 1e-6))
    a = lc.count_distribution(z, from_logits=True, max_count=5)
    b = lc.count_distribution(torch.sigmoid(z), max_count=5)
    assert torch.equal(a.num_lesions, b.num_lesions)
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.pmf, b.pmf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.log_pmf, b.log_pmf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.lesion_probs, b.lesion_probs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.expected_count, b.expected_count, rtol=1e-6, atol=1e-6)
    # float32 logits too
    a32 = lc.count_distribution(z.float(), from_logits=True, max_count=5)
    torch.testing.assert_close(a32.pmf.double(), b.pmf, rtol=1e-5, atol=1e-6)


def test_mask_excludes_voxels():
    rng = make_rng(7)
    x, _ = random_probs(rng, (3, 8, 7, 6), 0.25, dtype=torch.float64)
    mask = torch.from_numpy(rng.random(x.shape) < 0.6)
    a = lc.count_distribution(x, mask=mask, max_count=6)
    b = lc.count_distribution(x * mask, max_count=6)
    assert torch.equal(a.num_lesions, b.num_lesions)
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.pmf, b.pmf, rtol=0, atol=0)
    # a mask of zeros leaves nothing
    z = lc.count_distribution(x, mask=torch.zeros_like(mask), max_count=3)
    assert z.num_lesions.tolist() == [0, 0, 0]
    assert z.pmf.tolist() == [[1.0, 0.0, 0.0, 0.0]] * 3


@pytest.mark.parametrize("max_lesions", [1, 3, 8, 50])
def test_max_lesions_keeps_top_candidates(max_lesions):
    rng = make_rng(8)
    x, _ = random_probs(rng, (4, 7, 8, 9), 0.12, dtype=torch.float64, unique=True)
    x[3] = 0.0  # an item with no lesion
    vals, num, _, _ = _pipeline(x, conn=6, max_count=4)
    res = lc.count_distribution(x, connectivity=6, max_count=4, max_lesions=max_lesions)
    assert res.lesion_probs.shape == (4, max_lesions)
    assert res.argmax.shape == (4, max_lesions)
    assert torch.equal(res.num_lesions, num)
    assert res.truncated.tolist() == [int(n) > max_lesions for n in num]
    width = max(max_lesions, vals.shape[1])
    vals = torch.cat([vals, torch.zeros(4, width - vals.shape[1], dtype=vals.dtype)], dim=1)
    top = vals[:, :max_lesions]
    torch.testing.assert_close(_sorted_probs(res, max_lesions), top, rtol=0, atol=0)
    exp_pmf = ref.poisson_binomial(top, 4, False, False)
    torch.testing.assert_close(res.pmf.double(), exp_pmf, rtol=1e-12, atol=1e-12)
    exact = lc.count_distribution(x, connectivity=6, max_count=4)
    for b in range(4):
        if not bool(res.truncated[b]):
            torch.testing.assert_close(res.pmf[b], exact.pmf[b], rtol=1e-12, atol=1e-14)


def _blobs():
    centers = [(2, 2, 2), (2, 2, 7), (6, 6, 3), (7, 2, 7)]
    peaks = [0.9, 0.55, 0.35, 0.7]
    return blobs_volume((10, 9, 10), centers, peaks, radius=1, background=0.02)


def _small_blobs():
    centers = [(1, 1, 1), (1, 1, 5), (5, 4, 3)]
    return blobs_volume((7, 6, 7), centers, [0.9, 0.55, 0.7], radius=1, background=0.02)


@pytest.mark.parametrize(
    "field,max_count", [("pmf", 2), ("pmf", 5), ("log_pmf", 2), ("log_pmf", 5), ("expected_count", 3)]
)
def test_gradcheck_whole_pipeline(field, max_count):
    x = torch.cat([_small_blobs(), _small_blobs().flip(-1)], dim=0).requires_grad_(True)
    res = lc.count_distribution(x.detach(), connectivity=26, max_count=max_count)
    assert res.num_lesions.tolist() == [3, 3]
    keep = min(max_count, 3) + 1 if field == "log_pmf" else None

    def f(t):
        out = getattr(lc.count_distribution(t, connectivity=26, max_count=max_count), field)
        return out[:, :keep] if keep is not None else out

    torch.autograd.gradcheck(f, (x,), fast_mode=True)
    # a full (slow mode) check on a single item
    if field == "log_pmf" and max_count == 2:
        torch.autograd.gradcheck(f, (x[:1].detach().clone().requires_grad_(True),))


def test_gradient_is_sparse_at_argmax():
    x = _blobs().requires_grad_(True)
    res = lc.count_distribution(x, connectivity=26, max_count=4)
    loss = -res.log_pmf[0, 2]
    (g,) = torch.autograd.grad(loss, x)
    nz = torch.nonzero(g.reshape(-1)).reshape(-1).tolist()
    am = sorted(int(a) for a in res.argmax[0] if int(a) >= 0)
    assert sorted(nz) == am


def test_gradcheck_with_max_lesions_and_logits():
    x = _small_blobs()
    z = torch.logit(x).requires_grad_(True)

    def f(t):
        r = lc.count_distribution(t, connectivity=26, max_count=2, from_logits=True, max_lesions=2)
        return r.log_pmf

    assert lc.count_distribution(z.detach(), connectivity=26, from_logits=True, max_lesions=2).truncated.tolist() == [True]
    torch.autograd.gradcheck(f, (z,), fast_mode=True)


def test_empty_batch():
    res = lc.count_distribution(torch.zeros(0, 4, 5, 6), max_count=3)
    assert res.pmf.shape == (0, 4) and res.log_pmf.shape == (0, 4)
    assert res.num_lesions.shape == (0,) and res.truncated.shape == (0,)
    assert res.expected_count.shape == (0,) and res.entropy.shape == (0,)
    assert res.lesion_probs.shape[0] == 0
    res = lc.count_distribution(torch.zeros(0, 4, 5, 6), max_count=3, max_lesions=5)
    assert res.lesion_probs.shape == (0, 5)


def test_no_lesions_anywhere():
    res = lc.count_distribution(torch.zeros(2, 3, 4, 5, dtype=torch.float64), max_count=3)
    assert res.pmf.tolist() == [[1.0, 0.0, 0.0, 0.0]] * 2
    assert res.num_lesions.tolist() == [0, 0]
    assert res.expected_count.tolist() == [0.0, 0.0]
    assert res.entropy.tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _compile_case():
    x = torch.cat([_blobs(), _blobs().flip(-2), torch.zeros_like(_blobs())], dim=0).float()
    target = torch.tensor([4, 2, 0])
    return x, target


def _fn(x, target):
    r = lc.count_distribution(x, max_lesions=8, max_count=4)
    logp = r.log_pmf
    loss = -logp.gather(1, target.clamp(max=4).unsqueeze(1)).mean()
    return logp, loss


@requires_ops  # the SciPy fallback cannot be traced into one graph
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, target = _compile_case()
    xe = x.clone().requires_grad_(True)
    le, lossE = _fn(xe, target)
    (ge,) = torch.autograd.grad(lossE, xe)
    cf = torch.compile(_fn, fullgraph=True, backend=backend)
    xc = x.clone().requires_grad_(True)
    lc_, lossC = cf(xc, target)
    (gc,) = torch.autograd.grad(lossC, xc)
    torch.testing.assert_close(lc_, le, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lossC, lossE, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-6)
    # a second call with new values reuses the graph and stays correct
    x2 = (x * 0.9).requires_grad_(False)
    torch.testing.assert_close(cf(x2, target)[0], _fn(x2, target)[0], rtol=1e-6, atol=1e-6)


@requires_ops
@pytest.mark.slow
def test_torch_compile_inductor():
    cache = pathlib.Path(__file__).resolve().parents[1] / ".torchinductor_cache"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    torch._dynamo.reset()
    x, target = _compile_case()
    cf = torch.compile(_fn, fullgraph=True)
    lc_, lossC = cf(x, target)
    le, lossE = _fn(x, target)
    torch.testing.assert_close(lc_, le, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lossC, lossE, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


@requires_ops
@requires_cuda
@pytest.mark.cuda
def test_cuda_matches_cpu():
    rng = make_rng(9)
    x, _ = random_probs(rng, (3, 16, 17, 18), 0.05, dtype=torch.float32)
    for ml in (None, 4):
        cpu = lc.count_distribution(x, max_count=5, max_lesions=ml)
        gpu = lc.count_distribution(x.cuda(), max_count=5, max_lesions=ml)
        assert torch.equal(gpu.num_lesions.cpu(), cpu.num_lesions)
        assert torch.equal(gpu.labels.cpu(), cpu.labels)
        torch.testing.assert_close(gpu.pmf.cpu(), cpu.pmf, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gpu.lesion_probs.cpu(), cpu.lesion_probs)
