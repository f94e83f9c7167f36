"""verify --shard K/N + merge, and verify under torchrun, give the folder of a one-process run."""

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

import vitspec.session
from vitspec.cli import main
from vitspec.errors import VitspecError
from vitspec.merge import merge_runs
from vitspec.results import Result
from vitspec.shards import STATE_FILE
from vitspec.verification import verify
from vitspec.verification.merge import merge_verify_parts
from vitspec.verification.state import VerifierState
from vitspec.verification.tally import Tally

TINY = ["--model-arg", "patch_size=8", "--model-arg", "depth=2", "--img-size", "32"]
COMMON = ["--num-images", "5", "--batch-size", "2", "--device", "cpu", "--no-figures", "--quiet"]
MAXIMA = {"gains": ["s_a_max"], "blocks": ["gain_max", "rate_max"]}


def _verify(out: Path, *extra: str) -> Path:
    argv = ["verify", "vit_tiny", "--random-init", *TINY, *COMMON, "--out", str(out), *extra]
    assert main(argv) == 0
    return out


def _same_folder(one: Path, other: Path) -> None:
    """verify.csv byte for byte; verify.json's verdicts, counts and provenance equal; the
    figures' maxima exact and their means to 1e-9 relative."""
    assert (one / "verify.csv").read_text() == (other / "verify.csv").read_text()
    a, b = (json.loads((f / "verify.json").read_text()) for f in (one, other))
    for key in ("summary", "consistency", "residual_rate", "unavailable", "stages", "images"):
        assert a[key] == b[key], key
    for key in ("num_heads", "tokens", "run", "checkpoint", "weights", "seed", "max_steps"):
        assert a[key] == b[key], key
    assert a["figure_data"].keys() == b["figure_data"].keys()
    for name, columns in a["figure_data"].items():
        x, y = pd.DataFrame(columns), pd.DataFrame(b["figure_data"][name])
        assert list(x.columns) == list(y.columns) and len(x) == len(y) > 0, name
        for col in x.columns:
            if col in ("layer", "head", "t") or col in MAXIMA.get(name, []):
                assert x[col].equals(y[col]), (name, col)
            else:
                np.testing.assert_allclose(y[col], x[col], rtol=1e-9, atol=1e-300)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    return _verify(tmp_path_factory.mktemp("one") / "verify")


def test_verify_shards_merge_to_the_one_process_run(whole, tmp_path):
    parts = [_verify(tmp_path / f"s{k}", "--shard", f"{k}/2") for k in (1, 0)]
    for part in parts:
        assert (part / STATE_FILE).is_file()
        assert torch.load(part / STATE_FILE, weights_only=True)["verifier"]["depth"] == 2
    shard0 = json.loads((parts[1] / "verify.json").read_text())
    assert shard0["shard"] == {"index": 0, "count": 2, "batches": [0, 2], "images": [0, 1, 4]}
    assert shard0["images"]["used"] == 3 and len(shard0["images"]["files"]) == 3
    merged = tmp_path / "all"
    assert main(["merge", *map(str, parts), "--out", str(merged), "--quiet", "--no-figures"]) == 0
    _same_folder(whole, merged)
    info = json.loads((merged / "verify.json").read_text())
    assert [(s["index"], s["images"]) for s in info["shards"]] == [(0, 3), (1, 2)]
    assert "shard" not in info and not (merged / STATE_FILE).exists()


def test_a_shard_without_batches_merges(tmp_path):
    few = ["--num-images", "2"]  # one batch: shard 1/2 checks nothing
    one = _verify(tmp_path / "one", *few)
    parts = [_verify(tmp_path / f"s{k}", *few, "--shard", f"{k}/2") for k in (0, 1)]
    empty = json.loads((parts[1] / "verify.json").read_text())
    assert empty["images"]["used"] == 0 and empty["shard"]["batches"] == []
    merged = merge_runs(parts, tmp_path / "all")
    assert merged.info["images"]["used"] == 2
    _same_folder(one, tmp_path / "all")


def test_an_analyze_shard_without_batches_merges(tmp_path):
    argv = ["analyze", "vit_tiny", "--random-init", *TINY, *COMMON, "--num-images", "2"]
    for k in (0, 1):
        assert main([*argv, "--shard", f"{k}/2", "--out", str(tmp_path / f"s{k}")]) == 0
    merged = merge_runs([tmp_path / "s0", tmp_path / "s1"])
    assert merged.info["images"]["used"] == 2 and merged.info["grid"] == [4, 4]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    one = Result.load(tmp_path / "one")
    pd.testing.assert_frame_equal(merged.metrics, one.metrics, check_exact=False, rtol=1e-9)


def _mix_heads(attn: torch.nn.Module) -> None:
    """Mix a timm Attention's heads after the softmax (as CaiT does): its maps are no longer
    row-stochastic, so row_stochastic fails there and the dependent checks are not applicable."""
    mix = torch.eye(attn.num_heads) + 0.3

    def forward(x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        a = attn.attn_drop(torch.einsum("gh,bhnm->bgnm", mix, a))
        return attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))

    attn.forward = forward


def test_not_applicable_rows_and_reasons_merge_exactly():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", patch_size=8, depth=3, img_size=32).eval()
    _mix_heads(model.blocks[1].attn)
    kw = dict(num_images=5, batch_size=2, device="cpu", max_steps=64, warn=lambda _: None)
    one = verify(model, threads=2, **kw)  # two worker threads, merged in the run
    parts = [verify(model, threads=1, shard=f"{k}/2", **kw) for k in (1, 0)]
    merged = merge_verify_parts([(p.info, p.state) for p in parts])
    pd.testing.assert_frame_equal(merged.table, one.table)
    na = one.table[one.table["status"] == "not-applicable"]
    assert len(na) and na["reason"].str.contains("in batch 1,").all()  # the run's first batch
    assert merged.info["summary"] == one.info["summary"]
    assert merged.info["summary"]["failed_checks"] == ["row_stochastic"]


