"""Named observation sites: what a run can observe in a model, and their layouts (stdlib only).

A *site* names one tensor a block produces during the forward pass. Adapters say where each
site is in their family (:mod:`vitspec.adapters`); capture hooks them; consumers receive
``on(site, layer, tensor)``. Layers count blocks in execution order across all stages, 1..L.

=================  =========================  ==================================================
site               layout                     what it is
=================  =========================  ==================================================
``resid_pre``      ``[B, N, C]``              block input (the residual stream before the block)
``resid_mid``      ``[B, N, C]``              block input + attention branch (between branches)
``resid_post``     ``[B, N, C]``              block output
``attn_in``        ``[B, N, C]``              the attention module's input (timm: ``norm1(x)``)
``attn_out``       ``[B, N, C]``              the attention branch added to the residual stream
``pattern``        ``[B, H, N, M]`` or        the attention matrix the block applies (rows sum to
                   ``[B, nW, H, n, n]``       1 for softmax); windowed attention: one n x n
                                              matrix per window, windows in raster order
``pattern_pre``    as ``pattern``             AttnScale's pre-scale attention A
=================  =========================  ==================================================

Tokens are P prefix tokens then the h x w patch grid in raster order (NHWC maps are flattened by
the adapter's tap). The contract's ``site`` column (docs/metrics.md) is derived:
``resid_pre`` of layer 1 is ``embed`` (layer 0), ``resid_mid`` is ``mid``, ``resid_post`` is
``block``, the patterns are ``attn``.
"""

from __future__ import annotations

RESID_PRE = "resid_pre"
RESID_MID = "resid_mid"
RESID_POST = "resid_post"
ATTN_IN = "attn_in"
ATTN_OUT = "attn_out"
PATTERN = "pattern"
PATTERN_PRE = "pattern_pre"

SITES = (RESID_PRE, RESID_MID, RESID_POST, ATTN_IN, ATTN_OUT, PATTERN, PATTERN_PRE)
TOKEN_SITES = (RESID_PRE, RESID_MID, RESID_POST)
PATTERN_SITES = (PATTERN, PATTERN_PRE)
#: sites only some models have by construction (AttnScale blocks); absent without a reason
OPTIONAL_SITES = (PATTERN_PRE,)

#: contract ``site`` column -> the site it reads
CONTRACT_SITES = {"embed": RESID_PRE, "mid": RESID_MID, "block": RESID_POST}


def contract_site(site: str, layer: int) -> tuple[str, int] | None:
    """The contract's ``(site, layer)`` columns for an observation; None if it has no row there.

    Example:
        >>> contract_site("resid_pre", 1), contract_site("resid_pre", 2)
        (('embed', 0), None)
        >>> contract_site("resid_post", 3), contract_site("pattern", 3)
        (('block', 3), ('attn', 3))
    """
    if site == RESID_PRE:
        return ("embed", 0) if layer == 1 else None
    if site == RESID_MID:
        return "mid", layer
    if site == RESID_POST:
        return "block", layer
    if site in PATTERN_SITES:
        return "attn", layer
    return None


def layer_ranges(layers) -> str:
    """Layers as compact ranges, for ``"<what> at layers <ranges>"`` keys.

    Example:
        >>> layer_ranges([1, 2, 3, 5, 7, 8])
        '1-3, 5, 7-8'
    """
    out: list[str] = []
    ordered = sorted(set(layers))
    start = prev = None
    for layer in [*ordered, None]:
        if start is not None and (layer is None or layer != prev + 1):
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if layer is not None and start is None:
            start = layer
        prev = layer
    return ", ".join(out)


class Unavailable:
    """What a run could not measure and why: ``{what[ at layers a-b]: why}`` for run.json.

    Each distinct reason is reported once through ``warn`` (one stderr line per reason, not one
    per block), prefixed with the first place it occurred.

    Example:
        >>> u = Unavailable(warn=print)
        >>> u.add("attn_cos", "non-square pattern", layer=3)
        layer 3: attn_cos not measured: non-square pattern
        >>> u.add("attn_cos", "non-square pattern", layer=4)
        >>> u.add("mid", "one drop_path for both branches")
        mid not measured: one drop_path for both branches
        >>> u.as_dict()
        {'attn_cos at layers 3-4': 'non-square pattern', 'mid': 'one drop_path for both branches'}
    """

    def __init__(self, warn=None):
        self.warn = warn
        self._layers: dict[tuple[str, str], set[int]] = {}
        self._seen: set[str] = set()

    def add(self, what: str, why: str, layer: int | None = None, message: str | None = None):
        """Record ``what`` as not measured (at ``layer``) because ``why``; warn on a new reason.

        ``message`` replaces the default stderr line for this first occurrence.
        """
        layers = self._layers.setdefault((what, why), set())
        if layer is not None:
            layers.add(layer)
        if why not in self._seen:
            self._seen.add(why)
            if self.warn is not None:
                where = f"layer {layer}: " if layer is not None else ""
                self.warn(message or f"{where}{what} not measured: {why}")

    def update(self, other: Unavailable) -> None:
        """Fold another record in (no new warnings)."""
        for key, layers in other._layers.items():
            self._layers.setdefault(key, set()).update(layers)
        self._seen |= other._seen

    def __contains__(self, what: str) -> bool:
        return any(w == what for w, _ in self._layers)

    def as_dict(self) -> dict[str, str]:
        """``{"<what>[ at layers a-b]": why}``, in the order first recorded."""
        out = {}
        for (what, why), layers in self._layers.items():
            key = f"{what} at layers {layer_ranges(layers)}" if layers else what
            out[key] = why
        return out
