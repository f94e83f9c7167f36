"""Shared tester over every registered metric, plus Moments and registry unit tests.

For every metric in ``list_metrics()``: K batches through ``Moments.update`` equal the functional
value on all the data at once, equal the independent float64 NumPy reference
(tests/metric_reference.py), and ``merge`` of two halves equals the whole.
"""

from __future__ import annotations

import math

import metric_reference as ref
import numpy as np
import pytest
import torch

import vitspec.functional as F
from vitspec.errors import VitspecError
from vitspec.metrics import KINDS, MetricSpec, Moments, get_metric, list_metrics, register_metric

NUM_PREFIX, GRID = 2, (3, 5)
N_IMAGES, N_HEADS, N_ATTN = 12, 3, 30
BATCHES = [slice(0, 3), slice(3, 4), slice(4, 9), slice(9, 12)]  # uneven K = 4 batches


def data_for(spec: MetricSpec):
    """(args over all images, function of a slice -> args of that batch, reference values)."""
    g = torch.Generator().manual_seed(len(spec.name))
    if spec.kind.startswith("token"):
        n = NUM_PREFIX + GRID[0] * GRID[1]
        x = torch.randn(N_IMAGES, n, 6, generator=g, dtype=torch.float64) + 0.7
        want = ref.reference_tokens(spec.name, x, NUM_PREFIX, GRID)
        return (x, NUM_PREFIX, GRID), lambda s: (x[s], NUM_PREFIX, GRID), want
    shape = (N_IMAGES, N_HEADS, N_ATTN, N_ATTN)
    a = torch.softmax(2 * torch.randn(*shape, generator=g, dtype=torch.float64), -1)
    prev = torch.softmax(2 * torch.randn(*shape, generator=g, dtype=torch.float64), -1)
    want = ref.reference_attn(spec.name, a, prev)
    return (a, prev), lambda s: (a[s], prev[s]), want


def test_every_metric_has_reference():
    names = [m.name for m in list_metrics()]
    assert set(names) == set(ref.REFERENCE)


