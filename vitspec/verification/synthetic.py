"""The synthetic suite: the same checks on softmax matrices of random logits, no model needed.

For every size N and logit width a, four families of logits (``logit_families``), a few
matrices each, in float64:

- ``uniform``: i.i.d. logits uniform in [-a, a] (the typical case).
- ``peaked``: each row has one random key at +a and every other key at -a.
- ``shared``: every row's +a key is the same key (all queries attend to one token: the case
  where the logit bound is nearly tight).
- ``two-cluster``: the tokens split into two random halves and each half's rows put +a on one
  key of their own half: two almost-closed groups, where ``s_a`` exceeds 1 (up to
  ``sqrt(N / 2)``) and ``r_t`` decays arbitrarily slowly as a grows.

Products (``product_lowpass``) run along paths of ``PRODUCT_DEPTH`` matrices drawn at random
from all the matrices of one N; ``msa_bound`` uses ``HEADS`` matrices of a group as heads with
random weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vitspec.functional import double_centre
from vitspec.verification import checks as ck
from vitspec.verification.tally import PREMISE, Tallies
from vitspec.verification.trajectory import Trajectory, lowpass

SIZES = (16, 64, 197, 577)
WIDTHS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
FAMILIES = ("uniform", "peaked", "shared", "two-cluster")
SAMPLES = 2  # matrices per (family, width); also the heads of the synthetic msa_bound
PRODUCT_DEPTH = 12
PRODUCT_PATHS = 8
CHANNELS, HEAD_DIM = 32, 8


def logit_families(family: str, n: int, a: float, count: int, gen: torch.Generator) -> Tensor:
    """``[count, n, n]`` float64 logits of one family (module docstring) with half-width a.

    Example:
        >>> p = logit_families("peaked", 4, 2.0, 1, torch.Generator().manual_seed(0))
        >>> sorted(set(p.flatten().tolist()))
        [-2.0, 2.0]
    """
    if family == "uniform":
        return (torch.rand(count, n, n, generator=gen, dtype=torch.float64) * 2 - 1) * a
    p = torch.full((count, n, n), -a, dtype=torch.float64)
    rows = torch.arange(n)
    for i in range(count):
        if family == "peaked":
            keys = torch.randint(0, n, (n,), generator=gen)
        elif family == "shared":
            keys = torch.randint(0, n, (1,), generator=gen).expand(n)
        elif family == "two-cluster":
            perm = torch.randperm(n, generator=gen)
            half = perm[: n // 2]
            keys = torch.empty(n, dtype=torch.long)
            keys[half] = half[0]
            keys[perm[n // 2 :]] = perm[n // 2]
        else:
            raise ValueError(f"unknown logit family {family!r}; allowed: {', '.join(FAMILIES)}")
        p[i, rows, keys] = a
    return p


def run_synthetic(
    sizes=SIZES, widths=WIDTHS, *, samples: int = SAMPLES, max_steps: int = 512, seed: int = 0
) -> tuple[dict[int, Tallies], list[dict]]:
    """Run every check on synthetic softmax matrices.

    Returns:
        ``({N: tallies}, rows)``: per-size tallies (``layer`` is None except for
        ``product_lowpass``, where it is the number of factors; ``head`` is None) and one row per
        matrix for figure (d): N, family, width, measured a, s_a, ``||A||_2``, bound.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[int, Tallies] = {}
    points: list[dict] = []
    for n in sizes:
        tallies = out[n] = Tallies()
        pool = []
        for width in widths:
            for family in FAMILIES if width > 0 else FAMILIES[:1]:
                a_mat = logit_families(family, n, width, samples, gen).softmax(dim=-1)
                s_a, norm, bound, a = _group(tallies, a_mat, gen)
                pool.append((a_mat, s_a))
                points += [
                    {
                        "N": n,
                        "family": family,
                        "width": width,
                        "a": a[i].item(),
                        "s_a": s_a[i].item(),
                        "norm": norm[i].item(),
                        "logit_bound": bound[i].item(),
                    }
                    for i in range(samples)
                ]
        mats = ck.renormalise(torch.cat([m for m, _ in pool]))
        gains = torch.cat([s for _, s in pool])
        res = lowpass(mats, _randn(gen, mats.shape[0], n, 4), gains, max_steps)
        tallies.add("lowpass_limit", None, None, res.outcome)
        _products(tallies, mats, gains, gen)
    return out, points


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _group(tallies: Tallies, a_mat: Tensor, gen: torch.Generator):
    """Every single-matrix check and msa_bound on one group of matrices ``[K, N, N]``."""
    k, n, _ = a_mat.shape
    tallies.add(PREMISE, None, None, ck.check_row_stochastic(a_mat))
    c = _randn(gen, k).sign() * (0.5 + torch.rand(k, generator=gen, dtype=torch.float64))
    tallies.add("dc_passthrough", None, None, ck.check_dc_passthrough(a_mat, c))
    a_hat = ck.renormalise(a_mat)
    s_a = ck.hc_gain(a_hat)
    tallies.add(
        "hc_contraction", None, None, ck.check_hc_contraction(a_hat, _randn(gen, k, n, 8), s_a)
    )
    # the worst case: the top right singular vector of (I-J) A (I-J) attains the bound
    m = double_centre(a_hat)
    v = torch.linalg.eigh(m.mT @ m).eigenvectors[..., -1:]
    tallies.add("hc_contraction", None, None, ck.check_hc_contraction(a_hat, v, s_a))
    outcome, norm, bound, a = ck.check_logit_bound(a_hat, s_a)
    tallies.add("logit_bound", None, None, outcome)
    for w in ck.ATTNSCALE_W:
        tallies.add(
            "attnscale_gain", None, None, ck.check_attnscale_gain(a_hat[:1], s_a[:1], norm[:1], w)
        )
    # msa_bound: the K matrices as the heads of one attention branch with random weights
    w_v = _randn(gen, k, CHANNELS, HEAD_DIM) / math.sqrt(CHANNELS)
    w_o = _randn(gen, k, HEAD_DIM, CHANNELS) / math.sqrt(HEAD_DIM)
    x = _randn(gen, 1, n, CHANNELS)
    y = _randn(gen, 1, n, CHANNELS)
    values = torch.einsum("bnc,hcd->bhnd", y, w_v)
    msa = torch.einsum("bhnd,hdc->bnc", a_hat[None] @ values, w_o)
    err_scale = (
        torch.linalg.matrix_norm(a_hat)
        * torch.linalg.matrix_norm(values[0])
        * torch.linalg.matrix_norm(w_o)
    ).sum()[None]
    msa_res = ck.check_msa_bound(x, y, msa, s_a[None], ck.head_weight_norms(w_v, w_o), err_scale)
    tallies.add("msa_bound", None, None, msa_res.branch)
    tallies.add("msa_residual", None, None, msa_res.residual)
    return s_a, norm, bound, a


def _products(tallies: Tallies, mats: Tensor, gains: Tensor, gen: torch.Generator) -> None:
    """Paths of PRODUCT_DEPTH matrices drawn at random from ``mats``, checked after each
    factor."""
    n = mats.shape[-1]
    choice = torch.randint(0, mats.shape[0], (PRODUCT_PATHS, PRODUCT_DEPTH), generator=gen)
    tr = Trajectory(_randn(gen, PRODUCT_PATHS, n, 4))
    for depth in range(PRODUCT_DEPTH):
        idx = choice[:, depth]
        _, _, outcome = tr.step(mats[idx], gains[idx])
        tallies.add("product_lowpass", depth + 1, None, outcome)
