"""AttnScale / FeatScale (vitspec.scaling): the invariants of issue 4, loading and analysis.

Tiny random-init DeiTs and CaiTs only; checkpoints are written by the tests in the layout of the
authors' training script (``{'model': sd, 'optimizer': ..., 'epoch': ..., 'args': ...}``).
"""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import timm
import torch

from vitspec import analyze
from vitspec.adapters import Geometry, get_adapter
from vitspec.capture import capture
from vitspec.cli import main
from vitspec.cli_parser import build_parser
from vitspec.collect import Collector
from vitspec.engine import BatchInfo
from vitspec.errors import VitspecError
from vitspec.functional import attn_hc_gain, hc_gain_exact
from vitspec.inputs import synthetic_batches
from vitspec.loading import load_model, resolve_model_name
from vitspec.metrics import list_metrics
from vitspec.plots.figures import run_figures
from vitspec.scaling import (
    SCALED_MODELS,
    add_attnscale,
    add_featscale,
    default_featscale_form,
    techniques,
)

DEIT = "deit_tiny_patch16_224"
CAIT = "cait_xxs24_224"
TINY = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2}
TINY_CAIT = {**TINY, "depth_token_only": 1}
L, H, C = TINY["depth"], TINY["num_heads"], TINY["embed_dim"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and far faster on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name=DEIT, seed=0, **over):
    torch.manual_seed(seed)
    kwargs = TINY_CAIT if "cait" in name else TINY
    return timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": 5, **over}).eval()


def images(n=2, seed=1):
    return list(synthetic_batches(n, n, (32, 32), seed=seed))


