"""Theorem 1's low-pass check along trajectories: ``r_t = ||HC[w_t]|| / ||DC[w_t]||`` for
``w_t = M_t ... M_1 z``, each step checked against ``prod_k s_k ||HC[z]||`` with its float64
round-off allowance (the tolerances of :mod:`vitspec.verification.checks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vitspec.verification.checks import (
    RTOL,
    Outcome,
    dc_norm,
    fro_norm,
    gamma,
    hc_norm,
    inequality,
)

__all__ = ["STOP_RATIO", "LowpassResult", "Trajectory", "lowpass"]

STOP_RATIO = 1e-12  # lowpass_limit stops a trajectory once r_t falls below this


class Trajectory:
    """``w_t = M_t ... M_1 z`` column by column, with ``||HC[w_t]||`` checked against its bound.

    The bound is ``prod_k s_k ||HC[z]||`` (``s_k`` the exact HC gain of ``M_k``), with the running
    float64 round-off allowance ``E_t = s_t E_(t-1) + 4 gamma_N (||M_t||_F ||w_(t-1)|| + ||w_t||)``.
    ``r_t = ||HC[w_t]|| / ||DC[w_t]||`` is the ratio of Theorem 1.

    Args:
        z: ``[..., N, k]`` start vectors (k columns are k separate trajectories).

    Example:
        >>> from vitspec.verification.checks import hc_gain
        >>> a = torch.full((1, 4, 4), 0.25, dtype=torch.float64)
        >>> tr = Trajectory(torch.randn(1, 4, 2, dtype=torch.float64))
        >>> r, bound, out = tr.step(a, hc_gain(a))
        >>> bool((r < 1e-12).all()), out.violated.tolist()
        (True, [[False, False]])
    """

    def __init__(self, z: Tensor):
        self.w = z.to(torch.float64)
        self.gamma = gamma(z.shape[-2])
        self.hc0 = hc_norm(self.w)
        self.gain = torch.ones_like(self.hc0)
        self.err = 4 * self.gamma * self.w.norm(dim=-2)

    def keep(self, mask: Tensor) -> None:
        """Keep only the leading-dimension entries where ``mask`` is True."""
        self.w, self.hc0, self.gain, self.err = (
            t[mask] for t in (self.w, self.hc0, self.gain, self.err)
        )

    def step(
        self, m: Tensor, s: Tensor, rtol: float = RTOL, m_fro: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Outcome]:
        """Apply ``m`` (``[..., N, N]``, gain ``s`` ``[...]``, Frobenius norm ``m_fro`` if known);
        return ``r_t``, its bound and the outcome, each ``[..., k]``."""
        w_prev = self.w
        self.w = m @ w_prev
        s = s[..., None]
        m_fro = fro_norm(m) if m_fro is None else m_fro
        self.gain = self.gain * s
        self.err = s * self.err + 4 * self.gamma * (
            m_fro[..., None] * w_prev.norm(dim=-2) + self.w.norm(dim=-2)
        )
        lhs = hc_norm(self.w)
        dc = dc_norm(self.w)
        rhs = self.gain * self.hc0
        out = inequality(lhs, rhs, self.err, rtol)
        return lhs / dc, torch.nan_to_num(rhs, nan=math.inf) / dc, out


@dataclass
class LowpassResult:
    """Per-trajectory results of :func:`lowpass` (``[..., k]``) and the curves (``[..., k, T]``).

    Attributes:
        outcome: slack = max over t of ``r_t / bound_t``; violated if any t violates.
        r: ``r_t`` for t = 1..T (NaN after the trajectory stopped).
        bound: ``s_a^t ||HC[z]|| / ||DC[A^t z]||`` (NaN after the stop).
        steps: steps taken (the first t with ``r_t < STOP_RATIO``, else T).
        rate: fitted per-step decay rate ``exp(slope of log r_t)`` over the second half of the
            steps taken (NaN for fewer than 2 steps in that half).
    """

    outcome: Outcome
    r: Tensor
    bound: Tensor
    steps: Tensor
    rate: Tensor


def lowpass(
    a_hat: Tensor,
    z: Tensor,
    s_a: Tensor,
    max_steps: int = 512,
    stop: float = STOP_RATIO,
    rtol: float = RTOL,
) -> LowpassResult:
    """Theorem 1: ``r_t = ||HC[Â^t z]|| / ||DC[Â^t z]||`` for t = 1..T, checked at every t.

    Matrices whose trajectories have all stopped are dropped from the loop, so one slowly mixing
    head does not make every other matrix run to T.

    Args:
        a_hat: ``[..., N, N]`` renormalised attention.
        z: ``[..., N, k]`` start vectors.
        s_a: ``[...]`` exact HC gains.
        max_steps: T.
        stop: a trajectory stops once ``r_t < stop``; all stop -> the loop ends.

    Example:
        >>> from vitspec.verification.checks import hc_gain, renormalise
        >>> a = renormalise(torch.rand(2, 8, 8) + 1)
        >>> res = lowpass(a, torch.randn(2, 8, 3, dtype=torch.float64), hc_gain(a))
        >>> bool(res.outcome.violated.any()), bool((res.steps < 512).all())
        (False, True)
    """
    lead, n, k = a_hat.shape[:-2], a_hat.shape[-1], z.shape[-1]
    a = a_hat.reshape(-1, n, n)
    s = s_a.reshape(-1)
    m = a.shape[0]
    dev = a.device
    tr = Trajectory(z.reshape(m, n, k))
    idx = torch.arange(m, device=dev)
    active = torch.ones(m, k, dtype=torch.bool, device=dev)
    slack = torch.zeros(m, k, dtype=torch.float64, device=dev)
    violated = torch.zeros_like(active)
    steps = torch.zeros(m, k, dtype=torch.long, device=dev)
    r_all = torch.full((m, k, max_steps), math.nan, dtype=torch.float64, device=dev)
    b_all = torch.full_like(r_all, math.nan)
    fro = fro_norm(a)
    sub_a, sub_s, sub_fro = a, s, fro
    taken = 0
    for t in range(max_steps):
        r, bound, out = tr.step(sub_a, sub_s, rtol, sub_fro)
        act = active[idx]
        r_all[idx, :, t] = torch.where(act, r, math.nan)
        b_all[idx, :, t] = torch.where(act, bound, math.nan)
        slack[idx] = torch.where(act, torch.maximum(slack[idx], out.slack), slack[idx])
        violated[idx] |= act & out.violated
        steps[idx] += act.long()
        act = act & ~(r < stop)
        active[idx] = act
        taken = t + 1
        keep = act.any(dim=-1)
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            idx = idx[keep]
            tr.keep(keep)
            sub_a, sub_s, sub_fro = a[idx], s[idx], fro[idx]
    r_all, b_all = r_all[..., :taken], b_all[..., :taken]

    def shaped(x: Tensor) -> Tensor:
        return x.reshape(*lead, *x.shape[1:])

    return LowpassResult(
        Outcome(shaped(slack), shaped(violated)),
        shaped(r_all),
        shaped(b_all),
        shaped(steps),
        shaped(_fit_rate(r_all, steps)),
    )


def _fit_rate(r: Tensor, steps: Tensor) -> Tensor:
    """Least-squares slope of log r_t on t over t in (steps/2, steps], as a per-step factor."""
    t = torch.arange(1, r.shape[-1] + 1, dtype=torch.float64, device=r.device)
    use = (t > steps[..., None] / 2) & (t <= steps[..., None]) & (r > 0)
    logr = torch.where(use, r.clamp_min(1e-300).log(), torch.zeros_like(r))
    n = use.sum(dim=-1).to(torch.float64)
    tm = torch.where(use, t, 0).sum(dim=-1) / n
    lm = logr.sum(dim=-1) / n
    dt = torch.where(use, t - tm[..., None], 0)
    slope = (dt * (logr - lm[..., None])).sum(dim=-1) / (dt * dt).sum(dim=-1)
    return torch.where(n >= 2, slope.exp(), torch.full_like(slope, math.nan))
