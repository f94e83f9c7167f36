"""Checkpoint files: read every supported layout from local disk, with one clear error per mistake.

This is the only module that opens checkpoint files. Supported: a plain state dict, ``{'model':
sd}`` (DeiT / FB training checkpoints), ``{'state_dict': sd}`` (timm's train.py), ``module.`` /
``_orig_mod.`` prefixes, ``.safetensors`` (recognised by content too), and training checkpoints
with EMA weights (``model_ema`` / ``state_dict_ema``), of which the regular weights are read
unless ``ema=True``. Weights already in the local Hugging Face / torch hub caches are found by
:func:`find_cached_weights`; nothing is ever downloaded.

Checkpoints are read with ``torch.load(weights_only=True)``, which runs no code from the file,
with an allow-list of the plain types that training scripts store beside the weights
(:data:`SAFE_GLOBALS`: ``argparse.Namespace`` in DeiT / timm / AttnScale training checkpoints,
numpy scalars, arrays and dtypes in their metrics, ``pathlib`` paths). Anything else (a pickled
``nn.Module`` from ``torch.save(model)``, custom classes) needs full unpickling, which can run
arbitrary code: it is refused, naming the type, unless the caller trusts the file
(``trust_checkpoint=True`` / ``--trust-checkpoint``); ``info['trusted_pickle']`` records it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import timm
import torch
from torch import Tensor

from vitspec.errors import VitspecError, option

__all__ = ["SAFE_GLOBALS", "file_sha256", "find_cached_weights", "read_checkpoint"]

# Wrapper keys of training checkpoints: (regular weights, EMA weights). DeiT / FB checkpoints use
# 'model' / 'model_ema'; timm's train.py uses 'state_dict' / 'state_dict_ema'.
_WRAPPERS = (("model", "model_ema", "model"), ("state_dict", "state_dict_ema", "state_dict_key"))


_EMA_KEYS = ("model_ema", "state_dict_ema")


_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


_MAX_LISTED = 8


def _numpy_globals() -> list:
    """numpy's scalar / array reconstructors and dtype classes (numpy 1.x and 2.x spellings)."""
    names = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            mod = __import__(module, fromlist=["scalar", "_reconstruct"])
        except ImportError:
            continue
        names += [mod.scalar, mod._reconstruct]
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [*names, np.dtype, np.ndarray, *dtypes]


# Plain, code-free types that training scripts save beside the weights (see the module docstring).
SAFE_GLOBALS = [
    argparse.Namespace,
    pathlib.Path,
    pathlib.PosixPath,
    pathlib.PurePosixPath,
    pathlib.WindowsPath,
    pathlib.PureWindowsPath,
    *_numpy_globals(),
]


def _one_line(text: str, limit: int = 160) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_reason(exc: BaseException) -> str:
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "WeightsUnpickler error:" in msg:
        tail = msg.split("WeightsUnpickler error:", 1)[1]
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        msg = lines[0] if lines else "unpickling failed"
    else:
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        msg = lines[0] if lines else ""
        msg = msg.split(". ", 1)[0].rstrip(".")
    if isinstance(exc, EOFError):
        msg = "file is empty or truncated" + (f" ({msg})" if msg else "")
    return _one_line(f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__, 200)


def key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (", ..." if len(keys) > _MAX_LISTED else "")


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise VitspecError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise VitspecError(f"checkpoint is a directory, not a file: {p}")
    return p


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    try:  # sniff: 8-byte little-endian header length followed by a JSON object
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 27


