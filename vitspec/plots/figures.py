"""The figure set of a run (and of several runs overlaid), each with its caption.

``run_figures`` and ``overlay_figures`` return ``{stem: Drawn(figure, caption)}``; the caption
says what is plotted and how (tokens, site, statistic, band). Call them inside
``vitspec.plots.style.style(size)`` (``vitspec.report`` does) so fonts match the size.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass

from matplotlib.figure import Figure

from vitspec.plots.labels import SITES, band_words, define
from vitspec.plots.layers import depth_of, plot_heads, plot_runs, plot_sites
from vitspec.plots.spectra import (
    curve_rows,
    plot_cross_layer,
    plot_curves_by_depth,
    plot_dlogamp,
    plot_dlogamp_hf,
    plot_head_map,
    plot_spectrum_map,
)
from vitspec.plots.style import WIDTHS, fit, panels, run_series


def fitted(drawn: dict[str, Drawn]) -> dict[str, Drawn]:
    """Each figure grown so its panels keep their planned height (``style.fit``)."""
    for d in drawn.values():
        fit(d.figure)
    return drawn


@dataclass
class Drawn:
    """A figure and the one-paragraph caption that says what it shows and how."""

    figure: Figure
    caption: str


def header(info: dict, label: str | None = None) -> str:
    """``"base (vit_tiny) [RANDOM INIT (untrained)], 8 images"`` for titles.

    Example:
        >>> info = {"model": "vit_tiny", "checkpoint": "a.pth", "images": {"used": 8}}
        >>> header(info, "vit_tiny-a")
        'vit_tiny-a [a.pth], 8 images'
    """
    weights = "RANDOM INIT (untrained)" if info.get("random_init") else info.get("checkpoint", "")
    used = info.get("images", {}).get("used", "?")
    model = str(info.get("model", ""))
    name = label if label and model in label else f"{label} ({model})" if label else model
    return f"{name} [{weights}], {used} images"


def title(fig: Figure, text: str, size: str) -> None:
    """A suptitle wrapped to the figure's width (no text runs off a column-wide figure)."""
    chars = int(WIDTHS[size] * 11.5)
    fig.suptitle("\n".join(textwrap.wrap(text, chars)))


def _legend(fig: Figure, axes, ncols: int = 4) -> None:
    """One legend below the panels, in as many columns as the labels fit across the width."""
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fits = int(fig.get_figwidth() * 13 / (max(map(len, labels)) + 5))
        ncols = max(1, min(ncols, len(labels), fits))
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols)


def _names(metrics, attn: bool) -> list[str]:
    """Metric names in table order; AttnScale's ``pre_*`` after those of A' (the used one)."""
    m = metrics[(metrics["site"] == "attn") == attn]
    names = list(dict.fromkeys(m["metric"]))
    rank = {name: i for i, name in enumerate(names)}
    return sorted(names, key=lambda n: (n.startswith("pre_"), rank.get(n.removeprefix("pre_"), 0)))


def _sites_words(metrics) -> str:
    sites = [s for s in ("block", "mid") if (metrics["site"] == s).any()]
    words = [SITES[s] for s in sites]
    if (metrics["site"] == "embed").any():
        words[0] += "; layer 0 = " + SITES["embed"]
    return "; ".join(words)


