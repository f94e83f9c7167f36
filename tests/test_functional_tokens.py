"""Token metrics vs independent NumPy references (tests/metric_reference.py) and hand cases."""

from __future__ import annotations

import math

import metric_reference as ref
import numpy as np
import pytest
import torch

import vitspec.functional as F
from vitspec.errors import VitspecError

SCALAR = [
    "hc_dc_ratio",
    "hc_energy",
    "patch_cos_abs",
    "patch_cos",
    "rank_residual",
    "feat_var",
    "dlogamp_hf",
    "erank",
]
CURVES = ["dlogamp", "token_spectrum"]
CASES = [((3, 5), 0), ((3, 5), 1), ((5, 3), 2), ((4, 4), 1), ((2, 7), 2), ((6, 6), 0)]


def random_tokens(b, n, c, seed, offset=0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    x = x + offset * torch.randn(1, 1, c, generator=g, dtype=torch.float64)  # shared DC part
    return x.to(dtype)


@pytest.mark.parametrize("name", SCALAR + CURVES)
@pytest.mark.parametrize("grid,num_prefix", CASES)
def test_matches_reference(name, grid, num_prefix):
    n = num_prefix + grid[0] * grid[1]
    x = random_tokens(3, n, 7, seed=hash((name, grid, num_prefix)) % 1000)
    got = getattr(F, name)(x, num_prefix, grid)
    assert got.dtype == torch.float64
    want = ref.reference_tokens(name, x, num_prefix, grid)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", SCALAR + CURVES)
def test_float32_input_matches_float64_reference(name):
    """float32 tokens (incl. nearly collapsed ones, where cancellation would bite) vs the float64
    reference on the same values: the float32 Gram of patch_cos_abs must stay within 1e-5."""
    grid, num_prefix = (4, 4), 1
    for offset in (0.3, 30.0):  # mean |cos| ~0.1 and ~0.999
        x = random_tokens(4, 17, 64, seed=7, offset=offset, dtype=torch.float32)
        got = getattr(F, name)(x, num_prefix, grid)
        want = ref.reference_tokens(name, x, num_prefix, grid)
        atol = 1e-9 if name.startswith("dlogamp") else 0  # dlogamp starts at exactly 0
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=atol)


