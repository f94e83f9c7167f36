"""`vitspec verify` as a user meets it: exit 0 / 1 / 2, the files, one line per mistake."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import vitspec.session
from vitspec.cli import main
from vitspec.verification import checks as ck

TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


@pytest.fixture
def tiny_models(monkeypatch):
    """Model names resolve as usual but are built shrunk (fast), optionally altered."""
    real = vitspec.session.load_model
    alter = []

    def load_model(name, **kw):
        loaded = real(name, **{**kw, "model_kwargs": TINY})
        for fn in alter:
            fn(loaded.model)
        return loaded

    monkeypatch.setattr(vitspec.session, "load_model", load_model)
    return alter


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_line_error(code, err, fragment):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vitspec: error: "), err
    assert fragment in lines[0], lines[0]


def test_healthy_model_exits_0_with_csv_json_and_figures(capsys, tmp_path, tiny_models):
    out = tmp_path / "v"
    code, err = run(
        capsys, "verify", "deit_tiny", "--random-init", "--num-images", "2", "--out", str(out)
    )
    assert code == 0, err
    assert "every applicable check passes" in err and "RANDOM initialisation" in err
    names = {p.name for p in out.iterdir()}
    for stem in ("verify_lowpass", "verify_gain", "verify_msa"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    header = (out / "verify.csv").read_text().splitlines()[0]
    assert header == (
        "run,model,checkpoint,check,layer,head,cases,violations,max_slack,tolerance,status,reason"
    )
    df = pd.read_csv(out / "verify.csv")
    assert set(df["status"]) == {"pass"} and (df["checkpoint"] == "random-init").all()
    info = json.loads((out / "verify.json").read_text())
    assert info["summary"]["status"] == "pass" and info["images"]["used"] == 2
    assert info["random_init"] and info["weights"]["seed"] == 0


def talking_heads(model):
    """CaiT-style: block 3's heads are mixed after the softmax, so its maps are not stochastic."""
    attn = model.blocks[2].attn
    mix = torch.tensor([[1.0, 0.5], [0.2, 0.7]])

    def forward(x, attn_mask=None, is_causal=False):
        b, n, c = x.shape
        q, k, v = attn.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        a = attn.attn_drop(torch.einsum("gh,bhnm->bgnm", mix, a))
        return attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))

    attn.forward = forward


def test_planted_non_stochastic_attention_exits_1_and_says_which(capsys, tmp_path, tiny_models):
    tiny_models.append(talking_heads)
    out = tmp_path / "v"
    code, err = run(
        capsys,
        "verify",
        "deit_tiny",
        "--random-init",
        "--num-images",
        "1",
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 1, err
    assert "FAIL: row_stochastic" in err and "layer 3 head 0" in err
    df = pd.read_csv(out / "verify.csv", keep_default_na=False)
    assert set(df.loc[df["status"] == "fail", "check"]) == {"row_stochastic"}
    na = df[df["status"] == "not-applicable"]
    assert len(na) and (na["layer"] == 3).all() and na["reason"].str.contains("premise").all()


def test_wrong_bound_exits_1(capsys, tmp_path, monkeypatch):
    real = ck.logit_bound
    monkeypatch.setattr(ck, "logit_bound", lambda n, a: real(n, a) * 0.5)
    code, err = run(
        capsys,
        "verify",
        "--synthetic",
        "--sizes",
        "16",
        "--max-steps",
        "64",
        "--out",
        str(tmp_path / "s"),
    )
    assert code == 1, err
    assert "FAIL: logit_bound" in err


def test_synthetic_exits_0(capsys, tmp_path):
    out = tmp_path / "s"
    code, err = run(
        capsys, "verify", "--synthetic", "--sizes", "16,24", "--max-steps", "128", "--out", str(out)
    )
    assert code == 0, err
    assert {"verify_synthetic.png", "verify_synthetic.pdf", "verify.csv"} <= {
        p.name for p in out.iterdir()
    }
    df = pd.read_csv(out / "verify.csv")
    assert set(df["model"]) == {"synthetic-N16", "synthetic-N24"}
    assert set(df["status"]) == {"pass"}


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["verify", "deit_smal", "--random-init"], "unknown model 'deit_smal'"),
        (["verify", "deit_tiny", "--synthetic"], "not both"),
        (["verify"], "give a MODEL"),
        (["verify", "deit_tiny", "--sizes", "16"], "--sizes applies to the synthetic suite"),
        (["verify", "--synthetic", "--sizes", "16,x"], "comma-separated whole numbers"),
        (["verify", "--synthetic", "--sizes", "1"], "sizes must be whole numbers >= 2"),
        (["verify", "--synthetic", "--random-init"], "need a MODEL"),
        (["verify", "deit_tiny", "--random-init", "--max-steps", "0"], "--max-steps"),
        (["verify", "deit_tiny", "--random-init", "--threads", "0"], "threads"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, tmp_path, argv, fragment):
    code, err = run(capsys, *argv, "--out", str(tmp_path / "x"))
    one_line_error(code, err, fragment)
    assert not (tmp_path / "x").exists()


def test_existing_output_is_refused_before_the_work(capsys, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("")
    code, err = run(capsys, "verify", "--synthetic", "--out", str(tmp_path / "x"))
    one_line_error(code, err, "exists; pass --overwrite")
