"""timm ``Levit`` (LeViT): attention with learned positional biases and attention subsampling.

Layers, in order: every ``LevitBlock`` and, where a stage starts with one, its ``LevitDownsample``
(subsampling attention whose output replaces the stream, then a residual MLP). Tokens
``[B, N, C]`` (``levit_conv_*``: NCHW maps, flattened), no prefix, on the grid the model was built
for (``attn.resolution``; the biases fix it). ``resid_mid`` of a subsampling layer is its
attention output (there is no attention residual).

A: timm forms the softmax inline and keeps no module for it, so the hook on the attention module
replays its forward up to the softmax from the module's input: ``softmax(q k^T * scale + B)``
with the per-head bias over relative offsets. Subsampling layers' queries are the strided grid
(N/4 x N, non-square: only ``attn_entropy``).
"""

from __future__ import annotations

from timm.models.levit import AttentionDownsample, Levit, LevitDownsample
from torch import Tensor, nn

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap, pair
from vitspec.adapters.layered import Layer, LayeredAdapter
from vitspec.adapters.layout import nchw_tokens, shape_probe


def levit_attention(attn: nn.Module, x: Tensor) -> Tensor:
    """``[B, H, Nq, N]``: the softmax timm's LeViT ``Attention`` / ``AttentionDownsample``
    computes on input ``x`` (``[B, N, C]``, or ``[B, C, h, w]`` with ``use_conv``).

    Example:
        >>> import torch
        >>> from timm.models.levit import Attention
        >>> a = Attention(8, key_dim=2, num_heads=2, attn_ratio=2, resolution=2)
        >>> a.train(False)
        >>> with torch.no_grad():
        ...     levit_attention(a, torch.randn(1, 4, 8)).shape
        torch.Size([1, 2, 4, 4])
    """
    down = isinstance(attn, AttentionDownsample)
    b, heads, kd = x.shape[0], attn.num_heads, attn.key_dim
    if attn.use_conv:
        hw = x.shape[2] * x.shape[3]
        if down:
            k = attn.kv(x).view(b, heads, -1, hw)[:, :, :kd]
            q = attn.q(x).view(b, heads, kd, -1)
        else:
            q, k = attn.qkv(x).view(b, heads, -1, hw)[:, :, : 2 * kd].chunk(2, dim=2)
        logits = q.transpose(-2, -1) @ k
    else:
        n = x.shape[1]
        if down:
            k = attn.kv(x).view(b, n, heads, -1)[..., :kd]
            q = attn.q(x).view(b, -1, heads, kd)
        else:
            q, k = attn.qkv(x).view(b, n, heads, -1)[..., : 2 * kd].chunk(2, dim=-1)
        logits = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)
    return (logits * attn.scale + attn.get_attention_biases(x.device)).softmax(dim=-1)


@register(Levit)
class LevitAdapter(LayeredAdapter):
    """LeViT blocks and subsampling blocks in order."""

    family = "levit"
    info = FamilyInfo(
        name="LeViT",
        examples=("levit_128s",),
        measured="token metrics on each stage's grid; attention (replayed up to the softmax, "
        "learned biases inside) at every block; attn_entropy at subsampling blocks",
        not_measured="attention metrics other than attn_entropy at subsampling blocks "
        "(queries on the strided grid: non-square)",
    )

    def build(self) -> list[Layer]:
        tokens = nchw_tokens if self.model.use_conv else None
        out = []
        for i, stage in enumerate(self.model.stages):
            name = f"stage {i + 1}"
            if isinstance(stage.downsample, LevitDownsample):
                attn = stage.downsample.attn_downsample
                out.append(
                    Layer(
                        stage=name,
                        post=Tap(stage.downsample, "output", tokens),
                        pre=Tap(stage.downsample, "input", tokens),
                        mid=Tap(attn, "output", tokens),
                        pattern=Tap(attn, "input", lambda x, b, a=attn: levit_attention(a, x)),
                    )
                )
            for block in stage.blocks:
                block_in = Tap(block, "input", tokens)
                attn = block.attn
                out.append(
                    Layer(
                        stage=name,
                        post=Tap(block, "output", tokens),
                        pre=block_in,
                        mid=Tap(block.drop_path1, "output", tokens, plus=block_in),
                        attn_in=block_in,
                        attn_out=Tap(block.drop_path1, "output", tokens),
                        pattern=Tap(attn, "input", lambda x, b, a=attn: levit_attention(a, x)),
                    )
                )
        return out

    def grids(self, image_hw: tuple[int, int]) -> list[tuple[tuple[int, int], int]]:
        """The grids the biases were built for (``resolution``); widths from one probe pass."""
        grids = []
        for stage in self.model.stages:
            if isinstance(stage.downsample, LevitDownsample):
                down = stage.downsample.attn_downsample
                grids.append(tuple(-(-r // down.stride) for r in pair(down.resolution)))
            grids += [pair(block.attn.resolution) for block in stage.blocks]
        posts = {n: (la.post.module, "output") for n, la in enumerate(self.layers, start=1)}
        shapes = shape_probe(
            self.model, image_hw, {0: (self.layers[0].pre.module, "input"), **posts}
        )
        width = 1 if self.model.use_conv else -1
        first = self.layers[0]
        first_grid = pair(first.pattern.module.resolution)
        out = [(first_grid, shapes[0][width])]
        return out + [(g, shapes[n][width]) for n, g in enumerate(grids, start=1)]
