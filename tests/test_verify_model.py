"""vitspec.verify on tiny random-init timm models: healthy models pass, planted violations fail,
dependent checks become not-applicable, s_a agrees with analyze, results round-trip."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import vitspec
from vitspec import analyze
from vitspec.inputs import synthetic_batches
from vitspec.reporting import draw
from vitspec.verification import CHECKS, VERIFY_COLUMNS, VerifyResult, verify
from vitspec.verification import checks as ck

TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


def tiny(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, **{**TINY, **kw}).eval()


def quiet(_msg: str) -> None:
    pass


class TalkingHeads:
    """Replaces a timm Attention forward: heads mixed AFTER the softmax (as CaiT does), so the
    matrices that reach attn_drop are not row-stochastic."""

    def __init__(self, attn: nn.Module, mix: torch.Tensor):
        self.attn, self.mix = attn, mix

    def __call__(self, x, attn_mask=None, is_causal=False):
        a = self.attn
        b, n, c = x.shape
        qkv = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)
        attn = torch.einsum("gh,bhnm->bgnm", self.mix, attn)
        attn = a.attn_drop(attn)
        return a.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


@pytest.fixture(scope="module")
def result():
    return verify(tiny(), num_images=3, batch_size=2, device="cpu", warn=quiet)


def test_healthy_tiny_model_passes_every_check(result):
    df = result.table
    assert list(df.columns) == VERIFY_COLUMNS
    assert result.passed and (df["status"] == "pass").all(), df[df["status"] != "pass"]
    assert set(df["check"]) == set(CHECKS)
    assert sorted(df["layer"].unique()) == [1, 2, 3]
    prem = df[df["check"] == "row_stochastic"]
    assert set(prem["head"]) == {0, 1} and (prem["cases"] == 3).all()
    prod = df[df["check"] == "product_lowpass"]
    assert set(prod["head"]) == {0, 1, -1}  # -1: random head paths
    assert df.loc[df["check"] == "msa_bound", "head"].isna().all()
    assert (df["max_slack"] <= 1 + ck.RTOL).all()
    for name, tol in CHECKS.items():
        assert (df.loc[df["check"] == name, "tolerance"] == tol).all()
    info = result.info
    assert info["summary"]["status"] == "pass" and info["images"]["used"] == 3
    assert info["consistency"]["attn_hc_gain_max_rel_diff"] < 1e-3
    assert {"gains", "curves", "products", "blocks"} <= set(result.figure_data)


def test_exact_s_a_agrees_with_analyze_attn_hc_gain(result):
    run = analyze(
        tiny(), num_images=3, batch_size=2, device="cpu", metrics="attn_hc_gain", warn=quiet
    )
    m = run.metric("attn_hc_gain")
    m = m[m["head"] >= 0].set_index(["layer", "head"])["mean"]
    g = result.figure_data["gains"].set_index(["layer", "head"])["s_a"]
    assert len(g) == len(m) == 6
    for key, value in g.items():
        assert value == pytest.approx(m.loc[key], rel=1e-3)


def test_results_round_trip_and_figures_drawn_from_the_folder(result, tmp_path):
    out = result.save(tmp_path / "v")
    assert {p.name for p in out.iterdir()} == {"verify.csv", "verify.json"}  # data only
    draw(out)
    names = {p.name for p in out.iterdir()}
    for stem in ("verify_lowpass", "verify_gain", "verify_msa"):
        assert f"{stem}.png" in names and f"{stem}.pdf" in names
    back = VerifyResult.load(out)
    assert back.table[["check", "layer", "head", "status"]].equals(
        result.table[["check", "layer", "head", "status"]]
    )
    assert back.info["summary"] == result.info["summary"]
    assert len(back.figure_data["curves"]) == len(result.figure_data["curves"])
    text = (out / "verify.json").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_streaming_does_not_depend_on_the_batch_size():
    model = tiny(seed=1)
    batches = list(synthetic_batches(4, 4, (32, 32), seed=3))
    one = verify(model, images=[b[i : i + 1] for b in batches for i in range(4)], device="cpu")
    four = verify(model, images=batches, device="cpu")
    assert one.table["cases"].tolist() == four.table["cases"].tolist()
    g1, g4 = one.figure_data["gains"], four.figure_data["gains"]
    assert g1["s_a"].to_numpy() == pytest.approx(g4["s_a"].to_numpy(), rel=1e-10)


def test_planted_non_stochastic_attention_fails_and_dependents_are_not_applicable():
    model = tiny()
    attn = model.blocks[1].attn
    attn.forward = TalkingHeads(attn, torch.tensor([[1.0, 0.5], [0.2, 0.7]]))
    r = verify(model, num_images=2, device="cpu", warn=quiet)
    df = r.table
    assert not r.passed
    fails = df[df["status"] == "fail"]
    assert set(fails["check"]) == {"row_stochastic"} and set(fails["layer"]) == {2}
    na = df[df["status"] == "not-applicable"]
    assert set(na.loc[na["layer"] == 2, "check"]) == set(CHECKS) - {"row_stochastic"}
    assert (na["reason"].str.contains("premise")).all()
    # head paths run through layer 2: products at layers >= 2 are not applicable
    prod = df[df["check"] == "product_lowpass"].set_index(["layer", "head"])["status"]
    assert (prod.loc[1] == "pass").all() and (prod.loc[[2, 3]] == "not-applicable").all()
    others = df[(df["layer"] != 2) & (df["check"] != "product_lowpass")]
    assert (others["status"] == "pass").all()
    assert r.info["summary"]["failed_checks"] == ["row_stochastic"]
    assert r.info["summary"]["checks"]["row_stochastic"]["failing"] == [
        "layer 2 head 0",
        "layer 2 head 1",
    ]


def test_cait_checks_the_softmax_before_talking_heads():
    """A is the softmax output before the talking-heads mix (row-stochastic): the per-head
    checks apply; the branch checks do not (the heads are mixed); class attention is 1 x N."""
    torch.manual_seed(0)
    model = timm.create_model(
        "cait_xxs24_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        depth_token_only=1,
    ).eval()
    r = verify(model, num_images=1, device="cpu", warn=quiet)
    df = r.table
    assert set(df["layer"].dropna()) == {1, 2}
    assert (df.loc[df["check"] == "row_stochastic", "status"] == "pass").all()
    msa = df[df["check"].str.startswith("msa_")]
    assert (msa["status"] == "not-applicable").all()
    assert msa["reason"].str.contains("talking heads").all()
    assert set(df.loc[~df["check"].str.startswith("msa_"), "status"]) == {"pass"}
    assert "shape (1, 2, 1, 17)" in r.info["unavailable"]["checks at layer 3"]


def test_msa_checks_not_applicable_with_a_norm_between_heads_and_proj():
    r = verify(tiny(scale_attn_norm=True), num_images=1, device="cpu", warn=quiet)
    df = r.table
    msa = df[df["check"].str.startswith("msa_")]
    assert (msa["status"] == "not-applicable").all()
    assert msa["reason"].str.contains("scale_norm").all()
    assert (df.loc[~df["check"].str.startswith("msa_"), "status"] == "pass").all()


def test_layerscale_is_folded_into_the_branch():
    r = verify(tiny(init_values=0.3), num_images=2, device="cpu", warn=quiet)
    assert r.passed and (r.table["status"] == "pass").all()
    rec = r.table[r.table["check"] == "msa_reconstruction"]
    assert (rec["max_slack"] < 0.1).all()  # relative error < 1e-5 of the module's output


def test_a_wrong_bound_is_caught_on_a_model(monkeypatch):
    real = ck.logit_bound
    monkeypatch.setattr(ck, "logit_bound", lambda n, a: real(n, a) * 0.5)
    r = verify(tiny(), num_images=1, device="cpu", warn=quiet)
    assert r.info["summary"]["failed_checks"] == ["logit_bound"]
    assert (r.table.loc[r.table["check"] == "logit_bound", "status"] == "fail").all()


def test_lazy_api_and_usage_errors():
    assert vitspec.verify is verify and vitspec.verify is verify  # never shadowed by a module
    assert vitspec.VerifyResult is VerifyResult
    with pytest.raises(vitspec.VitspecError, match="not both"):
        verify("deit_tiny", synthetic=True)
    with pytest.raises(vitspec.VitspecError, match="give a MODEL"):
        verify()
    with pytest.raises(vitspec.VitspecError, match="max_steps"):
        verify(synthetic=True, max_steps=0)
    with pytest.raises(vitspec.VitspecError, match="sizes"):
        verify(synthetic=True, sizes=[1])


def test_synthetic_suite_passes_and_keeps_figure_points():
    r = verify(synthetic=True, sizes=[16], max_steps=256)
    assert r.passed, r.failures
    df = r.table
    assert set(df["model"]) == {"synthetic-N16"}
    assert set(df["check"]) == set(CHECKS) - {"msa_reconstruction"}
    tight = df.set_index("check")["max_slack"]
    assert tight["hc_contraction"] == pytest.approx(1.0, abs=1e-9)  # the bound is attained
    pts = r.figure_data["synthetic"]
    assert set(pts["family"]) == {"uniform", "peaked", "shared", "two-cluster"}
    assert (pts["norm"] <= pts["logit_bound"] * (1 + 1e-9)).all()
    assert (pts["s_a"] > 1).any()  # two-cluster attention amplifies HC in one step
    assert math.isclose(pts["a"].max(), 16.0, rel_tol=1e-9)


def test_verify_plots_do_not_import_torch():
    import subprocess
    import sys

    code = "import sys, vitspec.plots.verify; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
