"""The adapter interface every model family implements."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class Adapter:
    """Where to read tokens and attention in one model.

    Attributes:
        family: short family name, e.g. ``"vit"``.
        blocks: the transformer blocks in execution order (layer l is ``blocks[l - 1]``).
        num_prefix: prefix tokens before the patch grid (class, distillation, register tokens).
        attn_modules: per block, the module with a ``fused_attn`` switch (timm's ``Attention``).
        attn_taps: per block, the module whose forward *input* is the post-softmax attention
            ``[B, H, N, N]`` (timm's ``attn_drop``); ``None`` where the block has none.
        branch_taps: per block, the module whose output is the attention branch added to the
            residual stream (for the ``mid`` site); ``None`` where the block has none.
        patch_size: the patch embedding's (ph, pw), used to find the runtime grid.
        pre_attn_taps: per block, the module whose forward *input* is the pre-scale attention
            ``A`` of a block with AttnScale (``attn.attn_scale``, see :mod:`vitspec.scaling`);
            ``None`` where the block has no AttnScale. Empty: no block has one.
    """

    family: str
    blocks: list[nn.Module]
    num_prefix: int
    attn_modules: list[nn.Module | None]
    attn_taps: list[nn.Module | None]
    branch_taps: list[nn.Module | None]
    patch_size: tuple[int, int]
    pre_attn_taps: list[nn.Module | None] = field(default_factory=list)

    @property
    def has_pre_attention(self) -> bool:
        """True when some block has AttnScale (a pre-scale attention to observe)."""
        return any(t is not None for t in self.pre_attn_taps)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (h, w) for an input image of size ``image_hw``."""
        return image_hw[0] // self.patch_size[0], image_hw[1] // self.patch_size[1]
