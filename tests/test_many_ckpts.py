"""Several checkpoints in one run (vitspec.sweep): built once, every file checked first, each
checkpoint's tables and run.json those of a separate run, even when the checkpoints change the
model (AttnScale added, weights left at their initialisation, position embeddings resampled).

The CLI's two-checkpoint run against separate runs, and compare on its folder, are in
test_shards.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

import vitspec
import vitspec.sweep
from vitspec import analyze
from vitspec.cli import main
from vitspec.errors import VitspecError
from vitspec.scaling import add_attnscale

TINY = {"patch_size": 8, "depth": 2, "img_size": 32}
OPTIONS = dict(
    model_kwargs={"patch_size": 8, "depth": 2},
    img_size=32,
    num_images=3,
    batch_size=2,
    device="cpu",
    metrics="hc_*,patch_cos_abs,attn_entropy,attn_spectrum",
    warn=lambda _m: None,
)
TIMING = {"wall_time_s", "images_per_s", "command"}


def _model(seed: int, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY, **over})


def _save(path: Path, sd: dict, seed: int) -> Path:
    """A training checkpoint: regular weights and EMA weights that differ from them."""
    gen = torch.Generator().manual_seed(seed)
    ema = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in sd.items()}
    torch.save({"model": sd, "model_ema": ema, "epoch": seed}, path)
    return path


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    """Three checkpoints that each change the model another way, in an order where any state
    left over from the previous one would show."""
    root = tmp_path_factory.mktemp("ckpts")
    scaled = add_attnscale(_model(1))
    for block in scaled.blocks:
        block.attn.lamb.data.uniform_(-0.5, 0.5)
    plain = _model(2, img_size=48)  # its 6x6 position embeddings are resampled to 4x4
    partial = _model(3).state_dict()
    del partial["blocks.1.mlp.fc2.weight"]  # left at the seeded initialisation (strict=False)
    return [
        _save(root / "a_attnscale.pth", scaled.state_dict(), 1),
        _save(root / "b_plain48.pth", plain.state_dict(), 2),
        _save(root / "c_partial.pth", partial, 3),
    ]


def _same_tables(a: vitspec.Result, b: vitspec.Result) -> None:
    """Same rows and n, means to 1e-9 relative, std to 1e-6."""
    for x, y in ((a.metrics, b.metrics), (a.spectra, b.spectra)):
        keys = [c for c in x.columns if c not in ("mean", "std")]
        pd.testing.assert_frame_equal(x[keys], y[keys])
        np.testing.assert_allclose(y["mean"], x["mean"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(y["std"], x["std"], rtol=1e-6, atol=1e-12)


def _same(a: vitspec.Result, b: vitspec.Result) -> None:
    """The tables (:func:`_same_tables`) and run.json but its timing."""
    _same_tables(a, b)
    drop = lambda info: {k: v for k, v in info.items() if k not in TIMING}  # noqa: E731
    assert drop(a.info) == drop(b.info)


def test_each_checkpoint_equals_its_separate_run_and_the_model_is_built_once(
    series, tmp_path, monkeypatch
):
    builds = []
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: builds.append(a) or create(*a, **k))
    runs = vitspec.analyze_checkpoints(
        "vit_tiny", series, ema=True, strict=False, out=tmp_path / "many", **OPTIONS
    )
    assert len(builds) == 1
    assert list(runs) == ["a_attnscale", "b_plain48", "c_partial"]
    alone = {}
    for ckpt in series:
        alone[ckpt.stem] = analyze("vit_tiny", ckpt=ckpt, ema=True, strict=False, **OPTIONS)
        _same(alone[ckpt.stem], runs[ckpt.stem])
    assert len(builds) == 1 + len(series)
    # the three differ in the ways that would leak into the next run
    weights = {stem: r.info["weights"] for stem, r in runs.items()}
    assert weights["a_attnscale"]["techniques_added"] == ["attnscale"]
    assert weights["b_plain48"]["techniques_added"] == []
    assert weights["b_plain48"]["pos_embed_resampled"]["from"] == [6, 6]
    assert any("blocks.1.mlp.fc2.weight" in w for w in weights["c_partial"]["warnings"])
    assert {r.info["weights"]["loaded_key"] for r in runs.values()} == {"model_ema"}
    pre = runs["a_attnscale"].metrics["metric"].str.startswith("pre_")
    assert pre.any() and not runs["b_plain48"].metrics["metric"].str.startswith("pre_").any()
    # the saved series: one sealed run folder per checkpoint and the index
    index = json.loads((tmp_path / "many" / "index.json").read_text())
    assert [r["folder"] for r in index["runs"]] == list(runs)
    assert [r["sha256"] for r in index["runs"]] == [
        alone[s].info["weights"]["sha256"] for s in runs
    ]
    sealed = json.loads((tmp_path / "many" / "c_partial" / "run.json").read_text())
    assert sealed["written_by"] == "vitspec" and "metrics.csv" in sealed["files"]
    saved = vitspec.Result.load(tmp_path / "many" / "c_partial")
    np.testing.assert_allclose(saved.metrics["mean"], runs["c_partial"].metrics["mean"])


def _tiny_ckpt(path: Path, seed: int, **over) -> Path:
    torch.save(_model(seed, **over).state_dict(), path)
    return path


def _cli(out: Path, *ckpts: str) -> list[str]:
    return [
        "analyze",
        "vit_tiny",
        "--model-arg",
        "patch_size=8",
        "--model-arg",
        "depth=2",
        "--img-size",
        "32",
        "--num-images",
        "2",
        "--device",
        "cpu",
        "--metrics",
        "hc_*,token_spectrum,attn_spectrum",
        "--no-figures",
        "--quiet",
        "--out",
        str(out),
        "--ckpt",
        *ckpts,
    ]


@pytest.mark.parametrize(
    "second, says",
    [
        ("wide", "shape mismatches"),
        ("deep", "checkpoint has 3 blocks"),
        ("missing", "checkpoint not found"),
        ("truncated", "cannot read checkpoint"),
        ("pickled", "needs full unpickling"),
    ],
)
def test_a_bad_later_checkpoint_fails_before_the_first_analysis(
    second, says, tmp_path, monkeypatch, capsys
):
    good = _tiny_ckpt(tmp_path / "good.pth", 1)
    bad = tmp_path / f"{second}.pth"
    if second == "wide":
        _tiny_ckpt(bad, 2, embed_dim=96, num_heads=2)
    elif second == "deep":
        _tiny_ckpt(bad, 2, depth=3)
    elif second == "truncated":
        bad.write_bytes(good.read_bytes()[:5000])
    elif second == "pickled":  # a whole module: refused without --trust-checkpoint
        torch.save(_model(2), bad)

    def measure(*_a, **_k):
        raise AssertionError("the first checkpoint's analysis started")

    monkeypatch.setattr(vitspec.sweep, "_measure", measure)
    out = tmp_path / "many"
    assert main(_cli(out, str(good), str(bad))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vitspec: error: ")
    assert bad.name in err and says in err, err
    assert not out.exists() and list(tmp_path.glob(".many*")) == []
    with pytest.raises(VitspecError, match=f"{second}.pth"):
        vitspec.analyze_checkpoints("vit_tiny", [good, bad], **OPTIONS)


def test_api_refusals():
    with pytest.raises(VitspecError, match="share the stem 'e1'"):
        vitspec.analyze_checkpoints("vit_tiny", ["a/e1.pth", "b/e1.pth"])
    with pytest.raises(VitspecError, match="list of checkpoint files"):
        vitspec.analyze_checkpoints("vit_tiny", "e1.pth")
    with pytest.raises(VitspecError, match="timm model name"):
        vitspec.analyze_checkpoints(torch.nn.Linear(2, 2), ["e1.pth"])
    with pytest.raises(VitspecError, match="ckpt takes one file; for several, vitspec.analyze_c"):
        analyze("vit_tiny", ckpt=["e1.pth", "e2.pth"])


def test_glob_series_then_compare_and_report(tmp_path, capsys):
    for seed in (1, 2):
        _tiny_ckpt(tmp_path / f"epoch{seed}.pth", seed)
    many, alone = tmp_path / "many", tmp_path / "alone"
    draw = ["--sample", "random", "--sample-seed", "3"]
    assert main([*_cli(many, str(tmp_path / "epoch*.pth")), *draw]) == 0
    assert sorted(p.name for p in many.iterdir()) == ["epoch1", "epoch2", "index.json"]
    infos = [json.loads((many / s / "run.json").read_text()) for s in ("epoch1", "epoch2")]
    runs = [info["run"] for info in infos]
    assert runs == ["vit_tiny-epoch1", "vit_tiny-epoch2"]
    # the random draw of images is the same for each checkpoint and for a separate run
    assert main([*_cli(alone, str(tmp_path / "epoch2.pth")), *draw]) == 0
    files = json.loads((alone / "run.json").read_text())["images"]["files"]
    assert [info["images"]["files"] for info in infos] == [files, files]
    assert len(files) == 2 and files != ["astronaut.jpg", "chelsea.jpg"]  # not the first two
    assert main(["compare", str(many), "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    labels = [
        r["label"] for r in json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]
    ]
    assert labels == runs
    rep = tmp_path / "rep"
    assert main(["report", str(many), "--out", str(rep), "--quiet"]) == 0
    folders = json.loads((rep / "report.json").read_text())["folders"]
    assert [(f["kind"], f["label"]) for f in folders] == [("analyze", r) for r in runs]
    page = (rep / "report.html").read_text()
    assert all(r in page for r in runs)
    capsys.readouterr()
    assert main(["report", str(many)]) == 2  # several runs: the page needs its own folder
    assert "--out" in capsys.readouterr().err


def test_a_filter_that_reads_the_model_s_values_is_asked_with_a_real_copy(tmp_path, monkeypatch):
    """The checks run on a meta-device copy; a filter that needs values fails there, and the
    real copy's verdict stands (a pass here; the shape error in the test above)."""
    import vitspec.fitting as fitting
    import vitspec.loading as loading

    seen = []

    def reads_values(sd, model):
        seen.append(model.pos_embed.device.type)
        return {**sd, "cls_token": sd["cls_token"] + 0 * model.pos_embed.detach().sum().item()}

    monkeypatch.setattr(fitting, "_filter_fn", lambda *_: reads_values)
    ckpt = _tiny_ckpt(tmp_path / "e1.pth", 1)
    cache = loading.ModelCache()
    loading.check_checkpoint("vit_tiny", ckpt, cache=cache, model_kwargs=TINY)
    assert seen == ["meta", "cpu"] and cache.builds == 1


