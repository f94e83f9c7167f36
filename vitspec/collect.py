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
from vitspec.functional import is_row_stochastic
from vitspec.metrics import MetricSpec, Moments

SITE_ORDER = {site: i for i, site in enumerate((*SITES, "attn"))}
ALL_HEADS = "heads"  # moments key for the per-head values; head -1 is their per-image mean


class Collector:
    """Per-(site, layer, head, metric) moments for one analysis run.

    Args:
        specs: the selected metrics (token, token_curve, attn, attn_curve).
        num_prefix: prefix tokens before the patch grid.
        warn: where one-line warnings go (refused attention modules).
    """

    def __init__(self, specs: list[MetricSpec], num_prefix: int, warn: Callable[[str], None]):
        self.token_specs = [s for s in specs if s.kind.startswith("token")]
        self.attn_specs = [s for s in specs if s.kind.startswith("attn")]
        self.num_prefix = num_prefix
        self.warn = warn
        self.grid: tuple[int, int] = (0, 0)
        self.moments: dict[tuple, Moments] = {}
        self.refused: dict[int, str] = {}
        self.num_heads = 0
        self._prev: tuple[int, Tensor] | None = None

    def start_batch(self, grid: tuple[int, int]) -> None:
        self.grid = grid
        self._prev = None

    def on_tokens(self, site: str, layer: int, tokens: Tensor) -> None:
        _check_finite(tokens, f"layer {layer} {site} tokens")
        n_tokens = self.num_prefix + self.grid[0] * self.grid[1]
        if tokens.shape[1] != n_tokens:
            raise VitspecError(f"{site} layer {layer} has {tokens.shape[1]} tokens, expected "
                               f"{self.num_prefix} prefix + {self.grid[0]}x{self.grid[1]} patches")
        for spec in self.token_specs:
            self._update((site, layer, None, spec.name), spec.fn(tokens, self.num_prefix, self.grid))

    def on_attention(self, layer: int, attn: Tensor) -> None:
        if layer in self.refused:
            return
        _check_finite(attn, f"layer {layer} attention (blocks.{layer - 1}.attn)")
        n_tokens = self.num_prefix + self.grid[0] * self.grid[1]
        problem = None
        if attn.dim() != 4 or attn.shape[-1] != n_tokens or attn.shape[-2] != n_tokens:
            problem = f"its output has shape {tuple(attn.shape)}, not [B, H, {n_tokens}, {n_tokens}]"
        elif not is_row_stochastic(attn, atol=1e-4):
            problem = "its output is not row-stochastic (negative entries or rows not summing to 1)"
        if problem is not None:
            self.refused[layer] = problem
            self.moments = {k: v for k, v in self.moments.items()
                            if not (k[0] == "attn" and k[1] == layer)}
            self.warn(f"block {layer}: attention metrics skipped: {problem}")
            self._prev = None
            return
        self.num_heads = attn.shape[1]
        prev = self._prev[1] if self._prev is not None and self._prev[0] == layer - 1 else None
        for spec in self.attn_specs:
            if spec.needs_prev and prev is None:
                continue
            values = spec.fn(attn, prev)
            self._update(("attn", layer, ALL_HEADS, spec.name), values)
            self._update(("attn", layer, -1, spec.name), values.mean(dim=1))
        self._prev = (layer, attn)

    def _update(self, key: tuple, values: Tensor) -> None:
        moments = self.moments.get(key)
        if moments is None:
            moments = self.moments[key] = Moments()
        moments.update(values)

    def rows(self, kinds: dict[str, str], depth: int, ids: dict) -> tuple[list[dict], list[dict]]:
        """Metric rows and spectra rows, ordered by site, layer, head and metric order.

        Args:
            kinds: metric name -> registry kind (to tell scalars from curves).
            depth: number of blocks L (``depth`` column = layer / L).
            ids: the leading columns (run, model, checkpoint).
        """
        order = {name: i for i, name in enumerate(kinds)}
        metric_rows, spectra_rows = [], []

        def sort_key(item):
            (site, layer, head, name), _ = item
            head_rank = -2 if head is None else (-1 if head == -1 else 0)
            return SITE_ORDER[site], layer, head_rank, order[name]

        for (site, layer, head, name), moments in sorted(self.moments.items(), key=sort_key):
            mean, std, n = moments.compute()
            heads = range(mean.shape[0]) if head == ALL_HEADS else [head]
            per_head = zip(heads, mean, std) if head == ALL_HEADS else [(head, mean, std)]
            for h, m, s in per_head:
                base = {**ids, "site": site, "layer": layer}
                if kinds[name].endswith("curve"):
                    for freq, (mf, sf) in enumerate(zip(m.tolist(), s.tolist())):
                        spectra_rows.append({**base, "head": h, "curve": name, "freq": freq,
                                             "mean": mf, "std": sf, "n": n})
                else:
                    metric_rows.append({**base, "depth": layer / depth, "head": h, "metric": name,
                                        "mean": float(m), "std": float(s), "n": n})
        return metric_rows, spectra_rows


def _check_finite(x: Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        raise VitspecError(f"NaN or Inf in the {where}: the model's activations are not finite "
                           "(check the checkpoint and input scaling)", exit_code=1)
