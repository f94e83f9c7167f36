"""Shards, merge, torchrun and several checkpoints give the tables of one-process runs."""

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

from vitspec.cli import main
from vitspec.errors import VitspecError
from vitspec.merge import merge_runs
from vitspec.shards import STATE_FILE, Shard, ShardBatches, parse_shard

TINY = ["--model-arg", "patch_size=8", "--model-arg", "depth=2", "--img-size", "32"]
COMMON = ["--num-images", "5", "--batch-size", "2", "--device", "cpu", "--no-figures", "--quiet"]


def _analyze(out: Path, *extra: str) -> Path:
    assert main(["analyze", "vit_tiny", *TINY, *COMMON, "--out", str(out), *extra]) == 0
    return out


def _same_tables(a: Path, b: Path) -> None:
    """metrics.csv and spectra.csv: same rows and n, means to 1e-9 relative, std to 1e-6."""
    for name in ("metrics.csv", "spectra.csv"):
        x, y = pd.read_csv(a / name), pd.read_csv(b / name)
        keys = [c for c in x.columns if c not in ("mean", "std", "n", "run", "checkpoint")]
        pd.testing.assert_frame_equal(x[keys], y[keys])
        assert (x["n"] == y["n"]).all()
        np.testing.assert_allclose(y["mean"], x["mean"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(y["std"], x["std"], rtol=1e-6, atol=1e-12)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    return _analyze(tmp_path_factory.mktemp("one") / "run", "--random-init")


def test_shards_merge_to_the_one_process_run(whole, tmp_path):
    parts = [_analyze(tmp_path / f"s{k}", "--random-init", "--shard", f"{k}/2") for k in (1, 0)]
    for part in parts:
        assert (part / STATE_FILE).is_file()
    shard0 = json.loads((parts[1] / "run.json").read_text())
    assert shard0["shard"]["batches"] == [0, 2] and shard0["shard"]["images"] == [0, 1, 4]
    assert main(["merge", *map(str, parts), "--out", str(tmp_path / "all"), "--quiet"]) == 0
    _same_tables(whole, tmp_path / "all")
    info = json.loads((tmp_path / "all" / "run.json").read_text())
    one = json.loads((whole / "run.json").read_text())
    assert info["images"]["files"] == one["images"]["files"]
    assert [s["index"] for s in info["shards"]] == [0, 1]


def test_merge_refuses_mixed_overlapping_or_incomplete_shards(tmp_path):
    s0 = _analyze(tmp_path / "s0", "--random-init", "--shard", "0/2")
    s1 = _analyze(tmp_path / "s1", "--random-init", "--shard", "1/2")
    other = _analyze(tmp_path / "o1", "--random-init", "--seed", "1", "--shard", "1/2")
    with pytest.raises(VitspecError, match="weights.seed"):
        merge_runs([s0, other])
    with pytest.raises(VitspecError, match="given twice"):
        merge_runs([s0, s0, s1])
    with pytest.raises(VitspecError, match="1/2 are missing"):
        merge_runs([s0])
    with pytest.raises(VitspecError, match="not a shard"):
        merge_runs([s0, _analyze(tmp_path / "whole", "--random-init")])


def test_shard_batches_are_disjoint_and_unpadded():
    batches = [torch.zeros(3, 1)] * 4 + [torch.zeros(2, 1)]
    seen = []
    for k in range(3):
        part = ShardBatches(batches, Shard(k, 3))
        assert sum(b.shape[0] for b in part) == len(part.image_indices)
        seen += part.image_indices
    assert sorted(seen) == list(range(14))
    with pytest.raises(VitspecError, match="K/N"):
        parse_shard("2/2")


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", patch_size=8, depth=2, img_size=32)
    torch.save(model.state_dict(), path)
    return path


def test_two_checkpoints_equal_separate_runs(tmp_path):
    a, b = _checkpoint(tmp_path / "epoch1.pth", 1), _checkpoint(tmp_path / "epoch2.pth", 2)
    many = _analyze(tmp_path / "many", "--ckpt", str(a), str(b))
    index = json.loads((many / "index.json").read_text())
    assert [r["folder"] for r in index["runs"]] == ["epoch1", "epoch2"]
    for ckpt in (a, b):
        alone = _analyze(tmp_path / f"alone-{ckpt.stem}", "--ckpt", str(ckpt))
        _same_tables(alone, many / ckpt.stem)
    out = tmp_path / "cmp"
    assert main(["compare", str(many), "--out", str(out), "--quiet"]) == 0
    assert (out / "compare.json").is_file()


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun is not installed",
)
def test_torchrun_two_ranks_equal_one_process(whole, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [
        torchrun,
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "vitspec",
        "analyze",
        "vit_tiny",
        "--random-init",
        *TINY,
        *COMMON,
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _same_tables(whole, out)
    info = json.loads((out / "run.json").read_text())
    assert info["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert not (out / STATE_FILE).exists()
