"""timm ``ByobNet`` models with halo attention (HaloNet, ``halonet*``): blocked local attention.

Layers are the blocks ``stages[i][j]`` in order: bottleneck convolution blocks and
``SelfAttnBlock`` s whose 3x3 convolution is replaced by ``HaloAttn``. Tokens: NCHW maps
flattened in raster order, no prefix. The attention sits inside the bottleneck branch (between
1x1 convolutions), so there is no ``resid_mid``.

A: each b x b block of queries attends to the (b + 2 * halo)^2 keys of its padded neighbourhood
(zero padding included), with relative position logits: non-square, so only ``attn_entropy``
applies. timm forms the softmax inline; the hook on ``HaloAttn`` replays its forward up to the
softmax from the module's input and emits every block's query rows one after another,
``[B, H, nb * b^2, win^2]`` (the entropy is a mean over rows, which this order does not change).
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers.halo_attn import HaloAttn
from timm.models.byobnet import ByobNet
from torch import Tensor, nn

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap
from vitspec.adapters.layered import Layer, LayeredAdapter
from vitspec.adapters.layout import nchw_tokens
from vitspec.errors import VitspecError

NO_ATTENTION = "convolutional bottleneck block: no attention"
NO_MID = "the attention sits inside the bottleneck branch (no residual around it)"


def halo_attention(ha: nn.Module, x: Tensor) -> Tensor:
    """``[B, H, nb * b^2, win^2]``: the softmax timm's ``HaloAttn`` computes on ``x``
    ``[B, C, h, w]``, query blocks one after another.

    Example:
        >>> import torch
        >>> ha = HaloAttn(8, num_heads=2, block_size=2, halo_size=1).eval()
        >>> halo_attention(ha, torch.randn(1, 8, 4, 4)).shape
        torch.Size([1, 2, 16, 16])
    """
    b, _, h, w = x.shape
    bs, bq, heads = ha.block_size, ha.block_size_ds, ha.num_heads
    nh, nw = h // bs, w // bs
    q = ha.q(x).reshape(-1, ha.dim_head_qk, nh, bq, nw, bq).permute(0, 1, 3, 5, 2, 4)
    q = q.reshape(b * heads, ha.dim_head_qk, -1, nh * nw).transpose(1, 3)
    kv = F.pad(ha.kv(x), [ha.halo_size] * 4)
    kv = kv.unfold(2, ha.win_size, bs).unfold(3, ha.win_size, bs)
    kv = kv.reshape(b * heads, ha.dim_head_qk + ha.dim_head_v, nh * nw, -1).permute(0, 2, 3, 1)
    logits = q @ kv[..., : ha.dim_head_qk].transpose(-1, -2)
    if ha.scale_pos_embed:
        logits = (logits + ha.pos_embed(q)) * ha.scale
    else:
        logits = logits * ha.scale + ha.pos_embed(q)
    return logits.softmax(dim=-1).reshape(b, heads, -1, ha.win_size**2)


@register(ByobNet)
class HaloNetAdapter(LayeredAdapter):
    """ByobNet blocks in order; halo attention (non-square) where a block has ``HaloAttn``."""

    family = "halonet"
    info = FamilyInfo(
        name="HaloNet",
        examples=("halonet26t",),
        measured="token metrics after every block; attn_entropy of halo attention (each query "
        "block over its haloed neighbourhood)",
        not_measured="attention metrics other than attn_entropy (queries attend to a haloed "
        "neighbourhood: non-square); mid (attention inside the bottleneck branch)",
    )

    def build(self) -> list[Layer]:
        if not any(isinstance(m, HaloAttn) for m in self.model.modules()):
            raise VitspecError(
                "this ByobNet has no HaloAttn blocks; vitspec reads ByobNet models with halo "
                "attention (halonet*), not convolutional, lambda or bottleneck-attention ones"
            )
        out = []
        for i, stage in enumerate(self.model.stages):
            for block in stage:
                out.append(_layer(block, f"stage {i + 1}"))
        return out


def _layer(block: nn.Module, stage: str) -> Layer:
    ha = getattr(block, "self_attn", None)
    return Layer(
        stage=stage,
        post=Tap(block, "output", nchw_tokens),
        layout="nchw",
        pre=Tap(block, "input", nchw_tokens),
        pattern=Tap(ha, "input", lambda x, b: halo_attention(ha, x))
        if isinstance(ha, HaloAttn)
        else None,
        no_pattern=None if isinstance(ha, HaloAttn) else NO_ATTENTION,
        no_mid=NO_MID,
    )
