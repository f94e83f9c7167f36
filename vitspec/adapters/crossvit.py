"""timm ``CrossVit`` (CrossViT): two ViT branches at two patch sizes, fused by cross-attention.

Layers, in execution order, for each multi-scale block: branch 1's ViT blocks, branch 2's ViT
blocks, then the two fusions ("fusion into branch b": branch b's class token, projected, attends
to the other branch's tokens and is projected back). Each layer's tokens are its own branch's
stream ``[B, 1 + h*w, C]`` (class token then that branch's grid), so the branch is in the stage
name (``"branch 1 (patch 12)"``) and the grid and width change between branches. Branch blocks
have every site and metric (A: ``attn_drop`` input, square). Fusion layers give the branch's
stream after fusion (only its class token changed) and the class token's attention over the
other branch's tokens ``[B, H, 1, 1 + N']``: ``attn_entropy`` only.
"""

from __future__ import annotations

from timm.models.crossvit import CrossVit
from torch import nn

from vitspec.adapters import register
from vitspec.adapters.base import AttentionWeights, FamilyInfo, Tap, pair
from vitspec.adapters.layered import Layer, LayeredAdapter
from vitspec.adapters.layout import item
from vitspec.adapters.vit import branch_note, layer_scale, qkv_attention_weights

STACKED = "fusion by several stacked cross-attention blocks is not read"
NO_MID = "fusion updates only the class token, through projections (no attention residual)"


@register(CrossVit)
class CrossVitAdapter(LayeredAdapter):
    """CrossViT: both branches' blocks and the fusions, in execution order."""

    family = "crossvit"
    info = FamilyInfo(
        name="CrossViT (two branches)",
        examples=("crossvit_tiny_240",),
        measured="every metric for both branches' blocks (named by branch in run.json stages); "
        "fusion layers: the branch's tokens and attn_entropy of its class token over the "
        "other branch",
        not_measured="attention metrics other than attn_entropy at fusion layers (one query: "
        "the class token); mid at fusion layers",
    )

    def build(self) -> list[Layer]:
        model = self.model
        sizes = [pair(e.patch_size)[0] for e in model.patch_embed]
        names = [f"branch {b + 1} (patch {p})" for b, p in enumerate(sizes)]
        grid_maps = [(embed.proj, "output", "nchw") for embed in model.patch_embed]
        out: list[Layer] = []
        self.vit_blocks: dict[int, nn.Module] = {}
        for msb in model.blocks:
            for b, branch in enumerate(msb.blocks):
                for block in branch:
                    out.append(_block_layer(block, names[b], grid_maps[b]))
                    self.vit_blocks[len(out)] = block
            for b, fusion in enumerate(msb.fusion):
                attn = getattr(fusion, "attn", None)  # stacked cross-attention: a Sequential
                out.append(
                    Layer(
                        stage=f"fusion into {names[b]}",
                        post=Tap(msb, "output", item(b)),
                        pre=Tap(msb.blocks[b], "output") if len(msb.blocks[b]) else None,
                        grid_from=grid_maps[b],
                        pattern=None if attn is None else Tap(attn.attn_drop, "input"),
                        prefix=1,
                        no_pattern=None if attn is not None else STACKED,
                        no_mid=NO_MID,
                        partition="cross",
                    )
                )
        return out

    def attention_weights(self, layer: int) -> AttentionWeights | str:
        block = self.vit_blocks.get(layer)
        if block is None:
            return "fusion layer: cross-attention of one class token (no square attention)"
        return qkv_attention_weights(block.attn, layer_scale(block), branch_note(block))


def _block_layer(block: nn.Module, stage: str, grid_map: tuple) -> Layer:
    block_in = Tap(block, "input")
    return Layer(
        stage=stage,
        post=Tap(block, "output"),
        grid_from=grid_map,
        pre=block_in,
        mid=Tap(block.drop_path1, "output", plus=block_in),
        attn_in=Tap(block.attn, "input"),
        attn_out=Tap(block.drop_path1, "output"),
        pattern=Tap(block.attn.attn_drop, "input"),
        prefix=1,
    )
