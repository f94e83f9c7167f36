"""O(N^2)-per-step attn_hc_gain, FFT attn_spectrum and certified brackets at ViT sizes (N = 197,
1370) against float64 NumPy SVD and explicit DFT-matrix references."""

from __future__ import annotations

import metric_reference as ref
import numpy as np
import pandas as pd
import pytest
import torch

import vitspec.functional as F
from vitspec.functional import linalg
from vitspec.verification import checks as ck


def _attention(n: int, heads: int, scale: float, seed: int) -> torch.Tensor:
    return ref.softmax_attention((1, heads, n, n), scale, seed=seed).float()


def _numpy_hc_gain(a: np.ndarray) -> float:
    c = ref.centring(len(a))
    return float(np.linalg.svd(c @ a.astype(np.float64) @ c, compute_uv=False)[0])


@pytest.mark.parametrize("n,heads", [(197, 4), (1370, 1)])
def test_hc_gain_against_numpy_svd(n, heads):
    a = _attention(n, heads, 2.0, seed=n)
    got = F.attn_hc_gain(a)[0].numpy()
    want = [_numpy_hc_gain(a[0, h].numpy()) for h in range(heads)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_hc_gain_touches_only_matrix_vector_products(monkeypatch):
    """No N x N x N product: every matmul of the Lanczos has a vector (or a few) on one side."""
    seen = []
    orig = torch.Tensor.__matmul__

    def spy(x, y):
        seen.append((tuple(x.shape[-2:]), tuple(y.shape[-2:])))
        return orig(x, y)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    F.attn_hc_gain(_attention(300, 2, 1.0, seed=1))
    assert seen
    assert all(min(*x, *y) < 300 for x, y in seen)


@pytest.mark.parametrize("n", [197, 1370])
def test_spectrum_against_explicit_dft(n):
    a = _attention(n, 2, 1.0, seed=n + 1)
    got = F.attn_spectrum(a)[0].numpy()
    f = ref.dft(n)
    for h in range(2):
        fa = f @ a[0, h].numpy().astype(np.float64)
        # the full definition at N = 197; at 1370 row k of F A F^H has the norm of row k of F A
        s = fa @ f.conj().T if n < 500 else fa
        np.testing.assert_allclose(got[h], np.linalg.norm(s, axis=1), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("centre", [True, False])
@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_bracket_contains_the_svd_value(centre, scale):
    """Both certificates: the O(N^2) trace test (uncentred near-uniform maps) and Cholesky."""
    a = ref.softmax_attention((3, 300, 300), scale, seed=7)
    lo, hi = linalg.top_singular_bracket(a, centre=centre).unbind(-1)
    m = F.double_centre(a) if centre else a
    exact = torch.from_numpy(np.linalg.svd(m.numpy(), compute_uv=False)[:, 0])
    assert (lo <= exact * (1 + 1e-15)).all() and (exact <= hi * (1 + 1e-15)).all()
    assert (hi / lo - 1 <= 1e-9).all()
    cheap_lo, cheap_hi = linalg.top_singular_bracket(a, centre=centre, certify=False).unbind(-1)
    assert (cheap_lo <= exact * (1 + 1e-15)).all() and (exact <= cheap_hi * (1 + 1e-15)).all()


def test_bracket_falls_back_to_svd_when_not_certified(monkeypatch):
    calls = []
    orig = linalg.top_singular_value_exact
    monkeypatch.setattr(
        linalg, "top_singular_value_exact", lambda m: calls.append(len(m)) or orig(m)
    )
    a = ref.softmax_attention((2, 64, 64), 1.0, seed=3)
    b = linalg.top_singular_bracket(a, centre=True, max_steps=2)  # too few steps to converge
    assert calls == [2]
    assert (b[:, 0] == b[:, 1]).all()
    np.testing.assert_allclose(b[:, 0].numpy(), F.hc_gain_exact(a[None])[0].numpy(), rtol=1e-14)


def test_verify_checks_decide_the_same_with_brackets(monkeypatch):
    """Above BRACKET_MIN_N the checks use brackets; their verdicts equal the exact SVD path's."""
    n = ck.BRACKET_MIN_N + 4
    a_hat = ck.renormalise(ref.softmax_attention((1, 3, n, n), 2.0, seed=5))
    s_lo, s_hi = ck.hc_gain_bracket(a_hat).unbind(-1)
    exact = ck.hc_gain(a_hat)
    assert (s_lo <= exact).all() and (exact <= s_hi).all()
    got, norm, bound, _ = ck.check_logit_bound(a_hat, s_lo, s_a_hi=s_hi)
    scaled = [ck.check_attnscale_gain(a_hat, s_lo, norm, w) for w in ck.ATTNSCALE_W]
    monkeypatch.setattr(ck, "BRACKET_MIN_N", 10**9)  # the exact SVD path
    want, norm_exact, bound_exact, _ = ck.check_logit_bound(a_hat, exact)
    np.testing.assert_allclose(norm.numpy(), norm_exact.numpy(), rtol=1e-9)
    assert torch.equal(got.violated, want.violated) and torch.equal(bound, bound_exact)
    for w, out in zip(ck.ATTNSCALE_W, scaled):
        exact_out = ck.check_attnscale_gain(a_hat, exact, norm_exact, w)
        assert torch.equal(out.violated, exact_out.violated)
        assert (out.slack < 1e-3).all()  # Weyl's bound is round-off small


def test_verify_model_with_brackets_equals_the_exact_path(monkeypatch):
    """A model with N = 257 tokens: verify's verdicts and s_a with brackets = the exact path."""
    import timm

    from vitspec.verification import verify

    def run():
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224",
            img_size=128,
            patch_size=8,
            depth=2,
            embed_dim=48,
            num_heads=2,
        ).eval()
        images = [torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))]
        return verify(model, images=images, device="cpu", warn=lambda m: None, max_steps=32)

    fast = run()
    monkeypatch.setattr(ck, "BRACKET_MIN_N", 10**9)
    exact = run()
    assert fast.info["tokens"] == 257
    cols = ["check", "layer", "head", "status", "cases", "violations"]
    pd.testing.assert_frame_equal(fast.table[cols], exact.table[cols])
    np.testing.assert_allclose(
        fast.figure_data["gains"]["s_a"], exact.figure_data["gains"]["s_a"], rtol=1e-9
    )


def test_hc_gain_finds_the_top_of_a_cluster_on_deit():
    """Every map of a random-init DeiT-S forward pass (N = 197, near-uniform attention whose top
    singular values cluster) against the float64 SVD. With a residual tolerance of 1e-3 the
    Lanczos stopped on the second singular value of image 8, layer 6, head 5 (0.6 % low)."""
    import timm

    from vitspec.adapters import get_adapter
    from vitspec.capture import capture
    from vitspec.inputs import synthetic_batches

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    images = next(iter(synthetic_batches(16, 16, (224, 224), seed=0)))[8:10]
    maps = []
    with (
        torch.inference_mode(),
        capture(get_adapter(model), {"pattern"}, lambda s, n, x: maps.append(x.clone())),
    ):
        model(images)
    a = torch.stack(maps).flatten(0, 2)  # [12 * 2 * 6, 197, 197]
    got = linalg.top_singular_value(a, centre=True)
    want = linalg.top_singular_value_exact(F.double_centre(a.double()))
    assert ((got - want).abs() / want).max().item() < 1e-6
