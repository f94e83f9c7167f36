"""The figure of a compare folder: one panel per compared metric, one line per run."""

from __future__ import annotations

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vitspec.plots.figures import Drawn, _legend, fitted, title
from vitspec.plots.labels import band_words, define, ylabel
from vitspec.plots.layers import X_LABELS, plot_band
from vitspec.plots.style import panels, run_series


def plot_compare(
    table: pd.DataFrame,
    metric: str,
    *,
    x: str = "layer",
    order: list[str] | None = None,
    band: str | None = "sd",
    ax: Axes,
) -> Axes:
    """One metric of a comparison table, a line per run (same style per run in every panel).

    Args:
        table: ``ComparisonResult.table`` (metrics.csv columns, ``run`` = run label).
        metric: metric name, e.g. ``"patch_cos_abs"``.
        x: ``"layer"`` or ``"depth"``.
        order: run labels in drawing order (default: order of appearance).
        band: ``"sd"``, ``"se"`` or None.
        ax: axes to draw on.

    Example:
        >>> plot_compare(c.table, "patch_cos_abs", ax=ax)  # doctest: +SKIP
    """
    df = table[table["metric"] == metric]
    order = order if order is not None else list(dict.fromkeys(df["run"]))
    for i, label in enumerate(order):
        rows = df[df["run"] == label].sort_values("layer")
        plot_band(ax, rows, x, band=band, label=str(label), ms=2.5, **run_series(i))
    ax.set_title(metric)
    if x == "layer":
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel(ylabel(metric))
    ax.ticklabel_format(axis="y", useOffset=False)
    return ax


def compare_figure(
    table: pd.DataFrame,
    metrics: list[str],
    *,
    x: str = "layer",
    order: list[str] | None = None,
    heading: str = "",
    size: str = "page",
    band: str | None = "sd",
) -> Figure:
    """One panel per metric (:func:`plot_compare`), one legend of the run labels below.

    Example:
        >>> fig = compare_figure(c.table, c.metrics, x="layer")  # doctest: +SKIP
    """
    order = order if order is not None else list(dict.fromkeys(table["run"]))
    fig, axes = panels(size, len(metrics), aspect=0.72, extra=0.6)
    for ax, name in zip(axes, metrics):
        plot_compare(table, name, x=x, order=order, band=band, ax=ax)
    _legend(fig, axes)
    if heading:
        title(fig, heading, size)
    return fig


def compare_figures(
    table: pd.DataFrame, info: dict, *, size: str = "page", band: str = "sd"
) -> dict[str, Drawn]:
    """``{"compare": Drawn}`` for a comparison (its table and compare.json content)."""
    labels = [run["label"] for run in info["runs"]]
    used = "/".join(str(run.get("images_used")) for run in info["runs"])
    random = [run["label"] for run in info["runs"] if run.get("random_init")]
    warn = f" - RANDOM INIT: {', '.join(random)}" if random else ""
    if info.get("images_differ"):
        warn += " - DIFFERENT IMAGES"
    fig = compare_figure(
        table,
        list(info["metrics"]),
        x=info["x"],
        order=labels,
        size=size,
        band=band,
        heading=f"{' vs '.join(labels)}, site {info['site']}{warn}",
    )
    caption = (
        f"{' vs '.join(labels)} against {X_LABELS[info['x']]}: "
        f"{'; '.join(define(m) for m in info['metrics'])}. Token metrics at site "
        f"{info['site']}, attention metrics as the per-image mean over heads. "
        f"{band_words(band, used)}."
    )
    return fitted({"compare": Drawn(fig, caption)})
