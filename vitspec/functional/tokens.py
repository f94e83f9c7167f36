"""Token-matrix metrics of docs/metrics.md: pure batched torch functions.

Every function takes ``tokens: [B, N, C]`` (N = P + G tokens: ``num_prefix`` prefix tokens first,
then the ``G = h * w`` patch tokens in raster order on ``grid = (h, w)``), ``num_prefix`` and
``grid``, and returns float64 on the input's device: ``[B]`` for scalar metrics, ``[B, K]`` for
curves.

DC/HC (Wang et al. 2022) use ALL N tokens, prefix included: ``DC[X] = J X`` (the token mean on
every row) and ``HC[X] = X - J X``. Energies are computed from the centred tokens, never as total
minus DC (which loses everything when tokens are nearly collapsed). Everything is float64 except
the ``G x G`` Gram matrix of ``patch_cos_abs`` for non-float64 input, which is float32 on unit
vectors (checked against float64 to 1e-5 relative in tests/test_functional_tokens.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitspec.errors import VitspecError
from vitspec.functional.linalg import compute_dtype
from vitspec.functional.views import TokenView, token_view

__all__ = [
    "cls_dist_cos",
    "dlogamp",
    "dlogamp_hf",
    "erank",
    "feat_var",
    "hc_dc_ratio",
    "hc_energy",
    "patch_cos",
    "patch_cos_abs",
    "rank_residual",
    "token_spectrum",
]


Tokens = Tensor | TokenView


def hc_dc_ratio(tokens: Tokens, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """``||HC[X]||_F / ||DC[X]||_F`` over all N tokens (0 for identical tokens).

    Args:
        tokens: ``[B, N, C]``.
        num_prefix: number of prefix tokens P.
        grid: patch grid ``(h, w)``, ``h * w = N - P``.

    Returns:
        ``[B]`` float64 (inf when the token mean is zero).

    Example:
        >>> hc_dc_ratio(torch.ones(1, 5, 3), 1, (2, 2)).item()
        0.0
    """
    v = token_view(tokens, num_prefix, grid)
    return (v.hc_energy / v.dc_energy).sqrt()


def hc_energy(tokens: Tokens, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """``||HC[X]||_F^2 / ||X||_F^2`` over all N tokens (the non-DC share of the DFT energy).

    Args:
        tokens: ``[B, N, C]``.
        num_prefix: number of prefix tokens.
        grid: patch grid ``(h, w)``.

    Returns:
        ``[B]`` float64.

    Example:
        >>> hc_energy(torch.tensor([[[1.0], [-1.0]]]), 0, (1, 2)).item()
        1.0
    """
    v = token_view(tokens, num_prefix, grid)
    return v.hc_energy / v.energy


def patch_cos_abs(tokens: Tokens, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """Mean over ordered pairs ``i != j`` of ``|cos(p_i, p_j)|`` over the G patch tokens.

    Explicit ``G x G`` Gram of unit vectors (float32 unless the input is float64), formed in
    blocks of rows (at most ``2**24`` entries for the whole batch at a time: hierarchical
    models' early grids reach G = 112 x 112), diagonal excluded, sums in float64. A zero token
    has cosine 0 with every other token.

    Args:
        tokens: ``[B, N, C]``.
        num_prefix: number of prefix tokens (excluded).
        grid: patch grid ``(h, w)``.

    Returns:
        ``[B]`` float64 (NaN when G = 1).

    Example:
        >>> patch_cos_abs(torch.tensor([[[9.0, 9.0], [1.0, 0.0], [-1.0, 0.0]]]), 1, (1, 2)).item()
        1.0
    """
    v = token_view(tokens, num_prefix, grid)
    u = v.unit_patches.to(compute_dtype(v.tokens))
    g = u.shape[1]
    rows = max(1, 2**24 // max(g * u.shape[0], 1))
    total = torch.zeros(u.shape[0], dtype=torch.float64, device=u.device)
    for start in range(0, g, rows):
        block = u[:, start : start + rows] @ u.mT  # [B, r, G]: rows start.. of the Gram
        r = torch.arange(block.shape[1], device=u.device)
        block[:, r, r + start] = 0  # the diagonal
        total += block.abs().sum(dim=-1).to(torch.float64).sum(dim=-1)
    return total / (g * (g - 1))


def patch_cos(tokens: Tokens, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """Mean over ordered pairs ``i != j`` of ``cos(p_i, p_j)`` over the G patch tokens.

    O(G*C): with unit vectors u_i, ``sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2``.

    Args:
        tokens: ``[B, N, C]``.
        num_prefix: number of prefix tokens (excluded).
        grid: patch grid ``(h, w)``.

    Returns:
        ``[B]`` float64 (NaN when G = 1).

    Example:
        >>> patch_cos(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]]), 0, (1, 2)).item()
        -1.0
    """
    u = token_view(tokens, num_prefix, grid).unit_patches
    g = u.shape[1]
    return (u.sum(dim=1).square().sum(dim=-1) - u.square().sum(dim=(1, 2))) / (g * (g - 1))


def _n13(m: Tensor) -> Tensor:
    """sqrt(max abs column sum * max abs row sum) of every [N, C] matrix in a [B, N, C] batch."""
    a = m.abs()
    return (a.sum(dim=1).amax(dim=-1) * a.sum(dim=2).amax(dim=-1)).sqrt()


def rank_residual(tokens: Tokens, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """``n13(X - 1 xbar^T) / n13(X)``, xbar the mean over all N tokens (Dong et al. 2021).

    ``n13(M) = sqrt(||M||_1 * ||M||_inf)``: max absolute column sum times max absolute row sum.

    Args:
        tokens: ``[B, N, C]``.
        num_prefix: number of prefix tokens (included in the mean).
        grid: patch grid ``(h, w)``.

    Returns:
        ``[B]`` float64 (0 for identical tokens).

    Example:
        >>> rank_residual(torch.ones(2, 3, 4), 1, (1, 2)).tolist()
        [0.0, 0.0]
    """
    v = token_view(tokens, num_prefix, grid)
    return _n13(v.hc) / _n13(v.x)


def feat_var(tokens: Tokens, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """Unbiased variance over the h*w patch positions per channel, mean over channels.

    Args:
        tokens: ``[B, N, C]``.
        num_prefix: number of prefix tokens (excluded).
        grid: patch grid ``(h, w)``.

    Returns:
        ``[B]`` float64 (NaN when h*w = 1).

    Example:
        >>> feat_var(torch.tensor([[[0.0], [2.0]]]), 0, (1, 2)).item()
        2.0
    """
    v = token_view(tokens, num_prefix, grid)
    # the patch tokens centred on the token mean (all N) are HC's patch rows; re-centring them on
    # the patch mean subtracts G * (their mean)^2, a small correction (no cancellation)
    hc = v.hc[:, v.num_prefix :]
    g = hc.shape[1]
    ss = hc.square().sum(dim=1) - g * hc.mean(dim=1).square()
    return (ss / (g - 1)).mean(dim=-1)


def dlogamp(tokens: Tokens, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """Relative log amplitude of the patch grid's 2-D Fourier transform (Park & Kim 2022).

    ``L = log(|fft2(grid)| + 1e-6)`` per channel over ``(h, w)``, mean over channels, rolled by
    ``(h//2, w//2)`` (``fftshift``), diagonal ``d[i] = L[i, i]`` for ``i = h//2 .. min(h, w)-1``,
    reported as ``d[i] - d[h//2]``. For square grids d starts at DC and ends at the highest
    frequency; for non-square grids the diagonal is taken literally as in metrics.md. Only the K
    diagonal frequencies are computed (see :attr:`TokenView.dlogamp`).

    Args:
        tokens: ``[B, N, C]``.
        num_prefix: number of prefix tokens (excluded).
        grid: patch grid ``(h, w)``; needs ``min(h, w) > h // 2``.

    Returns:
        ``[B, K]`` float64, ``K = min(h, w) - h // 2``; the first value is 0.

    Example:
        >>> dlogamp(torch.randn(2, 17, 8), 1, (4, 4)).shape
        torch.Size([2, 2])
    """
    return token_view(tokens, num_prefix, grid).dlogamp


def dlogamp_hf(tokens: Tokens, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """Last point of :func:`dlogamp`: the relative log amplitude at the highest frequency.

    Args:
        tokens: ``[B, N, C]``.
        num_prefix: number of prefix tokens (excluded).
        grid: patch grid ``(h, w)``.

    Returns:
        ``[B]`` float64.

    Example:
        >>> dlogamp_hf(torch.randn(3, 17, 8), 1, (4, 4)).shape
        torch.Size([3])
    """
    return token_view(tokens, num_prefix, grid).dlogamp[:, -1]


def erank(tokens: Tokens, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """Effective rank of HC[X] (Roy & Vetterli 2007): ``exp(-sum_k p_k log p_k)``, ``p = s/sum(s)``.

    Singular values from ``eigvalsh`` of the smaller Gram matrix of HC[X] in float64, negative
    eigenvalues (rounding) clamped to 0.

    Args:
        tokens: ``[B, N, C]``.
        num_prefix: number of prefix tokens (included in HC).
        grid: patch grid ``(h, w)``.

    Returns:
        ``[B]`` float64 in ``[1, min(N - 1, C)]``; NaN when HC[X] = 0 (identical tokens).

    Example:
        >>> round(erank(torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]]),
        ...             0, (2, 2)).item(), 6)
        2.0
    """
    lam = torch.linalg.eigvalsh(token_view(tokens, num_prefix, grid).hc_gram)
    # the Gram's eigenvalues carry round-off ~eps * lambda_max: below N * eps * lambda_max they
    # are noise (HC[X] always has one zero singular value), and sqrt would inflate them to
    # ~1e-8 * s_max, so they count as 0, as in an SVD of HC[X] itself
    floor = lam.shape[-1] * torch.finfo(lam.dtype).eps * lam[..., -1:].clamp_min(0)
    s = torch.where(lam > floor, lam, torch.zeros_like(lam)).sqrt()
    p = s / s.sum(dim=-1, keepdim=True)
    return torch.exp(-torch.special.xlogy(p, p).sum(dim=-1))


def token_spectrum(tokens: Tokens, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """DFT energy share over the token axis: ``E_k = sum_c |(F X)[k, c]|^2 / ||X||_F^2``.

    All N tokens, k = 0..N-1 (DC first); sums to 1 and ``1 - E_0 = hc_energy``.

    Args:
        tokens: ``[B, N, C]``.
        num_prefix: number of prefix tokens (included).
        grid: patch grid ``(h, w)``.

    Returns:
        ``[B, N]`` float64.

    Example:
        >>> token_spectrum(torch.ones(1, 4, 2), 0, (2, 2)).squeeze().tolist()
        [1.0, 0.0, 0.0, 0.0]
    """
    v = token_view(tokens, num_prefix, grid)
    n = v.x.shape[1]
    if v.hc_gram.shape[-1] == n:
        # k >= 1 of F X equals k >= 1 of F HC[X], and sum_c |(F HC)[k, c]|^2 is the k-th diagonal
        # entry of F K F^H for K = HC HC^T (already formed for erank): the DFT over d of the
        # circulant diagonal sums c_d = sum_j K[j, (j - d) mod N], O(N^2) instead of a transform
        # of every channel. Cancellation-free: K is built from centred tokens, in float64.
        j = torch.arange(n, device=v.x.device)
        idx = (j[:, None] - j[None, :]) % n  # idx[j, d] = (j - d) mod N
        c = v.hc_gram.gather(-1, idx.expand(v.hc_gram.shape[0], n, n)).sum(dim=-2)
        energy = torch.fft.fft(c).real / n
    else:  # C < N: the Gram is C x C; transform the centred tokens directly
        z = torch.fft.fft(v.hc, dim=1, norm="ortho")
        energy = (z.real.square() + z.imag.square()).sum(dim=-1)
    energy[:, 0] = v.dc_energy
    return energy / v.energy[:, None]


def cls_dist_cos(tokens: Tokens, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """``cos(x_cls, x_dist)``: cosine between the two prefix tokens (class, distillation) of a
    distilled DeiT (Touvron et al. 2021: 0.06 at the input, 0.93 after the last layer).

    Args:
        tokens: ``[B, N, C]``, token 0 the class token, token 1 the distillation token.
        num_prefix: must be 2 (the metric is defined only for class + distillation tokens).
        grid: patch grid ``(h, w)``.

    Returns:
        ``[B]`` float64 (NaN when either token is zero).

    Raises:
        VitspecError: ``num_prefix`` is not 2.

    Example:
        >>> x = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
        >>> round(cls_dist_cos(x, 2, (1, 1)).item(), 6)
        0.707107
    """
    if num_prefix != 2:
        raise VitspecError(
            f"cls_dist_cos needs a class and a distillation token (num_prefix 2), got {num_prefix}"
        )
    x = token_view(tokens, num_prefix, grid).x
    cls, dist = x[:, 0], x[:, 1]
    return (cls * dist).sum(dim=-1) / (cls.norm(dim=-1) * dist.norm(dim=-1))
