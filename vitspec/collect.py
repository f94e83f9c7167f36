"""Streaming reduction of captured tensors into float64 moments, and from moments to table rows.

A ``Collector`` is the consumer the capture hooks call: it runs every selected metric on one
layer's tensors as the forward pass produces them, folds the per-image values into fixed-size
``Moments`` and drops the tensors. ``rows()`` turns the moments into the long-format tables.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vitspec.capture import SITES
from vitspec.errors import VitspecError
from vitspec.functional import AttnView, TokenView
from vitspec.metrics import MetricSpec, Moments

SITE_ORDER = {site: i for i, site in enumerate((*SITES, "attn"))}
ALL_HEADS = "heads"  # moments key for the per-head values; head -1 is their per-image mean
PRE = "pre_"  # name prefix of the metrics on the pre-scale attention of AttnScale blocks


class Collector:
    """Per-(site, layer, head, metric) moments for one analysis run.

    Args:
        specs: the selected metrics (token, token_curve, attn, attn_curve).
        num_prefix: prefix tokens before the patch grid.
        warn: where one-line warnings go (refused attention modules).

    Blocks with AttnScale (:mod:`vitspec.scaling`) also report their pre-scale attention
    through :meth:`on_pre_attention`; its rows carry the attention metric names prefixed with
    ``pre_`` (``pre_attn_entropy``, ...), its refusals are in ``refused_pre``.
    """

    def __init__(self, specs: list[MetricSpec], num_prefix: int, warn: Callable[[str], None]):
        self.token_specs = [s for s in specs if s.kind.startswith("token")]
        self.attn_specs = [s for s in specs if s.kind.startswith("attn")]
        self.num_prefix = num_prefix
        self.warn = warn
        self.grid: tuple[int, int] = (0, 0)
        self.moments: dict[tuple, Moments] = {}
        self.refused: dict[int, str] = {}
        self.refused_pre: dict[int, str] = {}
        self.refused_metrics: dict[tuple[int, str], str] = {}  # (layer, name) -> reason
        self.num_heads = 0
        self._prev: tuple[int, AttnView] | None = None
        self._pre_prev: tuple[int, AttnView] | None = None

    def start_batch(self, grid: tuple[int, int]) -> None:
        self.grid = grid
        self._prev = self._pre_prev = None

    def on_tokens(self, site: str, layer: int, tokens: Tensor) -> None:
        n_tokens = self.num_prefix + self.grid[0] * self.grid[1]
        if tokens.shape[1] != n_tokens:
            raise VitspecError(
                f"{site} layer {layer} has {tokens.shape[1]} tokens, expected "
                f"{self.num_prefix} prefix + {self.grid[0]}x{self.grid[1]} patches"
            )
        view = TokenView(tokens, self.num_prefix, self.grid)  # shared intermediates, this site only
        _check_finite(view.energy, f"layer {layer} {site} tokens")  # NaN/Inf reach ||X||^2
        for spec in self.token_specs:
            self._update((site, layer, None, spec.name), spec.fn(view, self.num_prefix, self.grid))

    def on_attention(self, layer: int, attn: Tensor) -> None:
        self._prev = self._attention(layer, attn, "", self.refused, self._prev)

    def on_pre_attention(self, layer: int, attn: Tensor) -> None:
        """The pre-scale attention ``A`` of an AttnScale block: rows named ``pre_<metric>``."""
        self._pre_prev = self._attention(layer, attn, PRE, self.refused_pre, self._pre_prev)

    def _attention(
        self,
        layer: int,
        attn: Tensor,
        prefix: str,
        refused: dict[int, str],
        prev_state: tuple[int, AttnView] | None,
    ) -> tuple[int, AttnView] | None:
        """Update ``prefix + name`` moments; return the new previous-layer state."""
        if layer in refused:
            return prev_state
        what = (
            "pre-scale attention (blocks.{}.attn.attn_scale)"
            if prefix
            else "attention (blocks.{}.attn)"
        )
        n_tokens = self.num_prefix + self.grid[0] * self.grid[1]
        prev = prev_state[1] if prev_state is not None and prev_state[0] == layer - 1 else None
        problem, signed = None, False
        if attn.dim() != 4 or attn.shape[-1] != n_tokens or attn.shape[-2] != n_tokens:
            problem = (
                f"its output has shape {tuple(attn.shape)}, not [B, H, {n_tokens}, {n_tokens}]"
            )
        else:
            view = AttnView(attn, prev)  # intermediates shared by this layer's metrics
            _check_finite(view.row_sums, f"layer {layer} {what.format(layer - 1)}")
            if not view.rows_sum_to_one(atol=1e-4):
                problem = "its output is not row-stochastic (rows not summing to 1)"
            # rows summing to 1 with negative entries: AttnScale's A' = J + (1 + w)(A - J), w > 0
            signed = not view.nonnegative
        if problem is not None:
            refused[layer] = problem
            names = {prefix + s.name for s in self.attn_specs}
            self.moments = {
                k: v
                for k, v in self.moments.items()
                if not (k[0] == "attn" and k[1] == layer and k[3] in names)
            }
            self.warn(
                f"block {layer}: {'pre-scale ' if prefix else ''}attention metrics "
                f"skipped: {problem}"
            )
            return None
        self.num_heads = attn.shape[1]
        for spec in self.attn_specs:
            if spec.needs_prev and prev is None:
                continue
            if spec.needs_nonnegative and (
                signed or (layer, prefix + spec.name) in self.refused_metrics
            ):
                self._refuse_metric(layer, prefix + spec.name)
                continue
            values = spec.fn(view, prev)
            self._update(("attn", layer, ALL_HEADS, prefix + spec.name), values)
            self._update(("attn", layer, -1, prefix + spec.name), values.mean(dim=1))
        view.prev = None  # the chain holds one layer back, never the whole depth
        return (layer, view)

    def _refuse_metric(self, layer: int, name: str) -> None:
        """Skip one metric that needs A >= 0 at ``layer`` for the whole run (once warned)."""
        if (layer, name) in self.refused_metrics:
            return
        reason = (
            "the attention has negative entries (its rows sum to 1: AttnScale with "
            "w > 0 makes A' = J + (1 + w)(A - J) negative where A < w / ((1 + w) N))"
        )
        self.refused_metrics[(layer, name)] = reason
        self.moments = {
            k: v
            for k, v in self.moments.items()
            if not (k[0] == "attn" and k[1] == layer and k[3] == name)
        }
        self.warn(f"block {layer}: {name} skipped: {reason}")

    def _update(self, key: tuple, values: Tensor) -> None:
        moments = self.moments.get(key)
        if moments is None:
            moments = self.moments[key] = Moments()
        moments.update(values)


def rows(
    moments: dict[tuple, Moments], kinds: dict[str, str], depth: int, ids: dict
) -> tuple[list[dict], list[dict]]:
    """Metric rows and spectra rows, ordered by site, layer, head and metric order.

    Args:
        moments: ``(site, layer, head, name) -> Moments``, from one or more collectors.
        kinds: metric name -> registry kind (to tell scalars from curves); ``pre_<name>``
            rows take the kind of ``<name>`` and follow the unprefixed metrics.
        depth: number of blocks L (``depth`` column = layer / L).
        ids: the leading columns (run, model, checkpoint).
    """
    order = {name: i for i, name in enumerate(kinds)}
    metric_rows, spectra_rows = [], []

    def unprefixed(name: str) -> str:
        return name if name in kinds else name.removeprefix(PRE)

    def sort_key(item):
        (site, layer, head, name), _ = item
        head_rank = -2 if head is None else (-1 if head == -1 else 0)
        return (
            SITE_ORDER[site],
            layer,
            head_rank,
            name != unprefixed(name),
            order[unprefixed(name)],
        )

    for (site, layer, head, name), acc in sorted(moments.items(), key=sort_key):
        mean, std, n = acc.compute()
        heads = range(mean.shape[0]) if head == ALL_HEADS else [head]
        per_head = zip(heads, mean, std) if head == ALL_HEADS else [(head, mean, std)]
        for h, m, s in per_head:
            base = {**ids, "site": site, "layer": layer}
            if kinds[unprefixed(name)].endswith("curve"):
                for freq, (mf, sf) in enumerate(zip(m.tolist(), s.tolist())):
                    spectra_rows.append(
                        {
                            **base,
                            "head": h,
                            "curve": name,
                            "freq": freq,
                            "mean": mf,
                            "std": sf,
                            "n": n,
                        }
                    )
            else:
                metric_rows.append(
                    {
                        **base,
                        "depth": layer / depth,
                        "head": h,
                        "metric": name,
                        "mean": float(m),
                        "std": float(s),
                        "n": n,
                    }
                )
    return metric_rows, spectra_rows


def _check_finite(x: Tensor, where: str) -> None:
    """``x``: a reduction (sum or sum of squares) of the activations, NaN/Inf if any of them is."""
    if not torch.isfinite(x).all():
        raise VitspecError(
            f"NaN or Inf in the {where}: the model's activations are not finite "
            "(check the checkpoint and input scaling)",
            exit_code=1,
        )
