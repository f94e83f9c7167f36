"""timm ``SHViT``: single-head self-attention on a slice of the channels.

Layers are the ``BasicBlock`` s ``stages[i].blocks[j]`` in order (depthwise conv, mixer, FFN, each
residual); the downsampling between stages is not a layer. Tokens: NCHW maps flattened in raster
order, no prefix; ``resid_mid`` is the mixer's output. The first stage's mixers are identities
(no attention). ``SHSA`` attends with one head over the first ``pdim`` channels; it forms the
softmax inline, so the hook on its ``qkv`` convolution's output forms
``softmax(q^T k * scale)`` from that output, as the module does: ``[B, 1, N, N]``.
"""

from __future__ import annotations

from timm.models.shvit import SHSA, SHViT
from torch import Tensor, nn

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap
from vitspec.adapters.layered import Layer, LayeredAdapter
from vitspec.adapters.layout import nchw_tokens

NO_ATTENTION = "the block's mixer is an identity (convolutional stage): no attention"


def single_head_attention(shsa: nn.Module, qkv: Tensor) -> Tensor:
    """``[B, 1, N, N]``: the softmax timm's ``SHSA`` computes from its ``qkv`` output
    ``[B, 2 * qk_dim + pdim, h, w]``.

    Example:
        >>> import torch
        >>> shsa = SHSA(dim=8, qk_dim=4, pdim=4)
        >>> single_head_attention(shsa, torch.randn(2, 12, 3, 3)).shape
        torch.Size([2, 1, 9, 9])
    """
    q, k, _ = qkv.split([shsa.qk_dim, shsa.qk_dim, shsa.pdim], dim=1)
    q, k = q.flatten(2), k.flatten(2)
    return ((q.transpose(-2, -1) @ k) * shsa.scale).softmax(dim=-1).unsqueeze(1)


@register(SHViT)
class SHViTAdapter(LayeredAdapter):
    """SHViT blocks across stages; single-head attention where the mixer is ``SHSA``."""

    family = "shvit"
    info = FamilyInfo(
        name="SHViT (single head)",
        examples=("shvit_s1",),
        measured="token metrics after every block; the single head's attention (head 0) "
        "where the mixer is SHSA",
        not_measured="attention in the first stage (its mixers are identities)",
    )

    def build(self) -> list[Layer]:
        out = []
        for i, stage in enumerate(self.model.stages):
            for block in stage.blocks:
                out.append(_layer(block, f"stage {i + 1}"))
        return out


def _layer(block: nn.Module, stage: str) -> Layer:
    common = dict(
        stage=stage,
        post=Tap(block, "output", nchw_tokens),
        layout="nchw",
        pre=Tap(block, "input", nchw_tokens),
    )
    shsa = getattr(block.mixer, "m", None)
    if not isinstance(shsa, SHSA):
        return Layer(**common, no_pattern=NO_ATTENTION, no_mid=NO_ATTENTION)
    return Layer(
        **common,
        mid=Tap(block.mixer, "output", nchw_tokens),
        attn_in=Tap(shsa, "input", nchw_tokens),
        attn_out=Tap(shsa, "output", nchw_tokens),
        pattern=Tap(shsa.qkv, "output", lambda x, b: single_head_attention(shsa, x)),
    )
