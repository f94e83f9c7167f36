"""Attention metrics vs independent NumPy references (tests/metric_reference.py) and hand cases."""

from __future__ import annotations

import math

import metric_reference as ref
import numpy as np
import pytest
import torch

import vitspec.functional as F
from vitspec.errors import VitspecError
from vitspec.functional import linalg

NAMES = ["attn_entropy", "attn_hc_gain", "attn_cross_layer_sim", "attn_cos", "attn_spectrum"]


@pytest.fixture(scope="module")
def deit():
    """Random-init DeiT-tiny attention, [12, 3, 3, 65, 65] float32 (layers, images, heads)."""
    attn, _ = ref.deit_attention(batch=3)
    return attn


@pytest.fixture
def exact_calls(monkeypatch):
    """Count the matrices sent to the exact-SVD fallback of the fast attn_hc_gain."""
    calls = []
    orig = linalg.top_singular_value_exact

    def spy(m):
        calls.append(m.reshape(-1, *m.shape[-2:]).shape[0])
        return orig(m)

    monkeypatch.setattr(linalg, "top_singular_value_exact", spy)
    return calls


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n,scale", [(5, 1.0), (16, 3.0), (30, 0.5), (30, 10.0)])
def test_matches_reference(name, n, scale):
    a = ref.softmax_attention((2, 3, n, n), scale, seed=n)
    prev = ref.softmax_attention((2, 3, n, n), scale, seed=n + 1)
    got = getattr(F, name)(a, prev)
    assert got.dtype == torch.float64
    want = ref.reference_attn(name, a, prev)
    assert got.shape == want.shape
    rtol = 1e-6 if name == "attn_hc_gain" else 1e-10
    np.testing.assert_allclose(got.numpy(), want, rtol=rtol, atol=1e-13)


