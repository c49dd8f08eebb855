"""Invalid arguments raise ValueError / RuntimeError naming the argument; never a crash or hang."""

from __future__ import annotations

import math

import pytest
import torch

import lesioncount as lc
from conftest import requires_ops

ERR = (ValueError, RuntimeError)


def vol3d(dtype=torch.float32):
    x = torch.zeros(2, 4, 5, 6, dtype=dtype)
    x[0, 1, 1, 1] = 0.8
    x[1, 2, 3, 4] = 0.6
    return x


def vol2d(dtype=torch.float32):
    x = torch.zeros(2, 7, 8, dtype=dtype)
    x[0, 1, 1] = 0.8
    return x


# ------------------------------------------------------------------------------ NaN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_nan_input_label(dtype):
    x = vol3d(dtype)
    x[1, 0, 0, 3] = math.nan
    with pytest.raises(ERR, match="(?i)nan"):
        lc.label(x)


def test_nan_input_count_distribution_and_loss():
    x = vol3d()
    x[0, 3, 4, 5] = math.nan
    with pytest.raises(ERR, match="(?i)nan"):
        lc.count_distribution(x)
    with pytest.raises(ERR, match="(?i)nan"):
        lc.count_distribution(x, from_logits=True)
    with pytest.raises(ERR, match="(?i)nan"):
        lc.CountLoss()(x, torch.tensor([1, 1]))
    with pytest.raises(ERR, match="(?i)nan"):
        lc.cc_count(x)


def test_nan_probs_poisson_binomial():
    p = torch.tensor([[0.2, math.nan, 0.3]])
    with pytest.raises(ERR, match="(?i)nan|probs"):
        lc.poisson_binomial(p, max_count=2)
    with pytest.raises(ERR, match="(?i)nan|probs"):
        lc.poisson_binomial(p, max_count=2, log=True)


def test_nan_region_max():
    x = vol3d()
    labels, _ = lc.label(x)
    x[0, 1, 1, 1] = math.nan  # inside region 1
    with pytest.raises(ERR, match="(?i)nan|input"):
        lc.region_max(x, labels, 1)


# ------------------------------------------------------------------------------ range


@pytest.mark.parametrize("bad", [1.5, -0.1, math.inf, -math.inf])
def test_values_outside_unit_interval(bad):
    x = vol3d()
    x[1, 0, 0, 0] = bad
    with pytest.raises(ERR, match="input|probs|\\[0, ?1\\]"):
        lc.count_distribution(x)
    with pytest.raises(ERR, match="input|probs|\\[0, ?1\\]"):
        lc.CountLoss()(x, torch.tensor([0, 1]))
    p = torch.tensor([[0.2, bad]])
    with pytest.raises(ERR, match="probs"):
        lc.poisson_binomial(p, max_count=2)
    with pytest.raises(ERR, match="probs"):
        lc.poisson_binomial(p, max_count=2, log=True)


def test_logits_may_be_outside_unit_interval():
    z = torch.full((1, 4, 5, 6), -8.0)
    z[0, 1, 1, 1] = 5.0
    res = lc.count_distribution(z, from_logits=True, max_count=2)
    assert res.num_lesions.tolist() == [1]
    assert lc.poisson_binomial(torch.tensor([[3.0, -2.0]]), max_count=2, from_logits=True).shape == (1, 3)


# ------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("shape", [(5,), (4, 5), (2, 3, 4, 5, 6, 7), (2, 2, 4, 5, 6)])
def test_wrong_rank(shape):
    x = torch.zeros(shape)
    with pytest.raises(ERR, match="input"):
        lc.label(x)
    with pytest.raises(ERR, match="input"):
        lc.count_distribution(x)


def test_wrong_rank_poisson_binomial():
    with pytest.raises(ERR, match="probs"):
        lc.poisson_binomial(torch.rand(5), max_count=2)
    with pytest.raises(ERR, match="probs"):
        lc.poisson_binomial(torch.rand(2, 3, 4), max_count=2)


def test_integer_probs_rejected():
    with pytest.raises(ERR + (TypeError,), match="probs|dtype"):
        lc.poisson_binomial(torch.ones(2, 3, dtype=torch.int64), max_count=2)


def test_region_max_mismatched_shapes():
    x = vol3d()
    labels, _ = lc.label(x)
    with pytest.raises(ERR, match="labels|shape"):
        lc.region_max(x, labels[:, :, :, :-1], 1)
    with pytest.raises(ERR, match="labels|shape"):
        lc.region_max(x, labels[:1], 1)
    with pytest.raises(ERR, match="labels|shape"):
        lc.region_max(x, labels.reshape(2, -1), 1)


