"""timm ``DaVit``: dual attention, spatial-window blocks alternating with channel blocks.

Layers are the spatial and channel blocks of every ``stages[i].blocks[j]`` pair, in order. Tokens:
the NCHW maps flattened in raster order, no prefix; each block first applies a convolutional
position encoding (``cpe1``), so ``resid_mid`` = ``cpe1`` output + attention branch. Spatial
blocks: A is the ``attn.softmax`` output ``[B*nW, H, n, n]`` split per image (no relative bias,
no shift). Channel blocks attend over channels (``[B, H, C/H, C/H]``): not an operator on the
token axis, so they have no attention metrics.
"""

from __future__ import annotations

from timm.models.davit import ChannelBlock, DaVit, SpatialBlock
from torch import nn

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap, pair, split_windows
from vitspec.adapters.layered import Layer, LayeredAdapter
from vitspec.adapters.layout import nchw_tokens
from vitspec.errors import VitspecError

CHANNEL_ATTENTION = (
    "channel attention (softmax over channels, [C/H x C/H] per head) is not an operator on "
    "the token axis"
)


@register(DaVit)
class DaVitAdapter(LayeredAdapter):
    """DaViT spatial (windowed) and channel blocks across stages."""

    family = "davit"
    info = FamilyInfo(
        name="DaViT",
        examples=("davit_tiny",),
        measured="token metrics after every spatial and channel block; spatial blocks: "
        "attention per window, averaged per image",
        not_measured="attention metrics of channel blocks (channel attention is not an "
        "operator on the token axis)",
    )

    def build(self) -> list[Layer]:
        out = []
        for i, stage in enumerate(self.model.stages):
            for pair_ in stage.blocks:
                for block in pair_:
                    out.append(_layer(block, f"stage {i + 1}"))
        return out


def _layer(block: nn.Module, stage: str) -> Layer:
    if not isinstance(block, (SpatialBlock, ChannelBlock)):
        raise VitspecError(f"DaVit block {type(block).__name__} is not a spatial or channel block")
    shortcut = Tap(block.cpe1, "output", nchw_tokens)
    common = dict(
        stage=stage,
        post=Tap(block, "output", nchw_tokens),
        layout="nchw",
        pre=Tap(block, "input", nchw_tokens),
        mid=Tap(block.drop_path1, "output", plus=shortcut),
        attn_in=Tap(block.norm1, "output"),
        attn_out=Tap(block.drop_path1, "output"),
    )
    if isinstance(block, ChannelBlock):
        return Layer(**common, no_pattern=CHANNEL_ATTENTION)
    return Layer(
        **common,
        pattern=Tap(block.attn.softmax, "output", split_windows),
        window=pair(block.window_size),
    )