@pytest.mark.parametrize("spec", list_metrics(), ids=lambda s: s.name)
def test_streaming_matches_functional_and_reference(spec):
    whole_args, batch_args, want = data_for(spec)
    whole = spec.fn(*whole_args)
    assert whole.dtype == torch.float64
    assert whole.shape[0] == N_IMAGES
    np.testing.assert_allclose(whole.numpy(), want, rtol=1e-6, atol=1e-12)

    acc = Moments()
    for s in BATCHES:
        acc.update(spec.fn(*batch_args(s)))
    mean, std, n = acc.compute()
    assert n == N_IMAGES
    np.testing.assert_allclose(mean.numpy(), whole.numpy().mean(0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(std.numpy(), whole.numpy().std(0, ddof=1), rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(mean.numpy(), want.mean(0), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(std.numpy(), want.std(0, ddof=1), rtol=1e-5, atol=1e-12)

    first, second = Moments(), Moments()
    first.update(spec.fn(*batch_args(slice(0, 5))))
    second.update(spec.fn(*batch_args(slice(5, 8))))
    second.update(spec.fn(*batch_args(slice(8, 12))))
    first.merge(second)
    m2, s2, n2 = first.compute()
    assert n2 == N_IMAGES
    np.testing.assert_allclose(m2.numpy(), mean.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(s2.numpy(), std.numpy(), rtol=1e-10, atol=1e-15)


# ------------------------------------------------------------------------- Moments


def test_moments_no_cancellation_when_std_tiny():
    """Values 0.999 + 1e-9 * noise: sum / sum-of-squares would lose the std entirely."""
    g = torch.Generator().manual_seed(0)
    vals = 0.999 + 1e-9 * torch.randn(1000, generator=g, dtype=torch.float64)
    acc = Moments()
    for chunk in vals.split(7):
        acc.update(chunk)
    mean, std, n = acc.compute()
    assert n == 1000
    assert mean.item() == pytest.approx(vals.numpy().mean(), rel=1e-15)
    assert std.item() == pytest.approx(vals.numpy().std(ddof=1), rel=1e-6)


def test_moments_shapes_dtypes_and_single_value():
    acc = Moments()
    acc.update(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float16))
    mean, std, n = acc.compute()
    assert n == 1 and mean.dtype == torch.float64 and mean.tolist() == [1.0, 2.0, 3.0]
    assert torch.isnan(std).all()
    acc.update(torch.tensor([[3.0, 2.0, 1.0]]))
    mean, std, n = acc.compute()
    assert mean.tolist() == [2.0, 2.0, 2.0]
    np.testing.assert_allclose(std.numpy(), [math.sqrt(2), 0, math.sqrt(2)])
    with pytest.raises(VitspecError, match="shape"):
        acc.update(torch.zeros(2, 4))
    acc.update(torch.zeros(0, 3))  # empty batch: no-op
    assert acc.compute()[2] == 2


def test_moments_state_is_fixed_size():
    acc = Moments()
    acc.update(torch.randn(5, 4, 3))
    before = (acc.mean.shape, acc.m2.shape)
    for _ in range(20):
        acc.update(torch.randn(5, 4, 3))
    assert (acc.mean.shape, acc.m2.shape) == before == (torch.Size([4, 3]),) * 2
    assert acc.compute()[2] == 105


def test_moments_merge_edge_cases_and_reset():
    a, empty = Moments(), Moments()
    a.update(torch.tensor([1.0, 5.0]))
    a.merge(empty)
    assert a.compute()[2] == 2
    empty.merge(a)
    assert empty.compute()[0].item() == 3.0
    assert a.compute()[2] == 2  # other left unchanged
    a.reset()
    with pytest.raises(VitspecError):
        a.compute()
    with pytest.raises(VitspecError):
        a.merge([1, 2])


# ------------------------------------------------------------------------- registry


def test_registry_order_and_kinds():
    names = [m.name for m in list_metrics()]
    assert names == [
        "hc_dc_ratio",
        "hc_energy",
        "patch_cos_abs",
        "patch_cos",
        "rank_residual",
        "feat_var",
        "dlogamp_hf",
        "erank",
        "dlogamp",
        "attn_entropy",
        "attn_hc_gain",
        "attn_cross_layer_sim",
        "attn_cos",
        "attn_spectrum",
        "token_spectrum",
        "cls_dist_cos",
    ]
    assert [m.name for m in list_metrics(kind="token_curve")] == ["dlogamp", "token_spectrum"]
    assert [m.name for m in list_metrics("*spectrum")] == ["attn_spectrum", "token_spectrum"]
    assert list_metrics("nothing*") == []
    assert {m.kind for m in list_metrics()} == set(KINDS)
    assert [m.name for m in list_metrics() if m.needs_prev] == ["attn_cross_layer_sim"]
    for m in list_metrics():
        assert m.fn is getattr(F, m.name)
        assert m.formula and m.source


def test_get_metric_unknown_names_allowed():
    assert get_metric("erank").fn is F.erank
    with pytest.raises(VitspecError, match="hc_dc_ratio") as err:
        get_metric("hc_dc_ration")
    assert "did you mean 'hc_dc_ratio'" in str(err.value)
    with pytest.raises(VitspecError, match="token_curve"):
        list_metrics(kind="curve")


def test_register_metric_rejects_bad_kind_and_duplicates():
    with pytest.raises(VitspecError, match="kind"):
        register_metric("x_metric", "scalar", "f", "s")
    with pytest.raises(VitspecError, match="already registered"):
        register_metric("erank", "token", "f", "s")(lambda t, p, g: t)
    spec = get_metric("erank")
    register_metric("erank", "token", spec.formula, spec.source)(F.erank)  # idempotent
    assert get_metric("erank") == spec
