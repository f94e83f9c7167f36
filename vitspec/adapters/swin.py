"""timm ``SwinTransformer`` (v1) and ``SwinTransformerV2``: shifted-window attention on NHWC maps.

Layers are the blocks ``layers[i].blocks[j]`` in order (patch merging runs at the start of a stage,
before its blocks). Tokens: the block's NHWC map flattened in raster order, no prefix. A: the
``attn_drop`` input ``[B*nW, H, n, n]``, split per image to ``[B, nW, H, n, n]``: one window's
attention over its n tokens in raster order, with the relative position bias (v2: the CPB-MLP
bias and cosine logits) and the shift mask (-100 between regions) inside the softmax, as the model
computes it. Where a stage's grid is not a multiple of the window, timm pads with zero tokens that
take part in the attention as keys; they are inside the windows measured.
"""

from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch import nn

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap, flatten_nhwc, pair, split_windows
from vitspec.adapters.layered import Layer, LayeredAdapter


@register(SwinTransformer, SwinTransformerV2)
class SwinAdapter(LayeredAdapter):
    """Swin v1 / v2 blocks across stages, windowed attention per window."""

    family = "swin"
    info = FamilyInfo(
        name="Swin v1 / v2",
        examples=("swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"),
        measured="token metrics on each stage's grid; attention per (shifted) window, "
        "averaged over the image's windows",
        not_measured="attn_cross_layer_sim across a shift or a stage change (the windows cover "
        "different tokens)",
    )

    def build(self) -> list[Layer]:
        out = []
        for i, stage in enumerate(self.model.layers):
            for block in stage.blocks:
                out.append(_swin_layer(block, f"stage {i + 1}"))
        return out


def _swin_layer(block: nn.Module, stage: str) -> Layer:
    v1 = isinstance(block, SwinTransformerBlock)
    block_in = Tap(block, "input", flatten_nhwc)
    branch = Tap(block.drop_path1, "output", flatten_nhwc)
    return Layer(
        stage=stage,
        post=Tap(block, "output", flatten_nhwc),
        layout="nhwc",
        pre=block_in,
        mid=Tap(block.drop_path1, "output", flatten_nhwc, plus=block_in),
        # v1: norm1 before the attention; v2 (res-post-norm): the block input enters it
        attn_in=Tap(block.norm1, "output", flatten_nhwc) if v1 else block_in,
        attn_out=branch,
        pattern=Tap(block.attn.attn_drop, "input", split_windows),
        window=pair(block.window_size),
        shift=pair(block.shift_size),
    )
