"""Capture: hooks see the right tensors, and leave the model exactly as they found it."""

import pytest
import timm
import torch

from vitspec.adapters import get_adapter
from vitspec.capture import capture, check_sites
from vitspec.errors import VitspecError
from vitspec.sites import SITES


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=3,
        embed_dim=32,
        num_heads=2,
    ).eval()


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_sites_reach_the_callbacks_with_the_right_tensors(model):
    adapter = get_adapter(model)
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    with (
        torch.inference_mode(),
        capture(adapter, SITES, lambda s, layer, t: seen.__setitem__((s, layer), t)),
    ):
        out = model.forward_features(x)
    assert sorted(seen) == sorted((s, layer) for s in SITES[:-1] for layer in (1, 2, 3))
    attn = {layer: seen[("pattern", layer)] for layer in (1, 2, 3)}
    with torch.inference_mode():
        assert torch.allclose(model.norm(seen[("resid_post", 3)]), out, atol=1e-6)
        assert torch.equal(seen[("resid_pre", 2)], seen[("resid_post", 1)])
        # independent: run the blocks by hand
        x0 = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        assert torch.allclose(seen[("resid_pre", 1)], x0)
        blk = model.blocks[0]
        assert torch.allclose(seen[("attn_in", 1)], blk.norm1(x0))
        assert torch.allclose(seen[("attn_out", 1)], blk.attn(blk.norm1(x0)), atol=1e-6)
        mid = x0 + blk.attn(blk.norm1(x0))
        assert torch.allclose(seen[("resid_mid", 1)], mid, atol=1e-6)
        assert torch.allclose(seen[("resid_post", 1)], blk(x0), atol=1e-6)
        # attention from q, k by hand
        b, n, c = x0.shape
        qkv = blk.attn.qkv(blk.norm1(x0)).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        a = (qkv[0] @ qkv[1].transpose(-1, -2) * (c // 2) ** -0.5).softmax(-1)
        assert torch.allclose(attn[1], a, atol=1e-6)
    assert attn[1].shape == (2, 2, 17, 17)


def test_hooks_removed_and_fused_attention_restored_even_on_error(model):
    adapter = get_adapter(model)
    model.blocks[1].attn.fused_attn = True
    model.blocks[2].attn.fused_attn = False
    before = _hook_count(model)

    def boom(site, layer, tokens):
        if site == "resid_post" and layer == 2:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"), torch.inference_mode():
        with capture(adapter, {"resid_post", "pattern"}, boom):
            assert not any(b.attn.fused_attn for b in model.blocks)
            model(torch.randn(1, 3, 32, 32))
    assert _hook_count(model) == before
    assert model.blocks[1].attn.fused_attn is True
    assert model.blocks[2].attn.fused_attn is False


def test_check_sites_orders_and_rejects():
    assert check_sites(["block", "mid"]) == ("mid", "block")
    with pytest.raises(VitspecError, match="allowed: embed, mid, block"):
        check_sites(["blocks"])


def test_unknown_site_is_refused(model):
    with pytest.raises(VitspecError, match="allowed: resid_pre"):
        with capture(get_adapter(model), {"block"}, lambda *a: None):
            pass


def test_resnet_is_refused_with_one_line():
    with pytest.raises(VitspecError, match="vitspec analyses vision transformers") as err:
        get_adapter(timm.create_model("resnet18", pretrained=False), "resnet18")
    assert "\n" not in str(err.value) and "resnet18" in str(err.value)