def test_patch_cos_abs_float32_on_deit_tokens():
    _, tokens = ref.deit_attention(batch=2)
    for x in tokens[[0, 5, 11]]:  # [B, 65, 192] float32 block outputs
        got = F.patch_cos_abs(x, 1, (8, 8)).numpy()
        want = ref.reference_tokens("patch_cos_abs", x, 1, (8, 8))
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_identical_tokens():
    x = torch.tensor([1.0, -2.0, 3.0]).expand(2, 7, 3).clone()  # P=1, grid (2, 3)
    args = (1, (2, 3))
    assert F.hc_dc_ratio(x, *args).tolist() == [0.0, 0.0]
    assert F.hc_energy(x, *args).tolist() == [0.0, 0.0]
    assert F.rank_residual(x, *args).tolist() == [0.0, 0.0]
    assert F.feat_var(x, *args).tolist() == [0.0, 0.0]
    np.testing.assert_allclose(F.patch_cos_abs(x, *args).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(F.patch_cos(x, *args).numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(F.token_spectrum(x, *args).numpy(), [[1] + [0] * 6] * 2, atol=1e-15)
    assert torch.isnan(F.erank(x, *args)).all()


def test_hand_cases():
    # two tokens +v, -v: zero mean, all energy in HC; cos = -1
    x = torch.tensor([[[3.0, 4.0], [-3.0, -4.0]]])
    assert F.hc_energy(x, 0, (1, 2)).item() == 1.0
    assert F.hc_dc_ratio(x, 0, (1, 2)).item() == math.inf
    assert F.patch_cos(x, 0, (1, 2)).item() == pytest.approx(-1.0)
    assert F.patch_cos_abs(x, 0, (1, 2)).item() == pytest.approx(1.0)
    # mean(var[3, -3] = 18, var[4, -4] = 32)
    assert F.feat_var(x, 0, (1, 2)).item() == pytest.approx(25.0)
    # orthonormal patch tokens: every cosine 0; prefix token ignored
    x = torch.cat([torch.full((1, 1, 4), 5.0), torch.eye(4)[None]], dim=1)
    assert F.patch_cos(x, 1, (2, 2)).item() == pytest.approx(0.0, abs=1e-15)
    assert F.patch_cos_abs(x, 1, (2, 2)).item() == pytest.approx(0.0, abs=1e-7)
    # HC with k equal singular values has effective rank k
    x = torch.tensor([[[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]])
    assert F.erank(x, 0, (2, 3)).item() == pytest.approx(3.0, rel=1e-12)
    # rank_residual by hand: X = [[1, 0], [0, 1]]: n13(X) = 1; X - mean = +-0.5 -> n13 = 1
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert F.rank_residual(x, 0, (1, 2)).item() == pytest.approx(1.0)


def test_dlogamp_constant_grid():
    """A constant c on an h x h grid: fft2 is h*h*c at DC and 0 elsewhere."""
    h, c = 4, 2.0
    x = torch.full((1, 1 + h * h, 3), c)
    got = F.dlogamp(x, 1, (h, h))[0]
    want = math.log(1e-6) - math.log(h * h * c + 1e-6)
    # K = 4 - 4 // 2; the explicit DFT leaves ~1e-15 of round-off in the zero bins, which moves
    # log(|z| + 1e-6) by ~1e-9 of its 1e-6 floor
    np.testing.assert_allclose(got.numpy(), [0.0, want], rtol=1e-10)
    assert F.dlogamp_hf(x, 1, (h, h)).item() == pytest.approx(want)


def test_curve_identities():
    x = random_tokens(3, 22, 5, seed=3)  # P=2, grid (4, 5)
    spec = F.token_spectrum(x, 2, (4, 5))
    np.testing.assert_allclose(spec.sum(-1).numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(
        (1 - spec[:, 0]).numpy(), F.hc_energy(x, 2, (4, 5)).numpy(), rtol=1e-10
    )
    curve = F.dlogamp(x, 2, (4, 5))
    assert curve.shape == (3, 4 - 2)
    assert (curve[:, 0] == 0).all()
    assert torch.equal(F.dlogamp_hf(x, 2, (4, 5)), curve[:, -1])


def test_patch_order_matters_for_dlogamp_only():
    x = random_tokens(2, 17, 4, seed=5)
    perm = torch.cat(
        [torch.tensor([0]), 1 + torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    )
    y = x[:, perm]
    for name in ["hc_energy", "patch_cos_abs", "feat_var", "erank"]:
        fn = getattr(F, name)
        np.testing.assert_allclose(fn(x, 1, (4, 4)).numpy(), fn(y, 1, (4, 4)).numpy(), rtol=1e-6)
    assert not torch.allclose(F.dlogamp(x, 1, (4, 4)), F.dlogamp(y, 1, (4, 4)))


@pytest.mark.parametrize(
    "bad",
    [
        {"tokens": torch.zeros(2, 10, 3), "num_prefix": 1, "grid": (3, 4)},  # N mismatch
        {"tokens": torch.zeros(10, 3), "num_prefix": 1, "grid": (3, 3)},  # not [B, N, C]
        {"tokens": torch.zeros(2, 10, 3, dtype=torch.long), "num_prefix": 1, "grid": (3, 3)},
    ],
)
def test_bad_input_raises(bad):
    with pytest.raises(VitspecError):
        F.hc_energy(bad["tokens"], bad["num_prefix"], bad["grid"])


def test_dlogamp_grid_without_diagonal_raises():
    with pytest.raises(VitspecError, match="min"):
        F.dlogamp(torch.zeros(1, 21, 3), 0, (7, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SCALAR + CURVES)
def test_cuda_matches_cpu(name):
    x = random_tokens(3, 17, 8, seed=1, dtype=torch.float32)
    fn = getattr(F, name)
    got = fn(x.cuda(), 1, (4, 4))
    assert got.device.type == "cuda"
    np.testing.assert_allclose(got.cpu().numpy(), fn(x, 1, (4, 4)).numpy(), rtol=1e-5, atol=1e-9)


def test_patch_cos_abs_in_row_blocks_on_a_large_grid():
    """A 64 x 64 grid and 2 images exceed one block of the Gram (2**24 entries): the blocked sum
    equals the numpy reference over the whole matrix."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1 + 64 * 64, 8, generator=gen, dtype=torch.float64)
    x[:, 1:, 0] += 2.0  # a shared direction, so |cos| is not ~0 everywhere
    got = F.patch_cos_abs(x, 1, (64, 64))
    want = [ref.patch_cos_abs(xi.numpy(), 1, (64, 64)) for xi in x]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
