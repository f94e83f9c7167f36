"""timm ``EfficientVit`` (EfficientViT-MIT, ``efficientvit_b*``): ReLU linear attention.

Layers are the blocks ``stages[i].blocks[j]`` in order: MBConv residual blocks (tokens only, no
attention) and ``EfficientVitBlock`` s (a ``LiteMLA`` context module, then an MBConv). Tokens:
NCHW maps flattened in raster order, no prefix; ``resid_mid`` of an ``EfficientVitBlock`` is its
context module's output.

A: ``LiteMLA`` never forms an N x N matrix: it computes ``relu(Q) (relu(K)^T V)`` divided by
``relu(Q) relu(K)^T 1 + eps`` per head (heads: ``heads x (1 + len(scales))``, the multi-scale
aggregated copies are heads of their own). The implicit attention it applies is
``A = relu(Q) relu(K)^T`` with each row divided by its sum (the module's ``eps`` = 1e-5 is left
out, so rows sum to 1). The hook on ``LiteMLA`` forms it from the module's own input (its
``qkv`` convolution, aggregation and kernel) in float32 as the module does. Above
``MAX_QUERIES`` tokens only a seeded subsample of query rows is formed (``[B, H, m, N]``,
non-square: then only ``attn_entropy``). Where a row sum is 0 (``relu(q_i)`` has no overlap with
any ``relu(k_j)``; rare: none among the rows of 8 random-init ``efficientvit_b0`` and ``b1``
images) A is undefined and the module outputs 0 for that query; vitspec gives such
a row the uniform weights 1/N so that A stays row-stochastic.
"""

from __future__ import annotations

import torch
from timm.models.efficientvit_mit import EfficientVit, EfficientVitBlock, EfficientVitLarge
from torch import Tensor, nn

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap
from vitspec.adapters.layered import Layer, LayeredAdapter
from vitspec.adapters.layout import nchw_tokens

MAX_QUERIES = 4096
SEED = 0
NO_ATTENTION = "convolutional block (MBConv): no attention"


def linear_attention_qk(mla: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``relu(Q)``, ``relu(K)`` ``[B, H, N, d]`` (float32) of timm's ``LiteMLA`` on input
    ``x`` ``[B, C, h, w]``, as its forward computes them."""
    b, _, h, w = x.shape
    qkv = mla.qkv(x)
    scales = torch.cat([qkv, *(op(qkv) for op in mla.aggreg)], dim=1)
    scales = scales.reshape(b, -1, 3 * mla.dim, h * w).transpose(-1, -2)
    q, k, _ = scales.chunk(3, dim=-1)
    return mla.kernel_func(q).float(), mla.kernel_func(k).float()


def row_normalised(q: Tensor, k: Tensor, max_queries: int = MAX_QUERIES) -> Tensor:
    """``A = q k^T`` with rows divided by their sums (rows summing to 0: uniform); above
    ``max_queries`` query rows, the rows of a seeded subsample (sorted).

    Example:
        >>> q = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
        >>> k = torch.tensor([[[[1.0, 1.0], [3.0, 0.0]]]])
        >>> row_normalised(q, k)
        tensor([[[[0.2500, 0.7500],
                  [0.5000, 0.5000]]]])
    """
    n = q.shape[-2]
    if n > max_queries:
        gen = torch.Generator().manual_seed(SEED)
        rows = torch.randperm(n, generator=gen)[:max_queries].sort().values
        q = q[..., rows.to(q.device), :]
    a = q @ k.transpose(-2, -1)
    sums = a.sum(-1, keepdim=True)
    undefined = sums == 0
    a = torch.where(undefined, torch.ones_like(a), a)
    return a / torch.where(undefined, float(a.shape[-1]), sums)


@register(EfficientVit, EfficientVitLarge)
class EfficientVitMitAdapter(LayeredAdapter):
    """EfficientViT-MIT blocks across stages; linear attention formed for the analysis."""

    family = "efficientvit_mit"
    info = FamilyInfo(
        name="EfficientViT-MIT (linear attention)",
        examples=("efficientvit_b0", "efficientvit_l1"),
        measured="token metrics after every block; at LiteMLA blocks the implicit attention "
        f"relu(Q) relu(K)^T with rows normalised, formed for the analysis (above {MAX_QUERIES} "
        f"tokens on a subsample of query rows, seed {SEED}: attn_entropy only)",
        not_measured="attention at MBConv blocks (convolutions)",
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
    if not isinstance(block, EfficientVitBlock):
        return Layer(**common, no_pattern=NO_ATTENTION, no_mid=NO_ATTENTION)
    context = block.context_module
    mla = context.main
    return Layer(
        **common,
        mid=Tap(context, "output", nchw_tokens),
        attn_in=Tap(mla, "input", nchw_tokens),
        attn_out=Tap(mla, "output", nchw_tokens),
        pattern=Tap(mla, "input", lambda x, b: row_normalised(*linear_attention_qk(mla, x))),
    )
