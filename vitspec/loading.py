"""Load a timm model and its weights from local files only, with provenance.

Model names (aliases, timm names, the AttnScale / FeatScale names), model creation, timm's
checkpoint filter and the key / shape check live here; reading the files is
:mod:`vitspec.checkpoints`. Every way a user's input can be wrong (unknown name, missing,
truncated or garbage file, an unknown layout, weights of another architecture) becomes one
:class:`~vitspec.errors.VitspecError` with a one-line message.

Nothing here downloads: models are always created with ``pretrained=False``, and "pretrained"
weights are only looked up in the local Hugging Face / torch hub caches (without network access;
the process environment, e.g. ``HF_HUB_OFFLINE``, is left as the user set it).
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor

from vitspec import scaling  # registers the AttnScale / FeatScale model names with timm
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
_ATTNSCALE_KEY = re.compile(r"blocks\.\d+\.attn\.lamb")
_FEATSCALE_KEY = re.compile(r"blocks\.\d+\.lamb[12]")


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


def _classifier_names(timm_name: str) -> tuple[str, ...]:
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except RuntimeError:
        cfg = None
    names = getattr(cfg, "classifier", None) or "head"
    return (names,) if isinstance(names, str) else tuple(names)


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


def _filter_fn(timm_name: str, model: torch.nn.Module):
    arch = timm.models.split_model_name_tag(timm_name)[0]
    modules = []
    if timm.models.is_model(arch):
        modules.append(sys.modules.get(timm.models.model_entrypoint(arch).__module__))
    modules.append(sys.modules.get(type(model).__module__))
    for mod in modules:
        fn = getattr(mod, "checkpoint_filter_fn", None)
        if callable(fn):
            return fn
    return None


def _apply_filter(sd, model, timm_name, path) -> tuple[dict[str, Tensor], str | None, dict]:
    """Run the model module's ``checkpoint_filter_fn``; also return {key: note} of reshaped keys."""
    fn = _filter_fn(timm_name, model)
    if fn is None:
        return sd, None, {}
    kwargs = {}
    if "adapt_layer_scale" in inspect.signature(fn).parameters:
        kwargs["adapt_layer_scale"] = True  # as timm's deit builder does (gamma_1 -> ls1.gamma)
    try:
        out = fn(dict(sd), model, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise VitspecError(
            f"checkpoint does not fit {timm_name}: timm's checkpoint filter failed "
            f"({short_reason(exc)}); file: {path}"
        ) from None
    changed = {
        k: f"{k} {_shape(sd[k])} -> {_shape(v)}"
        for k, v in out.items()
        if k in sd and isinstance(v, Tensor) and v.shape != sd[k].shape
    }
    return dict(out), f"{fn.__module__}.{fn.__name__}", changed


def _shape(t: Tensor) -> str:
    return "[" + ",".join(str(s) for s in t.shape) + "]"


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
        _add_techniques(model, {}, timm_name, featscale_form, provenance)
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
    model, to_load = _fit(
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
            _fit(
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


def _fit(
    sd: dict[str, Tensor],
    path: Path,
    timm_name: str,
    kwargs: dict,
    create,
    seed: int,
    strict: bool,
    featscale_form: str | None,
    provenance: dict,
    user_classes: bool,
) -> tuple[torch.nn.Module, dict[str, Tensor]]:
    """Build the model ``sd`` fits (classifier sized from it, techniques it has added), run the
    architecture, filter and key / shape checks, and return the model and the keys to load.
    ``kwargs`` gets the classifier size; notes and warnings go into ``provenance``."""
    warnings: list[str] = provenance["warnings"]

    # Size the classifier from the checkpoint (or drop the checkpoint's head if told otherwise).
    classifiers = _classifier_names(timm_name)
    head_prefixes = tuple(f"{c}." for c in classifiers)
    head_key = next((f"{c}.weight" for c in classifiers if f"{c}.weight" in sd), None)
    ckpt_classes = int(sd[head_key].shape[0]) if head_key else 0
    head_tolerated = False
    if "num_classes" not in kwargs:
        kwargs["num_classes"] = ckpt_classes
    elif int(kwargs["num_classes"]) != ckpt_classes:
        sd = {k: v for k, v in sd.items() if not k.startswith(head_prefixes)}
        head_tolerated = True
        warnings.append(
            f"checkpoint head has {ckpt_classes} classes but num_classes="
            f"{kwargs['num_classes']} was requested: checkpoint head dropped"
            + ("" if int(kwargs["num_classes"]) == 0 else ", classifier left at random init")
        )

    model = create(timm_name, kwargs, seed)
    _check_architecture(sd, model, timm_name)
    raw_sd = sd
    sd, filter_name, resampled = _apply_filter(raw_sd, model, timm_name, path)
    if head_key is None and not head_tolerated and not user_classes:
        # the filter may have produced the head from foreign key names (e.g. OpenCLIP)
        late = next((f"{c}.weight" for c in classifiers if f"{c}.weight" in sd), None)
        if late is not None:
            kwargs["num_classes"] = int(sd[late].shape[0])
            model = create(timm_name, kwargs, seed)
            sd, filter_name, resampled = _apply_filter(raw_sd, model, timm_name, path)
    provenance["filter"] = filter_name
    # Resampling pos_embed to another image size is routine; anything else the filter reshaped
    # (e.g. patch_embed.proj.weight for another patch size) means a different architecture.
    provenance["resampled"] = [note for k, note in resampled.items() if "pos_embed" in k]
    if "pos_embed" in resampled:
        provenance["pos_embed_resampled"] = _pos_embed_note(raw_sd, sd, model)
        provenance["notes"].append(provenance["pos_embed_resampled"]["note"])
    reshaped = [note for k, note in resampled.items() if "pos_embed" not in k]

    _add_techniques(model, sd, timm_name, featscale_form, provenance)
    model_sd = model.state_dict()
    missing = [k for k in model_sd if k not in sd]
    if head_tolerated:
        missing = [k for k in missing if not k.startswith(head_prefixes)]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [k for k in sd if k in model_sd and sd[k].shape != model_sd[k].shape]
    problems = []
    if reshaped:
        problems.append(f"{len(reshaped)} resampled by timm's filter ({key_list(reshaped)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({key_list(unexpected)})")
    if missing:
        problems.append(f"{len(missing)} missing ({key_list(missing)})")
    if mismatched:
        shown = [f"{k} {_shape(sd[k])} vs model {_shape(model_sd[k])}" for k in mismatched]
        problems.append(f"{len(mismatched)} shape mismatches ({key_list(shown)})")
    skip = set(mismatched)
    to_load = {k: v for k, v in sd.items() if k in model_sd and k not in skip}
    if problems and (strict or not to_load):
        hint = " (--non-strict / strict=False loads the matching keys)"
        if not to_load:
            hint = "; no key matches the model"
        raise VitspecError(
            f"checkpoint does not fit {timm_name}: {', '.join(problems)}; file: {path.name}{hint}"
        )
    if problems:
        warnings.extend(f"strict=False: {p}" for p in problems)
    return model, to_load


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def _block_count(keys) -> int:
    return 1 + max((int(m.group(1)) for k in keys if (m := _BLOCK_KEY.match(k))), default=-1)


def _check_architecture(sd: dict[str, Tensor], model: torch.nn.Module, timm_name: str) -> None:
    """Refuse a checkpoint of another depth, or a distilled one for a plain model (whole blocks
    or tokens would be dropped or left random, also with strict=False)."""
    have, want = _block_count(sd), _block_count(model.state_dict())
    if have and want and have != want:
        raise VitspecError(
            f"checkpoint has {have} blocks, {timm_name} has {want}: pass "
            f"{option('model_kwargs', f'depth={have}')}"
        )
    if "dist_token" in sd and not hasattr(model, "dist_token"):
        distilled = timm_name.replace("_patch", "_distilled_patch", 1)
        use = (
            distilled
            if distilled != timm_name and timm.is_model(distilled)
            else "its distilled model"
        )
        raise VitspecError(
            f"checkpoint is a distilled model (dist_token, head_dist) but {timm_name} is not: "
            f"use {use}"
        )


def _pos_embed_note(raw_sd: dict, sd: dict, model: torch.nn.Module) -> dict:
    """How timm's filter resampled the position embedding: grids before and after, method."""
    prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)

    def grid(t: Tensor) -> list[int]:
        side = round((t.shape[1] - prefix) ** 0.5)
        return [side, side] if side * side == t.shape[1] - prefix else [t.shape[1] - prefix]

    before, after = grid(raw_sd["pos_embed"]), grid(sd["pos_embed"])
    method = "timm.layers.resample_abs_pos_embed (bicubic, antialias), prefix tokens kept"
    shape = "x".join(map(str, before)), "x".join(map(str, after))
    return {
        "from": before,
        "to": after,
        "method": method,
        "note": f"the checkpoint's position embeddings were resampled from {shape[0]} to "
        f"{shape[1]} ({method})",
    }


def _add_techniques(model, sd, timm_name: str, form: str | None, provenance: dict) -> None:
    """Add AttnScale / FeatScale when ``sd`` has their parameters and ``model`` lacks them, and
    set the FeatScale form asked for; notes and warnings go into ``provenance``."""
    have = scaling.techniques(model)
    added, notes = provenance["techniques_added"], provenance["notes"]
    try:
        if not have["attnscale"] and any(_ATTNSCALE_KEY.fullmatch(k) for k in sd):
            scaling.add_attnscale(model)
            added.append("attnscale")
            notes.append(
                "checkpoint has AttnScale parameters (blocks.*.attn.lamb): added "
                f"AttnScale to {timm_name}"
            )
        if have["featscale"] is None and any(_FEATSCALE_KEY.fullmatch(k) for k in sd):
            chosen = form or scaling.default_featscale_form(model)
            scaling.add_featscale(model, doubled=chosen == "doubled")
            added.append("featscale")
            gains = (
                "gains 1+2s, 1+2t as the released DeiT code"
                if chosen == "doubled"
                else "gains 1+s, 1+t"
            )
            notes.append(
                "checkpoint has FeatScale parameters (blocks.*.lamb1/lamb2): added "
                f"FeatScale to {timm_name}, {chosen} form ({gains}"
                f"{'' if form else '; --featscale-form to change'})"
            )
            return
    except VitspecError as err:
        raise VitspecError(f"checkpoint has AttnScale/FeatScale parameters but {err}") from None
    if form is not None and have["featscale"] is not None:
        scaling.add_featscale(model, doubled=form == "doubled")
    elif form is not None:
        provenance["warnings"].append(
            f"featscale_form={form!r} ignored: {timm_name} has no "
            "FeatScale and the checkpoint no blocks.*.lamb1/lamb2"
        )
