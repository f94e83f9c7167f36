"""Several runs overlaid: one metric against layer or normalised depth, a line per run."""

from __future__ import annotations

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vitspec.plots.figures import _grid

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
X_LABELS = {"layer": "layer", "depth": "normalised depth (layer / L)"}


def plot_compare(
    table: pd.DataFrame,
    metric: str,
    *,
    x: str = "layer",
    order: list[str] | None = None,
    band: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Mean (+/- sd band over images) of one metric, a line per run, against ``x``.

    Args:
        table: a comparison table (``ComparisonResult.table``): metrics.csv columns whose ``run``
            column holds the run labels, one site (and for attention the head mean) per metric.
        metric: metric name, e.g. ``"patch_cos_abs"``.
        x: ``"layer"`` (block index) or ``"depth"`` (layer / L, for runs of different depths).
        order: run labels in drawing order (default: order of appearance); colour, marker and
            line style follow this order, so the same run looks the same in every panel.
        band: shade mean +/- sd where a run has more than one image.
        ax: axes to draw on (a new figure's axes by default).

    Example:
        >>> ax = plot_compare(comparison.table, "patch_cos_abs", x="depth")  # doctest: +SKIP
    """
    ax = ax if ax is not None else Figure(figsize=(4, 3)).add_subplot()
    df = table[table["metric"] == metric]
    order = order if order is not None else list(dict.fromkeys(df["run"]))
    for i, label in enumerate(order):
        group = df[df["run"] == label].sort_values("layer")
        if group.empty:
            continue
        (line,) = ax.plot(
            group[x],
            group["mean"],
            label=str(label),
            color=f"C{i % 10}",
            marker=MARKERS[i % len(MARKERS)],
            ms=3.5,
            ls=LINESTYLES[i % len(LINESTYLES)],
            lw=1.5,
        )
        if band and group["n"].max() > 1 and group["std"].notna().all():
            ax.fill_between(
                group[x],
                group["mean"] - group["std"],
                group["mean"] + group["std"],
                color=line.get_color(),
                alpha=0.15,
                lw=0,
            )
    where = (
        "attn, head mean" if (df["site"] == "attn").any() else ", ".join(dict.fromkeys(df["site"]))
    )
    ax.set_title(f"{metric} ({where})", fontsize=10)
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.ticklabel_format(axis="y", useOffset=False)  # nearly constant metrics: no "1e-5+2.83"
    ax.grid(alpha=0.3)
    return ax


def compare_figure(
    table: pd.DataFrame,
    metrics: list[str],
    *,
    x: str = "layer",
    order: list[str] | None = None,
    title: str = "",
) -> Figure:
    """One panel per metric (``plot_compare``), one shared legend of the run labels below.

    Example:
        >>> fig = compare_figure(comparison.table, ["patch_cos_abs"], x="layer")  # doctest: +SKIP
    """
    order = order if order is not None else list(dict.fromkeys(table["run"]))
    fig, axes = _grid(len(metrics), ncols=min(4, len(metrics)), size=(3.8, 3.0))
    for ax, name in zip(axes, metrics):
        plot_compare(table, name, x=x, order=order, ax=ax)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(len(labels), 4),
        fontsize=9,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
