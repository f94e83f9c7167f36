"""The ViT-shaped families (ViT/DeiT/DeiT III/distilled/registers/DINOv2/BEiT/EVA-02), CaiT and
ConViT on tiny random-init instances and two images: adapters, token counts per layer, the
patterns against the softmax the model's own code computed, and the end-to-end analysis."""

from __future__ import annotations

import pytest
import timm
import torch

import vitspec
from vitspec.adapters import get_adapter
from vitspec.capture import capture
from vitspec.sites import PATTERN, RESID_POST, RESID_PRE, SITES

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

# name -> (adapter family, prefix tokens, timm kwargs beyond TINY)
VIT_LIKE = {
    "deit_tiny_patch16_224": ("vit", 1, {}),
    "deit_tiny_distilled_patch16_224": ("vit", 2, {}),
    "deit3_small_patch16_224": ("vit", 1, {}),
    "vit_small_patch14_reg4_dinov2": ("vit", 5, {}),
    "beit_base_patch16_224": ("vit", 1, {}),
    "eva02_tiny_patch14_224": ("vit", 1, {}),
}


def build(name: str, **extra):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**TINY, **extra}).eval()


def observe(model, sites=SITES):
    """``{(site, layer): tensor}`` of one forward, and every softmax the model computed."""
    seen, softmaxes = {}, []
    real = torch.Tensor.softmax

    def recording(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        softmaxes.append(out)
        return out

    adapter = get_adapter(model)
    with torch.inference_mode(), capture(adapter, sites, lambda s, n, x: seen.update({(s, n): x})):
        torch.Tensor.softmax = recording
        try:
            model(X)
        finally:
            torch.Tensor.softmax = real
    return adapter, seen, softmaxes


def computed_by_the_model(pattern, softmaxes) -> bool:
    return any(s.shape == pattern.shape and torch.equal(s, pattern) for s in softmaxes)


@pytest.mark.parametrize("name", VIT_LIKE)
def test_vit_like_families(name):
    family, prefix, extra = VIT_LIKE[name]
    model = build(name, **extra)
    adapter, seen, softmaxes = observe(model)
    assert adapter.family == family and adapter.depth == 2
    geometry = adapter.geometry((32, 32))
    assert [g.tokens for g in geometry] == [prefix + 16] * 3
    for layer in (1, 2):
        assert seen[(RESID_POST, layer)].shape == (2, prefix + 16, 32)
        a = seen[(PATTERN, layer)]
        assert a.shape == (2, 2, prefix + 16, prefix + 16)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, prefix + 16))
        # relative position bias (BEiT) and RoPE (EVA-02) act before this softmax: it is A
        assert computed_by_the_model(a, softmaxes), layer
    r = vitspec.analyze(model, images=[X], device="cpu", warn=lambda m: None)
    assert r.info["num_prefix_tokens"] == prefix and r.info["unavailable"] == {}
    assert set(r.metrics["site"]) == {"embed", "block", "attn"}


def test_cait_pattern_is_the_softmax_before_talking_heads():
    model = build("cait_xxs24_224", depth_token_only=1)
    adapter, seen, softmaxes = observe(model)
    assert adapter.family == "cait" and adapter.depth == 3
    mixed = []
    hook = model.blocks[0].attn.proj_w.register_forward_hook(lambda m, a, out: mixed.append(out))
    with torch.inference_mode():
        model(X)
    hook.remove()
    a = seen[(PATTERN, 1)]
    assert a.shape == (2, 2, 16, 16) and computed_by_the_model(a, softmaxes)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 16))
    # the talking-heads mix of A is what proj_w outputs: A is its input, heads last -> first
    w = model.blocks[0].attn.proj_w
    torch.testing.assert_close(mixed[0], a.permute(0, 2, 3, 1) @ w.weight.T + w.bias)
    cls = seen[(PATTERN, 3)]  # the class-attention block, numbered after the trunk
    assert cls.shape == (2, 2, 1, 17)
    torch.testing.assert_close(cls.sum(-1), torch.ones(2, 2, 1))
    assert (RESID_POST, 3) not in seen and seen[(RESID_PRE, 1)].shape == (2, 16, 32)


def test_convit_gated_mixture_class_token_and_gate():
    torch.manual_seed(0)
    model = timm.create_model(
        "convit_tiny",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=3,
        embed_dim=8,
        num_heads=2,
        local_up_to_layer=2,
    ).eval()
    with torch.no_grad():
        for block in model.blocks[:2]:
            block.attn.gating_param.normal_()
    adapter, seen, _ = observe(model)
    assert [g.prefix for g in adapter.geometry((32, 32))] == [0, 0, 0, 1]
    assert [seen[(RESID_POST, n)].shape[1] for n in (1, 2, 3)] == [16, 16, 17]
    # layer 1 by hand: (1 - s(g)) softmax(q k^T / sqrt d) + s(g) softmax(pos), rows renormalised
    gpsa = model.blocks[0].attn
    with torch.no_grad():
        y = seen[("attn_in", 1)]
        qk = gpsa.qk(y).reshape(2, 16, 2, 2, 8).permute(2, 0, 3, 1, 4)
        content = (qk[0] @ qk[1].transpose(-1, -2) * gpsa.scale).softmax(-1)
        pos = gpsa.pos_proj(gpsa.get_rel_indices(16)).permute(0, 3, 1, 2).softmax(-1)
        s = gpsa.gating_param.sigmoid().view(1, -1, 1, 1)
        mix = (1 - s) * content + s * pos
        mix = mix / mix.sum(-1, keepdim=True)
    torch.testing.assert_close(seen[(PATTERN, 1)], mix)
    r = vitspec.analyze(model, images=[X], device="cpu", warn=lambda m: None)
    gate = r.metrics[r.metrics["metric"] == "gpsa_gate"].set_index(["layer", "head"])["mean"]
    for layer in (1, 2):
        want = model.blocks[layer - 1].attn.gating_param.detach().sigmoid().double()
        assert gate.loc[(layer, -1)] == pytest.approx(want.mean().item(), rel=1e-12)
        for h in range(2):
            assert gate.loc[(layer, h)] == pytest.approx(want[h].item(), rel=1e-12)
    assert 3 not in gate.index.get_level_values(0)  # MHSA block: no gate
    assert [s["prefix"] for s in r.info["stages"]] == [0, 1]
    attn = r.metrics[(r.metrics["site"] == "attn") & (r.metrics["metric"] == "attn_cos")]
    assert sorted(attn["layer"].unique()) == [1, 2, 3]
    sim = r.metrics[r.metrics["metric"] == "attn_cross_layer_sim"]
    assert sorted(sim["layer"].unique()) == [2]  # not across the class token's arrival
