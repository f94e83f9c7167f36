"""Attention-map metrics of shared/metrics.md: pure batched torch functions.

Every function takes post-softmax attention ``attn: [B, H, N, N]`` (query rows, key columns) and
``prev``: the previous block's attention for the same images (only ``attn_cross_layer_sim`` uses
it; the others accept and ignore it so that every attention metric has one signature). Results are
float64 on the input's device.

Precision: attention maps are large (``B*H*N*N``), so float32 inputs are processed in float32 and
only the reductions that can cancel are done in float64; tests/test_functional_attention.py
checks each float32 path against a float64 NumPy reference to <= 1e-5 relative on realistic
(random-init DeiT) and peaked attention. float64 inputs are processed in float64 throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitspec.errors import VitspecError
from vitspec.functional.linalg import compute_dtype, top_singular_value, top_singular_value_exact

__all__ = [
    "attn_cos",
    "attn_cross_layer_sim",
    "attn_entropy",
    "attn_hc_gain",
    "attn_spectrum",
    "double_centre",
    "hc_gain_exact",
    "is_row_stochastic",
]


def _check(attn: Tensor, name: str = "attn") -> Tensor:
    if not isinstance(attn, Tensor):
        raise VitspecError(f"{name} must be a torch.Tensor, got {type(attn).__name__}")
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise VitspecError(f"{name} must have shape [B, H, N, N], got {tuple(attn.shape)}")
    if not attn.is_floating_point():
        raise VitspecError(f"{name} must be a floating-point tensor, got {attn.dtype}")
    return attn.to(compute_dtype(attn))


def is_row_stochastic(attn: Tensor, atol: float = 1e-4) -> bool:
    """True when every entry is >= 0 and every row sums to 1 within ``atol``.

    Args:
        attn: ``[..., N, N]`` attention maps.
        atol: absolute tolerance on the row sums.

    Example:
        >>> is_row_stochastic(torch.full((1, 1, 4, 4), 0.25))
        True
    """
    if attn.numel() == 0:
        return True
    a = attn.to(compute_dtype(attn))
    if not bool((a >= 0).all()):  # also False for NaN
        return False
    return bool(((a.sum(dim=-1) - 1).abs() <= atol).all())


def attn_entropy(attn: Tensor, prev: Tensor | None = None) -> Tensor:
    """Mean over query rows of the row entropy ``-sum_j A_ij log A_ij`` (nats; 0 log 0 = 0).

    ``log N`` for uniform attention, 0 for one-hot rows.

    Args:
        attn: ``[B, H, N, N]`` post-softmax attention.
        prev: ignored.

    Returns:
        ``[B, H]`` float64.

    Example:
        >>> a = torch.full((1, 1, 4, 4), 0.25)
        >>> round(attn_entropy(a).item(), 6)  # log 4
        1.386294
    """
    a = _check(attn)
    row = -torch.special.xlogy(a, a).sum(dim=-1)  # [B, H, N]
    return row.to(torch.float64).mean(dim=-1)


def double_centre(attn: Tensor) -> Tensor:
    """``(I - J) A (I - J)`` for every map: ``A`` minus row means minus column means plus the
    grand mean (in :func:`~vitspec.functional.linalg.compute_dtype`).

    Args:
        attn: ``[..., N, N]``.

    Returns:
        ``[..., N, N]``.
    """
    a = attn.to(compute_dtype(attn))
    col = a.mean(dim=-2, keepdim=True)
    row = a.mean(dim=-1, keepdim=True)
    return (a - col) - (row - row.mean(dim=-2, keepdim=True))


def attn_hc_gain(attn: Tensor, prev: Tensor | None = None) -> Tensor:
    """Largest singular value of ``(I - J) A (I - J)`` (Wang et al. 2022, Thm. 3).

    The worst-case factor by which the map scales the high-frequency part of its input:
    ``||HC[A Z]||_F <= attn_hc_gain * ||HC[Z]||_F``. 1 for the identity map, 0 for uniform
    attention. Computed with Lanczos (:func:`~vitspec.functional.linalg.top_singular_value`,
    relative residual tolerance 1e-4, so the relative error is at most 5e-5 and in practice
    ~1e-8) with exact SVD fallback; :func:`hc_gain_exact` is the float64 SVD reference.

    Args:
        attn: ``[B, H, N, N]`` attention (any real matrix; row-stochasticity is not assumed).
        prev: ignored.

    Returns:
        ``[B, H]`` float64.

    Example:
        >>> round(attn_hc_gain(torch.eye(30).expand(1, 2, 30, 30)).tolist()[0][0], 6)
        1.0
    """
    a = _check(attn)
    return top_singular_value(double_centre(a))


def hc_gain_exact(attn: Tensor) -> Tensor:
    """Reference ``attn_hc_gain``: float64 SVD of ``(I - J) A (I - J)``.

    Args:
        attn: ``[B, H, N, N]``.

    Returns:
        ``[B, H]`` float64.

    Example:
        >>> hc_gain_exact(torch.full((1, 1, 3, 3), 1 / 3)).abs().max().item() < 1e-12
        True
    """
    _check(attn)
    return top_singular_value_exact(double_centre(attn.to(torch.float64)))


def attn_cos(attn: Tensor, prev: Tensor | None = None) -> Tensor:
    """Mean over ALL ordered column pairs (i, j), diagonal included, of ``|cos(A[:, i], A[:, j])|``.

    For ``A >= 0`` (post-softmax attention) every cosine is >= 0, so ``|cos| = cos`` and the mean
    is ``||sum_i unit(A[:, i])||^2 / N^2``: O(N^2) instead of an O(N^3) Gram matrix. Maps with a
    negative entry fall back to the explicit Gram matrix. A zero column has cosine 0 with every
    column (itself included). 1 for uniform attention.

    Args:
        attn: ``[B, H, N, N]``.
        prev: ignored.

    Returns:
        ``[B, H]`` float64.

    Example:
        >>> round(attn_cos(torch.full((1, 1, 5, 5), 0.2)).item(), 6)
        1.0
    """
    a = _check(attn)
    n = a.shape[-1]
    norms = a.norm(dim=-2, keepdim=True)  # [B, H, 1, N] column norms
    unit = a / norms.clamp_min(torch.finfo(a.dtype).tiny)
    if bool((a >= 0).all()):
        s = unit.sum(dim=-1).to(torch.float64)  # sum of unit columns, [B, H, N]
        return (s * s).sum(dim=-1) / n**2
    gram = unit.mT @ unit
    return gram.abs().to(torch.float64).sum(dim=(-2, -1)) / n**2


def attn_cross_layer_sim(attn: Tensor, prev: Tensor | None) -> Tensor:
    """Mean over key tokens t of ``cos(A^l[:, t], A^(l-1)[:, t])``, same head (DeepViT columns).

    Args:
        attn: ``[B, H, N, N]`` attention of layer l.
        prev: ``[B, H, N, N]`` attention of layer l - 1 for the same images (required).

    Returns:
        ``[B, H]`` float64; a zero column counts as cosine 0.

    Raises:
        VitspecError: when ``prev`` is None or its shape differs from ``attn``.

    Example:
        >>> a = torch.rand(2, 3, 4, 4)
        >>> bool(torch.allclose(attn_cross_layer_sim(a, a), torch.ones(2, 3, dtype=torch.float64)))
        True
    """
    a = _check(attn)
    if prev is None:
        raise VitspecError("attn_cross_layer_sim needs prev, the previous layer's attention")
    p = _check(prev, "prev").to(a.dtype)
    if p.shape != a.shape:
        raise VitspecError(
            f"prev has shape {tuple(p.shape)} but attn has shape {tuple(a.shape)}; "
            "attn_cross_layer_sim compares the same images and heads"
        )
    tiny = torch.finfo(a.dtype).tiny
    dot = (a * p).sum(dim=-2)
    den = a.norm(dim=-2) * p.norm(dim=-2)
    cos = dot / den.clamp_min(tiny)
    return cos.to(torch.float64).mean(dim=-1)


def attn_spectrum(attn: Tensor, prev: Tensor | None = None) -> Tensor:
    """Norm of row k of ``S = F A F^H`` for k = 0..N-1 (F the unitary N-point DFT).

    ``F^H`` is unitary, so row k of S has the norm of row k of ``F A``: a DFT of every column
    over the query axis, no second transform. For real A, row N-k of ``F A`` is the conjugate of
    row k, so a real FFT (k = 0..N//2) gives all N values. ``S[0, 0] = 1`` and the k = 0 value is
    ``sqrt(N) * ||column means||`` (1 for uniform attention, whose other values are 0).

    Args:
        attn: ``[B, H, N, N]``.
        prev: ignored.

    Returns:
        ``[B, H, N]`` float64, frequency k = 0..N-1 (DC first).

    Example:
        >>> attn_spectrum(torch.full((1, 1, 4, 4), 0.25)).squeeze().tolist()
        [1.0, 0.0, 0.0, 0.0]
    """
    a = _check(attn)
    n = a.shape[-1]
    z = torch.fft.rfft(a, dim=-2, norm="ortho")  # [B, H, N//2 + 1, N]
    energy = (z.real.square() + z.imag.square()).sum(dim=-1).to(torch.float64)
    mirrored = energy[..., 1 : n - n // 2].flip(-1)  # rows N-1 .. N//2+1
    return torch.cat([energy, mirrored], dim=-1).sqrt()
