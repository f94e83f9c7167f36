"""vitspec.compare / `vitspec compare`: overlay figure, differences table, provenance, errors."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from vitspec import ComparisonResult, analyze, compare
from vitspec.cli import main
from vitspec.errors import VitspecError
from vitspec.inputs import synthetic_batches
from vitspec.plots import compare_figures

TINY = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2)
KEYS = ["site", "layer", "head", "metric"]


def tiny(depth=3, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=depth, **TINY)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run dirs: base (depth 3), other (depth 3, other weights), deep (depth 6), hc (hc_* only)."""
    root = tmp_path_factory.mktemp("runs")
    images = list(synthetic_batches(4, 2, (32, 32)))
    specs = {
        "base": (3, 0, None),
        "other": (3, 1, None),
        "deep": (6, 2, None),
        "hc": (3, 3, "hc_*"),
    }
    dirs = {}
    for name, (depth, seed, metrics) in specs.items():
        result = analyze(
            tiny(depth, seed),
            images=images,
            device="cpu",
            label=name,
            metrics=metrics,
            warn=lambda m: None,
        )
        dirs[name] = result.save(root / name)
    return dirs


def read(run_dir):
    return pd.read_csv(run_dir / "metrics.csv", dtype={"head": "Int64"})


def hand_differences(ref_dir, run_dir, layer_map=None):
    """Differences by an independent route: merge the two metrics.csv files on their keys."""
    ref, cur = read(ref_dir), read(run_dir)
    cur = cur[
        ((cur["site"] == "block") & cur["head"].isna())
        | ((cur["site"] == "attn") & (cur["head"] == -1).fillna(False))
    ].copy()
    cur["reference_layer"] = cur["layer"].map(layer_map) if layer_map else cur["layer"]
    ref = ref.rename(columns={"layer": "reference_layer", "mean": "reference_mean"})
    merged = cur.merge(
        ref[["site", "reference_layer", "head", "metric", "reference_mean"]],
        on=["site", "reference_layer", "head", "metric"],
        how="inner",
    )
    merged["diff"] = merged["mean"] - merged["reference_mean"]
    return merged.set_index(KEYS).sort_index()


