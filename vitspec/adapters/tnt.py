"""timm ``TNT`` (Transformer in Transformer): inner attention over pixels, outer over patches.

Each TNT block is two layers, in order. The *inner* layer: attention among the p x p pixel
embeddings inside every patch (a window per patch, pixels in raster order,
``[B, N_patches, H_in, p^2, p^2]``), a pixel MLP, then the pixel stream is projected and added to
the patch tokens; its tokens are the patch stream after that addition (the input of
``norm_out``). The *outer* layer: ViT attention over the class token and the patches
(``[B, H_out, 1 + N, 1 + N]``), then the MLP; its tokens are the block's patch output. Tokens are
always the patch stream ``[B, 1 + h*w, C]`` (class token first); the grid is fixed by the model's
``img_size``. The inner layer has no ``resid_mid`` on the patch stream (its attention acts on the
pixel tokens).
"""

from __future__ import annotations

from timm.models.tnt import TNT

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap, pair, split_windows
from vitspec.adapters.layered import Layer, LayeredAdapter
from vitspec.adapters.layout import item

NO_MID = (
    "inner attention acts on the pixel tokens; the patch stream changes once, by the projection"
)


@register(TNT)
class TntAdapter(LayeredAdapter):
    """TNT: an inner (pixel) and an outer (patch) layer per block."""

    family = "tnt"
    info = FamilyInfo(
        name="TNT (inner and outer attention)",
        examples=("tnt_s_patch16_224",),
        measured="two layers per block on the patch stream: inner attention per patch's pixel "
        "window (averaged over patches), outer attention over class token and patches",
        not_measured="mid of inner layers (the inner attention acts on pixel tokens); "
        "attn_cross_layer_sim (inner and outer layers alternate)",
    )

    def build(self) -> list[Layer]:
        prefix = int(self.model.num_prefix_tokens)
        pixels = pair(self.model.pixel_embed.new_patch_size)
        out = []
        before = Tap(self.model.pos_drop, "output")
        for block in self.model.blocks:
            stream = Tap(block.norm_out, "input")
            out.append(
                Layer(
                    stage="blocks",
                    post=stream,
                    pre=before,
                    pattern=Tap(block.attn_in.attn_drop, "input", split_windows),
                    prefix=prefix,
                    window=pixels,
                    partition="pixels",
                    no_mid=NO_MID,
                )
            )
            out.append(
                Layer(
                    stage="blocks",
                    post=Tap(block, "output", item(1)),
                    pre=stream,
                    mid=Tap(block.norm_mlp, "input"),
                    attn_in=Tap(block.norm_out, "output"),
                    attn_out=Tap(block.attn_out, "output"),
                    pattern=Tap(block.attn_out.attn_drop, "input"),
                    prefix=prefix,
                )
            )
            before = Tap(block, "output", item(1))
        return out

    def grids(self, image_hw: tuple[int, int]) -> list[tuple[tuple[int, int], int]]:
        """The grid the model was built for (``pixel_embed.grid_size``; it asserts the size)."""
        grid = pair(self.model.pixel_embed.grid_size)
        return [(grid, int(self.model.embed_dim))] * (len(self.layers) + 1)
