"""Figures of ``vitspec verify``: each check's measured values against its bound, verdict on top.

Axes-level functions draw one small table of ``VerifyResult.figure_data`` (they filter and
draw, never compute a check); ``verify_figures`` lays them out with
captions. No pyplot, no torch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from vitspec.plots.figures import Drawn, fitted, title
from vitspec.plots.style import panels

FAMILY_MARKERS = {"uniform": "o", "peaked": "s", "shared": "^", "two-cluster": "D"}


def _finite(df: pd.DataFrame) -> pd.DataFrame:
    """Infinite values (a bound s_a^t that overflowed) as NaN, which matplotlib leaves out."""
    return df.replace([np.inf, -np.inf], np.nan)


def _axes(ax: Axes | None, size=(4.5, 3.4)) -> Axes:
    return ax if ax is not None else Figure(figsize=size, layout="constrained").add_subplot()


def _legend_below(ax: Axes) -> None:
    """The legend under the axes, never over the data."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=1, fontsize="small")


def verdict(info: dict, check: str) -> str:
    """``"logit_bound: PASS (0 of 792 cases violate, max slack 0.83)"`` from verify.json."""
    c = info.get("summary", {}).get("checks", {}).get(check)
    if c is None:
        return f"{check}: not run"
    if c["status"] == "not-applicable":
        return f"{check}: NOT APPLICABLE ({c['not_applicable'][0] if c['not_applicable'] else ''})"
    slack = "n/a" if c["max_slack"] is None else f"{c['max_slack']:.3g}"
    text = (
        f"{check}: {c['status'].upper()} ({c['violations']} of {c['cases']} cases violate, "
        f"max slack {slack})"
    )
    if c["failing"]:
        more = " ..." if len(c["failing"]) > 3 else ""
        text += f" - fails at {', '.join(c['failing'][:3])}{more}"
    return text


def plot_lowpass_curves(curves: pd.DataFrame, layer: int, *, ax: Axes | None = None) -> Axes:
    """Theorem 1 at one layer: ``r_t`` (solid) and its bound ``s_a^t ||HC z|| / ||DC A^t z||``
    (dashed) against t, one colour per head, log scale.

    Example:
        >>> ax = plot_lowpass_curves(result.figure_data["curves"], layer=1)  # doctest: +SKIP
    """
    ax = _axes(ax)
    df = _finite(curves[curves["layer"] == layer])
    for head, group in df.groupby("head"):
        group = group.sort_values("t")
        color = f"C{int(head) % 10}"
        marker = "o" if len(group) <= 40 else None
        ax.plot(group["t"], group["r"], color=color, lw=1.4, marker=marker, ms=2.5)
        ax.plot(group["t"], group["bound"], color=color, lw=1.0, ls="--")
    ax.set_yscale("log")
    r = df["r"][df["r"] > 0]
    if len(r):  # the measured values set the range; a bound far above them runs off the top
        ax.set_ylim(r.min() / 10, max(r.max() * 30, float(df["bound"].min()) * 3))
    ax.set_xlabel("t (power of A)")
    ax.set_ylabel("||HC[A^t z]|| / ||DC[A^t z]||")
    ax.set_title(f"layer {layer}")
    ax.grid(alpha=0.3, which="both")
    return ax