def test_same_depth_differences_equal_a_merge_of_the_two_tables(runs):
    c = compare([runs["base"], runs["other"]], None)
    assert isinstance(c, ComparisonResult)
    assert c.info["x"] == "layer" and c.labels == [
        "deit_tiny_patch16_224-base",
        "deit_tiny_patch16_224-other",
    ]
    d = c.differences.set_index(KEYS).sort_index()
    hand = hand_differences(runs["base"], runs["other"])
    assert d.index.equals(hand.index)
    assert len(d) == 8 * 3 + (4 * 3 - 1)  # 8 token metrics x 3 layers; 4 attn, cross-layer from 2
    np.testing.assert_allclose(d["reference_mean"], hand["reference_mean"], rtol=1e-12)
    np.testing.assert_allclose(d["diff"], hand["diff"], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(
        d["rel_diff"], hand["diff"] / hand["reference_mean"].abs(), rtol=1e-9
    )
    expected = np.where(hand["diff"] > 0, "+", np.where(hand["diff"] < 0, "-", "0"))
    assert (d["sign"].to_numpy() == expected).all()
    assert (d["reference_layer"] == d.index.get_level_values("layer")).all()
    assert set(d["reference_run"]) == {"deit_tiny_patch16_224-base"}


def test_against_itself_every_sign_is_zero(runs, tmp_path):
    copy = tmp_path / "base"  # the same directory twice is refused; an identical copy is not
    shutil.copytree(runs["base"], copy)
    c = compare([runs["base"], copy], None, metrics="patch_cos_abs,attn_entropy")
    assert c.labels == [
        "deit_tiny_patch16_224-base (base) #1",
        "deit_tiny_patch16_224-base (base) #2",
    ]
    assert (c.differences["sign"] == "0").all() and (c.differences["diff"] == 0).all()
    assert list(c.differences["metric"].unique()) == ["patch_cos_abs", "attn_entropy"]


def test_different_depths_match_the_nearest_normalised_depth(runs):
    c = compare([runs["base"], runs["deep"]], None, metrics=["patch_cos_abs", "attn_*"])
    assert c.info["x"] == "depth"
    assert c.info["matching"] == {"deit_tiny_patch16_224-deep": "nearest normalised depth"}
    # depths 1/6 .. 6/6 against 1/3, 2/3, 1; the ties at 1/2 and 5/6 go to the shallower layer
    layer_map = {1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3}
    d = c.differences[c.differences["metric"] == "patch_cos_abs"].set_index(KEYS).sort_index()
    hand = hand_differences(runs["base"], runs["deep"], layer_map)
    hand = hand[hand.index.get_level_values("metric") == "patch_cos_abs"]
    assert list(d["reference_layer"]) == [layer_map[k] for k in range(1, 7)]
    np.testing.assert_allclose(d["diff"], hand["diff"], rtol=1e-9)
    np.testing.assert_allclose(d["depth"], np.arange(1, 7) / 6)
    cross = c.differences[c.differences["metric"] == "attn_cross_layer_sim"]
    assert list(cross["reference_layer"]) == [2, 2, 2, 2, 3]  # no reference layer 1


def test_save_writes_figure_table_and_provenance(runs, tmp_path):
    out = tmp_path / "cmp"
    c = compare([runs["base"], runs["other"], runs["deep"]], out, labels="base,other,deep")
    assert sorted(p.name for p in out.iterdir()) == [  # data only: figures come from report
        "compare.json",
        "differences.csv",
        "table.csv",
    ]
    table = pd.read_csv(out / "differences.csv", dtype={"head": "Int64"})
    assert list(table.columns[:12]) == [
        "metric",
        "site",
        "layer",
        "depth",
        "head",
        "run",
        "reference_run",
        "mean",
        "reference_mean",
        "diff",
        "rel_diff",
        "sign",
    ]
    assert set(table["run"]) == {"other", "deep"} and set(table["sign"]) <= {"+", "-", "0"}
    info = json.loads((out / "compare.json").read_text())
    assert [r["abs_dir"] for r in info["runs"]] == [
        str(runs[k].resolve()) for k in ("base", "other", "deep")
    ]
    assert info["not_in_every_run"] == {}
    assert [r["depth"] for r in info["runs"]] == [3, 3, 6]
    assert info["runs"][0]["checkpoint"] == "in-memory" and info["vitspec"]
    assert info["metrics"][0] == "patch_cos_abs" and len(info["metrics"]) == 12
    assert info["x"] == "depth" and info["reference"] == "base"

    back = ComparisonResult.load(out)
    pd.testing.assert_frame_equal(back.table, c.table.reset_index(drop=True), check_dtype=False)
    assert back.info == json.loads(json.dumps(c.info, default=str))

    drawn = compare_figures(back.table, back.info)["compare"]
    axes = [ax for ax in drawn.figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes[:2]] == ["patch_cos_abs", "hc_dc_ratio"]
    assert axes[-1].get_title() == "attn_cross_layer_sim"
    for ax in axes:
        assert len(ax.get_lines()) == 3 and len(ax.collections) == 3  # a line and a band per run
        assert ax.get_xlabel() == "normalised depth (layer / L)"
    assert "base vs other vs deep" in drawn.caption and "sd over 4/4/4 images" in drawn.caption
    deep = axes[0].get_lines()[2]
    np.testing.assert_allclose(deep.get_xdata(), np.arange(1, 7) / 6)
    legend = drawn.figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["base", "other", "deep"]


def test_cli_compare_and_its_one_line_errors(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "compare",
            str(runs["base"]),
            str(runs["hc"]),
            "--out",
            str(out),
            "--metrics",
            "hc_dc_ratio",
            "--x",
            "depth",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    d = pd.read_csv(out / "differences.csv")
    assert set(d["metric"]) == {"hc_dc_ratio"} and list(d["depth"]) == pytest.approx(
        [1 / 3, 2 / 3, 1]
    )

    cases = [
        ([str(runs["base"])], "at least 2 run directories"),
        ([str(runs["base"]), str(tmp_path)], "not a vitspec run directory"),
        (
            [str(runs["base"]), str(runs["hc"]), "--metrics", "patch_cos_abs"],
            "'patch_cos_abs' is absent from run 'deit_tiny_patch16_224-hc'",
        ),
        ([str(runs["base"]), str(runs["hc"]), "--metrics", "nope"], "no metric 'nope'"),
        ([str(runs["base"]), str(runs["hc"]), "--labels", "a,a"], "unique"),
        ([str(runs["base"]), str(runs["hc"]), "--labels", "a"], "1 labels for 2 runs"),
        ([str(runs["base"]), str(runs["hc"]), "--site", "blocks"], "allowed: embed, mid, block"),
    ]
    for argv, fragment in cases:
        target = tmp_path / "never"
        code = main(["compare", *argv, "--out", str(target)])
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith("vitspec: error: ") and fragment in lines[0], lines[0]
        assert not target.exists()

    code = main(["compare", str(runs["base"]), str(runs["hc"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "exists; pass --overwrite" in err
    assert (out / "compare.png").exists()


def test_a_failing_save_leaves_no_directory(runs, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("pandas.DataFrame.to_csv", fail)
    with pytest.raises(OSError, match="disk full"):
        compare([runs["base"], runs["other"]], tmp_path / "half", metrics="erank")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VitspecError, match="unknown x axis"):
        compare([runs["base"], runs["other"]], None, x="time")