def test_region_max_labels_out_of_range():
    x = vol3d()
    labels, num = lc.label(x)
    with pytest.raises(ERR, match="label|num_regions"):
        lc.region_max(x, labels * 5, 1)
    with pytest.raises(ERR, match="label|num_regions"):
        lc.region_max(x, -labels, 1)
    with pytest.raises(ERR, match="num_regions"):
        lc.region_max(x, labels, -1)


def test_mask_shape_mismatch():
    x = vol3d()
    with pytest.raises(ERR, match="mask"):
        lc.count_distribution(x, mask=torch.ones(2, 4, 5, 7, dtype=torch.bool))


# ------------------------------------------------------------------------------ scalars


@pytest.mark.parametrize("conn", [26, 18, 6, 5, 0, -4])
def test_bad_connectivity_2d(conn):
    with pytest.raises(ERR, match="connectivity"):
        lc.label(vol2d(), connectivity=conn)
    with pytest.raises(ERR, match="connectivity"):
        lc.count_distribution(vol2d(), connectivity=conn)


@pytest.mark.parametrize("conn", [4, 8, 5, 27, 0])
def test_bad_connectivity_3d(conn):
    with pytest.raises(ERR, match="connectivity"):
        lc.label(vol3d(), connectivity=conn)
    with pytest.raises(ERR, match="connectivity"):
        lc.count_distribution(vol3d(), connectivity=conn)
    with pytest.raises(ERR, match="connectivity"):
        lc.cc_count(vol3d(), connectivity=conn)


def test_negative_max_count():
    with pytest.raises(ERR, match="max_count"):
        lc.poisson_binomial(torch.rand(2, 3), max_count=-1)
    with pytest.raises(ERR, match="max_count"):
        lc.count_distribution(vol3d(), max_count=-1)
    with pytest.raises(ERR, match="max_count"):
        lc.CountLoss(max_count=-1)(vol3d(), torch.tensor([0, 1]))


def test_negative_min_size():
    with pytest.raises(ERR, match="min_size"):
        lc.label(vol3d(), min_size=-1)
    with pytest.raises(ERR, match="min_size"):
        lc.count_distribution(vol3d(), min_size=-2)
    with pytest.raises(ERR, match="min_size"):
        lc.cc_count(vol3d(), min_size=-1)


def test_bad_max_lesions():
    with pytest.raises(ERR, match="max_lesions"):
        lc.count_distribution(vol3d(), max_lesions=-1)


@pytest.mark.parametrize("threshold", [1.0, 1.5, -0.1, -1e-9, math.nan, math.inf])
def test_threshold_outside_unit_interval_for_probabilities(threshold):
    with pytest.raises(ERR, match="threshold"):
        lc.count_distribution(vol3d(), threshold=threshold)
    with pytest.raises(ERR, match="threshold"):
        lc.CountLoss(threshold=threshold)(vol3d(), torch.tensor([0, 1]))
    with pytest.raises(ERR, match="threshold"):
        lc.cc_count(vol3d(), threshold=threshold)


def test_threshold_zero_is_allowed():
    res = lc.count_distribution(vol3d(), threshold=0.0, max_count=2)
    assert res.num_lesions.tolist() == [1, 1]


def test_target_counts_shape_mismatch():
    with pytest.raises(ERR, match="target"):
        lc.CountLoss()(vol3d(), torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------ compiled ops


@requires_ops
def test_ops_direct_errors():
    ops = torch.ops.lesioncount
    with pytest.raises(RuntimeError, match="connectivity"):
        ops.label(vol2d(), 0.1, 26, 0)
    with pytest.raises(RuntimeError, match="connectivity"):
        ops.label(vol3d(), 0.1, 8, 0)
    with pytest.raises(RuntimeError, match="min_size"):
        ops.label(vol3d(), 0.1, 18, -1)
    with pytest.raises(RuntimeError, match="input"):
        ops.label(torch.zeros(2, 3), 0.1, 4, 0)
    x = vol3d()
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(RuntimeError, match="(?i)nan"):
        ops.label(x, 0.1, 18, 0)
    x = vol3d()
    labels, _ = ops.label(x, 0.1, 18, 0)
    with pytest.raises(RuntimeError, match="label|num_regions"):
        ops.region_max(x, labels * 3, 1)
    with pytest.raises(RuntimeError, match="labels|shape"):
        ops.region_max(x, labels[:, :-1].contiguous(), 1)
    with pytest.raises(RuntimeError, match="max_count"):
        ops.poisson_binomial(torch.rand(2, 3), -1, False, False)
    with pytest.raises(RuntimeError, match="probs"):
        ops.poisson_binomial(torch.tensor([[0.5, 1.5]]), 2, False, False)
    with pytest.raises(RuntimeError, match="(?i)probs|nan"):
        ops.poisson_binomial(torch.tensor([[0.5, math.nan]]), 2, True, False)
    with pytest.raises(RuntimeError, match="probs"):
        ops.poisson_binomial(torch.rand(3), 2, False, False)
