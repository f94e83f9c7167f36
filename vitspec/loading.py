"""Load a timm model and its weights from local files only, with provenance.

Model names (aliases, timm names, the AttnScale / FeatScale names) and model creation live
here; reading the files is :mod:`vitspec.checkpoints`, fitting a checkpoint to the model (timm's
checkpoint filter, the key / shape check) :mod:`vitspec.fitting`. Every way a user's input can be
wrong (unknown name, missing, truncated or garbage file, an unknown layout, weights of another
architecture) becomes one :class:`~vitspec.errors.VitspecError` with a one-line message.

Nothing here downloads: models are always created with ``pretrained=False``, and "pretrained"
weights are only looked up in the local Hugging Face / torch hub caches (without network access;
the process environment, e.g. ``HF_HUB_OFFLINE``, is left as the user set it).
"""

from __future__ import annotations

import copy
import difflib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor

from vitspec import fitting, scaling  # scaling registers the AttnScale / FeatScale names
from vitspec.checkpoints import (
    check_file,
    file_sha256,
    find_cached_weights,
    key_list,
    read_checkpoint,
    short_reason,
)
from vitspec.errors import VitspecError, option

__all__ = [
    "ALIASES",
    "LoadedModel",
    "ModelCache",
    "check_checkpoint",
    "file_sha256",
    "find_cached_weights",
    "load_model",
    "read_checkpoint",
    "resolve_model_name",
]

ALIASES: dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "deit_small_distilled": "deit_small_distilled_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}

_FORBIDDEN_KWARGS = ("pretrained", "checkpoint_path")


@dataclass
class LoadedModel:
    """A model in eval mode on CPU (float32) plus where its weights came from.

    Attributes:
        model: the timm module, ``eval()``, on CPU, float32.
        name: the model name as the user gave it.
        timm_name: the resolved timm model name.
        checkpoint: checkpoint file name (basename) or ``'random-init'``.
        provenance: JSON-serialisable record (``checkpoint_path``, ``sha256``, ``format``,
            ``loaded_key``, ``seed``, ``warnings``, ``source``, ``techniques_added``, ``notes``
            (one-line messages for the user that are not warnings), ...).
    """

    model: torch.nn.Module
    name: str
    timm_name: str
    checkpoint: str
    provenance: dict = field(default_factory=dict)


def resolve_model_name(name: str) -> str:
    """Map an alias or a timm model name (optionally ``name.tag``) to the timm name.

    Example:
        >>> resolve_model_name("deit_small")
        'deit_small_patch16_224'
        >>> resolve_model_name("resnet18")
        'resnet18'
    """
    if not isinstance(name, str) or not name.strip():
        raise VitspecError(f"model name must be a non-empty string, got {name!r}")
    key = name.strip()
    if key in ALIASES:
        return ALIASES[key]
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    if timm.is_model(key):
        if "." in key:  # validate the pretrained tag, timm.is_model ignores it
            try:
                timm.models.get_pretrained_cfg(key)
            except RuntimeError:
                arch, tag = timm.models.split_model_name_tag(key)
                tags = [m for m in timm.list_models(arch, pretrained=True) if "." in m]
                raise VitspecError(
                    f"unknown pretrained tag '{tag}' for {arch}; known: {key_list(tags) or 'none'}"
                ) from None
        return key
    candidates = list(ALIASES) + timm.list_models()
    close = difflib.get_close_matches(key.lower(), candidates, n=3, cutoff=0.5)
    if close:
        raise VitspecError(f"unknown model '{key}'; closest: {', '.join(close)}")
    raise VitspecError(
        f"unknown model '{key}'; use an alias ({', '.join(ALIASES)}) or a timm.list_models() name"
    )


def check_weights(
    name: str,
    *,
    ckpt: str | Path | None = None,
    random_init: bool = False,
    model_kwargs: dict | None = None,
    img_size: int | None = None,
) -> tuple[str, dict]:
    """Validate the weight options without building anything; return the timm name and the
    ``timm.create_model`` keyword arguments (``img_size`` merged in).

    Example:
        >>> check_weights("deit_small", random_init=True, img_size=384)
        ('deit_small_patch16_224', {'img_size': 384})
    """
    timm_name = resolve_model_name(name)
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise VitspecError(f"{option('model_kwargs')} must be a dict, got {model_kwargs!r}")
    kwargs = dict(model_kwargs or {})
    bad = [k for k in _FORBIDDEN_KWARGS if k in kwargs]
    if bad:
        raise VitspecError(
            f"{option('model_kwargs')} may not set {', '.join(bad)}; pass "
            f"{option('ckpt')} to load weights"
        )
    if random_init and ckpt is not None:
        raise VitspecError(
            f"{option('random_init')} and {option('ckpt')} are mutually exclusive: pass one"
        )
    if ckpt is not None:
        check_file(ckpt)
    if img_size is not None:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise VitspecError(
                f"{option('img_size')} must be a whole number >= 1, got {img_size!r}"
            )
        if kwargs.get("img_size", img_size) != img_size:
            raise VitspecError(
                f"{option('img_size')} {img_size} contradicts "
                f"{option('model_kwargs', 'img_size=' + str(kwargs['img_size']))}"
            )
        kwargs["img_size"] = img_size
    return timm_name, kwargs


