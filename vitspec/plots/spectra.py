"""Curves against frequency coloured by depth, and the heat maps (layer x frequency, layer x head).

Wang et al. (2022) Fig. 2/5 (attention spectrum, DC in the middle), Park & Kim (2022) Fig. 2a/8
(relative log amplitude on a 0..pi axis), DeepViT-style layer x head maps. Drawn from the
spectra and metrics tables; nothing is computed here but re-ordering and axis scaling.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize

from vitspec.plots.layers import depth_of, head_rows, mark_stages, plot_band, plot_heads
from vitspec.plots.style import DEPTH_CMAP, HEAT_CMAP, PALETTE, series, tidy_log

PI_TICKS = (
    [0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi],
    ["0", "π/4", "π/2", "3π/4", "π"],
)


def grid_of(info: dict, layer: int) -> tuple[int, int]:
    """The patch grid (h, w) at ``layer``: its stage's grid, else run.json's ``grid``."""
    for stage in info.get("stages") or []:
        if stage["first_layer"] <= max(layer, 1) <= stage["last_layer"]:
            return tuple(stage["grid"])
    return tuple(info["grid"])


def curve_rows(spectra: pd.DataFrame, curve: str, sites: tuple[str, ...], head=None):
    """Rows of one curve at ``sites`` (head None for token curves, -1 for the head mean)."""
    df = spectra[(spectra["curve"] == curve) & spectra["site"].isin(sites)]
    return df[df["head"].isna()] if head is None else df[(df["head"] == head).fillna(False)]


def _depth_colorbar(ax: Axes, depth: int, label: str = "layer", first: int = 0) -> Normalize:
    """A colour bar from layer ``first`` (0 with the embedding, else 1) to ``depth``."""
    norm = Normalize(vmin=first, vmax=max(depth, first + 1))
    cbar = ax.figure.colorbar(
        ScalarMappable(norm=norm, cmap=colormaps[DEPTH_CMAP]), ax=ax, pad=0.02, fraction=0.06
    )
    cbar.set_label(label)
    return norm


def plot_curves_by_depth(
    ax: Axes,
    result,
    curve: str,
    sites=("embed", "block"),
    head=None,
    centre=True,
    log=True,
) -> int:
    """One curve per layer against token frequency k, coloured by layer (colour bar).

    Args:
        ax: axes to draw on.
        result: a run (``spectra``, ``metrics``, ``info``).
        curve: ``"attn_spectrum"``, ``"pre_attn_spectrum"`` or ``"token_spectrum"``.
        sites: sites whose layers are drawn (``embed`` gives layer 0).
        head: ``-1`` for the attention head mean, None for token curves.
        centre: DC in the middle (k - N//2 after ``fftshift``), the ordering of Wang et al.
        log: logarithmic y axis.

    Returns:
        The number of curves drawn.

    Example:
        >>> plot_curves_by_depth(ax, run, "attn_spectrum", ("attn",), -1)  # doctest: +SKIP
        12
    """
    df = curve_rows(result.spectra, curve, tuple(sites), head)
    layers = sorted(df["layer"].unique())
    first = int(min(layers)) if layers else 0
    norm = _depth_colorbar(ax, depth_of(result.info, result.metrics), first=first)
    cmap = colormaps[DEPTH_CMAP]
    for layer in layers:
        values = df[df["layer"] == layer].sort_values("freq")["mean"].to_numpy(float)
        k = np.arange(len(values))
        if centre:
            values, k = np.fft.fftshift(values), k - len(values) // 2
        ax.plot(k, values, color=cmap(norm(layer)), lw=0.9)
    if log:
        tidy_log(ax)
    ax.set_xlabel("token frequency k (DC = 0 in the middle)" if centre else "token frequency k")
    return len(layers)


def plot_spectrum_map(ax: Axes, result, curve: str = "attn_spectrum", *, head: int = -1) -> bool:
    """Layer x frequency heat map of a head-mean curve, DC in the middle, log colour scale.

    Returns:
        False (nothing drawn) when the layers have different token counts.
    """
    df = curve_rows(result.spectra, curve, ("attn",), head)
    table = df.pivot_table(index="layer", columns="freq", values="mean")
    if table.isna().any().any() or table.empty:
        return False
    values = np.fft.fftshift(table.to_numpy(float), axes=1)
    n = values.shape[1]
    layers = table.index.to_numpy()
    positive = values[values > 0]
    norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-6), vmax=positive.max())
    image = ax.imshow(
        np.where(values > 0, values, np.nan),
        aspect="auto",
        origin="lower",
        cmap=HEAT_CMAP,
        norm=norm,
        interpolation="nearest",
        extent=(-(n // 2) - 0.5, n - n // 2 - 0.5, layers[0] - 0.5, layers[-1] + 0.5),
    )
    ax.figure.colorbar(image, ax=ax, pad=0.02, fraction=0.06, label="||row k of F A F^H||")
    ax.set_xlabel("token frequency k (DC = 0 in the middle)")
    ax.set_ylabel("layer")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(False)
    mark_stages(ax, result.info, horizontal=True)
    return True


def plot_dlogamp(ax: Axes, result, *, sites=("embed", "block")) -> int:
    """Park & Kim's relative log amplitude against frequency 0..π, one curve per layer
    coloured by normalised depth.

    The i-th point is the diagonal frequency (ω, ω) with ω = 2π i / h on the layer's h x w
    patch grid, so grids of different sizes share the axis.

    Returns:
        The number of curves drawn.
    """
    df = curve_rows(result.spectra, "dlogamp", tuple(sites))
    depth = depth_of(result.info, result.metrics)
    norm = _depth_colorbar(ax, 1, label="normalised depth (layer / L)")
    cmap = colormaps[DEPTH_CMAP]
    layers = sorted(df["layer"].unique())
    for layer in layers:
        rows = df[df["layer"] == layer].sort_values("freq")
        h = grid_of(result.info, int(layer))[0]
        omega = rows["freq"].to_numpy(float) * 2 * math.pi / h
        ax.plot(omega, rows["mean"], color=cmap(norm(layer / depth)), lw=0.9, marker=".", ms=2)
    ax.set_xlim(0, math.pi)
    ax.set_xticks(*PI_TICKS)
    ax.set_xlabel("frequency ω on the grid diagonal (rad / patch)")
    ax.set_ylabel("Δ log amplitude (nats)")
    return len(layers)


def plot_dlogamp_hf(ax: Axes, result, *, band: str | None = "sd", index: int = 0) -> bool:
    """``dlogamp_hf`` against normalised depth; with the ``mid`` site, block outputs and
    attention residuals interleave and the attention sub-blocks are shaded (Park & Kim Fig. 8).

    Returns:
        True when the attention sub-blocks were shaded (``mid`` measured).
    """
    m = result.metrics
    df = m[(m["metric"] == "dlogamp_hf") & m["head"].isna()].copy()
    depth = depth_of(result.info, m)
    has_mid = (df["site"] == "mid").any()
    df["x"] = np.where(df["site"] == "mid", (df["layer"] - 0.5) / depth, df["layer"] / depth)
    df = df.sort_values("x")
    plot_band(ax, df, "x", band=band, label=None, ms=2.5, **series(index))
    if has_mid:
        for layer in sorted(df.loc[df["site"] == "mid", "layer"]):
            ax.axvspan((layer - 1) / depth, (layer - 0.5) / depth, color="0.85", lw=0, zorder=0)
    mark_stages(ax, result.info, "depth")
    ax.set_xlabel("normalised depth (layer / L)")
    ax.set_ylabel("Δ log amplitude at high freq. (nats)")
    return bool(has_mid)


def plot_head_map(ax: Axes, result, metric: str = "attn_entropy") -> float | None:
    """Layer x head heat map of an attention metric (mean over images); for ``attn_entropy``
    the colour bar marks log N, the entropy of uniform attention.

    Returns:
        log N where marked, else None.
    """
    m = result.metrics
    df = m[(m["metric"] == metric) & (m["site"] == "attn") & (m["head"] >= 0).fillna(False)]
    table = df.pivot_table(index="layer", columns="head", values="mean")
    values = table.to_numpy(float)
    log_n = _log_n(result.info) if metric.endswith("attn_entropy") else None
    vmin, vmax = np.nanmin(values), np.nanmax(values)
    if log_n is not None:  # log N inside the colour bar, a little below its top
        vmax = max(vmax, log_n)
        vmax += 0.05 * (vmax - vmin) + 1e-12
    layers, heads = table.index.to_numpy(), table.columns.to_numpy()
    image = ax.imshow(
        values,
        aspect="auto",
        origin="lower",
        cmap=HEAT_CMAP,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
        extent=(heads[0] - 0.5, heads[-1] + 0.5, layers[0] - 0.5, layers[-1] + 0.5),
    )
    cbar = ax.figure.colorbar(image, ax=ax, pad=0.02, fraction=0.06)
    cbar.formatter.set_useOffset(False)
    cbar.set_label("entropy (nats); black line: log N" if log_n is not None else metric)
    if log_n is not None:
        cbar.ax.axhline(log_n, color=PALETTE[6], lw=2.0)
    ax.set_xticks(heads)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.grid(False)
    mark_stages(ax, result.info, horizontal=True)
    return log_n


def _log_n(info: dict) -> float | None:
    """log N for a plain ViT (one token count at every layer); None when N varies."""
    if info.get("stages") and len(info["stages"]) > 1 or "grid" not in info:
        return None
    h, w = info["grid"]
    return math.log(info.get("num_prefix_tokens", 0) + h * w)


def plot_cross_layer(ax: Axes, result, *, band: str | None = "sd") -> None:
    """DeepViT's ``attn_cross_layer_sim`` against layer: heads and the head mean."""
    plot_heads(ax, result, "attn_cross_layer_sim", band=band)
    if head_rows(result.metrics, "attn_cross_layer_sim", -1).empty:
        ax.set_title("attn_cross_layer_sim not measured")
