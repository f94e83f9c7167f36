"""timm ``MaxxVit`` (MaxViT): MBConv, block (window) attention and grid (dilated) attention.

Each ``MaxxVitBlock`` is three residual layers in this order: its MBConv (tokens only: no
attention), its window-partition attention block and its grid-partition attention block. Tokens:
the NCHW / NHWC maps flattened in raster order, no prefix. A: the ``attn_drop`` input
``[B*nW, H, n, n]`` split per image; a grid window holds the n tokens at one offset of the
dilated sub-grid (stride = grid / partition), in raster order of that sub-grid. Relative position
bias is inside the softmax.
"""

from __future__ import annotations

from timm.models.maxxvit import MaxxVit
from torch import nn

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap, flatten_nhwc, pair, split_windows
from vitspec.adapters.layered import Layer, LayeredAdapter
from vitspec.adapters.layout import nchw_tokens
from vitspec.errors import VitspecError

NO_ATTENTION = "convolutional block (MBConv): no attention"


@register(MaxxVit)
class MaxVitAdapter(LayeredAdapter):
    """MaxViT layers: MBConv, block attention, grid attention per ``MaxxVitBlock``."""

    family = "maxvit"
    info = FamilyInfo(
        name="MaxViT",
        examples=("maxvit_tiny_tf_224",),
        measured="token metrics after every MBConv, block- and grid-attention layer; attention "
        "per window (block: contiguous tiles; grid: dilated sub-grids), averaged per image",
        not_measured="attention at the MBConv layers (convolutions); attn_cross_layer_sim "
        "(consecutive attention layers never share windows)",
    )

    def build(self) -> list[Layer]:
        out = []
        for i, stage in enumerate(self.model.stages):
            name = f"stage {i + 1}"
            for block in stage.blocks:
                if not hasattr(block, "attn_grid"):
                    raise VitspecError(
                        f"MaxxVit stage {i + 1} has {type(block).__name__} blocks; vitspec reads "
                        "MaxViT's MaxxVitBlock stages (CoAtNet-style stages are not supported)"
                    )
                out.append(_conv_layer(block.conv, name))
                for kind in ("block", "grid"):
                    part = block.attn_block if kind == "block" else block.attn_grid
                    if part is not None:
                        out.append(_partition_layer(part, name, kind, block.nchw_attn))
        return out


def _conv_layer(conv: nn.Module, stage: str) -> Layer:
    return Layer(
        stage=stage,
        post=Tap(conv, "output", nchw_tokens),
        layout="nchw",
        pre=Tap(conv, "input", nchw_tokens),
        no_pattern=NO_ATTENTION,
        no_mid=NO_ATTENTION,
    )


def _partition_layer(part: nn.Module, stage: str, kind: str, nchw: bool) -> Layer:
    tokens = nchw_tokens if nchw else flatten_nhwc
    block_in = Tap(part, "input", tokens)
    return Layer(
        stage=stage,
        post=Tap(part, "output", tokens),
        layout="nchw" if nchw else "nhwc",
        pre=block_in,
        mid=Tap(part.drop_path1, "output", tokens, plus=block_in),
        attn_in=Tap(part.norm1, "output", tokens),
        attn_out=Tap(part.drop_path1, "output", tokens),
        pattern=Tap(part.attn.attn_drop, "input", split_windows),
        window=pair(part.partition_size),
        partition=kind,
    )
