"""Model adapters: which modules are the blocks, where attention is formed, prefix tokens, grid.

Adding a model family is adding a module here with a ``match(model) -> Adapter | None`` function
and listing it in ``_FAMILIES``; nothing downstream changes.
"""

from __future__ import annotations

from torch import nn

from vitspec.adapters import cait, vit
from vitspec.adapters.base import Adapter
from vitspec.errors import VitspecError

_FAMILIES = (cait, vit)  # cait first: vit.match would also accept a Cait, with the wrong prefix


def get_adapter(model: nn.Module, name: str | None = None) -> Adapter:
    """The adapter for ``model``; a one-line error for models without attention blocks.

    Example:
        >>> import timm
        >>> get_adapter(timm.create_model("vit_tiny_patch16_224", depth=2)).depth
        2
    """
    for family in _FAMILIES:
        adapter = family.match(model)
        if adapter is not None:
            return adapter
    label = name or type(model).__name__
    raise VitspecError(
        f"{label} has no transformer blocks with self-attention (model.blocks[i].attn): vitspec "
        "analyses vision transformers (ViT, DeiT and timm models built like them)"
    )


__all__ = ["Adapter", "get_adapter"]
