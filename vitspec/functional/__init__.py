"""Functional core: one pure, batched torch definition of every metric in docs/metrics.md.

Token metrics: ``fn(tokens [B, N, C], num_prefix, grid) -> [B]`` (curves ``[B, K]``).
Attention metrics: ``fn(attn [B, H, N, N], prev) -> [B, H]`` (curve ``[B, H, N]``).
``tokens`` / ``attn`` / ``prev`` may also be a :class:`TokenView` / :class:`AttnView`, which
computes the intermediates several metrics share (centred tokens, unit columns, Gram matrices)
once.
No hooks, files or pandas here; the registry lives in :mod:`vitspec.metrics`.
"""

from vitspec.functional.attention import (
    attn_cos,
    attn_cross_layer_sim,
    attn_entropy,
    attn_hc_gain,
    attn_spectrum,
    double_centre,
    hc_gain_exact,
    is_row_stochastic,
)
from vitspec.functional.linalg import (
    top_singular_bracket,
    top_singular_value,
    top_singular_value_exact,
)
from vitspec.functional.tokens import (
    cls_dist_cos,
    dlogamp,
    dlogamp_hf,
    erank,
    feat_var,
    hc_dc_ratio,
    hc_energy,
    patch_cos,
    patch_cos_abs,
    rank_residual,
    token_spectrum,
)
from vitspec.functional.views import AttnView, TokenView, attn_view, map_groups, token_view

__all__ = [
    "AttnView",
    "TokenView",
    "attn_cos",
    "attn_cross_layer_sim",
    "attn_entropy",
    "attn_hc_gain",
    "attn_spectrum",
    "attn_view",
    "cls_dist_cos",
    "dlogamp",
    "dlogamp_hf",
    "double_centre",
    "erank",
    "feat_var",
    "hc_dc_ratio",
    "hc_energy",
    "hc_gain_exact",
    "is_row_stochastic",
    "map_groups",
    "patch_cos",
    "patch_cos_abs",
    "rank_residual",
    "token_spectrum",
    "token_view",
    "top_singular_bracket",
    "top_singular_value",
    "top_singular_value_exact",
]
