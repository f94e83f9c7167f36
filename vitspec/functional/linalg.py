"""Batched linear-algebra helpers for the functional metrics (pure torch, CPU and CUDA).

The expensive one is the largest singular value of many small dense matrices (``attn_hc_gain``:
one ``N x N`` matrix per image and head). :func:`top_singular_value` runs Lanczos on ``M^T M``
through matrix-vector products with ``M`` and ``M^T`` (the Gram matrix is never formed: two
memory-bound products per step are cheaper than one ``O(N^3)`` product), with full
reorthogonalisation and a residual-based stopping rule; matrices that do not meet the tolerance
are recomputed by exact float64 SVD, so the accuracy is guaranteed.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compute_dtype", "top_singular_value", "top_singular_value_exact"]

# Fixed seed for the Lanczos start vector: results are deterministic run to run.
_START_SEED = 20220
# Below this size a dense SVD is cheaper than Lanczos and there is no Krylov space to speak of.
_DENSE_BELOW = 24


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input, float32 for every other floating dtype (float16/bfloat16/float32).

    Example:
        >>> compute_dtype(torch.zeros(1, dtype=torch.float16))
        torch.float32
    """
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def top_singular_value_exact(mats: Tensor) -> Tensor:
    """Largest singular value of each matrix by float64 SVD (the reference).

    Args:
        mats: ``[..., R, N]`` real matrices, any float dtype and device.

    Returns:
        ``[...]`` float64.

    Example:
        >>> top_singular_value_exact(torch.eye(3)[None] * 2).tolist()
        [2.0]
    """
    return torch.linalg.svdvals(mats.to(torch.float64))[..., 0]


def top_singular_value(
    mats: Tensor,
    *,
    centre: bool = False,
    rtol: float = 1e-3,
    max_steps: int = 60,
    min_steps: int = 12,
    check_every: int = 4,
) -> Tensor:
    """Largest singular value of each matrix ``M`` (or of ``M (I - J)`` with ``centre=True``).

    Algorithm (batched over all leading dimensions, in :func:`compute_dtype` of the input):

    1. Lanczos on ``G = M^T M`` with full reorthogonalisation (classical Gram-Schmidt applied
       twice) from a fixed random start vector builds an orthonormal Krylov basis ``Q`` and the
       tridiagonal ``T = Q^T G Q``. ``G q`` is computed as ``M^T (M q)``; with ``centre=True`` the
       vectors are kept orthogonal to the all-ones vector, which applies ``(I - J)`` on the right
       without forming ``M (I - J)``.
    2. From ``min_steps`` on, every ``check_every`` steps, the top Ritz pair ``(theta, y)`` of ``T``
       is tested with the standard residual estimate ``beta_k * |y_k| <= rtol * theta``; a matrix
       that passes leaves the batch (so its value never depends on the other matrices in it), and
       the rest stop at ``max_steps`` (capped below ``N``).
    3. For the Ritz vector ``v`` (unit norm) ``lambda = ||M v||^2`` is returned as
       ``sqrt(lambda)``, and the true residual ``r = G v - lambda v`` is recomputed. For
       symmetric G some eigenvalue lies within ``||r||`` of ``lambda`` (Weyl) and ``lambda`` is
       at most the largest one, so ``||r|| <= rtol * lambda`` bounds the relative error of the
       singular value by ``rtol / 2`` (in practice it is ~``rtol^2``). Every matrix that fails
       this check is recomputed by exact float64 SVD.

    Args:
        mats: ``[..., R, N]`` real matrices (float16/bfloat16/float32/float64, any device).
        centre: return the largest singular value of ``M (I - J)`` instead of ``M``.
        rtol: relative residual tolerance (see step 3).
        max_steps: Lanczos steps before giving up and falling back to exact SVD.
        min_steps: first step at which convergence is tested (guards against a premature stop on
            the second singular value when the top two are close).
        check_every: steps between convergence tests.

    Returns:
        ``[...]`` float64 largest singular values.

    Example:
        >>> m = torch.diag(torch.tensor([3.0, 1.0, 2.0])).expand(2, 3, 3)
        >>> top_singular_value(m).tolist()
        [3.0, 3.0]
    """
    lead, (rows, n_dim) = mats.shape[:-2], mats.shape[-2:]
    if mats.numel() == 0:
        return torch.zeros(lead, dtype=torch.float64, device=mats.device)
    m = mats.reshape(-1, rows, n_dim).to(compute_dtype(mats))
    if n_dim < _DENSE_BELOW:
        return _exact(m, centre).reshape(lead)
    sigma = torch.empty(m.shape[0], dtype=torch.float64, device=m.device)
    todo = torch.arange(m.shape[0], device=m.device)  # matrices still iterating
    mt = m.mT.contiguous()
    rows = _lanczos_rows(m, centre)
    basis = alpha = beta = None
    for k in range(1, max(1, min(max_steps, n_dim - 2)) + 1):
        basis, alpha, beta = rows(m, mt, basis, alpha, beta)
        if not (k >= min_steps and k % check_every == 0 or k == min(max_steps, n_dim - 2)):
            continue
        # Each matrix stops at its own first passing check, so its value does not depend on the
        # other matrices of the batch; finished matrices leave the active set.
        theta, y = _top_ritz(alpha, beta)
        done = beta[:, -1] * y[:, -1].abs() <= rtol * theta
        if k == min(max_steps, n_dim - 2):
            done[:] = True
        if bool(done.any()):
            sigma[todo[done]] = _certified(m[done], mt[done], basis[done], y[done], centre, rtol)
            keep = ~done
            todo, m, mt, basis, alpha, beta = (t[keep] for t in (todo, m, mt, basis, alpha, beta))
        if todo.numel() == 0:
            break
    return sigma.reshape(lead)


