"""Metric registry: one :class:`MetricSpec` per metric name of docs/metrics.md.

The CLI, the docs and the tests enumerate metrics through :func:`list_metrics` instead of
repeating their names. The functional core (:mod:`vitspec.functional`) does not know about the
registry; the built-in metrics are registered at the bottom of this module, in the order of
docs/metrics.md.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from vitspec import functional as F
from vitspec.errors import VitspecError
from vitspec.sites import PATTERN_SITES, TOKEN_SITES

__all__ = [
    "KIND_SITES",
    "KINDS",
    "NEEDS",
    "MetricSpec",
    "get_metric",
    "list_metrics",
    "register_metric",
]

#: ``token``: ``fn(tokens [B, N, C], num_prefix, grid) -> [B]``;
#: ``token_curve``: same arguments ``-> [B, K]``;
#: ``attn``: ``fn(attn [B, H, N, N], prev) -> [B, H]``;
#: ``attn_curve``: same arguments ``-> [B, H, N]``.
KINDS = ("token", "token_curve", "attn", "attn_curve")


#: what a metric may need beyond its site: ``prev_layer`` (the previous layer's attention on the
#: same tokens), ``nonnegative`` (attention without negative entries), ``square`` (an N x N
#: pattern over one token set; non-square patterns get only the metrics without it).
NEEDS = ("prev_layer", "nonnegative", "square", "class_and_distillation")

#: the sites each kind reads (names of :mod:`vitspec.sites`)
KIND_SITES = {
    "token": TOKEN_SITES,
    "token_curve": TOKEN_SITES,
    "attn": PATTERN_SITES,
    "attn_curve": PATTERN_SITES,
}


@dataclass(frozen=True)
class MetricSpec:
    """One registered metric.

    Attributes:
        name: the metric's name in the results table, e.g. ``'hc_dc_ratio'``.
        kind: one of :data:`KINDS`.
        fn: the functional implementation.
        formula: short plain-text formula for the README glossary.
        source: the paper the definition follows, e.g. ``'Wang et al. 2022'``.
        sites: the sites (:mod:`vitspec.sites`) the metric reads; a run schedules it only where
            the model has one of them.
        needs: among :data:`NEEDS`. AttnScale's ``A' = J + (1 + w)(A - J)`` keeps rows summing
            to 1 but has negative entries where ``w > 0`` and ``A_ij < w / ((1 + w) N)``, so
            ``attn_entropy`` needs ``nonnegative``; the other attention metrics are defined for
            any real square matrix. ``class_and_distillation``: defined only for models whose
            two prefix tokens are a class and a distillation token (distilled DeiT).
        default: part of the default selection (``metrics=None``); the contract's metrics are,
            ``cls_dist_cos`` is asked for by name.
    """

    name: str
    kind: str
    fn: Callable
    formula: str
    source: str
    sites: tuple[str, ...] = ()
    needs: frozenset[str] = frozenset()
    default: bool = True

    @property
    def needs_prev(self) -> bool:
        """True when ``fn`` needs the previous layer's attention (it exists for l >= 2 only)."""
        return "prev_layer" in self.needs

    @property
    def needs_nonnegative(self) -> bool:
        """True when ``fn`` is undefined for attention with negative entries."""
        return "nonnegative" in self.needs


_REGISTRY: dict[str, MetricSpec] = {}


