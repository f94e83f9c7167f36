"""timm ``Cait``: the talking-heads trunk ``blocks`` then the class-attention ``blocks_token_only``.

CaiT runs its patch tokens through ``blocks`` (``LayerScaleBlock`` with ``TalkingHeadAttn``)
*without* a class token (prefix 0). ``TalkingHeadAttn`` mixes the heads before the softmax
(``proj_l``) and after it (``proj_w``); A is the softmax output before the post-softmax mix
(the ``proj_w`` input, row-stochastic), not the mixed map. The class token joins in the
class-attention blocks, numbered after the trunk: they update the class token alone, so they give
their class-token attention row ``[B, H, 1, 1 + N]`` (only ``attn_entropy`` applies) and no
token sites.
"""

from __future__ import annotations

from timm.models.cait import Cait
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

TALKING_HEADS = (
    "talking heads mix the heads after the softmax (proj_w): the branch is not "
    "sum_h A_h Y W_V^h W_O^h"
)


def _heads_last_to_first(value: Tensor, batch_size: int) -> Tensor:
    """``proj_w``'s input ``[B, N, N, H]`` -> ``[B, H, N, N]``."""
    return value.permute(0, 3, 1, 2)


@register(Cait)
class CaitAdapter(Adapter):
    """Trunk layers 1..T, class-attention layers T+1..T+K."""

    family = "cait"
    info = FamilyInfo(
        name="CaiT",
        examples=("cait_xxs24_224", "cait_s24_224"),
        measured="trunk: token metrics (no prefix) and A = the softmax before the talking-heads "
        "mix; class-attention blocks (numbered after the trunk): class-token attention entropy",
        not_measured="mid and the attention branch output (one drop_path for both branches); "
        "token metrics of class-attention blocks (they update the class token only)",
    )

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.trunk = list(model.blocks)
        self.cls_blocks = list(model.blocks_token_only or [])
        self.patch_size = pair(model.patch_embed.patch_size)

    @property
    def depth(self) -> int:
        return len(self.trunk) + len(self.cls_blocks)

    def taps(self) -> dict[tuple[str, int], Tap]:
        out = {}
        for layer, block in enumerate(self.trunk, start=1):
            out[(RESID_PRE, layer)] = Tap(block, "input")
            out[(RESID_POST, layer)] = Tap(block, "output")
            out[(ATTN_IN, layer)] = Tap(block.attn, "input")
            out[(PATTERN, layer)] = Tap(block.attn.proj_w, "input", _heads_last_to_first)
        for layer, block in enumerate(self.cls_blocks, start=len(self.trunk) + 1):
            out[(PATTERN, layer)] = Tap(block.attn.attn_drop, "input")
        return out

    def geometry(self, image_hw: tuple[int, int]) -> list[Geometry]:
        grid = (image_hw[0] // self.patch_size[0], image_hw[1] // self.patch_size[1])
        dim = getattr(self.model, "embed_dim", None)
        trunk = [Geometry(0, grid, dim)] * (len(self.trunk) + 1)
        return trunk + [Geometry(1, grid, dim, stage="class attention")] * len(self.cls_blocks)

    def unavailable(self) -> dict[str, str]:
        one_drop_path = (
            "the block applies one drop_path module to both branches, so no module output is "
            "the attention branch alone"
        )
        out = {RESID_MID: one_drop_path, ATTN_OUT: one_drop_path}
        if any(getattr(b.attn, "attn_scale", None) is not None for b in self.trunk):
            out[PATTERN_PRE] = (
                "AttnScale on CaiT acts after the talking-heads mix, on a map that is not "
                "row-stochastic"
            )
        if self.cls_blocks:
            only_cls = "class-attention blocks update only the class token"
            out.update({RESID_PRE: only_cls, RESID_POST: only_cls, ATTN_IN: only_cls})
        return out

    def attention_weights(self, layer: int) -> AttentionWeights | str:
        return TALKING_HEADS