def _torchrun() -> str | None:
    found = shutil.which("torchrun")
    beside = Path(sys.executable).with_name("torchrun")
    return found or (str(beside) if beside.exists() else None)


@pytest.mark.skipif(_torchrun() is None, reason="torchrun is not installed")
def test_torchrun_series_equals_the_one_process_series(tmp_path):
    for seed in (1, 2):
        _tiny_ckpt(tmp_path / f"epoch{seed}.pth", seed)
    one_each = ["--batch-size", "1"]  # a batch for each rank
    args = [*_cli(tmp_path / "ddp", str(tmp_path / "epoch*.pth")), *one_each]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [_torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "vitspec", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main([*_cli(tmp_path / "one", str(tmp_path / "epoch*.pth")), *one_each]) == 0
    for stem in ("epoch1", "epoch2"):
        ddp = vitspec.Result.load(tmp_path / "ddp" / stem)
        _same_tables(vitspec.Result.load(tmp_path / "one" / stem), ddp)
        assert ddp.info["distributed"] == {"world_size": 2, "backend": "gloo"}
        assert ddp.info["run"] == f"vit_tiny-{stem}"
    index = json.loads((tmp_path / "ddp" / "index.json").read_text())
    assert [r["folder"] for r in index["runs"]] == ["epoch1", "epoch2"]


def test_an_error_during_a_later_analysis_names_its_checkpoint(tmp_path, capsys):
    good = _tiny_ckpt(tmp_path / "good.pth", 1)
    sd = _model(2).state_dict()
    sd["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")  # passes the checks, fails in block 2
    torch.save(sd, tmp_path / "nan.pth")
    out = tmp_path / "many"
    assert main(_cli(out, str(good), str(tmp_path / "nan.pth"))) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vitspec: error: {tmp_path / 'nan.pth'}: NaN or Inf in the output of ")
    assert "block 2" in err and not out.exists()
