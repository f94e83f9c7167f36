"""Fit a checkpoint's state dict to a timm model: the classifier sized from the checkpoint,
timm's checkpoint filter (position embeddings resampled), the block-count / distillation check,
AttnScale / FeatScale added when the checkpoint has them, and the key / shape check.

:mod:`vitspec.loading` builds the model and reads the file; what does not fit becomes one
:class:`~vitspec.errors.VitspecError` naming the keys and the file.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import timm
import torch
from torch import Tensor

from vitspec import scaling
from vitspec.checkpoints import key_list, short_reason
from vitspec.errors import VitspecError, option

__all__ = ["add_techniques", "fit"]

_ATTNSCALE_KEY = re.compile(r"blocks\.\d+\.attn\.lamb")
_FEATSCALE_KEY = re.compile(r"blocks\.\d+\.lamb[12]")


def _classifier_names(timm_name: str) -> tuple[str, ...]:
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except RuntimeError:
        cfg = None
    names = getattr(cfg, "classifier", None) or "head"
    return (names,) if isinstance(names, str) else tuple(names)


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


def fit(
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

    Args:
        sd: the checkpoint's state dict; path: its file (named in errors).
        timm_name, kwargs, seed: what ``create(timm_name, kwargs, seed)`` builds; ``kwargs``
            gets the classifier size.
        strict, featscale_form: as in :func:`vitspec.loading.load_model`.
        provenance: gets the filter, the resampling, notes and warnings (needs ``warnings``,
            ``notes`` and ``techniques_added`` lists).
        user_classes: the user set ``num_classes`` (a head made by the filter is not used).

    Example:
        >>> import timm
        >>> tiny = dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
        >>> make = lambda name, kw, seed: timm.create_model(name, **kw)
        >>> sd = make("deit_tiny_patch16_224", {**tiny, "num_classes": 5}, 0).state_dict()
        >>> prov = {"warnings": [], "notes": [], "techniques_added": []}
        >>> model, to_load = fit(sd, Path("w.pth"), "deit_tiny_patch16_224", dict(tiny), make,
        ...                      0, True, None, prov, False)
        >>> model.num_classes, len(to_load) == len(sd), prov["warnings"]
        (5, True, [])
    """
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

    add_techniques(model, sd, timm_name, featscale_form, provenance)
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


def add_techniques(model, sd, timm_name: str, form: str | None, provenance: dict) -> None:
    """Add AttnScale / FeatScale when ``sd`` has their parameters and ``model`` lacks them, and
    set the FeatScale form asked for; notes and warnings go into ``provenance``.

    Example:
        >>> import timm
        >>> m = timm.create_model("deit_tiny_patch16_224", depth=1, embed_dim=32, num_heads=2)
        >>> prov = {"warnings": [], "notes": [], "techniques_added": []}
        >>> add_techniques(m, {"blocks.0.attn.lamb": None}, "deit_tiny", None, prov)
        >>> prov["techniques_added"]
        ['attnscale']
    """
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