def run_figures(
    result, *, size: str = "page", band: str = "sd", label: str | None = None
) -> dict[str, Drawn]:
    """Every figure of one analyze run whose data the run holds.

    Stems: ``tokens``, ``cosine`` (Wang et al. Fig. 4), ``attn_spectrum`` (Fig. 2/5),
    ``attn_spectrum_map``, ``dlogamp`` / ``dlogamp_hf`` (Park & Kim), ``rank_residual``
    (Dong et al.), ``attn_cross_layer_sim`` / ``attn_entropy_map`` (DeepViT),
    ``attention_heads``, ``token_spectrum``.

    Example:
        >>> with style("column"):  # doctest: +SKIP
        ...     figures = run_figures(result, size="column")
    """
    metrics, info = result.metrics, result.info
    n = info.get("images", {}).get("used", "?")
    head, bands = header(info, label), band_words(band, n)
    label = label or info.get("run") or "run"
    out: dict[str, Drawn] = {}
    sites = _sites_words(metrics)

    names = [x for x in _names(metrics, attn=False) if x not in ("dlogamp",)]
    if names:
        fig, axes = panels(size, len(names), aspect=0.72, extra=0.5)
        for ax in axes:
            ax.set_box_aspect(None)
        for ax, name in zip(axes, names):
            plot_sites(ax, result, name, band=band)
        _legend(fig, axes)
        title(fig, f"{head}: token metrics against layer", size)
        out["tokens"] = Drawn(
            fig,
            f"Token metrics against layer. {'; '.join(map(define, names))}. "
            f"Sites: {sites}. {bands}.",
        )
    cos = [x for x in ("patch_cos_abs", "attn_cos") if (metrics["metric"] == x).any()]
    if cos:
        fig, axes = panels(size, len(cos), aspect=0.8, extra=0.3)
        for ax, name in zip(axes, cos):
            plot_runs(ax, {label: result}, name, band=band)
        title(fig, f"{head}: cosine similarity (Wang et al. Fig. 4)", size)
        out["cosine"] = Drawn(
            fig,
            f"Cosine similarity against layer (Wang et al. 2022, Fig. 4). "
            f"{'; '.join(map(define, cos))}. Tokens at site block (layer 0 "
            f"= embed); attention as the per-image mean over heads. {bands}.",
        )
    spectra = [
        c
        for c in ("attn_spectrum", "pre_attn_spectrum")
        if not curve_rows(result.spectra, c, ("attn",), -1).empty
    ]
    if spectra:
        fig, axes = panels(size, len(spectra), ncols=len(spectra), aspect=0.75, extra=0.3)
        for ax, curve in zip(axes, spectra):
            plot_curves_by_depth(ax, result, curve, sites=("attn",), head=-1)
            ax.set_ylabel("||row k of F A F^H|| (log)" + (" pre-scale A" if "pre" in curve else ""))
        title(fig, f"{head}: attention spectrum (Wang et al. Fig. 2/5)", size)
        out["attn_spectrum"] = Drawn(
            fig,
            (
                "Attention spectrum (Wang et al. 2022, Fig. 2/5): Euclidean norm of row k of F A "
                "F^H "
                "(F the unitary N-point DFT over tokens, all N tokens), per-image mean over heads, "
                f"mean over {n} images (no band); one curve per layer, colour = layer; DC (k = 0, "
                "value 1 for a row-stochastic A) in the middle; log y axis."
                + (" Right: AttnScale's pre-scale attention." if len(spectra) > 1 else "")
            ),
        )
        fig, axes = panels(size, 1, aspect=0.6)
        if plot_spectrum_map(axes[0], result):
            title(fig, f"{head}: attention spectrum, layer x frequency", size)
            out["attn_spectrum_map"] = Drawn(
                fig,
                (
                    "Attention spectrum as a layer x frequency heat map: the head-mean curve of "
                    "the "
                    f"previous figure (mean over {n} images) per layer (rows), DC in the middle, "
                    "log colour scale."
                ),
            )
    if not curve_rows(result.spectra, "dlogamp", ("embed", "block", "mid")).empty:
        mid = not curve_rows(result.spectra, "dlogamp", ("mid",)).empty
        fig, axes = panels(size, 1 + mid, ncols=1 + mid, aspect=0.75, extra=0.3)
        plot_dlogamp(axes[0], result)
        if mid:
            plot_dlogamp(axes[1], result, sites=("mid",))
            axes[1].set_title("mid (after attention)")
            axes[0].set_title("block (0 = embed)")
        title(fig, f"{head}: relative log amplitude (Park & Kim Fig. 2a)", size)
        out["dlogamp"] = Drawn(
            fig,
            (
                "Relative log amplitude (Park & Kim 2022, Fig. 2a): log(|2-D DFT of the patch "
                "grid| "
                "+ 1e-6), mean over channels, on the grid diagonal (ω, ω) minus its value at DC, "
                f"patch tokens only; mean over {n} images (no band); one curve per layer, colour = "
                "normalised depth; ω = 2π i / h for grid height h, so grids of different sizes "
                "share "
                "the 0..π axis."
            ),
        )
    if (metrics["metric"] == "dlogamp_hf").any():
        fig, axes = panels(size, 1, aspect=0.55, extra=0.3)
        shaded = plot_dlogamp_hf(axes[0], result, band=band)
        title(fig, f"{head}: high-frequency log amplitude vs depth (Park & Kim Fig. 8)", size)
        out["dlogamp_hf"] = Drawn(
            fig,
            (
                f"{define('dlogamp_hf')}, against normalised depth (layer / L; 0 = embed). "
                + (
                    "Points at block outputs and, half a block earlier, after each attention "
                    "residual "
                    "(mid); grey spans: the attention sub-blocks. "
                    if shaded
                    else "Site block only (the mid site was not measured, so attention "
                    "sub-blocks are not "
                    "shaded). "
                )
                + f"{bands}."
            ),
        )
    if (metrics["metric"] == "rank_residual").any():
        fig, axes = panels(size, 1, aspect=0.55, extra=0.3)
        plot_runs(axes[0], {label: result}, "rank_residual", band=band, log=True)
        title(fig, f"{head}: distance to rank 1 (Dong et al.)", size)
        out["rank_residual"] = Drawn(
            fig,
            (
                f"Dong et al. (2021): {define('rank_residual')}, site block (layer 0 = embed), log "
                f"axis. {bands} (lower band edge kept above mean / 10 on the log axis)."
            ),
        )
    if (metrics["metric"] == "attn_cross_layer_sim").any():
        fig, axes = panels(size, 1, aspect=0.6, extra=0.6)
        plot_cross_layer(axes[0], result, band=band)
        _legend(fig, axes, ncols=5)
        title(fig, f"{head}: cross-layer attention similarity (DeepViT)", size)
        out["attn_cross_layer_sim"] = Drawn(
            fig,
            (
                f"DeepViT (Zhou et al. 2021): {define('attn_cross_layer_sim')}, for layers l >= 2; "
                f"thin lines: each head (mean over {n} images); thick: per-image mean over heads, "
                f"{bands}."
            ),
        )
    entropy = [e for e in ("attn_entropy", "pre_attn_entropy") if (metrics["metric"] == e).any()]
    if entropy:  # AttnScale's A' can be negative (no entropy): then the pre-scale A's
        fig, axes = panels(size, 1, aspect=0.7, extra=0.3)
        log_n = plot_head_map(axes[0], result, entropy[0])
        title(fig, f"{head}: {entropy[0]} per layer and head", size)
        mark = (
            f"the red line on the colour bar is log N = {log_n:.3f} nats, the entropy of "
            "uniform attention over N tokens"
            if log_n is not None
            else "log N is not marked: the token count changes with the layer"
        )
        out["attn_entropy_map"] = Drawn(
            fig, (f"{define(entropy[0])}, per layer and head, mean over {n} images; {mark}.")
        )
    attn = _names(metrics, attn=True)
    if attn:
        fig, axes = panels(size, len(attn), aspect=0.72, extra=0.8)
        for ax, name in zip(axes, attn):
            plot_heads(ax, result, name, band=band)
        _legend(fig, axes, ncols=7)
        title(fig, f"{head}: attention metrics per head", size)
        out["attention_heads"] = Drawn(
            fig,
            (
                f"Attention metrics per head against layer. {'; '.join(map(define, attn))}. "
                "A = post-softmax attention of each block, all N tokens; thin lines: one head "
                "each "
                f"(colour, marker and line style; mean over {n} images); thick black: per-image "
                "mean "
                f"over heads, {bands}."
            ),
        )
    if not curve_rows(result.spectra, "token_spectrum", ("embed", "block")).empty:
        fig, axes = panels(size, 1, aspect=0.6, extra=0.3)
        plot_curves_by_depth(axes[0], result, "token_spectrum")
        axes[0].set_ylabel("energy share E_k (log)")
        title(fig, f"{head}: token spectrum per layer", size)
        out["token_spectrum"] = Drawn(
            fig,
            (
                "Token spectrum: E_k = sum_c |(F X)[k, c]|^2 / ||X||_F^2 (F the unitary N-point "
                "DFT "
                f"over all N tokens), site block (layer 0 = embed), mean over {n} images (no "
                "band); "
                "one curve per layer, colour = layer; DC in the middle; log y axis."
            ),
        )
    return fitted(out)


