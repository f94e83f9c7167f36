"""Plots draw what the tables already say: they filter and pivot, never compute metrics.

Axes-level functions take a DataFrame and an optional ``ax`` and return the ``Axes``;
``save_run_figures`` lays them out into one figure per metric family (PNG + PDF).
No pyplot state: figures are ``matplotlib.figure.Figure`` objects.
"""

from vitspec.plots.compare import compare_figure, plot_compare
from vitspec.plots.curves import plot_curves
from vitspec.plots.depth import plot_heads_vs_layer, plot_metric_vs_layer
from vitspec.plots.figures import run_figures, save_figure, save_run_figures

__all__ = [
    "compare_figure",
    "plot_compare",
    "plot_curves",
    "plot_heads_vs_layer",
    "plot_metric_vs_layer",
    "run_figures",
    "save_figure",
    "save_run_figures",
]
