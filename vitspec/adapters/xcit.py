"""timm ``Xcit`` (XCiT): cross-covariance (channel) attention, then class-attention blocks.

Layers 1..T are the ``XCABlock`` s (tokens ``[B, N, C]``, no prefix, the patch grid in raster
order; ``resid_mid`` = input + the XCA branch, before the local patch interaction and the MLP).
XCA's softmax is over channels (``[B, H, C/H, C/H]``), not an operator on the token axis: no
attention metrics there. Layers T+1.. are the class-attention blocks (numbered after the trunk,
stage ``"class attention"``): the class token joins (prefix 1) and every token is updated (the
patch tokens by their own normalised values), so token metrics apply; the class token's
attention row ``[B, H, 1, 1 + N]`` gives ``attn_entropy``.
"""

from __future__ import annotations

from timm.models.xcit import Xcit

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap
from vitspec.adapters.layered import Layer, LayeredAdapter

CHANNEL_ATTENTION = (
    "cross-covariance attention (XCA) attends over channels ([C/H x C/H] per head), not tokens"
)


@register(Xcit)
class XcitAdapter(LayeredAdapter):
    """XCiT trunk (channel attention) and class-attention blocks."""

    family = "xcit"
    info = FamilyInfo(
        name="XCiT (channel attention)",
        examples=("xcit_nano_12_p16_224",),
        measured="token metrics at every trunk and class-attention block; attn_entropy of the "
        "class token's attention in the class-attention blocks",
        not_measured="attention metrics of the trunk (XCA attends over channels, not tokens)",
    )

    def build(self) -> list[Layer]:
        grid_map = (self.model.patch_embed.proj, "output", "nchw")
        out = []
        for block in self.model.blocks:
            block_in = Tap(block, "input")
            out.append(
                Layer(
                    stage="blocks",
                    post=Tap(block, "output"),
                    grid_from=grid_map,
                    pre=block_in,
                    mid=Tap(block.drop_path1, "output", plus=block_in),
                    attn_in=Tap(block.norm1, "output"),
                    attn_out=Tap(block.drop_path1, "output"),
                    no_pattern=CHANNEL_ATTENTION,
                )
            )
        for block in self.model.cls_attn_blocks or []:
            block_in = Tap(block, "input")
            out.append(
                Layer(
                    stage="class attention",
                    post=Tap(block, "output"),
                    grid_from=grid_map,
                    pre=block_in,
                    mid=Tap(block.drop_path1, "output", plus=block_in),
                    pattern=Tap(block.attn.attn_drop, "input"),
                    prefix=1,
                )
            )
        return out
