"""timm ``EfficientVitMsra`` (EfficientViT-M): cascaded group attention in local windows.

Layers are the ``EfficientVitBlock`` s (``stages[i].blocks[j]``: depthwise conv, FFN, attention
mixer, depthwise conv, FFN, each residual), in order; the downsampling between stages is not a
layer. Tokens: NCHW maps flattened in raster order, no prefix; ``resid_mid`` is the mixer's
output (after the attention residual, before the second conv and FFN).

A: the module forms each head's softmax inside a Python loop and keeps none, so the hook on
``CascadedGroupAttention`` replays that loop from the module's own input (a window
``[B*nW, C, ws, ws]``): head h's input is head h-1's output plus its own channel chunk (the
cascade), its query passes a depthwise conv, and a learned per-head bias over relative offsets is
added before the softmax. The replayed output equals the module's (checked in the tests).
"""

from __future__ import annotations

import torch
from timm.models.efficientvit_msra import EfficientVitMsra
from torch import Tensor, nn

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap, pair, split_windows
from vitspec.adapters.layered import Layer, LayeredAdapter
from vitspec.adapters.layout import nchw_tokens


def cascaded_attention(cga: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Replay timm's ``CascadedGroupAttention.forward`` on windows ``x`` ``[B', C, h, w]``.

    Returns:
        ``(A [B', H, n, n], output [B', C, h, w])``: every head's softmax and the module's
        output recomputed from them.

    Example:
        >>> from timm.models.efficientvit_msra import CascadedGroupAttention
        >>> cga = CascadedGroupAttention(16, 4, 2, attn_ratio=2, resolution=3, kernels=(3, 3))
        >>> cga.train(False)
        >>> x = torch.randn(1, 16, 3, 3)
        >>> a, out = cascaded_attention(cga, x)
        >>> a.shape, torch.allclose(out, cga(x), atol=1e-6)
        (torch.Size([1, 2, 9, 9]), True)
    """
    b, _, h, w = x.shape
    chunks = x.chunk(len(cga.qkvs), dim=1)
    bias = cga.get_attention_biases(x.device)
    maps, outs = [], []
    feat = chunks[0]
    for head, (qkv, dws) in enumerate(zip(cga.qkvs, cga.dws)):
        if head > 0:
            feat = feat + chunks[head]
        q, k, v = qkv(feat).view(b, -1, h, w).split([cga.key_dim, cga.key_dim, cga.val_dim], 1)
        q, k, v = dws(q).flatten(2), k.flatten(2), v.flatten(2)
        attn = ((q * cga.scale).transpose(-2, -1) @ k + bias[head]).softmax(dim=-1)
        feat = (v @ attn.transpose(-2, -1)).view(b, cga.val_dim, h, w)
        maps.append(attn)
        outs.append(feat)
    return torch.stack(maps, dim=1), cga.proj(torch.cat(outs, dim=1))


@register(EfficientVitMsra)
class EfficientVitMAdapter(LayeredAdapter):
    """EfficientViT-M blocks across stages, attention per local window (cascaded heads)."""

    family = "efficientvit_m"
    info = FamilyInfo(
        name="EfficientViT-M (cascaded group attention)",
        examples=("efficientvit_m0",),
        measured="token metrics on each stage's grid; every head's attention per local window "
        "(replayed from the module's input), averaged per image",
    )

    def build(self) -> list[Layer]:
        out = []
        for i, stage in enumerate(self.model.stages):
            for block in stage.blocks:
                out.append(_layer(block, f"stage {i + 1}"))
        return out


def _layer(block: nn.Module, stage: str) -> Layer:
    local = block.mixer.m
    cga = local.attn
    return Layer(
        stage=stage,
        post=Tap(block, "output", nchw_tokens),
        layout="nchw",
        pre=Tap(block, "input", nchw_tokens),
        mid=Tap(block.mixer, "output", nchw_tokens),
        attn_in=Tap(local, "input", nchw_tokens),
        attn_out=Tap(local, "output", nchw_tokens),
        pattern=Tap(cga, "input", lambda x, b: split_windows(cascaded_attention(cga, x)[0], b)),
        window=pair(cga.resolution),
    )
