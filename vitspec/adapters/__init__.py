"""Model adapters: what each family lets a run observe (see docs/adapters.md).

Adding a family is adding a module ``vitspec/adapters/<family>.py`` that defines an
:class:`Adapter` subclass decorated with :func:`register`; every module of this package is
imported on the first :func:`get_adapter` call, nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from torch import nn

from vitspec.adapters.base import (
    Adapter,
    AttentionWeights,
    FamilyInfo,
    Geometry,
    Tap,
    flatten_nhwc,
    pair,
    split_windows,
)
from vitspec.errors import VitspecError

_BY_CLASS: dict[str, type[Adapter]] = {}  # "module.QualName" of a model class -> adapter
_STRUCTURAL: list[type[Adapter]] = []
_LOADED = False


def register(*classes: type | str, structural: bool = False) -> Callable:
    """Class decorator: use this adapter for models of ``classes`` (and their subclasses).

    Args:
        classes: model classes, or their ``"module.QualName"`` strings for optional
            dependencies (e.g. ``"transformers.models.vit.modeling_vit.ViTModel"``).
        structural: also ask the adapter's ``matches(model)`` for unregistered classes.

    Example:
        >>> class Toy(nn.Module): ...
        >>> @register(Toy)
        ... class ToyAdapter(Adapter):
        ...     family = "toy"
        >>> type(get_adapter(Toy())).__name__
        'ToyAdapter'
        >>> _ = _BY_CLASS.pop(_qualname(Toy))
    """

    def decorator(adapter: type[Adapter]) -> type[Adapter]:
        for cls in classes:
            key = cls if isinstance(cls, str) else _qualname(cls)
            old = _BY_CLASS.get(key)
            if old is not None and old is not adapter:
                raise VitspecError(f"{key} already has the adapter {old.__name__}")
            _BY_CLASS[key] = adapter
        if structural and adapter not in _STRUCTURAL:
            _STRUCTURAL.append(adapter)
        return adapter

    return decorator


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_families() -> None:
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True


def adapter_classes() -> list[type[Adapter]]:
    """Every registered adapter class, sorted by family name (the README table's rows)."""
    _load_families()
    found = {*_BY_CLASS.values(), *_STRUCTURAL}
    return sorted(found, key=lambda a: a.family)


def get_adapter(model: nn.Module, name: str | None = None) -> Adapter:
    """The adapter for ``model``: by its class (nearest registered base class), else the one
    structural adapter that matches; a one-line error otherwise.

    Example:
        >>> import timm
        >>> get_adapter(timm.create_model("vit_tiny_patch16_224", depth=2)).depth
        2
    """
    _load_families()
    for cls in type(model).__mro__:
        adapter = _BY_CLASS.get(_qualname(cls))
        if adapter is not None:
            return adapter(model)
    found = [a for a in _STRUCTURAL if a.matches(model)]
    if len(found) == 1:
        return found[0](model)
    label = name or type(model).__name__
    if found:
        raise VitspecError(
            f"{label} matches several adapters ({', '.join(a.__name__ for a in found)}); "
            "register one for its class"
        )
    raise VitspecError(
        f"{label} has no adapter: vitspec analyses vision transformers (the families in the "
        "README's table and models built like timm's VisionTransformer)"
    )


__all__ = [
    "Adapter",
    "AttentionWeights",
    "FamilyInfo",
    "Geometry",
    "Tap",
    "adapter_classes",
    "flatten_nhwc",
    "get_adapter",
    "pair",
    "register",
    "split_windows",
]
