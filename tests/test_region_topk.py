"""_region_topk: the static-shape path of count_distribution(max_lesions=k) on the CPU."""
from __future__ import annotations

import pytest
import torch

import lesioncount as lc
from lesioncount import _ops
from conftest import requires_ops

pytestmark = requires_ops


def _topk_by_bound(x, labels, k):
    """The generic path: region_max over every label, then the k best (value desc, label asc)."""
    n = int(labels.max()) if labels.numel() else 0
    values, argmax = lc.region_max(x, labels, n)
    rows = []
    for b in range(x.shape[0]):
        present = [r for r in range(n) if argmax[b, r] >= 0]
        present.sort(key=lambda r: (-float(values[b, r]), r))
        keep = sorted(present[:k])
        v = [float(values[b, r]) for r in keep] + [0.0] * (k - len(keep))
        a = [int(argmax[b, r]) for r in keep] + [-1] * (k - len(keep))
        i = [r + 1 for r in keep] + [0] * (k - len(keep))
        rows.append((v, a, i))
    return rows


@pytest.mark.parametrize("k", [0, 1, 3, 8, 200])
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_matches_region_max_then_topk(k, label_dtype):
    g = torch.Generator().manual_seed(k)
    x = torch.rand(3, 9, 11, 13, generator=g, dtype=torch.float64)
    labels, _ = lc.label(x, 0.6, 6)
    labels = labels.to(label_dtype)
    values, argmax, ids = torch.ops.lesioncount._region_topk(x, labels, k)
    assert values.shape == (3, k) and argmax.dtype == torch.int64 and ids.dtype == torch.int64
    for b, (v, a, i) in enumerate(_topk_by_bound(x, labels, k)):
        assert values[b].tolist() == v
        assert argmax[b].tolist() == a
        assert ids[b].tolist() == i


def test_ties_keep_the_smaller_label_and_the_first_voxel():
    x = torch.zeros(1, 1, 12, dtype=torch.float32)
    x[0, 0, [0, 1, 3, 5, 6, 8, 10]] = torch.tensor([0.5, 0.7, 0.7, 0.7, 0.7, 0.9, 0.7])
    labels = torch.tensor([[[1, 1, 0, 2, 0, 3, 3, 0, 4, 0, 5, 0]]], dtype=torch.int32)
    values, argmax, ids = torch.ops.lesioncount._region_topk(x, labels, 3)
    # region maxima: 1:0.7@1, 2:0.7@3, 3:0.7@5 (first of two), 4:0.9@8, 5:0.7@10 -> best three by
    # (value desc, label asc): 4, 1, 2; returned in label order.
    assert ids.tolist() == [[1, 2, 4]]
    assert argmax.tolist() == [[1, 3, 8]]
    assert values[0].tolist() == pytest.approx([0.7, 0.7, 0.9])


def test_gradient_is_sparse_and_matches_region_max():
    x = torch.rand(2, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    labels, num = lc.label(x.detach(), 0.7, 26)
    k = int(num.max())
    values, argmax, _ = torch.ops.lesioncount._region_topk(x, labels, k)
    assert torch.autograd.gradcheck(lambda t: torch.ops.lesioncount._region_topk(t, labels, k)[0], (x,))
    (g,) = torch.autograd.grad(values.sum(), x)
    assert int((g != 0).sum()) == int((argmax >= 0).sum())


def test_opcheck():
    x = torch.rand(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    labels, _ = lc.label(x.detach(), 0.6, 18)
    torch.library.opcheck(torch.ops.lesioncount._region_topk.default, (x, labels, 4))


def test_count_distribution_static_path_equals_exact_when_nothing_is_dropped():
    x = torch.rand(2, 8, 10, 12) ** 4
    exact = lc.count_distribution(x, max_count=5)
    static = lc.count_distribution(x, max_count=5, max_lesions=int(exact.num_lesions.max()) + 3)
    torch.testing.assert_close(static.pmf, exact.pmf)
    assert not static.truncated.any()
    assert _ops.has_kernel("_region_topk", x.device)


def test_bad_labels_and_nan_are_errors():
    x = torch.rand(1, 4, 4, 4)
    labels = torch.zeros(1, 4, 4, 4, dtype=torch.int32)
    labels[0, 1, 1, 1] = -2
    with pytest.raises(RuntimeError, match="labels"):
        torch.ops.lesioncount._region_topk(x, labels, 2)
    labels[0, 1, 1, 1] = 1
    x[0, 1, 1, 1] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        torch.ops.lesioncount._region_topk(x, labels, 2)
