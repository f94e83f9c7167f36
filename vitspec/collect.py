"""The metric collector: a run consumer folding every selected metric into float64 moments.

A :class:`Collector` receives one layer's tensors as the forward pass produces them (``on(site,
layer, x)``), runs every scheduled metric on them, folds the per-image values into fixed-size
:class:`~vitspec.metrics.Moments` and drops the tensors. :func:`rows` turns moments into the
long-format tables of the contract.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vitspec.errors import VitspecError
from vitspec.functional import AttnView, TokenView
from vitspec.metrics import MetricSpec, Moments
from vitspec.sites import CONTRACT_SITES, PATTERN_PRE, PATTERN_SITES, Unavailable, contract_site

SITE_ORDER = {site: i for i, site in enumerate((*CONTRACT_SITES, "attn"))}
ALL_HEADS = "heads"  # moments key for the per-head values; head -1 is their per-image mean
PRE = "pre_"  # name prefix of the metrics on the pre-scale attention of AttnScale blocks
NEGATIVE = (
    "the attention has negative entries (its rows sum to 1: AttnScale with w > 0 makes "
    "A' = J + (1 + w)(A - J) negative where A < w / ((1 + w) N))"
)


class Collector:
    """Per-(site, layer, head, metric) moments: one consumer of a run.

    Args:
        specs: the metrics this collector runs (token and/or attention kinds).
        sites: the contract's token sites (``embed``, ``mid``, ``block``) for the token metrics.
        warn: one line per distinct reason something is not measured.

    Blocks with AttnScale (:mod:`vitspec.scaling`) also report their pre-scale attention
    (site ``pattern_pre``) in rows named ``pre_<metric>``.
    """

    def __init__(
        self,
        specs: list[MetricSpec],
        sites: tuple[str, ...] = (),
        warn: Callable[[str], None] | None = None,
    ):
        self._config = (specs, sites, warn)
        self.token_specs = [s for s in specs if s.kind.startswith("token")]
        self.attn_specs = [s for s in specs if s.kind.startswith("attn")]
        wanted = {CONTRACT_SITES[s] for s in sites} if self.token_specs else set()
        if self.attn_specs:
            wanted |= set(PATTERN_SITES)
        self.sites = frozenset(wanted)
        self.unavailable = Unavailable(warn)
        self.moments: dict[tuple, Moments] = {}
        self.refused: dict[str, dict[int, str]] = {"": {}, PRE: {}}  # layer -> why
        self.dropped: dict[tuple[int, str], str] = {}  # (layer, metric) -> why
        self.num_heads = 0
        self.geometry: list = []
        self._prev: dict[str, tuple[int, AttnView]] = {}

    # ---- consumer protocol ---------------------------------------------------------------
    def start_batch(self, info) -> None:
        """A new batch: its per-layer geometry and the adapter's per-head parameters."""
        self.geometry = info.geometry
        self._prev = {}
        if self.attn_specs:
            for name, layers in info.head_params.items():
                for layer, values in layers.items():
                    per_image = values.detach().double().cpu().expand(info.size, -1)
                    self._update(("attn", layer, ALL_HEADS, name), per_image)
                    self._update(("attn", layer, -1, name), per_image.mean(dim=1))

    def on(self, site: str, layer: int, x: Tensor) -> None:
        if site in PATTERN_SITES:
            self._attention(site, layer, x)
            return
        where = contract_site(site, layer)
        if where is not None and where[0] in SITE_ORDER:
            self._tokens(where[0], where[1], x)

    def spawn(self) -> Collector:
        """An empty collector with this one's metrics and sites, for another thread of the same
        run: a reason either of them warns about is warned about once."""
        twin = Collector(*self._config)
        twin.unavailable._seen = self.unavailable._seen
        return twin

    def state(self) -> dict:
        """Fixed-size state (moments, refusals) that :meth:`merge_state` folds together."""
        return {
            "moments": self.moments,
            "refused": self.refused,
            "dropped": self.dropped,
            "num_heads": self.num_heads,
            "unavailable": self.unavailable,
        }

    def merge_state(self, other: dict) -> None:
        """Fold another collector's :meth:`state` in (Chan's parallel moments update)."""
        for key, acc in other["moments"].items():
            self.moments.setdefault(key, Moments()).merge(acc)
        for kind, layers in other["refused"].items():
            self.refused[kind].update(layers)
        self.dropped.update(other["dropped"])
        # a layer or metric refused on any part of the images is refused for the whole run
        attn_names = {p + s.name for s in self.attn_specs for p in ("", PRE)}
        self.moments = {
            k: v
            for k, v in self.moments.items()
            if not (
                k[0] == "attn"
                and (
                    (
                        k[3] in attn_names
                        and k[1] in self.refused[PRE if k[3].startswith(PRE) else ""]
                    )
                    or (k[1], k[3]) in self.dropped
                )
            )
        }
        self.num_heads = max(self.num_heads, other["num_heads"])
        self.unavailable.update(other["unavailable"])

    # ---- token sites ---------------------------------------------------------------------
    def _tokens(self, site: str, layer: int, tokens: Tensor) -> None:
        g = self.geometry[layer]
        if tokens.dim() != 3 or tokens.shape[1] != g.tokens:
            raise VitspecError(
                f"{site} layer {layer} has shape {tuple(tokens.shape)}, expected [B, "
                f"{g.tokens}, C]: {g.prefix} prefix + {g.grid[0]}x{g.grid[1]} patches"
            )
        view = TokenView(tokens, g.prefix, g.grid)  # shared intermediates, this site only
        _check_finite(view.energy, f"layer {layer} {site} tokens")  # NaN/Inf reach ||X||^2
        for spec in self.token_specs:
            self._update((site, layer, None, spec.name), spec.fn(view, g.prefix, g.grid))

    # ---- attention -----------------------------------------------------------------------
    def _attention(self, site: str, layer: int, attn: Tensor) -> None:
        prefix = PRE if site == PATTERN_PRE else ""
        refused = self.refused[prefix]
        if layer in refused:
            return
        windows = attn.dim() == 5
        mats = attn.flatten(0, 1) if windows else attn  # [B*nW, H, n, m]
        square = mats.dim() == 4 and mats.shape[-1] == mats.shape[-2]
        what = "pre-scale attention" if prefix else "attention"
        problem, view = None, None
        if mats.dim() != 4:
            problem = f"its pattern has shape {tuple(attn.shape)}, not [B, H, N, M]"
        else:
            prev = self._prev_view(prefix, layer, mats)
            view = AttnView(mats, prev, square=square)
            _check_finite(view.row_sums, f"layer {layer} {what}")
            if not view.rows_sum_to_one(atol=1e-4):
                problem = "its output is not row-stochastic (rows not summing to 1)"
        if problem is not None:
            refused[layer] = problem
            names = {prefix + s.name for s in self.attn_specs}
            self.moments = {
                k: v
                for k, v in self.moments.items()
                if not (k[0] == "attn" and k[1] == layer and k[3] in names)
            }
            self.unavailable.add(
                f"{what} metrics",
                problem,
                layer,
                f"block {layer}: {what} metrics skipped: {problem}",
            )
            self._prev.pop(prefix, None)
            return
        self.num_heads = mats.shape[1]
        for spec in self.attn_specs:
            name = prefix + spec.name
            if "square" in spec.needs and not square:
                n, m = mats.shape[-2:]
                why = (
                    f"the attention is {n} x {m} (queries x keys, not one token set): only the "
                    "metrics over each row apply"
                )
                self.unavailable.add(name, why, layer)
                continue
            if spec.needs_prev and view.prev is None:
                continue
            if spec.needs_nonnegative and ((layer, name) in self.dropped or not view.nonnegative):
                self._drop(layer, name)
                continue
            values = spec.fn(view, view.prev)
            if windows:  # per window, then the mean over the image's windows
                values = values.reshape(attn.shape[0], attn.shape[1], *values.shape[1:])
                values = values.mean(dim=1)
            self._update(("attn", layer, ALL_HEADS, name), values)
            self._update(("attn", layer, -1, name), values.mean(dim=1))
        view.prev = None  # the chain holds one layer back, never the whole depth
        if square:
            self._prev[prefix] = (layer, view)
        else:
            self._prev.pop(prefix, None)

    def _drop(self, layer: int, name: str) -> None:
        """Skip a metric that needs A >= 0 at ``layer`` for the whole run (warned once)."""
        if (layer, name) in self.dropped:
            return
        self.dropped[(layer, name)] = NEGATIVE
        self.unavailable.add(name, NEGATIVE, layer, f"block {layer}: {name} skipped: {NEGATIVE}")
        self.moments = {
            k: v
            for k, v in self.moments.items()
            if not (k[0] == "attn" and k[1] == layer and k[3] == name)
        }

    def _prev_view(self, prefix: str, layer: int, mats: Tensor) -> AttnView | None:
        """The previous layer's view when it covers the same tokens (``attn_cross_layer_sim``)."""
        held = self._prev.get(prefix)
        if held is None or held[0] != layer - 1 or held[1].attn.shape != mats.shape:
            return None
        if not self.geometry[layer].same_tokens(self.geometry[layer - 1]):
            return None
        return held[1]

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
