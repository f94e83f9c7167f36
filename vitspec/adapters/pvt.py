"""timm ``PyramidVisionTransformerV2`` (PVT-v2): spatial-reduction attention on a pyramid.

Layers are ``stages[i].blocks[j]`` in order; tokens ``[B, N, C]``, no prefix, the stage's grid in
raster order (overlapping patch embeddings shrink the grid between stages). A: the ``attn_drop``
input ``[B, H, N, M]``: keys and values come from the map reduced by a strided convolution
(``sr_ratio`` > 1, M = N / sr^2; PVT-v2-li: pooled to 7x7), so A is non-square and only
``attn_entropy`` (over the keys) applies; stages with ``sr_ratio`` = 1 (the last, in the
standard configurations) have the full square attention and every metric.
"""

from __future__ import annotations

from timm.models.pvt_v2 import PyramidVisionTransformerV2

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap
from vitspec.adapters.layered import Layer, LayeredAdapter


@register(PyramidVisionTransformerV2)
class PvtV2Adapter(LayeredAdapter):
    """PVT-v2 stages; spatially reduced (non-square) keys except where ``sr_ratio`` = 1."""

    family = "pvt_v2"
    info = FamilyInfo(
        name="PVT-v2",
        examples=("pvt_v2_b0",),
        measured="token metrics on each stage's grid; attn_entropy over the spatially reduced "
        "keys; every attention metric in stages without reduction (sr_ratio 1)",
        not_measured="attention metrics other than attn_entropy where keys are spatially "
        "reduced (non-square attention)",
    )

    def build(self) -> list[Layer]:
        out = []
        for i, stage in enumerate(self.model.stages):
            for block in stage.blocks:
                block_in = Tap(block, "input")
                out.append(
                    Layer(
                        stage=f"stage {i + 1}",
                        post=Tap(block, "output"),
                        grid_from=(stage, "output", "nchw"),
                        pre=block_in,
                        mid=Tap(block.drop_path1, "output", plus=block_in),
                        attn_in=Tap(block.norm1, "output"),
                        attn_out=Tap(block.drop_path1, "output"),
                        pattern=Tap(block.attn.attn_drop, "input"),
                    )
                )
        return out
