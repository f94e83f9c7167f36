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
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _title(info: dict, what: str) -> str:
    weights = "RANDOM INIT (untrained)" if info.get("random_init") else info.get("checkpoint", "")
    used = info.get("images", {}).get("used", "?")
    return f"{info.get('model', '')} [{weights}] - {what} - {used} images, mean +/- sd"


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
    dl_sites = list(dict.fromkeys(spectra.loc[spectra["curve"] == "dlogamp", "site"]))
    if dl_sites:
        fig, axes = _grid(len(dl_sites), size=(4.2, 3.2))
        for ax, site in zip(axes, dl_sites):
            plot_curves(spectra, "dlogamp", site=site, ax=ax)
            ax.set_xlabel("frequency (0 = DC, last = highest on the diagonal)")
            ax.set_ylabel("relative log amplitude")
        fig.suptitle(_title(info, "Fourier log-amplitude of the patch grid (Park & Kim)"))
        figures["dlogamp"] = fig
    panels = []
    if (spectra["curve"] == "token_spectrum").any():
        for site in dict.fromkeys(spectra.loc[spectra["curve"] == "token_spectrum", "site"]):
            panels.append(("token_spectrum", site, None))
    if (spectra["curve"] == "attn_spectrum").any():
        panels.append(("attn_spectrum", "attn", -1))
    if (spectra["curve"] == "pre_attn_spectrum").any():
        panels.append(("pre_attn_spectrum", "attn", -1))
    if panels:
        fig, axes = _grid(len(panels), ncols=3, size=(4.4, 3.2))
        for ax, (curve, site, head) in zip(axes, panels):
            plot_curves(spectra, curve, site=site, head=head, centre=True, log=True, ax=ax)
            ax.set_xlabel("token frequency k (DC in the middle)")
        fig.suptitle(_title(info, "token-axis spectra"))
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
