"""timm ``VisionTransformer`` and the models built like it: DeiT, DeiT III, distilled DeiT,
register ViTs, DINOv2, BEiT, EVA-02 (relative position bias and RoPE act inside the softmax, so
the attention the model applies is the ``attn_drop`` input).

Sites per block l: ``resid_pre`` (block input), ``resid_mid`` (input + ``drop_path1`` output),
``resid_post`` (block output), ``attn_in`` / ``attn_out`` (``attn`` input, ``drop_path1``
output), ``pattern`` (``attn.attn_drop`` input ``[B, H, N, N]``) and, for AttnScale blocks,
``pattern_pre`` (``attn.attn_scale`` input).
"""

from __future__ import annotations

from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from vitspec.adapters import register
from vitspec.adapters.base import Adapter, AttentionWeights, FamilyInfo, Geometry, Tap, pair
from vitspec.sites import (
    ATTN_IN,
    ATTN_OUT,
    PATTERN,
    PATTERN_PRE,
    RESID_MID,
    RESID_POST,
    RESID_PRE,
)


@register(VisionTransformer, Beit, Eva, structural=True)
class ViTAdapter(Adapter):
    """Blocks ``model.blocks[i]`` with ``attn.attn_drop``, ``drop_path1`` and a ``patch_embed``."""

    family = "vit"
    info = FamilyInfo(
        name="ViT / DeiT / DeiT III / distilled DeiT / registers / DINOv2 / BEiT / EVA-02",
        examples=(
            "deit_small_patch16_224",
            "deit_tiny_distilled_patch16_224",
            "deit3_small_patch16_224",
            "vit_small_patch14_reg4_dinov2",
            "beit_base_patch16_224",
            "eva02_tiny_patch14_224",
        ),
        measured="every metric at every site; prefix tokens 1, 2 or 5; relative position bias "
        "and RoPE are inside the softmax, so A is the matrix the model applies",
    )

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.blocks = list(model.blocks)
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 1))
        self.patch_size = pair(model.patch_embed.patch_size)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        blocks = getattr(model, "blocks", None)
        patch_embed = getattr(model, "patch_embed", None)
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
            return False
        if patch_embed is None or not hasattr(patch_embed, "patch_size"):
            return False
        return all(hasattr(getattr(b, "attn", None), "attn_drop") for b in blocks)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def taps(self) -> dict[tuple[str, int], Tap]:
        out = {}
        for layer, block in enumerate(self.blocks, start=1):
            out[(RESID_PRE, layer)] = Tap(block, "input")
            out[(RESID_POST, layer)] = Tap(block, "output")
            attn = getattr(block, "attn", None)
            branch = getattr(block, "drop_path1", None)
            if branch is not None:
                out[(RESID_MID, layer)] = Tap(branch, "output", plus=Tap(block, "input"))
                out[(ATTN_OUT, layer)] = Tap(branch, "output")
            if attn is not None:
                out[(ATTN_IN, layer)] = Tap(attn, "input")
                if getattr(attn, "attn_drop", None) is not None:
                    out[(PATTERN, layer)] = Tap(attn.attn_drop, "input")
                if getattr(attn, "attn_scale", None) is not None:
                    out[(PATTERN_PRE, layer)] = Tap(attn.attn_scale, "input")
        return out

    def geometry(self, image_hw: tuple[int, int]) -> list[Geometry]:
        grid = (image_hw[0] // self.patch_size[0], image_hw[1] // self.patch_size[1])
        channels = getattr(self.model, "embed_dim", None)
        return [Geometry(self.num_prefix, grid, channels)] * (self.depth + 1)

    def unavailable(self) -> dict[str, str]:
        if any(getattr(b, "drop_path1", None) is None for b in self.blocks):
            return {RESID_MID: "the blocks have no drop_path1 module (the attention branch alone)"}
        return {}

    def attention_weights(self, layer: int) -> AttentionWeights | str:
        block = self.blocks[layer - 1]
        return qkv_attention_weights(block.attn, layer_scale(block), branch_note(block))


def layer_scale(block: nn.Module) -> Tensor | str | None:
    """The attention branch's LayerScale gamma (timm ``ls1``, BEiT/CaiT ``gamma_1``), None when
    the block has none, or a reason string when ``ls1`` is not timm's LayerScale."""
    ls = getattr(block, "ls1", None)
    if ls is not None and not isinstance(ls, nn.Identity):
        gamma = getattr(ls, "gamma", None)
        return gamma if gamma is not None else f"ls1 is {type(ls).__name__}, not timm's LayerScale"
    gamma = getattr(block, "gamma_1", None)
    return gamma if isinstance(gamma, Tensor) else None


def branch_note(block: nn.Module) -> str | None:
    """Why ``block``'s attention branch is not ``sum_h A_h Y W_V^h W_O^h`` (None: it is)."""
    attn = block.attn
    norm = getattr(attn, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        return (
            f"attn.norm is {type(norm).__name__} (scale_norm): it acts between the heads "
            "and proj, so the branch is not sum_h A_h Y W_V^h W_O^h"
        )
    if getattr(attn, "gate", None) is not None:
        return "gated attention: an input-dependent gate multiplies the heads before proj"
    if getattr(block, "feat_scale", None) is not None:
        return (
            "FeatScale rescales the branch's DC and HC parts after proj: the branch is "
            "not sum_h A_h Y W_V^h W_O^h"
        )
    return None


def qkv_attention_weights(
    attn: nn.Module, gamma: Tensor | str | None, note: str | None
) -> AttentionWeights | str:
    """Per-head value and output maps (float64) of an attention module with a fused ``qkv``
    linear (layout ``[3, H, d]`` along its outputs), ``proj`` and ``num_heads``; a reason string
    otherwise."""
    qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
    heads = getattr(attn, "num_heads", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or not heads:
        return (
            "the attention module has no qkv / proj linear layers and num_heads "
            "(not timm's Attention layout)"
        )
    if qkv.out_features % (3 * heads) or proj.in_features * 3 != qkv.out_features:
        return (
            f"qkv has {qkv.out_features} outputs, not 3 x heads x head_dim with "
            f"proj taking {proj.in_features}"
        )
    d = qkv.out_features // (3 * heads)
    w = qkv.weight.detach().double()
    w_v = w[2 * heads * d :].reshape(heads, d, qkv.in_features).transpose(1, 2)
    b_v = None
    if qkv.bias is not None:
        b_v = qkv.bias.detach().double()[2 * heads * d :].reshape(heads, d)
    w_o = proj.weight.detach().double().T.reshape(heads, d, -1)
    b_o = None if proj.bias is None else proj.bias.detach().double()
    if isinstance(gamma, str):
        note = note or gamma
    elif gamma is not None:
        g = gamma.detach().double()
        w_o = w_o * g
        b_o = None if b_o is None else b_o * g
    return AttentionWeights(w_v, b_v, w_o, b_o, note)