def register_metric(
    name: str,
    kind: str,
    formula: str,
    source: str,
    *,
    sites: tuple[str, ...] | None = None,
    needs: tuple[str, ...] = (),
    default: bool = True,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` under ``name``; returns ``fn`` unchanged.

    Args:
        name, kind, formula, source: see :class:`MetricSpec`.
        sites: the sites it reads (default: those of its kind, :data:`KIND_SITES`).
        needs: among :data:`NEEDS`.
        default: measured when no metrics are named; False: only when asked for (by name or
            pattern), like the added metrics that apply to one family only.

    Example:
        >>> @register_metric("my_norm", "token", "||X||_F", "doc example")
        ... def my_norm(tokens, num_prefix, grid):
        ...     return tokens.double().norm(dim=(1, 2))
        >>> get_metric("my_norm").sites
        ('resid_pre', 'resid_mid', 'resid_post')
        >>> _ = _REGISTRY.pop("my_norm")
    """
    if kind not in KINDS:
        raise VitspecError(f"unknown metric kind {kind!r}; allowed: {', '.join(KINDS)}")
    unknown = [n for n in needs if n not in NEEDS]
    if unknown:
        raise VitspecError(f"unknown metric need {unknown[0]!r}; allowed: {', '.join(NEEDS)}")
    sites = KIND_SITES[kind] if sites is None else tuple(sites)

    def decorator(fn: Callable) -> Callable:
        old = _REGISTRY.get(name)
        if old is not None and old.fn is not fn:
            raise VitspecError(f"metric {name!r} is already registered (by {old.fn.__module__})")
        _REGISTRY[name] = MetricSpec(
            name, kind, fn, formula, source, sites, frozenset(needs), default
        )
        return fn

    return decorator


def get_metric(name: str) -> MetricSpec:
    """The spec registered under ``name``.

    Raises:
        VitspecError: unknown name; the message lists the allowed names.

    Example:
        >>> get_metric("attn_hc_gain").source
        'Wang et al. 2022, Thm. 3'
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise VitspecError(
            f"unknown metric {name!r}{hint}; allowed: {', '.join(_REGISTRY)}"
        ) from None


def list_metrics(pattern: str = "*", kind: str | None = None) -> list[MetricSpec]:
    """Registered metrics whose name matches the fnmatch ``pattern``, in registration order.

    Args:
        pattern: shell-style pattern, e.g. ``'attn_*'``.
        kind: keep only this kind (one of :data:`KINDS`); None keeps all.

    Example:
        >>> [m.name for m in list_metrics("attn_*", kind="attn")]
        ['attn_entropy', 'attn_hc_gain', 'attn_cross_layer_sim', 'attn_cos']
    """
    if kind is not None and kind not in KINDS:
        raise VitspecError(f"unknown metric kind {kind!r}; allowed: {', '.join(KINDS)}")
    return [
        spec
        for spec in _REGISTRY.values()
        if fnmatch.fnmatchcase(spec.name, pattern) and (kind is None or spec.kind == kind)
    ]


# Built-in metrics, in the order of docs/metrics.md: name, kind, formula, source, fn, needs.
_BUILTIN = [
    (
        "hc_dc_ratio",
        "token",
        "||HC[X]||_F / ||DC[X]||_F over all N tokens",
        "Wang et al. 2022",
        F.hc_dc_ratio,
        (),
    ),
    (
        "hc_energy",
        "token",
        "||HC[X]||_F^2 / ||X||_F^2 over all N tokens",
        "Wang et al. 2022",
        F.hc_energy,
        (),
    ),
    (
        "patch_cos_abs",
        "token",
        "mean_{i!=j} |cos(p_i, p_j)| over patch tokens",
        "Gong et al. 2021",
        F.patch_cos_abs,
        (),
    ),
    (
        "patch_cos",
        "token",
        "mean_{i!=j} cos(p_i, p_j) over patch tokens",
        "Gong et al. 2021 v1",
        F.patch_cos,
        (),
    ),
    (
        "rank_residual",
        "token",
        "n13(X - 1 xbar^T) / n13(X), n13(M) = sqrt(||M||_1 ||M||_inf)",
        "Dong et al. 2021 code",
        F.rank_residual,
        (),
    ),
    (
        "feat_var",
        "token",
        "mean_c var_{h*w}(patch grid[c]) (unbiased)",
        "Park & Kim 2022",
        F.feat_var,
        (),
    ),
    (
        "dlogamp_hf",
        "token",
        "last point of dlogamp (highest frequency)",
        "Park & Kim 2022",
        F.dlogamp_hf,
        (),
    ),
    (
        "erank",
        "token",
        "exp(-sum p_k log p_k), p = s / sum(s), s = svd(HC[X])",
        "Roy & Vetterli 2007",
        F.erank,
        (),
    ),
    (
        "dlogamp",
        "token_curve",
        "diag of fftshift(mean_c log(|fft2(grid)| + 1e-6)) from h//2, minus first point",
        "Park & Kim 2022",
        F.dlogamp,
        (),
    ),
    (
        "attn_entropy",
        "attn",
        "mean_i -sum_j A_ij log A_ij (nats)",
        "Zhai et al. 2023",
        F.attn_entropy,
        ("nonnegative",),
    ),
    (
        "attn_hc_gain",
        "attn",
        "sigma_max((I - J) A (I - J))",
        "Wang et al. 2022, Thm. 3",
        F.attn_hc_gain,
        ("square",),
    ),
    (
        "attn_cross_layer_sim",
        "attn",
        "mean_t cos(A^l[:, t], A^(l-1)[:, t])",
        "Zhou et al. 2021",
        F.attn_cross_layer_sim,
        ("prev_layer", "square"),
    ),
    (
        "attn_cos",
        "attn",
        "mean_{i,j} |cos(A[:, i], A[:, j])| (diagonal included)",
        "Wang et al. 2022, issue #2 snippet",
        F.attn_cos,
        ("square",),
    ),
    (
        "attn_spectrum",
        "attn_curve",
        "||row k of F A F^H||_2, k = 0..N-1",
        "Wang et al. 2022, Fig. 2/5",
        F.attn_spectrum,
        ("square",),
    ),
    (
        "token_spectrum",
        "token_curve",
        "sum_c |(F X)[k, c]|^2 / ||X||_F^2, k = 0..N-1",
        "Wang et al. 2022",
        F.token_spectrum,
        (),
    ),
]
for _name, _kind, _formula, _source, _fn, _needs in _BUILTIN:
    register_metric(_name, _kind, _formula, _source, needs=_needs)(_fn)
del _name, _kind, _formula, _source, _fn, _needs

# Added metrics (docs/metrics.md, "Added metrics")
register_metric(
    "cls_dist_cos",
    "token",
    "cos(x_cls, x_dist), the class and distillation tokens (distilled DeiT only)",
    "Touvron et al. 2021",
    needs=("class_and_distillation",),
    default=False,
)(F.cls_dist_cos)
