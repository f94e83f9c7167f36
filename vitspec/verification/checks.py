"""The checks of ``vitspec verify``: pure float64 torch functions on attention matrices and tokens.

Every statement is checked as ``lhs <= rhs`` (inequalities) or ``|error| <= allowed`` (identities)
on batches of matrices ``[..., N, N]``; each check returns an :class:`Outcome` per case: the slack
(``lhs / rhs`` for inequalities, ``error / allowed`` for identities and the premise) and whether the
case violates the statement beyond its tolerance.

Tolerances (see docs/verify.md):

- The premise (``row_stochastic``) and ``dc_passthrough`` are checked on the float32 matrices the
  model produced, with absolute tolerance :data:`PREMISE_TOL` = 1e-5 on ``A 1 - 1``.
- Everything else runs on ``Â = A / (A 1)`` in float64 (:func:`renormalise`), the matrix the
  premise certified, moved the rest of the way onto the premise so that the identities hold to
  float64 round-off. Inequalities pass when ``lhs <= (1 + RTOL) (rhs + E)`` with :data:`RTOL`
  = 1e-9 and ``E`` a first-order float64 round-off bound of the quantities involved,
  ``E = 4 gamma_n (sum of the norms that enter the computation)``, ``gamma_n = n u / (1 - n u)``,
  ``u = 2^-53`` (Higham, Accuracy and Stability of Numerical Algorithms, Sec. 3.1). ``E`` only
  matters where ``rhs`` is itself at round-off level (e.g. uniform attention, ``s_a = 0``).

``s_a`` is the exact float64 SVD value (:func:`hc_gain`) below :data:`BRACKET_MIN_N` tokens and
a certified bracket ``lo <= s_a <= hi`` (:func:`hc_gain_bracket`, relative width <= 1e-9) from
there on; every check then uses the end of the bracket that makes it conservative: a pass is
certain, never an artefact of the bracket (docs/verify.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vitspec.functional import (
    double_centre,
    map_groups,
    top_singular_bracket,
    top_singular_value_exact,
)

__all__ = [
    "ATTNSCALE_W",
    "BRACKET_MIN_N",
    "PREMISE_TOL",
    "RECON_TOL",
    "RTOL",
    "Outcome",
    "attnscale",
    "attnscale_weyl",
    "check_attnscale_gain",
    "check_dc_passthrough",
    "check_hc_contraction",
    "check_logit_bound",
    "check_msa_bound",
    "check_row_stochastic",
    "dc_norm",
    "fro_norm",
    "gamma",
    "hc_gain",
    "hc_gain_bracket",
    "norm_bracket",
    "hc_norm",
    "inequality",
    "head_weight_norms",
    "logit_bound",
    "logit_half_width",
    "renormalise",
]

PREMISE_TOL = 1e-5  # |A 1 - 1| on the model's float32 attention (the theorem's premise)
RTOL = 1e-9  # relative tolerance of every float64 inequality and identity
RECON_TOL = 1e-4  # float64 reconstruction of the attention branch vs the float32 module output
ATTNSCALE_W = (-0.5, 0.5, 1.0, 2.0)
_U = 2.0**-53  # unit round-off of float64
BRACKET_MIN_N = 256  # from this N on, certified Krylov brackets replace the dense SVDs


@dataclass
class Outcome:
    """Per-case result of one check.

    Attributes:
        slack: ``[...]`` float64, observed / bound: ``lhs / (rhs + E)`` for inequalities (E the
            float64 round-off allowance, negligible unless rhs is itself at round-off level),
            the error over the allowed error for identities and the premise.
        violated: ``[...]`` bool, the statement fails beyond its tolerance.
    """

    slack: Tensor
    violated: Tensor


def gamma(n: int) -> float:
    """``n u / (1 - n u)``: the relative round-off of an n-term float64 sum.

    Example:
        >>> gamma(197) < 3e-14
        True
    """
    return n * _U / (1 - n * _U)


def inequality(lhs: Tensor, rhs: Tensor, err: Tensor | float, rtol: float = RTOL) -> Outcome:
    """``lhs <= rhs`` with slack ``lhs / (rhs + err)``, violated when the slack exceeds
    ``1 + rtol`` (NaN counts as a violation; an infinite bound as slack 0).

    Example:
        >>> out = inequality(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), 0.0)
        >>> out.slack.tolist(), out.violated.tolist()
        ([0.5, 1.5], [False, True])
    """
    rhs = torch.nan_to_num(rhs, nan=math.inf)
    slack = lhs / (rhs + err)
    return Outcome(slack, ~(slack <= 1 + rtol))


def renormalise(attn: Tensor) -> Tensor:
    """``Â = A / (A 1)`` in float64: rows summing to 1 to float64 round-off.

    Example:
        >>> renormalise(torch.ones(1, 2, 2)).tolist()
        [[[0.5, 0.5], [0.5, 0.5]]]
    """
    a = attn.to(torch.float64)
    return a / a.sum(dim=-1, keepdim=True)


def hc_norm(x: Tensor) -> Tensor:
    """``||HC[x]||`` over the token axis -2, one value per column: ``[..., N, k] -> [..., k]``.

    Example:
        >>> hc_norm(torch.tensor([[1.0], [3.0]], dtype=torch.float64)).tolist()
        [1.4142135623730951]
    """
    return (x - x.mean(dim=-2, keepdim=True)).norm(dim=-2)


def dc_norm(x: Tensor) -> Tensor:
    """``||DC[x]||`` over the token axis -2, one value per column: ``[..., N, k] -> [..., k]``.

    Example:
        >>> dc_norm(torch.tensor([[1.0], [3.0]], dtype=torch.float64)).tolist()
        [2.8284271247461903]
    """
    return x.mean(dim=-2).abs() * math.sqrt(x.shape[-2])


def fro_norm(x: Tensor) -> Tensor:
    """The Frobenius norm of each matrix: ``[..., N, M] -> [...]``.

    Example:
        >>> fro_norm(torch.full((1, 2, 2), 0.5, dtype=torch.float64)).tolist()
        [1.0]
    """
    return torch.linalg.matrix_norm(x)


def hc_gain(a_hat: Tensor) -> Tensor:
    """``s_a = ||(I - J) Â (I - J)||_2`` by float64 SVD: ``[..., N, N] -> [...]``.

    Example:
        >>> hc_gain(torch.eye(4, dtype=torch.float64)).item()
        1.0
    """
    return top_singular_value_exact(double_centre(a_hat.to(torch.float64)))


def hc_gain_bracket(a_hat: Tensor, certify: bool = True) -> Tensor:
    """``[..., 2]``: certified ``lo <= s_a <= hi`` (exact SVD, ``lo = hi``, below
    :data:`BRACKET_MIN_N`; see :func:`~vitspec.functional.linalg.top_singular_bracket`).

    Example:
        >>> hc_gain_bracket(torch.eye(4, dtype=torch.float64)[None]).tolist()
        [[1.0, 1.0]]
    """
    if a_hat.shape[-1] < BRACKET_MIN_N:
        s = hc_gain(a_hat)
        return torch.stack([s, s], dim=-1)
    return top_singular_bracket(a_hat, centre=True, certify=certify)


def norm_bracket(a_hat: Tensor) -> Tensor:
    """``[..., 2]``: certified ``lo <= ||Â||_2 <= hi`` (exact SVD below :data:`BRACKET_MIN_N`).

    Example:
        >>> norm_bracket(2 * torch.eye(3, dtype=torch.float64)[None]).tolist()
        [[2.0, 2.0]]
    """
    if a_hat.shape[-1] < BRACKET_MIN_N:
        s = torch.linalg.svdvals(a_hat.to(torch.float64))[..., 0]
        return torch.stack([s, s], dim=-1)
    return top_singular_bracket(a_hat)


def check_row_stochastic(attn: Tensor, tol: float = PREMISE_TOL) -> Outcome:
    """The premise: ``A >= 0`` and ``max_i |(A 1)_i - 1| <= tol`` on the model's matrix.

    The slack is ``max(row-sum defect, largest negative entry's magnitude) / tol``; NaN or Inf
    entries violate.

    Example:
        >>> check_row_stochastic(torch.full((1, 3, 3), 0.5)).violated.tolist()
        [True]
    """
    # row sums accumulated in float64 without a float64 copy of the maps; a NaN or Inf entry
    # makes its row sum NaN or Inf, hence the slack, so it violates
    defect = (attn.sum(dim=-1, dtype=torch.float64) - 1).abs().amax(dim=-1)
    negative = attn.amin(dim=(-2, -1)).to(torch.float64).neg().clamp_min(0)
    slack = torch.maximum(defect, negative) / tol
    return Outcome(slack, ~(slack <= 1))


def check_dc_passthrough(attn: Tensor, c: Tensor, tol: float = PREMISE_TOL) -> Outcome:
    """``A (c 1) = c 1`` and ``S[0, 0] = 1`` for ``S = F A F^H``, on the model's matrix.

    ``S[0, 0]`` is the DC row of ``F`` times ``A`` times the DC column of ``F^H``, both
    ``1 / sqrt(N)``: ``1^T A 1 / N``. The error is
    ``max(max_i |(A c 1)_i - c| / |c|, |S[0, 0] - 1|)``, allowed ``tol``.

    Args:
        attn: ``[..., N, N]``.
        c: ``[...]`` nonzero constants, one per matrix.

    Example:
        >>> a = torch.full((1, 4, 4), 0.25)
        >>> check_dc_passthrough(a, torch.tensor([3.0])).violated.tolist()
        [False]
    """
    a = attn.to(torch.float64)
    c = c.to(torch.float64)
    n = a.shape[-1]
    out = a @ (c[..., None, None] * torch.ones(n, 1, dtype=a.dtype, device=a.device))
    e1 = (out[..., 0] - c[..., None]).abs().amax(dim=-1) / c.abs()
    # (F A F^H)[0, 0]: F's DC row and F^H's DC column are 1 / sqrt(N), so it is 1^T A 1 / N
    s00 = a.sum(dim=(-2, -1)) / n
    e2 = (s00 - 1).abs()
    slack = torch.maximum(e1, e2) / tol
    return Outcome(slack, ~(slack <= 1))


def check_hc_contraction(a_hat: Tensor, z: Tensor, s_a: Tensor, rtol: float = RTOL) -> Outcome:
    """``||HC[Â Z]||_F <= s_a ||HC[Z]||_F`` (Wang et al., Thm. 3; exact for row-stochastic Â).

    Args:
        a_hat: ``[..., N, N]`` renormalised attention.
        z: ``[..., N, k]`` inputs.
        s_a: ``[...]`` exact HC gains of ``a_hat``.

    Returns:
        One case per matrix (Frobenius norms over the k columns).

    Example:
        >>> a = torch.full((1, 4, 4), 0.25, dtype=torch.float64)
        >>> check_hc_contraction(a, torch.randn(1, 4, 2, dtype=torch.float64),
        ...                      hc_gain(a)).violated.tolist()
        [False]
    """
    az = a_hat @ z
    lhs = hc_norm(az).norm(dim=-1)
    rhs = s_a * hc_norm(z).norm(dim=-1)
    err = 4 * gamma(a_hat.shape[-1]) * (fro_norm(a_hat) * fro_norm(z) + fro_norm(az))
    return inequality(lhs, rhs, err, rtol)


def logit_half_width(a_hat: Tensor) -> Tensor:
    """``a = max_i (max_j log Â_ij - min_j log Â_ij) / 2``: the largest half-width of a row's
    logit range (softmax is shift-invariant, so ``log Â`` is the logits up to a row constant).
    ``inf`` when an entry is 0 (the logits are unbounded).

    Example:
        >>> p = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
        >>> logit_half_width(p.softmax(-1)).item()
        1.0
    """
    la = a_hat.to(torch.float64).log()
    return ((la.amax(dim=-1) - la.amin(dim=-1)) / 2).amax(dim=-1)


def logit_bound(n: int, a: Tensor) -> Tensor:
    """``sqrt(N e^{2a} / (e^{2a} + N - 1))``, evaluated stably as ``sqrt(N / (1 + (N-1) e^{-2a}))``.

    1 at ``a = 0``, ``sqrt(N)`` as ``a -> inf``.

    Example:
        >>> logit_bound(16, torch.tensor([0.0, float("inf")], dtype=torch.float64)).tolist()
        [1.0, 4.0]
    """
    a = a.to(torch.float64)
    return torch.sqrt(n / (1 + (n - 1) * torch.exp(-2 * a)))


def check_logit_bound(
    a_hat: Tensor, s_a: Tensor, rtol: float = RTOL, s_a_hi: Tensor | None = None
) -> tuple[Outcome, Tensor, Tensor, Tensor]:
    """``s_a <= ||Â||_2 <= logit_bound(N, a)`` with ``a`` from :func:`logit_half_width`.

    The second inequality holds because every entry of a softmax row whose logit range is ``2a``
    is at most ``e^{2a} / (e^{2a} + N - 1)``, so the column sums (``||Â||_1``) are at most N
    times that, while ``||Â||_inf = 1``; and ``||Â||_2^2 <= ||Â||_1 ||Â||_inf``. It needs ``a``
    to bound every row: the mean or a single row's half-width does not give a bound.

    ``||Â||_2`` is bracketed (:func:`norm_bracket`); the inner inequality is decided with the
    upper end of ``s_a`` (``s_a_hi``, default ``s_a``) against the lower end of the norm, the
    outer one with the upper end of the norm, so a pass is certain.

    Returns:
        ``(outcome, norm, bound, a)``: slack ``||Â||_2 / bound``; violated if either inequality
        fails; ``norm`` = the lower end of ``||Â||_2`` (the float64 SVD value below
        :data:`BRACKET_MIN_N`), each ``[...]``.
    """
    norm_lo, norm_hi = norm_bracket(a_hat).unbind(-1)
    a = logit_half_width(a_hat)
    bound = logit_bound(a_hat.shape[-1], a)
    err = 4 * gamma(a_hat.shape[-1]) * fro_norm(a_hat)
    inner = inequality(s_a if s_a_hi is None else s_a_hi, norm_lo, err, rtol)
    outer = inequality(norm_hi, bound, err, rtol)
    norm = norm_lo
    return Outcome(outer.slack, inner.violated | outer.violated), norm, bound, a


def head_weight_norms(w_v: Tensor, w_o: Tensor) -> Tensor:
    """``||W_V^h W_O^h||_2`` per head from the QR factors (``W_V = Q_v R_v``, ``W_O^T = Q_o R_o``,
    so ``W_V W_O = Q_v R_v R_o^T Q_o^T`` and the norm is that of the small ``R_v R_o^T``).

    Args:
        w_v: ``[H, C, d]`` (``Y @ w_v[h]`` is head h's values).
        w_o: ``[H, d, C']`` (head h's rows of the output projection, as ``O_h @ w_o[h]``).

    Returns:
        ``[H]`` float64.
    """
    r_v = torch.linalg.qr(w_v.to(torch.float64), mode="r").R
    r_o = torch.linalg.qr(w_o.to(torch.float64).mT, mode="r").R
    return torch.linalg.svdvals(r_v @ r_o.mT)[..., 0]


@dataclass
class MsaResult:
    """Per-image msa_bound quantities ``[B]``: the branch and residual outcomes, the measured HC
    gain ``||HC[MSA(Y)]|| / ||HC[Y]||``, the bound ``sum_h s_a^h ||W_V^h W_O^h||_2`` and the
    residual rate ``||HC[X + MSA(Y)]|| / ||HC[X]||``, its bound, and ``||HC[Y]|| / ||HC[X]||``."""

    branch: Outcome
    residual: Outcome
    gain: Tensor
    bound: Tensor
    rate: Tensor
    rate_bound: Tensor
    y_over_x: Tensor


def check_msa_bound(
    x: Tensor,
    y: Tensor,
    msa: Tensor,
    s_a: Tensor,
    head_norms: Tensor,
    err_scale: Tensor,
    rtol: float = RTOL,
) -> MsaResult:
    """``||HC[MSA(Y)]||_F <= sum_h s_a^h ||W_V^h W_O^h||_2 ||HC[Y]||_F`` and the residual form
    ``||HC[X + MSA(Y)]||_F <= ||HC[X]||_F + (that bound)``.

    Args:
        x: ``[B, N, C]`` block input; ``y``: ``[B, N, C']`` attention input (``norm1(x)``).
        msa: ``[B, N, C]`` the attention branch (biases add only DC and may be left out).
        s_a: ``[B, H]`` exact HC gains; ``head_norms``: ``[H]``.
        err_scale: ``[B]`` sum of the norms entering ``msa`` (for the round-off allowance).
    """
    x, y, msa = (t.to(torch.float64) for t in (x, y, msa))
    k = max(x.shape[-2], x.shape[-1], y.shape[-1])
    err = 4 * gamma(k) * err_scale
    hc_y = fro_norm(y - y.mean(dim=-2, keepdim=True))
    hc_x = fro_norm(x - x.mean(dim=-2, keepdim=True))
    hc_msa = fro_norm(msa - msa.mean(dim=-2, keepdim=True))
    res = x + msa
    hc_res = fro_norm(res - res.mean(dim=-2, keepdim=True))
    bound = (s_a * head_norms).sum(dim=-1)
    branch = inequality(hc_msa, bound * hc_y, err, rtol)
    err_res = err + 4 * gamma(k) * (fro_norm(x) + fro_norm(res))
    residual = inequality(hc_res, hc_x + bound * hc_y, err_res, rtol)
    return MsaResult(
        branch,
        residual,
        hc_msa / hc_y,
        bound,
        hc_res / hc_x,
        (hc_x + bound * hc_y) / hc_x,
        hc_y / hc_x,
    )


def attnscale(a_hat: Tensor, w: float) -> Tensor:
    """AttnScale (Wang et al. 2022): ``A' = J + (1 + w) (Â - J)``.

    Example:
        >>> a = torch.eye(2, dtype=torch.float64)
        >>> attnscale(a, 1.0).tolist()
        [[1.5, -0.5], [-0.5, 1.5]]
    """
    n = a_hat.shape[-1]
    return 1.0 / n + (1 + w) * (a_hat - 1.0 / n)


def attnscale_weyl(a_hat: Tensor, ws: tuple[float, ...] = ATTNSCALE_W) -> Tensor:
    """``[2, len(ws), ...]``: for each w, Weyl's bound ``||C'_w - (1 + w) C||_F`` (plus the
    rounding of ``(1 + w) C``) and ``max_i |(A'_w 1)_i - 1|``, one map at a time (``C`` formed
    once for all w).

    Example:
        >>> a = renormalise(torch.rand(1, 300, 300, dtype=torch.float64))
        >>> bool((attnscale_weyl(a) < 1e-12).all())
        True
    """
    out = []
    for g in map_groups(a_hat.to(torch.float64)):
        n = g.shape[-1]
        c = double_centre(g)
        fro_c = fro_norm(c)
        weyl, rows = [], []
        for w in ws:
            # attnscale(g, w) and double_centre of it, with the same roundings, in two buffers
            a2 = (g - 1.0 / n).mul_(1 + w).add_(1.0 / n)
            rows.append((a2.sum(dim=-1) - 1).abs().amax(dim=-1))
            row = a2.mean(dim=-1, keepdim=True)
            d = (a2 - a2.mean(dim=-2, keepdim=True)).sub_(row - row.mean(dim=-2, keepdim=True))
            # d - (1 + w) c in one pass: its rounding is at most that of the two-step form
            weyl.append(
                fro_norm(d.sub_(c, alpha=1 + w)) * (1 + 2 * _U) + 2 * _U * abs(1 + w) * fro_c
            )
        out.append(torch.stack([torch.stack(weyl), torch.stack(rows)]))
    return torch.cat(out, dim=2).reshape(2, len(ws), *a_hat.shape[:-2])


def check_attnscale_gain(
    a_hat: Tensor,
    s_a: Tensor,
    norm: Tensor,
    w: float,
    rtol: float = RTOL,
    weyl: Tensor | None = None,
) -> Outcome:
    """``||(I-J) A' (I-J)||_2 = (1 + w) s_a`` (float64 SVD of ``A'``) and ``A' 1 = 1``.

    The error is ``max(|s' - (1 + w) s_a| / ((1 + |w|) ||Â||_2), max_i |(A' 1)_i - 1|)``, allowed
    ``rtol`` (round-off in forming A' is relative to its size, hence the normalisation). From
    :data:`BRACKET_MIN_N` tokens on, no SVD: Weyl's inequality bounds ``|s' - (1 + w) s_a|`` by
    ``||C' - (1 + w) C||_F`` (``C``, ``C'`` the double-centred Â, A' as computed, plus the
    rounding of ``(1 + w) C``; :func:`attnscale_weyl`, or ``weyl`` (its ``[2, ...]`` entry for
    this w) when given), so the slack is an upper bound of the error's; ``norm`` is then the
    lower end of ``||Â||_2``, which only enlarges it.
    """
    if a_hat.shape[-1] < BRACKET_MIN_N:
        a2 = attnscale(a_hat, w)
        diff = (hc_gain(a2) - (1 + w) * s_a).abs()
        e2 = (a2.sum(dim=-1) - 1).abs().amax(dim=-1)
    else:
        diff, e2 = attnscale_weyl(a_hat, (w,))[:, 0] if weyl is None else weyl
    e1 = diff / ((1 + abs(w)) * norm)
    slack = torch.maximum(e1, e2) / rtol
    return Outcome(slack, ~(slack <= 1))