def _create(timm_name: str, kwargs: dict, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = timm.create_model(timm_name, pretrained=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - TypeError/AssertionError from bad kwargs
            raise VitspecError(
                f"cannot create {timm_name} with {option('model_kwargs')} {kwargs}: "
                f"{short_reason(exc)}"
            ) from None
    return model.float().cpu().eval()


def load_model(
    name: str,
    *,
    ckpt: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    ema: bool = False,
    strict: bool = True,
    model_kwargs: dict | None = None,
    featscale_form: str | None = None,
    trust_checkpoint: bool = False,
    img_size: int | None = None,
    cache: ModelCache | None = None,
) -> LoadedModel:
    """Create a timm model and load local weights into it (never downloads).

    Args:
        name: alias (``deit_small``) or timm model name.
        ckpt: local checkpoint file (see :func:`read_checkpoint` for layouts).
        random_init: use random weights (seeded with ``seed``); excludes ``ckpt``.
        seed: RNG seed for creating the model (random init, any head left unloaded).
        ema: load ``model_ema``/``state_dict_ema`` instead of the regular weights.
        strict: missing / unexpected / shape-mismatched keys raise; if False they become
            ``provenance['warnings']`` and only the fitting keys are loaded.
        model_kwargs: passed to ``timm.create_model`` (e.g. ``depth=24``, ``img_size=224``; a
            checkpoint's position embeddings are then resampled by timm's filter, recorded in
            ``provenance['pos_embed_resampled']`` and ``notes``).
        featscale_form: ``'doubled'`` or ``'single'`` FeatScale (see :mod:`vitspec.scaling`);
            None keeps a registered name's form and, for FeatScale found in a checkpoint loaded
            into a plain name, uses the authors' released form (doubled for DeiT / ViT, single
            for CaiT).
        img_size: build the model for ``img_size`` x ``img_size`` images (``img_size`` in
            ``model_kwargs``); a checkpoint's position embeddings are resampled to it.
        trust_checkpoint: allow full unpickling of a checkpoint that needs it (it can run code
            from the file; see :mod:`vitspec.checkpoints`); recorded in the provenance.
        cache: a :class:`ModelCache` to take the model from (built there once, a fresh copy
            each call) instead of building it; the result is the same.

    A checkpoint whose number of blocks differs from the model's, or a distilled checkpoint for a
    plain model, is refused (also with ``strict=False``): loading part of it would silently
    analyse another network.

    A checkpoint with AttnScale (``blocks.*.attn.lamb``) or FeatScale (``blocks.*.lamb1`` /
    ``lamb2``) parameters loaded into a model without them gets the technique added before the
    strict key check; ``provenance['techniques_added']`` and ``provenance['notes']`` say so.

    Without ``ckpt`` or ``random_init`` the weights must already be in the local HF / torch hub
    cache (:func:`find_cached_weights`).

    Example:
        >>> lm = load_model("deit_tiny", random_init=True,
        ...                 model_kwargs=dict(img_size=32, patch_size=8, depth=1, embed_dim=32,
        ...                                   num_heads=2))
        >>> lm.timm_name, lm.checkpoint, lm.model.training
        ('deit_tiny_patch16_224', 'random-init', False)
    """
    timm_name, kwargs = check_weights(
        name, ckpt=ckpt, random_init=random_init, model_kwargs=model_kwargs, img_size=img_size
    )
    scaling.check_featscale_form(featscale_form)
    create = cache.create if cache is not None else _create
    provenance: dict[str, Any] = {
        "source": None,
        "checkpoint_path": None,
        "sha256": None,
        "format": None,
        "loaded_key": None,
        "seed": seed,
        "warnings": [],
        "trusted_pickle": False,
        "stripped_prefix": None,
        "filter": None,
        "resampled": [],
        "pos_embed_resampled": None,
        "hub_location": None,
        "num_classes": None,
        "techniques_added": [],
        "notes": [],
    }
    if random_init:
        model = create(timm_name, kwargs, seed)
        fitting.add_techniques(model, {}, timm_name, featscale_form, provenance)
        provenance["source"] = "random-init"
        provenance["num_classes"] = getattr(model, "num_classes", None)
        return LoadedModel(model, name, timm_name, "random-init", provenance)

    if ckpt is None:
        found = find_cached_weights(timm_name)
        if found is None:
            raise VitspecError(
                f"no local weights for {timm_name}: pass --ckpt FILE or --random-init"
            )
        path, location = found
        provenance["source"] = "hub-cache"
        provenance["hub_location"] = location
        provenance["notes"].append(f"weights from the local hub cache: {location} ({path})")
    else:
        path = check_file(ckpt)
        provenance["source"] = "file"

    sd, info = read_checkpoint(path, ema=ema, trust=trust_checkpoint)
    provenance.update(info)
    if info["trusted_pickle"]:
        provenance["warnings"].append(
            f"{path.name} was read with full unpickling ({option('trust_checkpoint', 'True')}): "
            "it could run code from the file"
        )
    provenance["checkpoint_path"] = os.path.abspath(path)
    provenance["sha256"] = file_sha256(path)
    model, to_load = fitting.fit(
        sd,
        path,
        timm_name,
        kwargs,
        create,
        seed,
        strict,
        featscale_form,
        provenance,
        user_classes="num_classes" in (model_kwargs or {}),
    )
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    model.float().cpu().eval()
    provenance["num_classes"] = int(kwargs["num_classes"])
    return LoadedModel(model, name, timm_name, path.name, provenance)


def check_checkpoint(
    name: str,
    ckpt: str | Path,
    *,
    cache: ModelCache,
    seed: int = 0,
    ema: bool = False,
    strict: bool = True,
    model_kwargs: dict | None = None,
    featscale_form: str | None = None,
    trust_checkpoint: bool = False,
    img_size: int | None = None,
) -> None:
    """Every check :func:`load_model` makes on ``ckpt`` (readable, safe to unpickle, EMA entry,
    block count, keys and shapes after timm's filter, techniques), without loading the weights:
    a bad file among several fails before any of them is analysed. Tensors are memory-mapped
    where the format allows, so only what the checks touch is read; the model comes from
    ``cache`` (built there once), as a copy on the meta device (shapes, no data), asked again
    with a real copy when the meta copy finds a problem (a filter that reads the model's values
    fails there), so the verdict is that of :func:`load_model`.

    Example:
        >>> import tempfile, timm, torch
        >>> tiny = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
        >>> f = tempfile.NamedTemporaryFile(suffix=".pth", delete=False).name
        >>> torch.save(timm.create_model("deit_tiny_patch16_224", **tiny).state_dict(), f)
        >>> check_checkpoint("deit_tiny", f, cache=ModelCache(), model_kwargs=tiny) is None
        True
    """
    timm_name, kwargs = check_weights(name, ckpt=ckpt, model_kwargs=model_kwargs, img_size=img_size)
    scaling.check_featscale_form(featscale_form)
    path = check_file(ckpt)
    sd, _ = read_checkpoint(path, ema=ema, trust=trust_checkpoint, mmap=True)
    for meta in (True, False):
        try:
            fitting.fit(
                sd,
                path,
                timm_name,
                dict(kwargs),
                functools.partial(cache.create, meta=meta),
                seed,
                strict,
                featscale_form,
                {"warnings": [], "notes": [], "techniques_added": []},
                user_classes="num_classes" in (model_kwargs or {}),
            )
            return
        except Exception:  # noqa: BLE001 - the real copy's verdict (or error) stands
            if not meta:
                raise


class ModelCache:
    """Models built once and handed out as copies.

    ``timm.create_model`` (module construction and weight initialisation, the expensive part)
    runs once per architecture, name, arguments and seed; every caller gets a deep copy of
    that fresh model, so nothing (techniques added, loaded or left-random weights, buffers,
    hooks) carries over from one checkpoint to the next, and each copy equals a fresh build.

    Example:
        >>> cache = ModelCache()
        >>> a = cache.create("deit_tiny_patch16_224", {"depth": 1}, 0)
        >>> b = cache.create("deit_tiny_patch16_224", {"depth": 1}, 0)
        >>> a is not b and torch.equal(a.pos_embed, b.pos_embed), cache.builds
        (True, 1)
    """

    def __init__(self) -> None:
        self._built: dict[str, torch.nn.Module] = {}

    @property
    def builds(self) -> int:
        """How many models were built."""
        return len(self._built)

    def create(
        self, timm_name: str, kwargs: dict, seed: int, meta: bool = False
    ) -> torch.nn.Module:
        """A fresh ``timm_name`` model with ``kwargs``, initialised with ``seed``; with
        ``meta``, its parameters and buffers on the meta device (shapes only, no copy)."""
        key = repr((timm_name, sorted(kwargs.items()), seed))
        if key not in self._built:
            self._built[key] = _create(timm_name, kwargs, seed)
        built = self._built[key]
        memo: dict[int, Tensor] = {}
        if meta:
            for t in [*built.parameters(), *built.buffers()]:
                twin = torch.empty_like(t, device="meta")
                if isinstance(t, torch.nn.Parameter):
                    twin = torch.nn.Parameter(twin, requires_grad=t.requires_grad)
                memo[id(t)] = twin
        return copy.deepcopy(built, memo)
