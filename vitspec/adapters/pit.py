"""timm ``PoolingVisionTransformer`` (PiT): ViT blocks on a grid pooled between stages.

Layers are ``transformers[i].blocks[j]`` (timm's ViT ``Block``) in order; tokens ``[B, P + h*w, C]``
with P = 1 class token (2 with the distillation token), the stage's grid in raster order. Between
stages a depthwise strided convolution pools the grid and a linear map widens the prefix tokens;
that happens before the next stage's first block. A: the ``attn_drop`` input, square, global.
"""

from __future__ import annotations

from timm.models.pit import PoolingVisionTransformer

from vitspec.adapters import register
from vitspec.adapters.base import AttentionWeights, FamilyInfo, Tap
from vitspec.adapters.layered import Layer, LayeredAdapter
from vitspec.adapters.vit import branch_note, layer_scale, qkv_attention_weights


@register(PoolingVisionTransformer)
class PiTAdapter(LayeredAdapter):
    """PiT stages of ViT blocks; every metric at every site."""

    family = "pit"
    info = FamilyInfo(
        name="PiT",
        examples=("pit_ti_224", "pit_s_distilled_224"),
        measured="every metric at every site on each stage's pooled grid (prefix 1, or 2 with "
        "distillation)",
    )

    def build(self) -> list[Layer]:
        prefix = int(self.model.num_tokens)
        out = []
        for i, stage in enumerate(self.model.transformers):
            grid_map = stage.pool.conv if stage.pool is not None else self.model.patch_embed
            for block in stage.blocks:
                block_in = Tap(block, "input")
                out.append(
                    Layer(
                        stage=f"stage {i + 1}",
                        post=Tap(block, "output"),
                        grid_from=(grid_map, "output", "nchw"),
                        pre=block_in,
                        mid=Tap(block.drop_path1, "output", plus=block_in),
                        attn_in=Tap(block.attn, "input"),
                        attn_out=Tap(block.drop_path1, "output"),
                        pattern=Tap(block.attn.attn_drop, "input"),
                        prefix=prefix,
                    )
                )
        self.blocks = [b for stage in self.model.transformers for b in stage.blocks]
        return out

    def attention_weights(self, layer: int) -> AttentionWeights | str:
        block = self.blocks[layer - 1]
        return qkv_attention_weights(block.attn, layer_scale(block), branch_note(block))