def randomise_scales(model, seed=2, scale=0.8):
    """Non-zero lamb / lamb1 / lamb2, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.lamb", "lamb1", "lamb2")):
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * scale)
    return model


def lamb_keys(model):
    return sorted(k for k in model.state_dict() if k.endswith(("attn.lamb", "lamb1", "lamb2")))


def save_released(model, path):
    """The layout of the authors' (DeiT) training script."""
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": {"state": {}},
            "lr_scheduler": {},
            "epoch": 299,
            "args": argparse.Namespace(model="attnscale_small_12"),
        },
        path,
    )
    return path


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", [DEIT, CAIT])
@pytest.mark.parametrize("variant", ["attnscale", "doubled", "single", "both"])
def test_zero_scales_give_the_baseline_logits(name, variant):
    base = make(name)
    scaled = copy.deepcopy(base)
    if variant in ("attnscale", "both"):
        add_attnscale(scaled)
    if variant != "attnscale":
        add_featscale(scaled, doubled=variant != "single")
    x = images(2)[0]
    with torch.no_grad():
        assert torch.allclose(scaled(x), base(x), rtol=0, atol=1e-6)
    if name == DEIT and variant != "single":  # the registered names, created from the same seed
        reg = make(
            "attnscale_small_12" if variant == "attnscale" else "featscale_small_12", depth=L
        )
        reg.load_state_dict(base.state_dict(), strict=False)
        with torch.no_grad():
            assert torch.allclose(reg(x), base(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "name,base",
    [
        ("attnscale_small_12", DEIT),
        ("featscale_small_12", DEIT),
        ("attnscale_cait_xxs24_224", CAIT),
        ("featscale_cait_xxs24_224", CAIT),
    ],
)
def test_timm_weights_load_with_only_the_new_keys_missing(name, base):
    plain, scaled = make(base), make(name)
    missing, unexpected = scaled.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == []
    assert sorted(missing) == lamb_keys(scaled)
    per_block = ["attn.lamb"] if name.startswith("attn") else ["lamb1", "lamb2"]
    assert sorted(missing) == sorted(f"blocks.{i}.{k}" for i in range(L) for k in per_block)


def _attention(model, x):
    """{layer: (pre-scale A, A')} as the model computes them."""
    seen = {"pattern": {}, "pattern_pre": {}}
    with (
        torch.no_grad(),
        capture(
            get_adapter(model),
            {"pattern", "pattern_pre"},
            lambda site, layer, a: seen[site].__setitem__(layer, a),
        ),
    ):
        model(x)
    pre, post = seen["pattern_pre"], seen["pattern"]
    return {layer: (pre.get(layer), post[layer]) for layer in post}


def test_attnscale_hc_gain_is_one_plus_w_times_the_baseline_gain():
    base = make()
    scaled = randomise_scales(add_attnscale(copy.deepcopy(base)), scale=1.5)
    x = images(2)[0]
    seen, baseline = _attention(scaled, x), _attention(base, x)
    for layer, (a, a_scaled) in seen.items():
        gain = (1 + scaled.blocks[layer - 1].attn.lamb.detach().double()).abs()  # [H]
        assert torch.allclose(hc_gain_exact(a_scaled), gain * hc_gain_exact(a), rtol=1e-5)
        assert torch.allclose(attn_hc_gain(a_scaled), gain * attn_hc_gain(a), rtol=1e-4)
        assert torch.allclose(a_scaled.sum(-1), torch.ones(()), atol=1e-5)  # rows still sum to 1
    # layer 1 sees the same input in both models: its pre-scale A is the baseline's attention
    a1, base_a1 = seen[1][0], baseline[1][1]
    assert baseline[1][0] is None and torch.allclose(a1, base_a1, atol=1e-7)
    gain1 = 1 + scaled.blocks[0].attn.lamb.detach().double()
    assert torch.allclose(hc_gain_exact(seen[1][1]), gain1 * hc_gain_exact(base_a1), rtol=1e-5)


@pytest.mark.parametrize("name", [DEIT, CAIT])
def test_parameter_overhead_is_LH_and_2LC(name):
    base = make(name)
    n = sum(p.numel() for p in base.parameters())
    attn = add_attnscale(copy.deepcopy(base))
    feat = add_featscale(copy.deepcopy(base))
    assert sum(p.numel() for p in attn.parameters()) - n == L * H
    assert sum(p.numel() for p in feat.parameters()) - n == L * 2 * C
    assert len(attn.state_dict()) == len(set(attn.state_dict()))  # no duplicate keys


def dc(t):
    return t.mean(dim=1, keepdim=True)


def test_registered_names_have_the_paper_shapes_and_overheads():
    dims = {"small": (384, 6), "base": (768, 12), "cait_xxs24": (192, 4)}
    for name, (_base, depth, tech, form) in SCALED_MODELS.items():
        model = timm.create_model(name, device="meta")
        size = "cait_xxs24" if "cait" in name else name.split("_")[1]
        dim, heads = dims[size]
        assert len(model.blocks) == depth and model.embed_dim == dim
        extra = sum(p.numel() for k, p in model.named_parameters() if "lamb" in k)
        assert extra == (depth * heads if tech == "attnscale" else depth * 2 * dim), name
        assert techniques(model) == {"attnscale": tech == "attnscale", "featscale": form}
        assert model.pretrained_cfg["architecture"] == name
        assert not model.pretrained_cfg.get("hf_hub_id")  # never the unscaled base weights
    assert default_featscale_form(make(CAIT)) == "single"


@pytest.mark.parametrize("doubled", [True, False])
@pytest.mark.parametrize("name", [DEIT, CAIT])
def test_featscale_gains_on_a_blocks_output(doubled, name):
    model = randomise_scales(add_featscale(make(name), doubled=doubled))
    block = copy.deepcopy(model.blocks[1])
    with torch.no_grad():
        block.mlp.fc2.weight.zero_()
        block.mlp.fc2.bias.zero_()  # block output = x + attention branch
        x = torch.randn(2, 16, C)
        msa = block.attn(block.norm1(x))
        if name == CAIT:
            msa = block.gamma_1 * msa  # layer scale commutes with FeatScale (per channel)
        branch = block(x) - x
    k = 2 if doubled else 1
    s, t = block.lamb1.detach(), block.lamb2.detach()
    assert torch.allclose(dc(branch), (1 + k * s) * dc(msa), atol=1e-6)
    assert torch.allclose(branch - dc(branch), (1 + k * t) * (msa - dc(msa)), atol=1e-6)


def test_scaled_modules_never_use_fused_attention_and_adding_is_idempotent():
    model = add_attnscale(make())
    assert all(not b.attn.fused_attn for b in model.blocks)
    lamb = model.blocks[0].attn.lamb
    add_attnscale(model)
    assert model.blocks[0].attn.lamb is lamb
    add_featscale(model, doubled=True)
    add_featscale(model, doubled=False)  # only the form changes
    assert techniques(model) == {"attnscale": True, "featscale": "single"}
    with pytest.raises(VitspecError, match="blocks.0.attn is .*supported: timm VisionTransformer"):
        add_attnscale(
            timm.create_model(
                "vit_relpos_small_patch16_224",
                depth=1,
                img_size=32,
                patch_size=8,
                embed_dim=32,
                num_heads=2,
            )
        )
    with pytest.raises(VitspecError, match="needs model.blocks"):
        add_featscale(torch.nn.Linear(2, 2))


def test_negative_entries_of_a_scaled_attention_skip_entropy_only():
    collector = Collector(list_metrics(kind="attn"), warn=(warnings := []).append)
    collector.start_batch(BatchInfo(0, 2, (8, 8), [Geometry(1, (2, 2))] * 2))
    a = torch.softmax(torch.randn(2, 2, 5, 5) * 3, dim=-1)
    scaled = 0.2 + (a - 0.2) * 4.0  # A' with w = 3: rows sum to 1, entries < 0
    assert (scaled < 0).any()
    collector.on("pattern_pre", 1, a)
    collector.on("pattern", 1, scaled)
    names = {k[3] for k in collector.moments}
    assert "attn_entropy" not in names and {"attn_hc_gain", "attn_cos"} <= names
    assert "pre_attn_entropy" in names
    assert (1, "attn_entropy") in collector.dropped and len(warnings) == 1
    assert list(collector.unavailable.as_dict()) == ["attn_entropy at layers 1"]
    collector.on("pattern", 1, a)  # a later batch without negatives stays skipped
    assert "attn_entropy" not in {k[3] for k in collector.moments}


# --------------------------------------------------------------------------- loading and analysis


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """AttnScale and FeatScale (released DeiT form) checkpoints with non-zero scales."""
    root = tmp_path_factory.mktemp("released")
    attn = randomise_scales(make("attnscale_small_12", depth=L))
    feat = randomise_scales(make("featscale_small_12", depth=L))
    return {
        "attn": (attn, save_released(attn, root / "attnscale_small_12.pth")),
        "feat": (feat, save_released(feat, root / "featscale_small_12.pth")),
    }


def _same_logits(a, b):
    x = images(2)[0]
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


def test_released_checkpoints_load_strictly_and_analyse(released, tmp_path):
    for key, name in (("attn", "attnscale_small_12"), ("feat", "featscale_small_12")):
        model, path = released[key]
        loaded = load_model(name, ckpt=path, model_kwargs=dict(TINY))
        assert loaded.provenance["techniques_added"] == [] and not loaded.provenance["warnings"]
        assert not loaded.provenance["trusted_pickle"]  # the argparse.Namespace is allow-listed
        assert _same_logits(loaded.model, model)
    model, path = released["attn"]
    result = analyze(
        "attnscale_small_12",
        ckpt=path,
        model_kwargs=dict(TINY),
        images=images(2),
        metrics="hc_dc_ratio,attn_*",
        sites=["block"],
        device="cpu",
        warn=lambda m: None,
    )
    m = result.metrics
    attn_names = {s.name for s in list_metrics("attn_*", kind="attn")}
    assert set(m.loc[m["site"] == "attn", "metric"]) == attn_names | {
        f"pre_{n}" for n in attn_names
    }
    pre = m[m["metric"] == "pre_attn_hc_gain"]
    assert sorted(pre["layer"].unique()) == [1, 2, 3] and set(pre["head"]) == {-1, 0, 1}
    assert set(result.spectra["curve"]) == {"attn_spectrum", "pre_attn_spectrum"}
    out = result.save(tmp_path / "run")
    info = json.loads((out / "run.json").read_text())
    assert info["techniques"] == {"attnscale": True, "featscale": None}
    figures = run_figures(result)  # the plots take the pre_ rows: A' panels first, then pre_
    axes = [ax for ax in figures["attention_heads"].figure.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in axes]
    assert set(titles[:4]) == attn_names
    assert titles[4:] == [f"pre_{t}" for t in titles[:4]]
    spectrum = figures["attn_spectrum"].figure
    assert sum("pre-scale A" in ax.get_ylabel() for ax in spectrum.axes) == 1
    assert "pre-scale" in figures["attn_spectrum"].caption


@pytest.mark.parametrize(
    "key,drop,shape,expect",
    [
        ("attn", "blocks.1.attn.lamb", None, r"1 missing \(blocks\.1\.attn\.lamb\)"),
        ("attn", None, ("blocks.2.attn.lamb", 3), r"blocks\.2\.attn\.lamb \[3\] vs model \[2\]"),
        ("feat", "blocks.0.lamb2", None, r"1 missing \(blocks\.0\.lamb2\)"),
        ("feat", None, ("blocks.1.lamb1", 7), r"blocks\.1\.lamb1 \[7\] vs model \[32\]"),
    ],
)
def test_missing_or_misshapen_lamb_is_refused_naming_the_key(
    released, tmp_path, key, drop, shape, expect
):
    model, _ = released[key]
    sd = dict(model.state_dict())
    if drop:
        del sd[drop]
    else:
        sd[shape[0]] = torch.zeros(shape[1])
    torch.save({"model": sd}, tmp_path / "bad.pth")
    name = "attnscale_small_12" if key == "attn" else "featscale_small_12"
    for target in (name, DEIT):  # registered name, and auto-detection on the plain name
        with pytest.raises(VitspecError, match=expect):
            load_model(target, ckpt=tmp_path / "bad.pth", model_kwargs=dict(TINY))


def test_plain_names_detect_the_techniques_and_say_so(released, tmp_path):
    model, path = released["attn"]
    loaded = load_model(DEIT, ckpt=path, model_kwargs=dict(TINY))
    assert loaded.provenance["techniques_added"] == ["attnscale"]
    assert loaded.provenance["notes"] == [
        f"checkpoint has AttnScale parameters (blocks.*.attn.lamb): added AttnScale to {DEIT}"
    ]
    assert techniques(loaded.model)["attnscale"] and _same_logits(loaded.model, model)

    model, path = released["feat"]
    loaded = load_model(DEIT, ckpt=path, model_kwargs=dict(TINY))  # released DeiT form by default
    assert techniques(loaded.model)["featscale"] == "doubled" and _same_logits(loaded.model, model)
    assert "added FeatScale to deit_tiny_patch16_224, doubled form" in loaded.provenance["notes"][0]
    single = load_model(DEIT, ckpt=path, model_kwargs=dict(TINY), featscale_form="single")
    assert techniques(single.model)["featscale"] == "single"
    assert not _same_logits(single.model, model)
    reg = load_model(
        "featscale_small_12", ckpt=path, model_kwargs=dict(TINY), featscale_form="single"
    )
    assert techniques(reg.model)["featscale"] == "single"
    with pytest.raises(VitspecError, match="allowed: doubled, single"):
        load_model(DEIT, ckpt=path, model_kwargs=dict(TINY), featscale_form="twice")

    cait = randomise_scales(add_featscale(make(CAIT)))  # CaiT's released form: single
    torch.save({"model": cait.state_dict()}, tmp_path / "cait.pth")
    loaded = load_model(CAIT, ckpt=tmp_path / "cait.pth", model_kwargs=dict(TINY_CAIT))
    assert techniques(loaded.model)["featscale"] == "single" and _same_logits(loaded.model, cait)

    args = build_parser().parse_args(
        ["analyze", "attnscale_small_12", "--ckpt", str(path), "--featscale-form", "single"]
    )
    assert args.featscale_form == "single"


def test_scaled_names_resolve_and_are_suggested():
    assert resolve_model_name("attnscale_small_12") == "attnscale_small_12"
    with pytest.raises(VitspecError, match="closest: .*featscale_base_24"):
        resolve_model_name("featscale_base24")
    with pytest.raises(VitspecError, match="no local weights for attnscale_base_12"):
        load_model("attnscale_base_12")


# --------------------------------------------------------------------------- CaiT


@pytest.mark.parametrize("name", [CAIT, "attnscale_cait_xxs24_224"])
def test_tiny_cait_measures_the_softmax_before_talking_heads_and_class_attention(name):
    warnings = []
    model = randomise_scales(make(name))
    result = analyze(
        model,
        images=images(2),
        sites=["embed", "mid", "block"],
        device="cpu",
        metrics="hc_*,attn_entropy,attn_hc_gain",
        warn=warnings.append,
    )
    m, info = result.metrics, result.info
    assert info["family"] == "cait" and info["num_prefix_tokens"] == 0 and info["depth"] == L + 1
    assert sorted(m.loc[m["site"] == "block", "layer"].unique()) == [1, 2, 3]
    assert set(m["site"]) == {"embed", "block", "attn"}  # mid: one drop_path for both branches
    attn = m[m["site"] == "attn"]
    # trunk: A before the talking-heads mix is row-stochastic, every attention metric applies;
    # the class-attention block (layer L + 1) gives its 1 x N row: entropy only
    assert sorted(attn.loc[attn["metric"] == "attn_hc_gain", "layer"].unique()) == [1, 2, 3]
    assert sorted(attn.loc[attn["metric"] == "attn_entropy", "layer"].unique()) == [1, 2, 3, 4]
    assert info["attention_refused"] == {}
    assert [s["name"] for s in info["stages"]] == ["blocks", "class attention"]
    gone = info["unavailable"]
    assert "drop_path" in gone["resid_mid at layers 1-4"]
    assert "non-square" not in gone["attn_hc_gain at layers 4"]
    assert "1 x 17" in gone["attn_hc_gain at layers 4"]
    assert "class token" in gone["resid_post at layers 4"]
    assert any(k.startswith("pattern_pre") for k in gone) == (name != CAIT)
    assert len(warnings) == len(set(warnings))  # one line per distinct reason


def test_cli_detects_the_techniques_and_prints_the_note(tmp_path, capsys):
    torch.manual_seed(0)  # full-size deit_tiny: the CLI has no model_kwargs
    model = add_featscale(add_attnscale(timm.create_model(DEIT, pretrained=False)), doubled=True)
    torch.save({"model": model.state_dict(), "epoch": 299}, tmp_path / "both.pth")
    code = main(
        [
            "analyze",
            "deit_tiny",
            "--ckpt",
            str(tmp_path / "both.pth"),
            "--num-images",
            "1",
            "--metrics",
            "hc_dc_ratio,attn_hc_gain",
            "--no-figures",
            "--device",
            "cpu",
            "--featscale-form",
            "single",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"added AttnScale to {DEIT}" in err and "added FeatScale" in err and "single" in err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["techniques"] == {"attnscale": True, "featscale": "single"}
    assert info["weights"]["techniques_added"] == ["attnscale", "featscale"]