def test_merge_of_failing_verify_shards_exits_1(tmp_path, monkeypatch, capsys):
    real = vitspec.session.load_model

    def load_model(name, **kw):
        loaded = real(name, **kw)
        _mix_heads(loaded.model.blocks[1].attn)
        return loaded

    monkeypatch.setattr(vitspec.session, "load_model", load_model)
    parts = [tmp_path / f"s{k}" for k in (0, 1)]
    argv = ["verify", "vit_tiny", "--random-init", *TINY, *COMMON, "--max-steps", "64"]
    for k, part in enumerate(parts):
        assert main([*argv, "--shard", f"{k}/2", "--out", str(part)]) == 1
    capsys.readouterr()
    assert main(["merge", *map(str, parts), "--out", str(tmp_path / "all"), "--no-figures"]) == 1
    err = capsys.readouterr().err
    assert "FAIL: row_stochastic" in err and "layer 2 head 0" in err


def test_reasons_keep_the_earliest_batch_and_the_state_round_trips():
    def part(batch: int, why: str, slack: float) -> VerifierState:
        s = VerifierState(depth=2, max_steps=4, seed=0, branch_reasons={1: None, 2: "no W_O"})
        s.note("premise_failed", 2, why, batch)
        t = s.tallies[("row_stochastic", 2, 0)] = Tally()
        t.cases, t.violations, t.max_slack = 3, 1, slack
        s._slot("gains", (3, 1, 4))[2, 0] += torch.tensor([1.0, 2.0, 3.0, 4.0])
        return s

    late, early = part(5, "late", 2.0), part(1, "early", 7.0)
    for a, b in ((late, early), (early, late)):
        merged = VerifierState.from_plain(a.plain())
        merged.merge_state(VerifierState.from_plain(b.plain()).state())
        assert merged.premise_failed == {2: "early"} and merged.first == {("premise_failed", 2): 1}
        t = merged.tallies[("row_stochastic", 2, 0)]
        assert (t.cases, t.violations, t.max_slack) == (6, 2, 7.0)
        assert merged._sums["gains"][2, 0].tolist() == [2.0, 4.0, 6.0, 8.0]
        assert merged.not_applicable()[("msa_bound", 2, None)] == "early"


def test_merge_refuses_other_options_overlaps_missing_parts_and_analyze_shards(tmp_path):
    s0 = _verify(tmp_path / "s0", "--shard", "0/2")
    s1 = _verify(tmp_path / "s1", "--shard", "1/2")
    other = _verify(tmp_path / "o1", "--shard", "1/2", "--max-steps", "64")
    with pytest.raises(VitspecError, match="shards differ in max_steps"):
        merge_runs([s0, other])
    larger = _verify(tmp_path / "l1", "--shard", "1/2", "--img-size", "48")
    with pytest.raises(VitspecError, match="shards differ in stages"):
        merge_runs([s0, larger])
    with pytest.raises(VitspecError, match="given twice"):
        merge_runs([s0, s0, s1])
    with pytest.raises(VitspecError, match="1/2 are missing"):
        merge_runs([s0])
    with pytest.raises(VitspecError, match="not a shard"):
        merge_runs([s0, _verify(tmp_path / "whole")])
    info0 = json.loads((s0 / "verify.json").read_text())
    state0 = torch.load(s0 / STATE_FILE, weights_only=True)
    twin = {**info0, "shard": {**info0["shard"], "index": 1}}
    with pytest.raises(VitspecError, match="overlaps another shard's images"):
        merge_verify_parts([(info0, state0), (twin, state0)])
    analyzed = tmp_path / "a1"
    argv = ["analyze", "vit_tiny", "--random-init", *TINY, *COMMON, "--shard", "1/2"]
    assert main([*argv, "--out", str(analyzed)]) == 0
    with pytest.raises(VitspecError, match="shard of vitspec verify and .* of vitspec analyze"):
        merge_runs([s0, analyzed])


def test_verify_shard_usage_errors_are_one_line(capsys, tmp_path):
    for argv, fragment in (
        (["verify", "--synthetic", "--shard", "0/2"], "synthetic suite in one process"),
        (["verify", "vit_tiny", "--random-init", "--shard", "2/2"], "0 <= K < N"),
    ):
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "x").exists()
    assert main(["verify", "--help"]) == 0
    assert "--shard K/N" in capsys.readouterr().out


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun is not installed",
)
def test_torchrun_two_ranks_equal_one_process(whole, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "vitspec", "verify"]
    cmd += ["vit_tiny", "--random-init", *TINY, *COMMON, "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _same_folder(whole, out)
    info = json.loads((out / "verify.json").read_text())
    assert info["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert [s["index"] for s in info["shards"]] == [0, 1]
    assert not (out / STATE_FILE).exists()


def test_head_norms_do_not_depend_on_the_thread_count():
    """LAPACK rounds the QR / SVD of the head weights differently with more threads; the verifier
    computes them on one thread, so one process, shards and ranks agree to the bit."""
    from vitspec.adapters import get_adapter
    from vitspec.verification.model import ModelVerifier

    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").eval()
    adapter = get_adapter(model, "deit_small_patch16_224")
    saved, norms = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            v = ModelVerifier(adapter, torch.device("cpu"))
            norms.append(torch.stack([v.weights[layer].head_norms for layer in range(1, 13)]))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(norms[0], norms[1])
