"""Figures draw what the tables say: artists, labels and captions, at both sizes; no torch."""

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from vitspec import analyze
from vitspec.inputs import synthetic_batches
from vitspec.plots import (
    overlay_figures,
    plot_band,
    plot_dlogamp,
    plot_dlogamp_hf,
    plot_head_map,
    plot_heads,
    plot_sites,
    plot_spectrum_map,
    run_figures,
    style,
)
from vitspec.plots.layers import mark_stages
from vitspec.plots.style import PALETTE, panels, series

PACKAGE = Path(__file__).parents[1] / "vitspec"


def _run(depth, sites=("embed", "block"), seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=False,
        img_size=48,
        patch_size=8,
        depth=depth,
        embed_dim=32,
        num_heads=2,
    )
    r = analyze(
        model,
        images=list(synthetic_batches(3, 3, (48, 48))),
        device="cpu",
        sites=sites,
        warn=lambda m: None,
    )
    r.info["random_init"] = True
    return r


@pytest.fixture(scope="module")
def result():
    return _run(3, sites=("embed", "mid", "block"))


def _ax():
    return Figure().add_subplot()


def test_band_is_sd_or_se_and_absent_for_one_image(result):
    df = result.metric("hc_energy", site="block").sort_values("layer")
    for band, scale in (("sd", 1.0), ("se", 1 / math.sqrt(3))):
        ax = _ax()
        plot_band(ax, df, band=band)
        (poly,) = ax.collections
        top = poly.get_paths()[0].vertices[:, 1].max()
        assert top == pytest.approx((df["mean"] + scale * df["std"]).max())
    ax = _ax()
    plot_band(ax, df.assign(n=1), band="sd")
    assert not ax.collections


def test_token_sites_block_from_embed_and_mid_half_a_block_earlier(result):
    ax = _ax()
    lines = plot_sites(ax, result, "hc_dc_ratio")
    assert [line.get_label() for line in lines] == [
        "block (0 = embed)",
        "mid (after attention, at l - 0.5)",
    ]
    assert list(lines[0].get_xdata()) == [0, 1, 2, 3]
    assert list(lines[1].get_xdata()) == [0.5, 1.5, 2.5]
    assert ax.get_ylabel() == "||HC|| / ||DC|| (ratio)" and ax.get_title() == "hc_dc_ratio"
    assert len(ax.collections) == 2  # a band per site, layer 0 included


