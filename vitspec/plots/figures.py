"""Figure-level layouts of a run: one figure per metric family, PNG + PDF."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from vitspec.plots.curves import plot_curves
from vitspec.plots.depth import plot_heads_vs_layer, plot_metric_vs_layer


def _grid(n: int, ncols: int = 4, size=(3.6, 2.8)) -> tuple[Figure, list]:
    ncols = min(ncols, max(n, 1))
    nrows = math.ceil(n / ncols)
    # at least 7.5 inches wide so that the two-line title fits above a single panel
    fig = Figure(figsize=(max(size[0] * ncols, 7.5), size[1] * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _title(info: dict, what: str, bands: bool = True) -> str:
    weights = "RANDOM INIT (untrained)" if info.get("random_init") else info.get("checkpoint", "")
    used = info.get("images", {}).get("used", "?")
    stat = "mean +/- sd" if bands else "mean"
    return f"{info.get('model', '')} [{weights}]\n{what}, {used} images, {stat}"


def _curve_sites(spectra, curve: str) -> list[tuple[str, ...]]:
    """Token-curve panels: ``embed`` (layer 0) joins the ``block`` panel, ``mid`` has its own."""
    sites = set(spectra.loc[spectra["curve"] == curve, "site"])
    panels = [tuple(s for s in ("embed", "block") if s in sites)]
    return [p for p in panels if p] + ([("mid",)] if "mid" in sites else [])


def run_figures(result) -> dict[str, Figure]:
    """The figures of one run, by file stem: ``tokens``, ``attention``, ``dlogamp``, ``spectra``.

    A family absent from the result (e.g. no attention metric selected) has no figure.
    """
    metrics, spectra, info = result.metrics, result.spectra, result.info
    figures = {}
    token_names = list(dict.fromkeys(metrics.loc[metrics["site"] != "attn", "metric"]))
    if token_names:
        fig, axes = _grid(len(token_names))
        for ax, name in zip(axes, token_names):
            plot_metric_vs_layer(metrics, name, ax=ax)
        axes[0].legend(title="site", fontsize=8)
        fig.suptitle(_title(info, "token metrics vs layer"))
        figures["tokens"] = fig
    attn_names = list(dict.fromkeys(metrics.loc[metrics["site"] == "attn", "metric"]))
    # AttnScale models: the pre-scale attention's pre_* panels after those of A' (the used one)
    rank = {name: i for i, name in enumerate(attn_names)}
    attn_names.sort(key=lambda n: (n.startswith("pre_"), rank.get(n.removeprefix("pre_"), 0)))
    if attn_names:
        fig, axes = _grid(len(attn_names))
        for ax, name in zip(axes, attn_names):
            plot_heads_vs_layer(metrics, name, ax=ax)
        axes[0].legend(fontsize=8)
        fig.suptitle(_title(info, "attention metrics vs layer"))
        figures["attention"] = fig
    dl_panels = _curve_sites(spectra, "dlogamp")
    if dl_panels:
        fig, axes = _grid(len(dl_panels), size=(5.2, 3.6))
        for ax, sites in zip(axes, dl_panels):
            plot_curves(spectra, "dlogamp", site=sites, ax=ax)
            ax.set_xlabel("frequency on the grid diagonal (0 = DC)")
            ax.set_ylabel("log amplitude relative to DC")
        fig.suptitle(_title(info, "patch-grid Fourier log amplitude (Park & Kim)", bands=False))
        figures["dlogamp"] = fig
    panels = [("token_spectrum", sites, None) for sites in _curve_sites(spectra, "token_spectrum")]
    for curve in ("attn_spectrum", "pre_attn_spectrum"):
        if (spectra["curve"] == curve).any():
            panels.append((curve, ("attn",), -1))
    if panels:
        fig, axes = _grid(len(panels), ncols=3, size=(4.6, 3.4))
        for ax, (curve, sites, head) in zip(axes, panels):
            plot_curves(spectra, curve, site=sites, head=head, centre=True, log=True, ax=ax)
            ax.set_xlabel("token frequency k (DC in the middle)")
        fig.suptitle(_title(info, "spectra over the token axis", bands=False))
        figures["spectra"] = fig
    return figures


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Save ``fig`` as ``stem.png`` (150 dpi) and ``stem.pdf``."""
    paths = [Path(out_dir) / f"{stem}.png", Path(out_dir) / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def save_run_figures(result, out_dir: Path) -> list[Path]:
    """Write every figure of ``run_figures`` into ``out_dir``."""
    return [p for stem, fig in run_figures(result).items() for p in save_figure(fig, out_dir, stem)]
