"""Hugging Face transformers models: the same weights and inputs give timm's numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from vitspec import analyze, verify
from vitspec.cli import main
from vitspec.errors import VitspecError

transformers = pytest.importorskip("transformers")

DIM, DEPTH, HEADS = 32, 2, 2


def deit_and_hf_twin():
    """A tiny timm DeiT and a transformers ViTModel holding the same weights."""
    torch.manual_seed(0)
    deit = timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=DEPTH,
        embed_dim=DIM,
        num_heads=HEADS,
    ).eval()
    config = transformers.ViTConfig(
        hidden_size=DIM,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=4 * DIM,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    hf = transformers.ViTModel(config, add_pooling_layer=False).eval()
    sd = deit.state_dict()
    new = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    names = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(DEPTH):
        for kind in ("weight", "bias"):
            for p, q in zip("qkv", sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)):
                new[f"layers.{i}.attention.{p}_proj.{kind}"] = q
            for timm_name, hf_name in names.items():
                new[f"layers.{i}.{hf_name}.{kind}"] = sd[f"blocks.{i}.{timm_name}.{kind}"]
    missing, unexpected = hf.load_state_dict(new, strict=False)
    assert missing == [] and unexpected == []
    return deit, hf


def test_hf_vit_with_deit_weights_gives_the_timm_numbers():
    deit, hf = deit_and_hf_twin()
    x = [torch.randn(2, 3, 32, 32)]
    kw = dict(images=x, device="cpu", sites=["embed", "mid", "block"], warn=lambda m: None)
    ours, theirs = analyze(hf, **kw), analyze(deit, **kw)
    assert ours.info["family"] == "hf-vit" and ours.info["num_prefix_tokens"] == 1
    assert hf.config._attn_implementation == "sdpa"  # eager only during the run
    keys = ["site", "layer", "head", "metric"]
    assert ours.metrics[keys].astype(str).equals(theirs.metrics[keys].astype(str))
    assert set(ours.metrics["site"]) == {"embed", "mid", "block", "attn"}
    np.testing.assert_allclose(ours.metrics["mean"], theirs.metrics["mean"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.spectra["mean"], theirs.spectra["mean"], rtol=1e-4, atol=1e-6)
    # the branch weights read from q/k/v/o projections reconstruct the module's output
    r = verify(hf, images=x, device="cpu", warn=lambda m: None)
    assert r.passed and (r.table["status"] == "pass").all()


def test_hf_folder_runs_from_the_cli_with_its_image_processor(tmp_path, capsys):
    _, hf = deit_and_hf_twin()
    folder = tmp_path / "tiny-vit"
    hf.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    out = tmp_path / "run"
    assert (
        main(
            [
                "analyze",
                f"hf:{folder}",
                "--num-images",
                "2",
                "--out",
                str(out),
                "--no-figures",
                "--metrics",
                "hc_dc_ratio,attn_entropy",
            ]
        )
        == 0
    )
    info = json.loads((out / "run.json").read_text())
    assert info["family"] == "hf-vit" and info["grid"] == [4, 4]
    assert info["weights"]["source"] == "transformers folder"
    with pytest.raises(VitspecError, match="no model folder"):
        analyze(f"hf:{tmp_path / 'nothing'}")
    with pytest.raises(VitspecError, match="do not apply"):
        analyze(f"hf:{folder}", random_init=True)