def test_heads_are_told_apart(result):
    ax = _ax()
    lines = plot_heads(ax, result, "attn_hc_gain")
    assert [line.get_label() for line in lines] == ["head 0", "head 1", "head mean"]
    styles = {(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines}
    assert len(styles) == 3
    mean = result.metric("attn_hc_gain", head=-1).sort_values("layer")["mean"].tolist()
    assert list(lines[-1].get_ydata()) == pytest.approx(mean)
    assert len({tuple(series(i).values()) for i in range(16)}) == 16  # 16 heads, 16 styles


def test_attention_spectrum_dc_in_the_middle_and_heat_map(result):
    figures = run_figures(result)
    ax = figures["attn_spectrum"].figure.axes[0]
    n = 1 + 36
    dc = result.spectra.query(
        "curve == 'attn_spectrum' and head == -1 and layer == 1 and freq == 0"
    )
    line = ax.get_lines()[0]
    x, y = line.get_xdata(), line.get_ydata()
    assert list(x) == list(range(-(n // 2), n - n // 2))
    assert y[list(x).index(0)] == pytest.approx(dc["mean"].item())
    assert len(ax.get_lines()) == 3 and ax.get_yscale() == "log"
    heat = _ax()
    assert plot_spectrum_map(heat, result)
    image = heat.images[0]
    assert image.get_array().shape == (3, n)
    assert image.get_extent()[:2] == [-(n // 2) - 0.5, n - n // 2 - 0.5]


def test_dlogamp_on_zero_to_pi_coloured_by_depth(result):
    ax = _ax()
    assert plot_dlogamp(ax, result) == 4  # embed + 3 blocks
    x = ax.get_lines()[0].get_xdata()
    grid = 6
    assert list(x) == pytest.approx([2 * math.pi * i / grid for i in range(grid - grid // 2)])
    assert ax.get_xlim() == (0, math.pi)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "π/4", "π/2", "3π/4", "π"]
    assert len({to_hex(line.get_color()) for line in ax.get_lines()}) == 4


def test_dlogamp_hf_shades_attention_sub_blocks_with_mid(result):
    ax = _ax()
    assert plot_dlogamp_hf(ax, result)
    spans = [p for p in ax.patches]
    assert len(spans) == 3
    assert spans[0].get_x() == pytest.approx(0) and spans[0].get_width() == pytest.approx(0.5 / 3)
    xs = ax.get_lines()[0].get_xdata()
    assert list(xs) == pytest.approx([0, 0.5 / 3, 1 / 3, 1.5 / 3, 2 / 3, 2.5 / 3, 1])


def test_entropy_map_marks_log_n(result):
    ax = _ax()
    log_n = plot_head_map(ax, result, "attn_entropy")
    assert log_n == pytest.approx(math.log(37))
    assert ax.images[0].get_array().shape == (3, 2)
    cbar_ax = ax.figure.axes[-1]
    marks = [line.get_ydata()[0] for line in cbar_ax.get_lines()]
    assert marks == [pytest.approx(log_n)]
    assert cbar_ax.get_ylim()[1] > log_n


def test_stage_boundaries_marked():
    ax = _ax()
    info = {
        "depth": 6,
        "stages": [
            {"first_layer": 1, "last_layer": 2, "grid": [8, 8]},
            {"first_layer": 3, "last_layer": 6, "grid": [4, 4]},
        ],
    }
    assert mark_stages(ax, info) == 1
    assert ax.get_lines()[0].get_xdata()[0] == 2.5
    assert mark_stages(_ax(), {"depth": 6}) == 0


@pytest.mark.parametrize("size,width", [("column", 3.5), ("page", 7.16)])
def test_run_figures_both_sizes_with_captions(result, size, width):
    with style(size):
        figures = run_figures(result, size=size)
    assert set(figures) == {
        "tokens",
        "cosine",
        "attn_spectrum",
        "attn_spectrum_map",
        "dlogamp",
        "dlogamp_hf",
        "rank_residual",
        "attn_cross_layer_sim",
        "attn_entropy_map",
        "attention_heads",
        "token_spectrum",
    }
    for stem, drawn in figures.items():
        assert drawn.figure.get_figwidth() == pytest.approx(width), stem
        assert "RANDOM INIT" in drawn.figure.get_suptitle(), stem
        assert drawn.caption.endswith("."), stem
    assert figures["rank_residual"].figure.axes[0].get_yscale() == "log"
    assert "band = ± sd over 3 images" in figures["tokens"].caption
    for ax in figures["tokens"].figure.axes:
        if ax.get_visible():
            assert ax.get_ylabel() and ax.get_xlabel() == "layer (block index)"


def test_overlay_uses_normalised_depth_when_depths_differ(result):
    other = _run(6, seed=1)
    figures = overlay_figures({"three": result, "six": other})
    ax = figures["overlay_cosine"].figure.axes[0]
    assert ax.get_xlabel() == "normalised depth (layer / L)"
    three, six = ax.get_lines()
    assert three.get_label() == "three" and six.get_label() == "six"
    assert six.get_xdata()[-1] == pytest.approx(1.0) and three.get_color() == PALETTE[0]
    assert (three.get_marker(), three.get_linestyle()) != (six.get_marker(), six.get_linestyle())
    legend = figures["overlay_cosine"].figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["three", "six"]


def test_panels_hide_unused_cells():
    fig, axes = panels("column", 3)
    assert len(axes) == 3 and sum(ax.get_visible() for ax in fig.axes) == 3
    assert np.isclose(fig.get_figwidth(), 3.5)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_plots_and_report_never_import_torch_and_results_never_draw():
    for path in [*(PACKAGE / "plots").glob("*.py"), *(PACKAGE / "reporting").glob("*.py")]:
        bad = {
            n
            for n in _imports(path)
            if n.split(".")[0] == "torch"
            or n.startswith(("vitspec.verification", "vitspec.analysis", "vitspec.metrics"))
        }
        assert not bad, (path, bad)
    for path in (
        PACKAGE / "results.py",
        PACKAGE / "comparison.py",
        PACKAGE / "verification" / "result.py",
    ):
        bad = {
            n
            for n in _imports(path)
            if n.startswith(("vitspec.plots", "vitspec.reporting", "matplotlib"))
        }
        assert not bad, (path, bad)


def test_report_layer_loads_without_torch():
    import subprocess
    import sys

    code = "import sys, vitspec.reporting; sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(PACKAGE.parent)})
    assert done.returncode == 0
