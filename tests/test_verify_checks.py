"""vitspec verify's check functions against explicit NumPy references, hand cases and planted
violations (a non-stochastic matrix, a wrong bound)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitspec.functional import attn_hc_gain
from vitspec.verification import checks as ck
from vitspec.verification.synthetic import logit_families
from vitspec.verification.trajectory import STOP_RATIO, Trajectory, lowpass

F64 = torch.float64


def softmax_mats(count: int, n: int, width: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return ((torch.rand(count, n, n, generator=gen, dtype=F64) * 2 - 1) * width).softmax(-1)


def np_hc_gain(a: np.ndarray) -> float:
    """Independent reference: explicit I - J matrices and a full NumPy SVD."""
    n = a.shape[0]
    c = np.eye(n) - np.full((n, n), 1 / n)
    return float(np.linalg.svd(c @ a @ c, compute_uv=False)[0])


def test_hc_gain_is_the_exact_svd_and_analyze_agrees():
    a = softmax_mats(6, 40, 3.0)
    s = ck.hc_gain(a)
    ref = np.array([np_hc_gain(m) for m in a.numpy()])
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-12)
    fast = attn_hc_gain(a.float()[None])[0]
    np.testing.assert_allclose(fast.numpy(), ref, rtol=1e-3)


def test_row_stochastic_premise_and_planted_violations():
    a = softmax_mats(3, 10, 2.0).float()
    assert not ck.check_row_stochastic(a).violated.any()
    scaled = a.clone()
    scaled[1] *= 1.1  # rows sum to 1.1
    out = ck.check_row_stochastic(scaled)
    assert out.violated.tolist() == [False, True, False]
    assert out.slack[1] == pytest.approx(0.1 / ck.PREMISE_TOL, rel=1e-5)
    negative = torch.eye(3, dtype=F64)[None].clone()
    negative[0, 0, :2] = torch.tensor([1.2, -0.2], dtype=F64)  # rows sum to 1, one entry < 0
    out = ck.check_row_stochastic(negative)
    assert out.violated.all() and out.slack.item() == pytest.approx(0.2 / ck.PREMISE_TOL)
    nan = a.clone()
    nan[2, 0, 0] = float("nan")
    assert ck.check_row_stochastic(nan).violated[2]


def test_dc_passthrough():
    a = softmax_mats(4, 12, 1.0)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    assert not ck.check_dc_passthrough(a, c).violated.any()
    assert ck.check_dc_passthrough(a * 1.001, c).violated.all()


def test_hc_contraction_holds_is_attained_and_catches_wrong_bounds():
    a = softmax_mats(5, 30, 4.0)
    s = ck.hc_gain(a)
    z = torch.randn(5, 30, 6, dtype=F64)
    out = ck.check_hc_contraction(a, z, s)
    assert not out.violated.any() and (out.slack < 1).all()
    # the top right singular vector of (I-J) A (I-J) attains the bound exactly
    m = torch.from_numpy(np.stack([np.eye(30) - 1 / 30] * 5)) @ a
    m = m @ (torch.eye(30, dtype=F64) - 1 / 30)
    v = torch.linalg.svd(m).Vh[:, :1, :].mT
    tight = ck.check_hc_contraction(a, v, s)
    assert not tight.violated.any()
    np.testing.assert_allclose(tight.slack.numpy(), 1.0, atol=1e-12)
    assert ck.check_hc_contraction(a, v, s * (1 - 1e-7)).violated.all()  # a wrong bound
    # without the premise the bound fails: a non-stochastic matrix leaks DC into HC
    bent = a.clone()
    bent[:, :, 0] *= 1.5
    assert ck.check_hc_contraction(bent, z + 1000.0, ck.hc_gain(bent)).violated.all()


def test_uniform_attention_round_off_is_not_a_violation():
    a = torch.full((2, 197, 197), 1 / 197, dtype=F64)
    s = ck.hc_gain(a)
    assert (s < 1e-14).all()
    assert not ck.check_hc_contraction(a, torch.randn(2, 197, 4, dtype=F64), s).violated.any()
    assert not lowpass(a, torch.randn(2, 197, 4, dtype=F64), s).outcome.violated.any()


def test_lowpass_matches_explicit_powers_and_fits_the_rate():
    lam, n = 0.7, 9  # A = (1 - lam) J + lam I: HC scales by lam per step, DC is unchanged
    a = ((1 - lam) / n + lam * torch.eye(n, dtype=F64))[None]
    z = torch.randn(1, n, 2, dtype=F64)
    short = lowpass(a, z, ck.hc_gain(a), max_steps=20)
    np.testing.assert_allclose(short.outcome.slack.numpy(), 1.0, rtol=1e-12)  # tight bound
    res = lowpass(a, z, ck.hc_gain(a), max_steps=512)
    assert not res.outcome.violated.any()
    np.testing.assert_allclose(res.rate.numpy(), lam, rtol=1e-6)
    r0 = (z - z.mean(-2, keepdim=True)).norm(dim=-2) / (z.mean(-2).abs() * math.sqrt(n))
    assert (res.steps == res.r.isfinite().sum(-1)).all()
    expected = r0[..., None] * lam ** torch.arange(1, 6, dtype=F64)
    np.testing.assert_allclose(res.r[..., :5].numpy(), expected.numpy(), rtol=1e-10)
    last = res.r.gather(-1, (res.steps - 1)[..., None])[..., 0]
    assert (last < STOP_RATIO).all() and (res.steps < 512).all()

    b = softmax_mats(3, 16, 2.0, seed=3)
    zb = torch.randn(3, 16, 3, dtype=F64)
    res = lowpass(b, zb, ck.hc_gain(b), max_steps=4)
    an = np.linalg.matrix_power(b.numpy(), 3)
    w = an @ zb.numpy()
    hc = np.linalg.norm(w - w.mean(1, keepdims=True), axis=1)
    dc = np.abs(w.mean(1)) * math.sqrt(16)
    np.testing.assert_allclose(res.r[..., 2].numpy(), hc / dc, rtol=1e-9)
    assert lowpass(b, zb, ck.hc_gain(b) * 0.1, max_steps=4).outcome.violated.all()


def test_slowly_mixing_matrices_stop_at_max_steps_and_pass():
    gen = torch.Generator().manual_seed(0)
    a = logit_families("two-cluster", 16, 12.0, 2, gen).softmax(-1)
    s = ck.hc_gain(a)
    assert (s > 1).all()  # a low-pass filter whose one-step HC gain exceeds 1
    res = lowpass(a, torch.randn(2, 16, 2, dtype=F64), s, max_steps=50)
    assert (res.steps == 50).all() and not res.outcome.violated.any()


def test_logit_bound_formula_derivation_and_counterexample():
    assert ck.logit_bound(16, torch.tensor([0.0, math.inf], dtype=F64)).tolist() == [1.0, 4.0]
    a = torch.tensor(3.0, dtype=F64)
    assert ck.logit_bound(197, a) == pytest.approx(
        math.sqrt(197 * math.exp(6) / (math.exp(6) + 196)), rel=1e-14
    )
    for family in ("uniform", "peaked", "shared", "two-cluster"):
        p = logit_families(family, 24, 2.5, 3, torch.Generator().manual_seed(1))
        mats = p.softmax(-1)
        half = ((p.amax(-1) - p.amin(-1)) / 2).amax(-1)
        np.testing.assert_allclose(ck.logit_half_width(mats).numpy(), half.numpy(), atol=1e-12)
        out, norm, bound, _ = ck.check_logit_bound(mats, ck.hc_gain(mats))
        assert not out.violated.any(), family
    # a must bound EVERY row: with the mean half-width the "bound" fails (docs/verify.md)
    n, k, width = 197, 20, 6.0
    p = torch.zeros(n, n, dtype=F64)
    p[:k] = -width
    p[:k, 0] = width
    m = p.softmax(-1)
    rows = (p.amax(-1) - p.amin(-1)) / 2
    norm = torch.linalg.matrix_norm(m, 2)
    assert norm > ck.logit_bound(n, rows.mean()) * 2  # 4.47 > 1.83
    assert norm <= ck.logit_bound(n, rows.max())
    out, *_ = ck.check_logit_bound(m[None], ck.hc_gain(m[None]))
    assert not out.violated.any()


def test_logit_bound_check_catches_a_planted_wrong_bound(monkeypatch):
    mats = logit_families("shared", 16, 4.0, 2, torch.Generator().manual_seed(0)).softmax(-1)
    real = ck.logit_bound
    monkeypatch.setattr(ck, "logit_bound", lambda n, a: real(n, a) * 0.5)
    out, *_ = ck.check_logit_bound(mats, ck.hc_gain(mats))
    assert out.violated.all() and (out.slack > 1).all()


def test_msa_bound_against_an_explicit_reference():
    gen = torch.Generator().manual_seed(2)
    n, c, d, heads = 12, 10, 4, 3
    a = softmax_mats(heads, n, 2.0, seed=4)[None]
    w_v = torch.randn(heads, c, d, generator=gen, dtype=F64)
    w_o = torch.randn(heads, d, c, generator=gen, dtype=F64)
    x = torch.randn(1, n, c, generator=gen, dtype=F64)
    y = torch.randn(1, n, c, generator=gen, dtype=F64)
    msa = sum(a[0, h] @ y[0] @ w_v[h] @ w_o[h] for h in range(heads))[None]
    norms = ck.head_weight_norms(w_v, w_o)
    ref = [np.linalg.norm((w_v[h] @ w_o[h]).numpy(), 2) for h in range(heads)]
    np.testing.assert_allclose(norms.numpy(), ref, rtol=1e-12)
    s = ck.hc_gain(a)
    res = ck.check_msa_bound(x, y, msa, s, norms, torch.ones(1))
    assert not res.branch.violated.any() and not res.residual.violated.any()
    hc = lambda t: np.linalg.norm(t - t.mean(0))  # noqa: E731
    gain = hc(msa[0].numpy()) / hc(y[0].numpy())
    assert res.gain.item() == pytest.approx(gain, rel=1e-12)
    assert res.bound.item() == pytest.approx(float((s[0].numpy() * ref).sum()), rel=1e-12)
    bad = ck.check_msa_bound(x, y, msa, s, norms * 1e-3, torch.ones(1))  # a wrong bound
    assert bad.branch.violated.all()


def test_attnscale_gain_identity():
    a = softmax_mats(4, 20, 3.0)
    s = ck.hc_gain(a)
    norm = torch.linalg.svdvals(a)[:, 0]
    for w in ck.ATTNSCALE_W:
        out = ck.check_attnscale_gain(a, s, norm, w)
        assert not out.violated.any(), w
        assert (ck.attnscale(a, w).sum(-1) - 1).abs().max() < 1e-12
    off = a.clone()
    off[:, 0] *= 1.01  # row 0 sums to 1.01: A' rows no longer sum to 1
    assert ck.check_attnscale_gain(off, ck.hc_gain(off), norm, 1.0).violated.all()


def test_trajectory_products_hold_and_catch_a_wrong_gain():
    mats = softmax_mats(6, 16, 3.0, seed=5)
    s = ck.hc_gain(mats)
    tr = Trajectory(torch.randn(16, 3, dtype=F64))
    bad = Trajectory(tr.w.clone())
    for i in range(6):
        _, _, out = tr.step(mats[i], s[i])
        assert not out.violated.any()
        _, _, out_bad = bad.step(mats[i], s[i] * 0.1)
    assert out_bad.violated.all()


def test_one_plus_msa_bound_is_not_a_rate_with_layernorm():
    """Counter-example in docs/verify.md: Y = LayerNorm(X) undoes the scale of X, so the block
    rate ||HC[X + MSA(Y)]|| / ||HC[X]|| exceeds 1 + B, while the checked residual form holds."""
    gen = torch.Generator().manual_seed(0)
    n, c, d, heads = 16, 8, 4, 2
    x = 1e-2 * torch.randn(1, n, c, generator=gen, dtype=F64)
    y = torch.nn.functional.layer_norm(x, (c,))
    a = softmax_mats(heads, n, 3.0, seed=1)[None]
    w_v = torch.randn(heads, c, d, generator=gen, dtype=F64) / 2
    w_o = torch.randn(heads, d, c, generator=gen, dtype=F64) / 2
    msa = torch.einsum("bhnd,hdc->bnc", a @ torch.einsum("bnc,hcd->bhnd", y, w_v), w_o)
    res = ck.check_msa_bound(
        x, y, msa, ck.hc_gain(a), ck.head_weight_norms(w_v, w_o), torch.ones(1)
    )
    assert not res.branch.violated.any() and not res.residual.violated.any()
    assert res.rate.item() > 10 * (1 + res.bound.item())