def _lanczos_rows(m: Tensor, centre: bool):
    """One Lanczos step on ``(I - J) M^T M (I - J)`` (or ``M^T M``) for row vectors ``[b, 1, N]``.

    Returns a function ``step(m, mt, basis, alpha, beta) -> (basis, alpha, beta)`` that appends one
    basis vector (full reorthogonalisation, twice) and one entry of the tridiagonal; with
    ``basis=None`` it starts from a fixed random vector.
    """
    n_dim, dtype, device = m.shape[-1], m.dtype, m.device
    tiny, eps = torch.finfo(dtype).tiny, torch.finfo(dtype).eps
    gen = torch.Generator(device="cpu").manual_seed(_START_SEED)
    q0 = torch.randn(1, 1, n_dim, generator=gen, dtype=torch.float64)
    q0 = _proj(q0, centre)
    q0 = (q0 / q0.norm()).to(device=device, dtype=dtype)

    def step(m, mt, basis, alpha, beta):
        if basis is None:
            basis = q0.expand(m.shape[0], 1, n_dim).clone()
            alpha = beta = torch.zeros(m.shape[0], 0, dtype=dtype, device=device)
        q = basis[:, -1:]
        w = _gram_apply(m, mt, q, centre)
        w_norm = w.norm(dim=(-2, -1))
        a_j = (w * q).sum(dim=(-2, -1))
        for _ in range(2):
            w = w - (w @ basis.mT) @ basis
        b_j = w.norm(dim=(-2, -1))
        # Breakdown (invariant subspace found): continue with a zero vector, which leaves T
        # block-diagonal with zeros; harmless because G is PSD and we only want its top value.
        keep = b_j > 100 * eps * w_norm
        b_j = b_j * keep
        nxt = w * (keep / b_j.clamp_min(tiny))[:, None, None]
        return (
            torch.cat([basis, nxt], dim=1),
            torch.cat([alpha, a_j[:, None]], dim=1),
            torch.cat([beta, b_j[:, None]], dim=1),
        )

    return step


def _proj(v: Tensor, centre: bool) -> Tensor:
    return v - v.mean(dim=-1, keepdim=True) if centre else v


def _gram_apply(m: Tensor, mt: Tensor, v: Tensor, centre: bool) -> Tensor:
    """``(I - J) M^T M (I - J) v`` for rows ``v`` [b, 1, N]. ``mat @ row.mT`` hits a batched GEMM
    path that is ~7x faster on CPU than the same product with a fresh [b, N, 1] column."""
    b = v.shape[0]
    u = (m @ _proj(v, centre).mT).reshape(b, 1, -1)
    return _proj((mt @ u.mT).reshape(b, 1, -1), centre)


def _certified(m, mt, basis, y, centre: bool, rtol: float) -> Tensor:
    """``sqrt(lambda)`` for the Ritz vector of ``y``, or exact SVD where ``||r|| > rtol lambda``."""
    v = _proj(y[:, None, : basis.shape[1] - 1] @ basis[:, :-1], centre)  # [b, 1, N]
    v = v / v.norm(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    mv = (m @ v.mT).reshape(v.shape[0], 1, -1)
    lam = mv.to(torch.float64).square().sum(dim=(-2, -1))
    gv = _proj((mt @ mv.mT).reshape(v.shape[0], 1, -1), centre)
    resid = (gv - lam.to(v.dtype)[:, None, None] * v).to(torch.float64).norm(dim=(-2, -1))
    bad = (resid > rtol * lam) | ~torch.isfinite(lam)
    sigma = lam.sqrt()
    if bool(bad.any()):
        sigma[bad] = _exact(m[bad], centre)
    return sigma


def _exact(m: Tensor, centre: bool) -> Tensor:
    m = m.to(torch.float64)
    return top_singular_value_exact(m - m.mean(dim=-1, keepdim=True) if centre else m)


def _top_ritz(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Top eigenpair of the symmetric tridiagonal matrices with diagonal ``alpha`` [b, k] and
    off-diagonal ``beta[:, :k-1]``."""
    off = beta[:, :-1]
    t = torch.diag_embed(alpha) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    evals, evecs = torch.linalg.eigh(t.to(torch.float64))
    return evals[:, -1].to(alpha.dtype), evecs[:, :, -1].to(alpha.dtype)
