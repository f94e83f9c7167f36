"""Attention-map metrics of docs/metrics.md: pure batched torch functions.

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
from vitspec.functional.views import AttnView, _check_attn, attn_view, per_map

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


Attn = Tensor | AttnView
Prev = Tensor | AttnView | None


def is_row_stochastic(attn: Attn, atol: float = 1e-4) -> bool:
    """True when every entry is >= 0 and every row sums to 1 within ``atol``.

    Args:
        attn: ``[..., N, N]`` attention maps.
        atol: absolute tolerance on the row sums.

    Example:
        >>> is_row_stochastic(torch.full((1, 1, 4, 4), 0.25))
        True
    """
    v = attn_view(attn)
    if v.a.numel() == 0:
        return True
    return v.nonnegative and v.rows_sum_to_one(atol)


def attn_entropy(attn: Attn, prev: Prev = None) -> Tensor:
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
    a = attn_view(attn, prev).a
    tiny = torch.finfo(a.dtype).tiny

    def rows(g: Tensor) -> Tensor:
        # 0 log 0 = 0: a zero (underflowed) entry gets log(tiny), so its product stays 0; one
        # temporary, updated in place (a third of the memory passes of g * log(g + tiny))
        return -g.clamp_min(tiny).log_().mul_(g).sum(dim=-1)

    return per_map(rows, a).to(torch.float64).mean(dim=-1)


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


def attn_hc_gain(attn: Attn, prev: Prev = None) -> Tensor:
    """Largest singular value of ``(I - J) A (I - J)`` (Wang et al. 2022, Thm. 3).

    The worst-case factor by which the map scales the high-frequency part of its input:
    ``||HC[A Z]||_F <= attn_hc_gain * ||HC[Z]||_F``. 1 for the identity map, 0 for uniform
    attention. Computed with Lanczos (:func:`~vitspec.functional.linalg.top_singular_value`)
    whose steps are two matrix-vector products with A itself, ``O(N^2)`` per step (the centring
    is applied to the vectors); the residual test puts each value within 5e-6 relative of a
    singular value (in practice ~1e-7 of the largest; see the linalg function for what is and
    is not certified), with exact SVD fallback; :func:`hc_gain_exact` is the float64 SVD
    reference.

    Args:
        attn: ``[B, H, N, N]`` attention (any real matrix; row-stochasticity is not assumed).
        prev: ignored.

    Returns:
        ``[B, H]`` float64.

    Example:
        >>> round(attn_hc_gain(torch.eye(30).expand(1, 2, 30, 30)).tolist()[0][0], 6)
        1.0
    """
    return top_singular_value(attn_view(attn, prev).a, centre=True)


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
    _check_attn(attn)
    return top_singular_value_exact(double_centre(attn.to(torch.float64)))


def attn_cos(attn: Attn, prev: Prev = None) -> Tensor:
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
    v = attn_view(attn, prev)
    n = v.a.shape[-1]
    inv = v.inv_column_norms[..., None, :]  # [B, H, 1, N]
    if v.nonnegative:
        s = (v.a @ inv.mT).to(torch.float64)  # sum of the unit columns, [B, H, N, 1]
        return s.square().sum(dim=(-2, -1)) / n**2
    unit = v.a * inv
    gram = unit.mT @ unit
    return gram.abs().to(torch.float64).sum(dim=(-2, -1)) / n**2


def attn_cross_layer_sim(attn: Attn, prev: Prev) -> Tensor:
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
    v = attn_view(attn, prev)
    if v.prev is None:
        raise VitspecError("attn_cross_layer_sim needs prev, the previous layer's attention")
    if v.prev.a.shape != v.a.shape:
        raise VitspecError(
            f"prev has shape {tuple(v.prev.a.shape)} but attn has shape {tuple(v.a.shape)}; "
            "attn_cross_layer_sim compares the same images and heads"
        )
    # column dot products, [B, H, N]
    dots = per_map(lambda x, y: (x * y).sum(dim=-2), v.a, v.prev.a.to(v.a.dtype))
    cos = dots * v.inv_column_norms * v.prev.inv_column_norms.to(v.a.dtype)
    return cos.to(torch.float64).mean(dim=-1)


def attn_spectrum(attn: Attn, prev: Prev = None) -> Tensor:
    """Norm of row k of ``S = F A F^H`` for k = 0..N-1 (F the unitary N-point DFT).

    ``F^H`` is unitary, so row k of S has the norm of row k of ``F A``: a DFT of every column
    over the query axis (FFTs, ``O(N^2 log N)`` per map, two real columns per complex
    transform), no second transform. ``S[0, 0] = 1`` for row-stochastic A and the k = 0 value is
    ``sqrt(N) * ||column means||`` (1 for uniform attention, whose other values are 0).

    Args:
        attn: ``[B, H, N, N]``.
        prev: ignored.

    Returns:
        ``[B, H, N]`` float64, frequency k = 0..N-1 (DC first).

    Example:
        >>> [round(v, 6) for v in attn_spectrum(torch.full((1, 1, 4, 4), 0.25)).squeeze().tolist()]
        [1.0, 0.0, 0.0, 0.0]
    """
    a = attn_view(attn, prev).a
    n = a.shape[-1]
    energy = per_map(_column_pair_energy, a).reshape(-1, n)  # groups: the FFT output is as big
    # two real columns x, y as z = x + iy: |X_k|^2 + |Y_k|^2 = (|Z_k|^2 + |Z_(N-k)|^2) / 2
    energy = (energy + energy.roll(-1, dims=-1).flip(-1)) / (2 * n)  # ||row k of F A||^2
    return energy.clamp_min(0).sqrt().reshape(*a.shape[:-2], n)


def _column_pair_energy(a: Tensor) -> Tensor:
    """``sum_j |DFT(z_j)_k|^2`` over the complex columns ``z_j = a[:, 2j] + i a[:, 2j+1]``
    (a zero column pads odd N), float64 ``[b, N]``: half the transforms of one real FFT per
    column. The transform runs down the columns in place (``dim=1``), so frequency k's values
    lie contiguous in memory and its energy is one contiguous reduction."""
    b, n, _ = a.shape
    if n % 2:
        a = torch.cat([a, a.new_zeros(b, n, 1)], dim=-1)
    z = torch.view_as_complex(a.reshape(b, n, -1, 2))
    f = torch.view_as_real(torch.fft.fft(z, dim=1)).reshape(b, n, -1)  # [b, N (k), 2 pairs]
    return torch.linalg.vecdot(f, f).to(torch.float64)