def _torch_load(path: Path, trust: bool, mmap: bool = False) -> tuple[Any, bool]:
    """``torch.load`` without running code from the file (allow-list), or fully when trusted;
    also return whether full unpickling was used. ``mmap``: map the tensors of a zip-format
    file instead of reading them (the legacy format is read)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    lazy = {"mmap": True} if mmap and magic.startswith(b"PK") else {}

    def fail(exc: Exception) -> VitspecError:
        reason = short_reason(exc)
        if magic.startswith(b"PK"):
            reason += " (truncated or corrupt file?)"
        elif magic and not magic.startswith(b"\x80"):  # neither zip nor legacy torch pickle
            reason = f"not a PyTorch or safetensors file ({reason})"
        return VitspecError(f"cannot read checkpoint {path}: {reason}")

    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, **lazy), False
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):
            raise fail(exc) from None
        offending = _unsupported_global(str(exc))
    except Exception as exc:  # noqa: BLE001 - corrupt zip, EOF, ...
        raise fail(exc) from None
    if not trust:
        raise VitspecError(
            f"checkpoint {path} needs full unpickling, which can run code from the file: it "
            f"holds {offending}; if you trust the file, pass {option('trust_checkpoint', 'True')}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False, **lazy), True
    except Exception as exc:  # noqa: BLE001
        raise fail(exc) from None


def _unsupported_global(message: str) -> str:
    """The type named by torch's 'Unsupported global: GLOBAL a.b.C' message."""
    found = re.search(r"GLOBAL ([\w.]+)", re.sub(r"\x1b\[[0-9;]*m", "", message))
    return f"a {found.group(1)}" if found else "a type that is not plain data"


