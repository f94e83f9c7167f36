"""Figures draw what the tables say: artists and labels, and the design's import rules."""

import ast
from pathlib import Path

import pytest
import timm
import torch

from vitspec import analyze
from vitspec.inputs import synthetic_batches
from vitspec.plots import plot_curves, plot_heads_vs_layer, plot_metric_vs_layer, run_figures

PACKAGE = Path(__file__).parents[1] / "vitspec"


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=3,
        embed_dim=32,
        num_heads=2,
    )
    r = analyze(
        model, images=list(synthetic_batches(3, 3, (32, 32))), device="cpu", warn=lambda m: None
    )
    r.info["random_init"] = True
    return r


def test_token_metric_lines_per_site_with_bands(result):
    ax = plot_metric_vs_layer(result.metrics, "hc_dc_ratio")
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["embed", "block"]
    assert list(ax.get_lines()[1].get_xdata()) == [1, 2, 3]
    assert len(ax.collections) == 2  # one sd band per site


def test_attention_lines_per_head_and_mean(result):
    ax = plot_heads_vs_layer(result.metrics, "attn_hc_gain")
    assert len(ax.get_lines()) == 2 + 1  # two heads, head mean
    assert ax.get_lines()[-1].get_label() == "head mean"
    mean = result.metric("attn_hc_gain", head=-1).sort_values("layer")["mean"].tolist()
    assert list(ax.get_lines()[-1].get_ydata()) == pytest.approx(mean)


def test_curves_coloured_by_layer(result):
    ax = plot_curves(result.spectra, "dlogamp", site=("embed", "block"))
    assert len(ax.get_lines()) == 4  # layers 0..3
    colours = {tuple(line.get_color()) for line in ax.get_lines()}
    assert len(colours) == 4


def test_run_figures_say_random_init(result):
    figures = run_figures(result)
    assert set(figures) == {"tokens", "attention", "dlogamp", "spectra"}
    for fig in figures.values():
        assert "RANDOM INIT" in fig.get_suptitle()


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0] if node.level == 0 else node.module)
    return names


def test_plots_never_import_torch_and_metrics_never_touch_files():
    for path in (PACKAGE / "plots").glob("*.py"):
        assert "torch" not in _imports(path), path
    for path in (PACKAGE / "functional").glob("*.py"):
        assert not _imports(path) & {"pandas", "matplotlib", "vitspec.capture", "pathlib"}, path
