"""timm ``ConVit``: gated positional self-attention (GPSA) blocks, then plain MHSA blocks.

A of a GPSA block is the module's gated, renormalised mixture ``(1 - s(g)) softmax(QK^T / sqrt d)
+ s(g) softmax(pos)`` with every row divided by its sum, as ``GPSA.get_attention`` computes it
(the ``attn_drop`` input); MHSA blocks give their softmax. The class token joins after the local
blocks (``local_up_to_layer``): layers up to there have no prefix token, later ones one. Each GPSA
layer also reports ``gpsa_gate``: s(g) = sigmoid of the head's gating parameter.
"""

from __future__ import annotations

from timm.models.convit import GPSA, ConVit
from torch import nn

from vitspec.adapters import register
from vitspec.adapters.base import Adapter, AttentionWeights, FamilyInfo, Geometry, Tap, pair
from vitspec.adapters.vit import qkv_attention_weights
from vitspec.sites import ATTN_IN, ATTN_OUT, PATTERN, RESID_MID, RESID_POST, RESID_PRE


@register(ConVit)
class ConVitAdapter(Adapter):
    """Blocks ``model.blocks[i]`` with ``attn`` a ``GPSA`` (local) or ``MHSA``."""

    family = "convit"
    info = FamilyInfo(
        name="ConViT",
        examples=("convit_tiny", "convit_small"),
        measured="every metric; A of the GPSA blocks is the gated, renormalised mixture of "
        "content and positional attention; the class token joins mid-network (prefix 0 then 1); "
        "gpsa_gate = sigmoid(g) per head and layer",
    )

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.blocks = list(model.blocks)
        self.local = (
            int(model.local_up_to_layer) if model.cls_token is not None else len(self.blocks)
        )
        self.patch_size = pair(model.patch_embed.patch_size)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def taps(self) -> dict[tuple[str, int], Tap]:
        out = {}
        for layer, block in enumerate(self.blocks, start=1):
            out[(RESID_PRE, layer)] = Tap(block, "input")
            out[(RESID_POST, layer)] = Tap(block, "output")
            out[(ATTN_IN, layer)] = Tap(block.attn, "input")
            # no LayerScale and drop_path is the identity at eval: the attn output is the branch
            out[(ATTN_OUT, layer)] = Tap(block.attn, "output")
            out[(RESID_MID, layer)] = Tap(block.attn, "output", plus=Tap(block, "input"))
            out[(PATTERN, layer)] = Tap(block.attn.attn_drop, "input")
        return out

    def geometry(self, image_hw: tuple[int, int]) -> list[Geometry]:
        grid = (image_hw[0] // self.patch_size[0], image_hw[1] // self.patch_size[1])
        dim = getattr(self.model, "embed_dim", None)
        return [
            Geometry(
                int(layer > self.local),
                grid,
                dim,
                stage="GPSA" if layer <= self.local else "MHSA",
            )
            for layer in range(self.depth + 1)
        ]

    def head_params(self) -> dict[str, dict[int, object]]:
        gates = {
            layer: block.attn.gating_param.detach().sigmoid()
            for layer, block in enumerate(self.blocks, start=1)
            if isinstance(block.attn, GPSA)
        }
        return {"gpsa_gate": gates} if gates else {}

    def attention_weights(self, layer: int) -> AttentionWeights | str:
        attn = self.blocks[layer - 1].attn
        if not isinstance(attn, GPSA):
            return qkv_attention_weights(attn, None, None)
        heads, v, proj = attn.num_heads, attn.v, attn.proj
        d = v.out_features // heads
        w_v = v.weight.detach().double().reshape(heads, d, v.in_features).transpose(1, 2)
        b_v = None if v.bias is None else v.bias.detach().double().reshape(heads, d)
        w_o = proj.weight.detach().double().T.reshape(heads, d, -1)
        b_o = None if proj.bias is None else proj.bias.detach().double()
        return AttentionWeights(w_v, b_v, w_o, b_o)