def overlay_figures(
    runs: Mapping[str, object], *, size: str = "page", band: str = "sd"
) -> dict[str, Drawn]:
    """Several analyze runs overlaid (``runs``: label -> run), against layer, or against
    normalised depth when their depths differ.

    Stems: ``overlay_tokens``, ``overlay_cosine`` (Wang et al. Fig. 4, runs overlaid),
    ``overlay_rank_residual``, ``overlay_dlogamp_hf``.
    """
    depths = {depth_of(r.info, r.metrics) for r in runs.values()}
    x = "depth" if len(depths) > 1 else "layer"
    ns = "/".join(str(r.info.get("images", {}).get("used", "?")) for r in runs.values())
    bands = band_words(band, ns)
    who = " vs ".join(runs)
    shared = [
        n
        for n in _names(next(iter(runs.values())).metrics, attn=False)
        if n != "dlogamp" and all((r.metrics["metric"] == n).any() for r in runs.values())
    ]
    out: dict[str, Drawn] = {}
    xs = "layer" if x == "layer" else "normalised depth (runs of different depths)"
    if shared:
        fig, axes = panels(size, len(shared), aspect=0.72, extra=0.5)
        for ax, name in zip(axes, shared):
            plot_runs(ax, runs, name, x=x, band=band)
        _legend(fig, axes)
        title(fig, f"{who}: token metrics", size)
        out["overlay_tokens"] = Drawn(
            fig,
            (
                f"Token metrics of {len(runs)} runs against {xs}, site block (0 = embed). "
                f"{'; '.join(map(define, shared))}. {bands}."
            ),
        )
    cos = [
        c
        for c in ("patch_cos_abs", "attn_cos")
        if all((r.metrics["metric"] == c).any() for r in runs.values())
    ]
    if cos:
        fig, axes = panels(size, len(cos), aspect=0.8, extra=0.5)
        for ax, name in zip(axes, cos):
            plot_runs(ax, runs, name, x=x, band=band)
        _legend(fig, axes)
        title(fig, f"{who}: cosine similarity (Wang et al. Fig. 4)", size)
        out["overlay_cosine"] = Drawn(
            fig,
            (
                f"Cosine similarity of {len(runs)} runs against {xs} (Wang et al. 2022, Fig. 4). "
                f"{'; '.join(map(define, cos))}. Tokens at site block (0 = embed); attention as "
                "the "
                f"per-image mean over heads. {bands}."
            ),
        )
    if "rank_residual" in shared:
        fig, axes = panels(size, 1, aspect=0.55, extra=0.5)
        plot_runs(axes[0], runs, "rank_residual", x=x, band=band, log=True)
        _legend(fig, axes)
        title(fig, f"{who}: distance to rank 1 (Dong et al.)", size)
        out["overlay_rank_residual"] = Drawn(
            fig,
            (
                f"{define('rank_residual')}, {len(runs)} runs against {xs}, log axis. {bands} "
                "(lower band edge kept above mean / 10)."
            ),
        )
    if "dlogamp_hf" in shared:
        fig, axes = panels(size, 1, aspect=0.55, extra=0.5)
        for i, (name, result) in enumerate(runs.items()):
            plot_dlogamp_hf(axes[0], result, band=band, index=i)
            axes[0].get_lines()[-1].set_label(name)
            axes[0].get_lines()[-1].set(**{k: v for k, v in run_series(i).items() if k != "color"})
        _legend(fig, axes)
        title(fig, f"{who}: high-frequency log amplitude (Park & Kim)", size)
        out["overlay_dlogamp_hf"] = Drawn(
            fig,
            (
                f"{define('dlogamp_hf')}; {len(runs)} runs against normalised depth (0 = embed; "
                "grey "
                f"spans: attention sub-blocks where the mid site was measured). {bands}."
            ),
        )
    return fitted(out)
