"""timm ``VisionTransformer`` and the models built like it (DeiT, distilled DeiT, register ViTs)."""

from __future__ import annotations

from torch import nn

from vitspec.adapters.base import Adapter


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def match(model: nn.Module) -> Adapter | None:
    """An adapter for models with ``blocks[i].attn.attn_drop`` and a ``patch_embed``; else None."""
    blocks = getattr(model, "blocks", None)
    patch_embed = getattr(model, "patch_embed", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        return None
    if patch_embed is None or not hasattr(patch_embed, "patch_size"):
        return None
    attns = [getattr(b, "attn", None) for b in blocks]
    if not any(a is not None and hasattr(a, "attn_drop") for a in attns):
        return None
    return Adapter(
        family="vit",
        blocks=list(blocks),
        num_prefix=int(getattr(model, "num_prefix_tokens", 1)),
        attn_modules=[a if hasattr(a, "fused_attn") else None for a in attns],
        attn_taps=[getattr(a, "attn_drop", None) for a in attns],
        branch_taps=[getattr(b, "drop_path1", None) for b in blocks],
        patch_size=_pair(patch_embed.patch_size),
        pre_attn_taps=[getattr(a, "attn_scale", None) for a in attns],
    )