def plot_product_lowpass(products: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """The Corollary: ``r`` of ``A_l ... A_1 z`` along same-head and random-head paths, with the
    ``prod s_a`` bound, against l."""
    ax = _axes(ax)
    df = _finite(products.sort_values("layer"))
    ax.plot(df["layer"], df["r_same"], color="C0", marker="o", ms=3, label="same-head paths")
    ax.plot(df["layer"], df["bound_same"], color="C0", ls="--", label="bound (prod s_a)")
    ax.plot(df["layer"], df["r_random"], color="C3", marker="s", ms=3, label="random-head paths")
    ax.plot(df["layer"], df["bound_random"], color="C3", ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("layers in the product")
    ax.set_ylabel("||HC|| / ||DC|| of A_l...A_1 z")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("products of attention (Corollary)")
    _legend_below(ax)
    ax.grid(alpha=0.3, which="both")
    return ax


def plot_decay_rate(gains: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Fitted per-step decay rate of ``r_t`` against ``s_a``, one point per layer and head, with
    the line rate = s_a (the per-step bound) and rate = 1."""
    ax = _axes(ax)
    df = _finite(gains).dropna(subset=["decay_rate"]) if "decay_rate" in gains else gains.iloc[:0]
    sc = ax.scatter(df["s_a"], df["decay_rate"], c=df["layer"], cmap="viridis", s=14)
    ax.figure.colorbar(sc, ax=ax, label="layer")
    hi = float(max(df["s_a"].max(), df["decay_rate"].max())) * 1.15 if len(df) else 1.0
    ax.plot([0, hi], [0, hi], color="black", lw=1, ls="--", label="rate = s_a")
    if hi > 1:
        ax.axhline(1, color="grey", lw=0.8, ls=":")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("s_a (mean over images)")
    ax.set_ylabel("fitted decay rate per step")
    ax.set_title("measured decay vs s_a")
    _legend_below(ax)
    ax.grid(alpha=0.3)
    return ax


def plot_gain_bounds(gains: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """``s_a`` per layer and head (dots), ``||A||_2`` (crosses) and the logit bound
    ``sqrt(N e^{2a} / (e^{2a} + N - 1))`` (line), means over images, log scale."""
    ax = _axes(ax, size=(6, 3.6))
    gains = _finite(gains)
    heads = sorted(gains["head"].unique())
    width = 0.6 / max(len(heads), 1)
    for i, head in enumerate(heads):
        g = gains[gains["head"] == head].sort_values("layer")
        x = g["layer"] + (i - (len(heads) - 1) / 2) * width
        ax.scatter(
            x, g["s_a"], s=12, color="C0", alpha=0.8, label="s_a (per head)" if i == 0 else None
        )
        ax.scatter(
            x,
            g["norm"],
            s=14,
            marker="x",
            color="C1",
            alpha=0.8,
            label="||A||_2 (per head)" if i == 0 else None,
        )
    per_layer = gains.groupby("layer")["logit_bound"].mean()
    ax.plot(
        per_layer.index,
        per_layer.values,
        color="C3",
        lw=1.8,
        marker="_",
        ms=12,
        label="logit bound (mean over heads)",
    )
    ax.axhline(1, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("gain")
    ax.set_xticks(sorted(gains["layer"].unique()))
    _legend_below(ax)
    ax.grid(alpha=0.3, which="both")
    return ax


def plot_msa_gain(blocks: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Measured per-block HC gain ``||HC[MSA(Y)]|| / ||HC[Y]||`` (mean and max over images)
    against the msa bound ``sum_h s_a^h ||W_V^h W_O^h||_2`` per layer, log scale."""
    ax = _axes(ax)
    df = _finite(blocks.sort_values("layer"))
    ax.plot(df["layer"], df["gain"], color="C0", marker="o", ms=3, label="measured (mean)")
    ax.plot(df["layer"], df["gain_max"], color="C0", ls=":", marker=".", label="measured (max)")
    ax.plot(
        df["layer"],
        df["bound"],
        color="C3",
        ls="--",
        marker="_",
        ms=10,
        label="bound sum_h s_a ||W_V W_O||",
    )
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("||HC[MSA(Y)]|| / ||HC[Y]||")
    ax.set_title("attention branch")
    _legend_below(ax)
    ax.grid(alpha=0.3, which="both")
    return ax


def plot_residual_rate(blocks: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Measured ``||HC[X + MSA(Y)]|| / ||HC[X]||`` against the checked bound
    ``(||HC[X]|| + B ||HC[Y]||) / ||HC[X]||`` and the naive rate ``1 + B``."""
    ax = _axes(ax)
    df = _finite(blocks.sort_values("layer"))
    ax.plot(df["layer"], df["rate"], color="C0", marker="o", ms=3, label="measured (mean)")
    ax.plot(df["layer"], df["rate_max"], color="C0", ls=":", marker=".", label="measured (max)")
    ax.plot(
        df["layer"],
        df["rate_bound"],
        color="C3",
        ls="--",
        label="bound (||HC X|| + B ||HC Y||) / ||HC X||",
    )
    ax.plot(
        df["layer"],
        df["one_plus_bound"],
        color="grey",
        ls="-.",
        label="1 + B (not a bound with LayerNorm)",
    )
    ax.set_xlabel("layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("||HC[X + MSA(Y)]|| / ||HC[X]||")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title("residual form")
    _legend_below(ax)
    ax.grid(alpha=0.3)
    return ax


def plot_synthetic_gain(
    points: pd.DataFrame, *, value: str = "s_a", ax: Axes | None = None
) -> Axes:
    """Synthetic suite: ``value`` (``s_a`` or ``norm`` = ``||A||_2``) against the logit
    half-width a, colour per N, marker per logit family, with the bound curve per N."""
    ax = _axes(ax)
    sizes = sorted(points["N"].unique())
    finite = points[np.isfinite(points["a"])]
    a_max = float(finite["a"].max()) if len(finite) else 1.0
    grid = np.concatenate([[0.0], np.geomspace(1e-3, max(a_max, 1e-3) * 1.05, 200)])
    for i, n in enumerate(sizes):
        color = f"C{i}"
        df = points[points["N"] == n]
        for family, group in df.groupby("family"):
            ax.scatter(
                group["a"],
                group[value],
                s=16,
                color=color,
                marker=FAMILY_MARKERS.get(family, "o"),
                alpha=0.8,
            )
        ax.plot(grid, np.sqrt(n / (1 + (n - 1) * np.exp(-2 * grid))), color=color, lw=1.2, ls="--")
    ax.set_xscale("symlog", linthresh=0.1)
    if value == "s_a":  # s_a is 0 (round-off) for uniform and rank-one matrices: keep 0 visible
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(bottom=0)
    else:
        ax.set_yscale("log")
    ax.set_xlabel("a = largest half-width of a row's logit range")
    ax.set_ylabel("s_a" if value == "s_a" else "||A||_2")
    ax.set_title(f"{'s_a' if value == 's_a' else '||A||_2'} vs a")
    handles = [
        Line2D([], [], color=f"C{i}", marker="o", ls="--", label=f"N = {n}")
        for i, n in enumerate(sizes)
    ]
    handles += [
        Line2D([], [], color="black", marker=m, ls="", label=f)
        for f, m in FAMILY_MARKERS.items()
        if f in set(points["family"])
    ]
    ax.legend(handles=handles, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    return ax


def _title(info: dict, what: str) -> str:
    if info.get("model") == "synthetic":
        return f"synthetic softmax matrices - {what}"
    weights = "RANDOM INIT (untrained)" if info.get("random_init") else info.get("checkpoint", "")
    used = info.get("images", {}).get("used", "?")
    return f"{info.get('model', '')} [{weights}], {used} images - {what}"


def verify_figures(result, *, size: str = "page") -> dict[str, Drawn]:
    """Figures by file stem, each with its caption: ``verify_lowpass`` (a), ``verify_gain`` (b),
    ``verify_msa`` (c), ``verify_synthetic`` (d); each present when its data is.

    Example:
        >>> figures = verify_figures(VerifyResult.load("runs/verify"))  # doctest: +SKIP
    """
    data, info = result.figure_data, result.info
    figures: dict[str, Drawn] = {}
    curves, products, gains = (data.get(k) for k in ("curves", "products", "gains"))
    if curves is not None and len(curves):
        layers = sorted(curves["layer"].unique())
        n = len(layers)
        cols = min(n, 2 if size == "column" else 3)
        fig, axes = panels(size, n, ncols=cols, aspect=0.8, extra=0.9)
        for ax, layer in zip(axes, layers):
            plot_lowpass_curves(curves, layer, ax=ax)
        measured = Line2D([], [], color="black", marker="o", ms=2.5, label="measured r_t")
        bound = Line2D([], [], color="black", ls="--", label="bound s_a^t ||HC z|| / ||DC A^t z||")
        fig.legend(handles=[measured, bound], loc="outside lower center", ncols=2)
        heading = _title(info, "low-pass limit (Theorem 1)") + ". "
        title(fig, heading + verdict(info, "lowpass_limit"), size)
        figures["verify_lowpass"] = Drawn(
            fig,
            (
                "Low-pass limit (Wang et al. 2022, Theorem 1): r_t = ||HC[A^t z]|| / ||DC[A^t z]|| "
                "(solid, geometric mean over images and start vectors z, up to the first early "
                "stop) and its bound s_a^t ||HC z|| / ||DC A^t z|| (dashed) against the power t, "
                "one panel per layer, colour = head, log y."
            ),
        )
    have_products = products is not None and len(products)
    have_gains = gains is not None and len(gains)
    if have_products or have_gains:
        n = bool(have_products) + bool(have_gains)
        fig, axes = panels(size, n, ncols=1 if size == "column" else n, aspect=0.8, extra=1.2)
        if have_products:
            plot_product_lowpass(products, ax=axes[0])
        if have_gains:
            plot_decay_rate(gains, ax=axes[-1])
        heading = _title(info, "products of attention and decay rates") + ". "
        title(fig, heading + verdict(info, "product_lowpass"), size)
        figures["verify_products"] = Drawn(
            fig,
            (
                "Corollary of Theorem 1: ||HC|| / ||DC|| of the products A_l...A_1 z along "
                "same-head and random-head paths with the prod s_a bound (dashed), against the "
                "number of layers; and the fitted per-step decay rate of r_t against s_a (one "
                "point per layer and head, colour = layer, dashed: rate = s_a)."
            ),
        )
    if gains is not None and len(gains):
        fig, axes = panels(size, 1, aspect=0.6, extra=1.2)
        plot_gain_bounds(gains, ax=axes[0])
        title(
            fig,
            _title(info, "s_a <= ||A||_2 <= logit bound")
            + ". "
            + verdict(info, "logit_bound")
            + ". "
            + verdict(info, "hc_contraction"),
            size,
        )
        figures["verify_gain"] = Drawn(
            fig,
            (
                "HC gain bounds: s_a = sigma_max((I - J) A (I - J)) per layer and head (dots), "
                "||A||_2 (crosses) and the logit bound sqrt(N e^{2a} / (e^{2a} + N - 1)) (line, "
                "mean "
                "over heads), each the mean over images; log y."
            ),
        )
    blocks = data.get("blocks")
    if blocks is not None and len(blocks):
        fig, axes = panels(size, 2, ncols=1 if size == "column" else 2, aspect=0.75, extra=1.6)
        plot_msa_gain(blocks, ax=axes[0])
        plot_residual_rate(blocks, ax=axes[1])
        title(
            fig,
            _title(info, "HC gain of the attention branch per block")
            + ". "
            + verdict(info, "msa_bound")
            + ". "
            + verdict(info, "msa_residual"),
            size,
        )
        figures["verify_msa"] = Drawn(
            fig,
            (
                "Attention branch: measured ||HC[MSA(Y)]|| / ||HC[Y]|| (mean and max over images) "
                "against the bound sum_h s_a^h ||W_V^h W_O^h||_2 per layer (log y); residual form: "
                "measured ||HC[X + MSA(Y)]|| / ||HC[X]|| against (||HC X|| + B ||HC Y||) / ||HC "
                "X|| "
                "and the naive 1 + B."
            ),
        )
    points = data.get("synthetic")
    if points is not None and len(points):
        fig, axes = panels(size, 2, ncols=1 if size == "column" else 2, aspect=0.75, extra=0.6)
        plot_synthetic_gain(points, value="s_a", ax=axes[0])
        plot_synthetic_gain(points, value="norm", ax=axes[1])
        title(
            fig,
            _title(info, "HC gain against the logit bound")
            + ". "
            + verdict(info, "logit_bound")
            + ". "
            + verdict(info, "hc_contraction"),
            size,
        )
        figures["verify_synthetic"] = Drawn(
            fig,
            (
                "Synthetic softmax matrices: s_a and ||A||_2 against the logit half-width a, "
                "colour = N, marker = logit family, dashed: the logit bound for each N; shared "
                "rows give a rank-one A, whose s_a is 0 (round-off)."
            ),
        )
    return fitted(figures)
