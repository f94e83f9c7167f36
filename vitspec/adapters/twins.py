"""timm ``Twins`` (Twins-SVT and Twins-PCPVT): local windows and sub-sampled global attention.

Layers are ``blocks[i][j]`` in order; tokens ``[B, N, C]``, no prefix, the stage's grid in raster
order. The position generator (PEG, ``pos_block[i]``) runs after the first block of each stage,
outside the block: it acts between that block's output and the next block's input. Local blocks
(``LocallyGroupedAttn``): A is the ``attn_drop`` input, already ``[B, nW, H, n, n]``. Global
blocks (``GlobalSubSampleAttn``): keys come from a strided convolution of the map (``sr`` > 1),
so A is ``[B, H, N, N / sr^2]``, non-square: only ``attn_entropy`` applies; with ``sr`` = 1 (the
last stage) it is the full square attention. PCPVT's plain ``Attention`` blocks read the same.
"""

from __future__ import annotations

from timm.models.twins import LocallyGroupedAttn, Twins

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap, pair
from vitspec.adapters.layered import Layer, LayeredAdapter


@register(Twins)
class TwinsAdapter(LayeredAdapter):
    """Twins blocks across stages: local windows or (sub-sampled) global attention."""

    family = "twins"
    info = FamilyInfo(
        name="Twins-SVT / Twins-PCPVT",
        examples=("twins_svt_small", "twins_pcpvt_small"),
        measured="token metrics on each stage's grid; local blocks: attention per window, "
        "averaged per image; global blocks with sub-sampled keys: attn_entropy over the keys",
        not_measured="attention metrics other than attn_entropy on sub-sampled (non-square) "
        "global attention",
    )

    def build(self) -> list[Layer]:
        out = []
        for i, stage in enumerate(self.model.blocks):
            embed = self.model.patch_embeds[i].proj
            for block in stage:
                block_in = Tap(block, "input")
                local = isinstance(block.attn, LocallyGroupedAttn)
                out.append(
                    Layer(
                        stage=f"stage {i + 1}",
                        post=Tap(block, "output"),
                        grid_from=(embed, "output", "nchw"),
                        pre=block_in,
                        mid=Tap(block.drop_path1, "output", plus=block_in),
                        attn_in=Tap(block.norm1, "output"),
                        attn_out=Tap(block.drop_path1, "output"),
                        pattern=Tap(block.attn.attn_drop, "input"),
                        window=pair(block.attn.ws) if local else None,
                    )
                )
        return out
