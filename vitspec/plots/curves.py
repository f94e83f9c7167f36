"""Curves (dlogamp, token_spectrum, attn_spectrum) against frequency, coloured by depth."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure


def plot_curves(
    spectra: pd.DataFrame,
    curve: str,
    *,
    site: str | Sequence[str],
    head: int | None = None,
    centre: bool = False,
    log: bool = False,
    ax: Axes | None = None,
) -> Axes:
    """One curve per layer, coloured from shallow (dark) to deep (yellow), with a colorbar.

    Args:
        spectra: a spectra table (spectra.csv layout) of one run.
        curve: ``"dlogamp"``, ``"token_spectrum"`` or ``"attn_spectrum"``.
        site: the site(s) to draw (``"block"``, ``"embed"``, ``"mid"``, ``"attn"``); e.g.
            ``("embed", "block")`` draws layer 0 from ``embed`` and layers 1..L from ``block``.
        head: attention head (``-1`` = head mean); ``None`` for token curves.
        centre: reorder frequencies k = 0..N-1 so that DC sits in the middle (as Wang et al.).
        log: logarithmic y axis.

    Example:
        >>> ax = plot_curves(result.spectra, "dlogamp", site="block")  # doctest: +SKIP
    """
    ax = ax if ax is not None else Figure(figsize=(4, 3)).add_subplot()
    sites = (site,) if isinstance(site, str) else tuple(site)
    df = spectra[(spectra["curve"] == curve) & spectra["site"].isin(sites)]
    df = df[df["head"].isna()] if head is None else df[df["head"] == head]
    layers = sorted(df["layer"].unique())
    norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    cmap = colormaps["viridis"]
    for layer in layers:
        values = df[df["layer"] == layer].sort_values("freq")["mean"].to_numpy()
        x = np.arange(len(values))
        if centre:
            values = np.fft.fftshift(values)
            x = x - len(values) // 2
        ax.plot(x, values, color=cmap(norm(layer)), lw=1.2)
    cbar = ax.figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    cbar.set_label("layer")
    if log:
        ax.set_yscale("log")
    where = " + ".join(sites)
    if head is not None:
        where += ", head mean" if head == -1 else f", head {head}"
    ax.set_title(f"{curve} ({where})")
    ax.grid(alpha=0.3)
    return ax
