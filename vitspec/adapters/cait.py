"""timm ``Cait``: the self-attention trunk ``blocks`` only.

CaiT runs its patch tokens through ``blocks`` (``LayerScaleBlock`` with talking-heads attention)
*without* a class token; the class token joins only in ``blocks_token_only`` (class-attention
blocks), which update the class token alone and leave the patch tokens unchanged. vitspec's
layers are therefore the trunk blocks, with 0 prefix tokens (N = the patch grid); the
class-attention blocks are not layers.

Attention: ``TalkingHeadAttn`` mixes heads after the softmax (``proj_w``), so the matrix the model
uses (the input of ``attn_drop``) is in general not row-stochastic; the Collector then skips the
attention metrics with that reason and the token metrics still run. Site ``mid`` is not available:
the block applies one ``drop_path`` module to both branches, so no module output is the attention
branch alone.
"""

from __future__ import annotations

from timm.models.cait import Cait
from torch import nn

from vitspec.adapters.base import Adapter
from vitspec.adapters.vit import _pair


def match(model: nn.Module) -> Adapter | None:
    """An adapter for timm ``Cait`` models (their trunk ``blocks``); else None."""
    if not isinstance(model, Cait) or len(model.blocks) == 0:
        return None
    blocks = list(model.blocks)
    attns = [b.attn for b in blocks]
    return Adapter(
        family="cait",
        blocks=blocks,
        num_prefix=0,
        attn_modules=[a if hasattr(a, "fused_attn") else None for a in attns],
        attn_taps=[getattr(a, "attn_drop", None) for a in attns],
        branch_taps=[None] * len(blocks),
        patch_size=_pair(model.patch_embed.patch_size),
        pre_attn_taps=[getattr(a, "attn_scale", None) for a in attns],
    )
