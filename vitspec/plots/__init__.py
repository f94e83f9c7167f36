"""Plots draw what the saved tables already say: they filter and pivot, never compute metrics.

Axes-level functions take an ``ax`` and a run (or a table) and return what they drew; the
figure-level functions (``run_figures``, ``overlay_figures``, ``compare_figures``,
``verify_figures``) return ``{stem: Drawn(figure, caption)}``; ``style`` fixes fonts, colours
and sizes, ``save`` writes PNG (200 dpi) and PDF (TrueType fonts). No pyplot state, no torch.
"""

from vitspec.plots.compare import compare_figure, compare_figures, plot_compare
from vitspec.plots.figures import Drawn, overlay_figures, run_figures
from vitspec.plots.layers import plot_band, plot_heads, plot_runs, plot_sites
from vitspec.plots.spectra import (
    plot_cross_layer,
    plot_curves_by_depth,
    plot_dlogamp,
    plot_dlogamp_hf,
    plot_head_map,
    plot_spectrum_map,
)
from vitspec.plots.style import SIZES, panels, save, style
from vitspec.plots.verify import verify_figures

__all__ = [
    "SIZES",
    "Drawn",
    "compare_figure",
    "compare_figures",
    "overlay_figures",
    "panels",
    "plot_band",
    "plot_compare",
    "plot_cross_layer",
    "plot_curves_by_depth",
    "plot_dlogamp",
    "plot_dlogamp_hf",
    "plot_head_map",
    "plot_heads",
    "plot_runs",
    "plot_sites",
    "plot_spectrum_map",
    "run_figures",
    "save",
    "style",
    "verify_figures",
]