def _as_tensor_dict(obj: Any) -> dict[str, Tensor] | None:
    """A {str: Tensor} dict from a state dict or module, or None if obj is not one."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not obj:
        return None
    if all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return dict(obj)
    return None


def _top_keys(obj: Mapping) -> str:
    return key_list([str(k) for k in obj]) or "none"


def read_checkpoint(
    path: str | Path, *, ema: bool = False, trust: bool = False, mmap: bool = False
) -> tuple[dict[str, Tensor], dict]:
    """Read a local checkpoint file into a flat state dict.

    Layouts: a plain state dict; ``{'model': sd, ...}`` (DeiT / FB training checkpoints, with
    optional ``'model_ema'``); ``{'state_dict': sd, ...}`` (timm train.py, with optional
    ``'state_dict_ema'``); a pickled ``nn.Module``; ``.safetensors``. ``module.`` and
    ``_orig_mod.`` key prefixes are stripped. Regular weights are returned unless ``ema=True``
    (unlike timm's ``load_state_dict``, which silently prefers EMA weights). Files that need
    full unpickling (a pickled module, custom classes) are refused unless ``trust=True``.
    ``mmap=True`` maps the tensors of a zip-format ``torch.save`` file instead of reading them
    (for checks that need keys and shapes only).

    Returns:
        ``(state_dict, info)`` with info keys ``format`` ('state_dict' | 'model' |
        'state_dict_key' | 'safetensors' | 'pickled_module'), ``loaded_key`` (None or the
        top-level key read), ``trusted_pickle`` (read with full unpickling) and
        ``stripped_prefix``.

    Example:
        >>> import tempfile, torch
        >>> f = tempfile.NamedTemporaryFile(suffix=".pth", delete=False).name
        >>> torch.save({"model": {"module.w": torch.zeros(2)}, "epoch": 3}, f)
        >>> sd, info = read_checkpoint(f)
        >>> list(sd), info["format"], info["loaded_key"]
        (['w'], 'model', 'model')
    """
    path = check_file(path)
    info: dict[str, Any] = {
        "format": None,
        "loaded_key": None,
        "trusted_pickle": False,
        "stripped_prefix": None,
    }
    if path.suffix == ".npz":
        raise VitspecError(
            f"cannot read checkpoint {path}: .npz (JAX) files are not supported; "
            "use a .pth/.bin/.safetensors file"
        )
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
            raise VitspecError(f"cannot read checkpoint {path}: {short_reason(exc)}") from None
        if ema:
            raise VitspecError(
                f"checkpoint {path} is a safetensors state dict with no EMA weights "
                f"(ema needs a '{_EMA_KEYS[0]}' or '{_EMA_KEYS[1]}' entry)"
            )
        info["format"] = "safetensors"
    else:
        obj, info["trusted_pickle"] = _torch_load(path, trust, mmap)
        sd, fmt, key = _unwrap(obj, path, ema)
        info["format"], info["loaded_key"] = fmt, key
    if not sd:
        raise VitspecError(f"checkpoint {path} holds no tensors")
    sd, stripped = _strip_prefixes(sd)
    info["stripped_prefix"] = stripped
    return sd, info


def _unwrap(obj: Any, path: Path, ema: bool) -> tuple[dict[str, Tensor], str, str | None]:
    if isinstance(obj, torch.nn.Module):
        if ema:
            raise VitspecError(f"checkpoint {path} is a pickled model with no EMA weights")
        return obj.state_dict(), "pickled_module", None
    if not isinstance(obj, Mapping):
        raise VitspecError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state dict or a dict with "
            "'model'/'state_dict'"
        )
    if ema:
        for _regular, ema_key, fmt in _WRAPPERS:
            if ema_key in obj:
                sd = _as_tensor_dict(obj[ema_key])
                if sd is None:
                    raise VitspecError(
                        f"checkpoint {path}: '{ema_key}' is not a state dict of tensors"
                    )
                return sd, fmt, ema_key
        raise VitspecError(
            f"checkpoint {path} has no EMA weights ('model_ema'/'state_dict_ema'); "
            f"top-level keys: {_top_keys(obj)}"
        )
    for regular, _ema_key, fmt in _WRAPPERS:
        if regular in obj and not isinstance(obj[regular], Tensor):
            sd = _as_tensor_dict(obj[regular])
            if sd is None:
                raise VitspecError(f"checkpoint {path}: '{regular}' is not a state dict of tensors")
            return sd, fmt, regular
    sd = _as_tensor_dict(obj)
    if sd is not None:
        return sd, "state_dict", None
    hint = ""
    if any(k in obj for k in _EMA_KEYS):
        hint = " (only EMA weights found: use --ema / ema=True)"
    raise VitspecError(
        f"checkpoint {path} has an unknown layout: expected a state dict or a 'model'/"
        f"'state_dict' entry; top-level keys: {_top_keys(obj)}{hint}"
    )


def _strip_prefixes(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], str | None]:
    stripped = []
    for prefix in _STRIP_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
            stripped.append(prefix)
    return sd, ("".join(stripped) or None)


def _hf_cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default


def find_cached_weights(timm_name: str) -> tuple[Path, str] | None:
    """Find already-downloaded weights for a timm model without touching the network.

    Looks in the Hugging Face cache (``hf_hub_id`` of the pretrained cfg; ``model.safetensors``
    then ``pytorch_model.bin``) and in ``torch.hub.get_dir()/checkpoints`` (the cfg's ``url``).

    Returns:
        ``(path, location)`` where location is the hub repo id or url, or None.
    """
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except RuntimeError:
        cfg = None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        if ":" in repo:  # tolerate 'org/name:revision'
            repo, _, revision = repo.partition(":")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        names += [n for n in ("model.safetensors", "pytorch_model.bin") if n not in names]
        for filename in names:
            try:
                found = try_to_load_from_cache(
                    repo, filename, cache_dir=_hf_cache_dir(), revision=revision or None
                )
            except Exception:  # noqa: BLE001 - malformed ids / cache: treat as not cached
                found = None
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found), f"hf-hub:{cfg.hf_hub_id}/{filename}"
    if cfg.url:
        base = os.path.basename(urlparse(cfg.url).path)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / base
        if base and not base.endswith(".npz") and cached.is_file():
            return cached, cfg.url
    if cfg.file and not str(cfg.file).endswith(".npz") and os.path.isfile(cfg.file):
        return Path(cfg.file), str(cfg.file)
    return None
