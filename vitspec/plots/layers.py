"""Metrics against layer or normalised depth: one line-and-band mark, runs or sites overlaid.

Every function here filters the tables and draws; none computes a metric. ``runs`` is a mapping
``label -> Result`` (any object with ``metrics``, ``spectra`` and ``info``), in drawing order, so
the same run has the same colour, marker and line style in every panel.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from vitspec.plots.labels import ylabel
from vitspec.plots.style import PALETTE, run_series, series, tidy_log

X_LABELS = {"layer": "layer (block index)", "depth": "normalised depth (layer / L)"}
BANDS = ("sd", "se")


def depth_of(info: dict, metrics: pd.DataFrame) -> int:
    """L, the number of blocks: run.json's ``depth``, else the deepest layer in the table."""
    depth = info.get("depth")
    if isinstance(depth, int) and depth > 0:
        return depth
    return int(metrics.loc[metrics["site"] != "embed", "layer"].max())


def token_rows(metrics: pd.DataFrame, metric: str, site: str) -> pd.DataFrame:
    """Rows of a token metric at ``site``; the ``block`` line starts with ``embed`` at layer 0.

    Example:
        >>> token_rows(result.metrics, "patch_cos_abs", "block")["layer"].min()  # doctest: +SKIP
        0
    """
    sites = ("embed", "block") if site == "block" else (site,)
    df = metrics[
        (metrics["metric"] == metric) & metrics["site"].isin(sites) & metrics["head"].isna()
    ]
    return df.sort_values("layer")


def head_rows(metrics: pd.DataFrame, metric: str, head: int) -> pd.DataFrame:
    """Rows of an attention metric for one head (``-1`` = the head mean), by layer."""
    df = metrics[(metrics["metric"] == metric) & (metrics["site"] == "attn")]
    return df[(df["head"] == head).fillna(False)].sort_values("layer")


def plot_band(
    ax: Axes,
    df: pd.DataFrame,
    x: str = "layer",
    *,
    band: str | None = "sd",
    log: bool = False,
    **line,
) -> Line2D | None:
    """Mean against ``x`` with a shaded ``band`` (``"sd"``, ``"se"`` or None) over images.

    Args:
        ax: axes to draw on.
        df: rows with columns ``x``, ``mean``, ``std``, ``n`` (one row per x).
        x: ``"layer"`` or ``"depth"``.
        band: ``"sd"`` (spread of images), ``"se"`` (sd / sqrt(n): uncertainty of the mean)
            or None. No band where n == 1.
        log: the y axis is logarithmic: the lower band edge is kept above mean / 10.
        **line: ``Line2D`` properties (color, marker, ls, label, lw).

    Returns:
        The line, or None when ``df`` is empty.

    Example:
        >>> line = plot_band(ax, token_rows(m, "hc_energy", "block"), band="se")  # doctest: +SKIP
    """
    if df.empty:
        return None
    xs, mean = df[x].to_numpy(float), df["mean"].to_numpy(float)
    (handle,) = ax.plot(xs, mean, **line)
    if band is not None:
        err = df["std"].to_numpy(float)
        if band == "se":
            err = err / np.sqrt(df["n"].to_numpy(float))
        ok = np.isfinite(err) & (df["n"].to_numpy() > 1)
        if ok.any():
            lo, hi = mean - err, mean + err
            if log:
                lo = np.maximum(lo, mean / 10)
            ax.fill_between(
                xs,
                np.where(ok, lo, mean),
                np.where(ok, hi, mean),
                color=handle.get_color(),
                alpha=0.18,
                lw=0,
            )
    return handle


def mark_stages(ax: Axes, info: dict, x: str = "layer", *, horizontal: bool = False) -> int:
    """Dotted lines between the stages of a hierarchical model (run.json ``stages``).

    Returns:
        The number of boundaries drawn (0 for a plain ViT).
    """
    stages = info.get("stages") or []
    depth = info.get("depth") or max((s.get("last_layer", 0) for s in stages), default=1)
    drawn = 0
    for stage in stages[:-1]:
        at = stage["last_layer"] + 0.5
        at = at / depth if x == "depth" else at
        (ax.axhline if horizontal else ax.axvline)(at, color="0.35", ls=":", lw=0.9, zorder=0)
        drawn += 1
    return drawn


def plot_sites(
    ax: Axes, result, metric: str, *, x: str = "layer", band: str | None = "sd"
) -> list[Line2D]:
    """One token metric of one run: a line per site (``block`` from ``embed`` at 0, ``mid``)."""
    lines = []
    for i, site in enumerate(("block", "mid")):
        df = token_rows(result.metrics, metric, site)
        if site == "mid":  # after block l's attention, before its MLP: half a block earlier
            depth = depth_of(result.info, result.metrics)
            df = df.assign(layer=df["layer"] - 0.5, depth=(df["layer"] - 0.5) / depth)
        label = "block (0 = embed)" if site == "block" else "mid (after attention, at l - 0.5)"
        line = plot_band(ax, df, x, band=band, label=label, ms=2.5, **series(i))
        if line is not None:
            lines.append(line)
    _finish(ax, result.info, metric, x)
    return lines


def plot_runs(
    ax: Axes,
    runs: Mapping[str, object],
    metric: str,
    *,
    site: str = "block",
    x: str = "layer",
    band: str | None = "sd",
    log: bool = False,
) -> list[Line2D]:
    """One metric of several runs overlaid: token metric at ``site`` or attention head mean.

    Example:
        >>> plot_runs(ax, {"base": r1, "+AttnScale": r2}, "patch_cos_abs")  # doctest: +SKIP
    """
    lines = []
    for i, (label, result) in enumerate(runs.items()):
        m = result.metrics
        attn = (m.loc[m["metric"] == metric, "site"] == "attn").any()
        df = head_rows(m, metric, -1) if attn else token_rows(m, metric, site)
        line = plot_band(ax, df, x, band=band, log=log, label=str(label), ms=2.5, **run_series(i))
        if line is not None:
            lines.append(line)
    first = next(iter(runs.values()))
    _finish(ax, first.info, metric, x, log=log)
    return lines


def plot_heads(
    ax: Axes, result, metric: str, *, x: str = "layer", band: str | None = "sd"
) -> list[Line2D]:
    """An attention metric per head (colour + marker + line style each) and the head mean
    (thick black, with its band)."""
    m = result.metrics
    df = m[(m["metric"] == metric) & (m["site"] == "attn")]
    lines = []
    for head in sorted(int(h) for h in df["head"].dropna().unique() if h >= 0):
        rows = head_rows(m, metric, head)
        lines.append(
            plot_band(
                ax,
                rows,
                x,
                band=None,
                label=f"head {head}",
                lw=0.8,
                ms=2,
                alpha=0.85,
                **series(head),
            )
        )
    mean = plot_band(
        ax,
        head_rows(m, metric, -1),
        x,
        band=band,
        label="head mean",
        color=PALETTE[6],
        lw=2.0,
        marker="o",
        ms=2.5,
    )
    _finish(ax, result.info, metric, x)
    return [line for line in [*lines, mean] if line is not None]


def _finish(ax: Axes, info: dict, metric: str, x: str, *, log: bool = False) -> None:
    ax.set_title(metric)
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel(ylabel(metric))
    if log:
        tidy_log(ax)
    else:
        ax.ticklabel_format(axis="y", useOffset=False)  # no "1e-5+2.83" on flat metrics
    if x == "layer":
        ax.xaxis.get_major_locator().set_params(integer=True)
    mark_stages(ax, info, x)