@pytest.mark.parametrize("name", NAMES)
def test_float32_path_on_deit_attention(name, deit):
    """float32 computation vs the float64 reference on realistic near-uniform attention."""
    for layer in (0, 6, 11):
        a, prev = deit[layer], deit[layer - 1]
        got = getattr(F, name)(a, prev).numpy()
        want = ref.reference_attn(name, a, prev)
        np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_float32_path_on_peaked_attention(name):
    a = ref.softmax_attention((2, 2, 40, 40), 10.0, seed=1).float()
    prev = ref.softmax_attention((2, 2, 40, 40), 3.0, seed=2).float()
    got = getattr(F, name)(a, prev).numpy()
    want = ref.reference_attn(name, a, prev)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_uniform_attention():
    n = 40
    a = torch.full((2, 3, n, n), 1.0 / n)
    np.testing.assert_allclose(F.attn_entropy(a).numpy(), math.log(n), rtol=1e-6)
    np.testing.assert_allclose(F.attn_hc_gain(a).numpy(), 0.0, atol=1e-7)
    np.testing.assert_allclose(F.hc_gain_exact(a).numpy(), 0.0, atol=1e-7)
    np.testing.assert_allclose(F.attn_cos(a).numpy(), 1.0, rtol=1e-6)
    spec = F.attn_spectrum(a)
    assert spec.shape == (2, 3, n)
    np.testing.assert_allclose(spec[..., 0].numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(spec[..., 1:].numpy(), 0.0, atol=1e-6)


@pytest.mark.parametrize("n", [7, 40])
def test_identity_attention(n):
    a = torch.eye(n, dtype=torch.float64).expand(1, 2, n, n)
    assert F.attn_entropy(a).abs().max().item() == 0.0
    np.testing.assert_allclose(F.attn_hc_gain(a).numpy(), 1.0, rtol=1e-10)
    np.testing.assert_allclose(F.hc_gain_exact(a).numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(F.attn_cos(a).numpy(), 1.0 / n, rtol=1e-12)  # only i == j
    np.testing.assert_allclose(F.attn_spectrum(a).numpy(), 1.0, rtol=1e-12)  # F I F^H = I


def test_spectrum_dc():
    """S[0, 0] = 1 for row-stochastic A, so the k=0 row norm is >= 1, = 1 when the column sums
    are equal too (doubly stochastic: here a permutation mixed with uniform)."""
    a = ref.softmax_attention((2, 2, 33, 33), 2.0, seed=4)
    f = ref.dft(33)
    s00 = np.einsum("k,bhkj,j->bh", f[0], a.numpy(), f[0].conj())
    np.testing.assert_allclose(s00, 1.0, rtol=1e-12)
    assert (F.attn_spectrum(a)[..., 0] >= 1 - 1e-12).all()
    perm = torch.eye(33, dtype=torch.float64)[torch.randperm(33)]
    doubly = (0.7 * perm + 0.3 / 33).expand(1, 1, 33, 33)
    assert F.attn_spectrum(doubly)[0, 0, 0].item() == pytest.approx(1.0, rel=1e-12)


def test_spectrum_symmetry_even_and_odd():
    for n in (8, 9):
        a = ref.softmax_attention((1, 1, n, n), 1.0, seed=n)
        got = F.attn_spectrum(a).numpy()[0, 0]
        np.testing.assert_allclose(got[1:], got[1:][::-1], rtol=1e-12)  # |row k| = |row N-k|
        np.testing.assert_allclose(got, ref.attn_spectrum(a.numpy()[0, 0], None), rtol=1e-12)


def test_attn_cos_negative_entries_use_explicit_gram():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 2, 12, 12, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(F.attn_cos(a).numpy(), ref.reference_attn("attn_cos", a), rtol=1e-10)


def test_cross_layer_sim():
    a = ref.softmax_attention((2, 2, 10, 10), 1.0, seed=0)
    np.testing.assert_allclose(F.attn_cross_layer_sim(a, a).numpy(), 1.0, rtol=1e-12)
    with pytest.raises(VitspecError, match="prev"):
        F.attn_cross_layer_sim(a, None)
    with pytest.raises(VitspecError, match="shape"):
        F.attn_cross_layer_sim(a, a[:, :1])


def test_is_row_stochastic():
    a = ref.softmax_attention((2, 2, 10, 10), 1.0, seed=0)
    assert F.is_row_stochastic(a)
    assert F.is_row_stochastic(a.float())
    assert not F.is_row_stochastic(a * 1.01)
    assert F.is_row_stochastic(a * (1 + 1e-6))
    b = a.clone()
    b[0, 0, 0, :2] = torch.tensor([-0.1, b[0, 0, 0, 0] + b[0, 0, 0, 1] + 0.1])
    assert b[0, 0, 0].sum().item() == pytest.approx(1.0)
    assert not F.is_row_stochastic(b)
    b[0, 0, 0, 0] = math.nan
    assert not F.is_row_stochastic(b)


def test_bad_shape_raises():
    with pytest.raises(VitspecError, match=r"\[B, H, N, N\]"):
        F.attn_entropy(torch.zeros(2, 3, 4, 5))


# ------------------------------------------------------------------ fast attn_hc_gain accuracy


def _rel_err(fast, exact):
    return ((fast - exact).abs() / exact).max().item()


def test_hc_gain_fast_on_deit(deit, exact_calls):
    a = deit.flatten(0, 1)  # [36, 3, 65, 65] float32
    fast = F.attn_hc_gain(a)
    assert exact_calls == []  # converged without the exact fallback
    assert _rel_err(fast, F.hc_gain_exact(a)) < 1e-6


@pytest.mark.parametrize("n", [50, 197])
def test_hc_gain_fast_on_synthetic(n, exact_calls):
    """Near-uniform (clustered top singular values), peaked and mixed attention, float32."""
    scales = torch.tensor([0.1, 1.0, 3.0, 10.0], dtype=torch.float64)[:, None, None, None]
    g = torch.Generator().manual_seed(n)
    a = torch.softmax(scales * torch.randn(4, 2, n, n, generator=g, dtype=torch.float64), -1)
    a = a.float()
    fast = F.attn_hc_gain(a)
    assert exact_calls == []
    assert _rel_err(fast, F.hc_gain_exact(a)) < 1e-6


def test_hc_gain_fallback_is_exact(exact_calls):
    a = ref.softmax_attention((2, 2, 50, 50), 0.1, seed=3)
    m = F.double_centre(a)
    got = linalg.top_singular_value(m, max_steps=3, min_steps=1, check_every=1)
    assert sum(exact_calls) == 4  # none converged in 3 steps: all recomputed exactly
    np.testing.assert_allclose(got.numpy(), F.hc_gain_exact(a).numpy(), rtol=1e-12)


def test_hc_gain_not_row_stochastic():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 2, 30, 30, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(
        F.attn_hc_gain(a).numpy(), ref.reference_attn("attn_hc_gain", a), rtol=1e-6
    )


def test_hc_gain_bounds_hc_amplification():
    """The contract's defining inequality: ||HC[A Z]||_F <= gain * ||HC[Z]||_F, tight for the top
    right singular vector of (I-J)A(I-J)."""
    a = ref.softmax_attention((1, 1, 30, 30), 3.0, seed=9)[0, 0]
    gain = F.attn_hc_gain(a[None, None]).item()
    c = torch.eye(30, dtype=torch.float64) - 1 / 30
    z = torch.randn(30, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert (c @ a @ z).norm() <= gain * (c @ z).norm() + 1e-12
    v = torch.linalg.svd(c @ a @ c).Vh[0]
    assert (c @ a @ v).norm().item() == pytest.approx(gain, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_reference(name):
    a = ref.softmax_attention((2, 3, 65, 65), 1.0, seed=0).float()
    prev = ref.softmax_attention((2, 3, 65, 65), 1.0, seed=1).float()
    got = getattr(F, name)(a.cuda(), prev.cuda())
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), ref.reference_attn(name, a, prev), rtol=1e-5)
