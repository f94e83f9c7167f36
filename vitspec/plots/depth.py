"""Metric against layer: one line per site (token metrics) or per head (attention metrics)."""

from __future__ import annotations

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

SITE_COLORS = {"embed": "#444444", "mid": "#d95f02", "block": "#1b9e77", "attn": "#7570b3"}


def _axes(ax: Axes | None) -> Axes:
    return ax if ax is not None else Figure(figsize=(4, 3)).add_subplot()


def plot_metric_vs_layer(
    metrics: pd.DataFrame,
    metric: str,
    *,
    hue: str = "site",
    ax: Axes | None = None,
    band: bool = True,
) -> Axes:
    """Mean (+/- sd band over images) of one token metric against layer, a line per ``hue`` value.

    Args:
        metrics: a metrics table (metrics.csv layout), possibly several runs.
        metric: metric name, e.g. ``"hc_dc_ratio"``.
        hue: column that separates lines (``"site"`` or ``"run"``).
        ax: axes to draw on (a new figure's axes by default).
        band: shade mean +/- sd.

    Example:
        >>> ax = plot_metric_vs_layer(result.metrics, "patch_cos_abs")  # doctest: +SKIP
    """
    ax = _axes(ax)
    df = metrics[(metrics["metric"] == metric) & metrics["head"].isna()]
    for key, group in df.groupby(hue, sort=False):
        group = group.sort_values("layer")
        color = SITE_COLORS.get(key) if hue == "site" else None
        (line,) = ax.plot(
            group["layer"], group["mean"], marker="o", ms=3, label=str(key), color=color
        )
        if band and group["n"].max() > 1:
            ax.fill_between(
                group["layer"],
                group["mean"] - group["std"],
                group["mean"] + group["std"],
                color=line.get_color(),
                alpha=0.2,
                lw=0,
            )
    ax.set_title(metric)
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
    return ax


def plot_heads_vs_layer(metrics: pd.DataFrame, metric: str, *, ax: Axes | None = None) -> Axes:
    """One attention metric against layer: a thin line per head and a thick head mean.

    Example:
        >>> ax = plot_heads_vs_layer(result.metrics, "attn_entropy")  # doctest: +SKIP
    """
    ax = _axes(ax)
    df = metrics[(metrics["metric"] == metric) & (metrics["site"] == "attn")]
    heads = df[df["head"] >= 0]
    for i, (head, group) in enumerate(heads.groupby("head")):
        group = group.sort_values("layer")
        ax.plot(
            group["layer"],
            group["mean"],
            lw=0.8,
            alpha=0.55,
            color=f"C{head % 10}",
            label="per head" if i == 0 else None,
        )
    mean = df[df["head"] == -1].sort_values("layer")
    ax.plot(mean["layer"], mean["mean"], color="black", lw=2.2, marker="o", ms=3, label="head mean")
    if mean["n"].max() > 1:
        ax.fill_between(
            mean["layer"],
            mean["mean"] - mean["std"],
            mean["mean"] + mean["std"],
            color="black",
            alpha=0.12,
            lw=0,
        )
    ax.set_title(metric)
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
    return ax
