"""Fold the shards of one analysis (or verify run) into the folder one process would have written.

``vitspec merge DIR... --out DIR`` reads shard folders (``analyze --shard K/N``, or
``verify --shard K/N``: :mod:`vitspec.verification.merge`);
:func:`gather_ranks` does the same in memory under ``torchrun`` (the ranks' fixed-size states
are gathered once, to rank 0). Shards of different models, checkpoints, options or image
selections, overlapping shards and incomplete sets are refused with one line naming the
difference.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vitspec.collect import PRE, Collector, rows
from vitspec.errors import VitspecError
from vitspec.metrics import get_metric, list_metrics
from vitspec.outputs import read_info
from vitspec.results import METRIC_COLUMNS, SPECTRA_COLUMNS, Result, moments_frame, validate
from vitspec.shards import collector_state, load_state

__all__ = [
    "check_shards",
    "distributed_device",
    "gather_ranks",
    "merge_parts",
    "merge_runs",
    "merged_info",
]

# run.json fields every shard of one run shares (dotted paths)
SAME = (
    "vitspec",
    "model",
    "timm_name",
    "checkpoint",
    "weights.sha256",
    "weights.seed",
    "weights.loaded_key",
    "random_init",
    "family",
    "depth",
    "sites",
    "metrics",
    "images.source",
    "images.requested",
    "images.sample",
    "images.sample_seed",
    "batch_size",
    "shard.count",
    "dtype",
)
# run.json fields of the images' geometry, compared among the shards that saw images (a shard
# without a batch has none)
GEOMETRY = ("grid",)


# the manifest of each command whose shards merge
MANIFESTS = {"run.json": "analyze", "verify.json": "verify"}


def merge_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
):
    """Merge shard folders into one run (written to ``out`` when given): a :class:`Result`
    for ``analyze --shard`` folders, a :class:`~vitspec.verification.VerifyResult` for
    ``verify --shard`` folders (the two kinds do not mix).

    Example:
        >>> merge_runs(["runs/s0", "runs/s1"], "runs/all")  # doctest: +SKIP
    """
    if len(run_dirs) < 1:
        raise VitspecError("merge needs the shard folders (analyze or verify --shard K/N outputs)")
    parts, kinds = [], {}
    for folder in run_dirs:
        path = Path(folder)
        manifest = next((m for m in MANIFESTS if (path / m).is_file()), None)
        if manifest is None:
            raise VitspecError(f"{folder} is not a vitspec run folder (no run.json or verify.json)")
        kinds.setdefault(MANIFESTS[manifest], folder)
        if len(kinds) > 1:
            (a, first), (b, other) = kinds.items()
            raise VitspecError(
                f"{first} is a shard of vitspec {a} and {other} of vitspec {b}: merge folds "
                "the shards of one command"
            )
        info = read_info(path / manifest)
        info["_folder"] = str(path)
        parts.append((info, load_state(path)))
    if "verify" in kinds:
        from vitspec.verification.merge import merge_verify_parts

        result = merge_verify_parts(parts)
    else:
        result = merge_parts(parts)
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result


def merge_parts(parts: Sequence[tuple[dict, dict]]) -> Result:
    """``(run.json, state)`` of every shard -> the one-process :class:`Result`."""
    infos = [info for info, _ in parts]
    check_shards(infos)
    order = sorted(range(len(parts)), key=lambda i: infos[i]["shard"]["index"])
    first = infos[order[0]]
    names = first["metrics"]
    registered = {s.name: s for s in list_metrics()}
    specs = [get_metric(n) for n in names if n in registered]
    sites = tuple(first["sites"])
    tokens = Collector([s for s in specs if s.kind.startswith("token")], sites)
    attn = Collector([s for s in specs if s.kind.startswith("attn")], ())
    for i in order:
        state = parts[i][1]
        tokens.merge_state(collector_state(state["tokens"]))
        attn.merge_state(collector_state(state["attn"]))
    kinds = {s.name: s.kind for s in specs}
    for key in {**tokens.moments, **attn.moments}:
        name = key[3].removeprefix(PRE) if key[3] not in registered else key[3]
        kinds.setdefault(name, "attn")  # the adapters' per-head parameters (gpsa_gate)
    ids = {"run": first["run"], "model": first["model"], "checkpoint": first["checkpoint"]}
    metric_rows, spectra_rows = rows({**tokens.moments, **attn.moments}, kinds, first["depth"], ids)
    table = moments_frame(metric_rows, METRIC_COLUMNS)
    spectra = moments_frame(spectra_rows, SPECTRA_COLUMNS)
    validate(table, spectra)
    return Result(table, spectra, _merged_info([infos[i] for i in order], attn))


def _get(info: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(info, dict):
            return None
        info = info.get(key)
    return info


def check_shards(
    infos: list[dict], same: Sequence[str] = SAME, geometry: Sequence[str] = GEOMETRY
) -> None:
    """Same run (the fields ``same`` agree, and ``geometry`` among the shards that saw
    images), every shard once, disjoint images; else a one-line :class:`VitspecError`.

    Example:
        >>> check_shards([{"shard": {"index": 0, "count": 1, "images": [0, 1]}}])
    """
    for info in infos:
        if "shard" not in info:
            where = info.get("_folder", "a run")
            raise VitspecError(f"{where} is not a shard (it was not run with --shard K/N)")
    _agree(infos, same)
    _agree([info for info in infos if _get(info, "images.used") != 0], geometry)
    first = infos[0]
    count = first["shard"]["count"]
    seen: dict[int, str] = {}
    images: set[int] = set()
    for info in infos:
        k = info["shard"]["index"]
        where = info.get("_folder", f"rank {k}")
        if k in seen:
            raise VitspecError(f"shard {k}/{count} given twice ({seen[k]} and {where})")
        seen[k] = where
        mine = set(info["shard"]["images"])
        if images & mine:
            raise VitspecError(f"{where} overlaps another shard's images")
        images |= mine
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        raise VitspecError(
            f"shards {', '.join(f'{k}/{count}' for k in missing)} are missing; "
            f"merge needs all {count}"
        )


def _agree(infos: list[dict], keys: Sequence[str]) -> None:
    """The fields ``keys`` (dotted paths) are equal in every one of ``infos``."""
    first = infos[0] if infos else None
    for info in infos[1:]:
        for key in keys:
            if _get(info, key) != _get(first, key):
                raise VitspecError(
                    f"shards differ in {key}: {_get(first, key)!r} "
                    f"({first.get('_folder', 'shard ' + str(first['shard']['index']))}) vs "
                    f"{_get(info, key)!r} ({info.get('_folder', info['shard']['index'])}); "
                    "only shards of one run merge"
                )


def _merged_info(infos: list[dict], attn: Collector) -> dict:
    """The first shard's run.json with the images, timing and refusals of all of them."""
    info = merged_info(infos, ("unavailable", "attention_metrics_refused"))
    info["attention_refused"] = {str(k): v for k, v in attn.refused[""].items()}
    info["pre_attention_refused"] = {str(k): v for k, v in attn.refused[PRE].items()}
    info["num_heads"] = attn.num_heads or info.get("num_heads")
    return info


def merged_info(infos: list[dict], union: Sequence[str] = ()) -> dict:
    """The first shard's manifest (shards in index order) with the images, timing and
    provenance of all of them, and the dicts named in ``union`` joined.

    Example:
        >>> part = {"images": {"used": 1, "files": ["a.jpg"], "skipped": []},
        ...         "shard": {"index": 0, "count": 1, "images": [0]}, "wall_time_s": 2.0}
        >>> merged_info([part])["images_per_s"]
        0.5
    """
    info = {k: v for k, v in infos[0].items() if k not in ("shard", "_folder")}
    files: dict[int, str] = {}
    skipped = {}
    for part in infos:
        files.update(zip(part["shard"]["images"], part["images"]["files"]))
        skipped.update({s["path"]: s for s in part["images"]["skipped"]})
        for key in union:
            info[key] = {**part.get(key, {}), **info.get(key, {})}
    used = sum(part["images"]["used"] for part in infos)
    info["images"] = {
        **info["images"],
        "used": used,
        "files": [files[i] for i in sorted(files)],
        "skipped": list(skipped.values()),
    }
    wall = max(part["wall_time_s"] for part in infos)
    info["wall_time_s"] = wall
    info["images_per_s"] = round(used / wall, 3) if wall > 0 else None
    info["shards"] = [
        {
            "index": part["shard"]["index"],
            "count": part["shard"]["count"],
            "folder": part.get("_folder"),
            "images": part["images"]["used"],
            "device": part.get("device"),
            "wall_time_s": part.get("wall_time_s"),
            "command": part.get("command"),
        }
        for part in infos
    ]
    return info


# ---- torch.distributed --------------------------------------------------------------------
def distributed_device(device: str, warn: Callable[[str], None] | None = None) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is asked for (or ``auto`` finds
    it), else ``cpu``."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return f"cuda:{local}" if wants_cuda else "cpu"


def gather_ranks(result, merge: Callable[[Sequence[tuple[dict, dict]]], object] = merge_parts):
    """Under torchrun: every rank's (manifest, state) to rank 0, once; rank 0 gets the run
    ``merge`` folds from them (analyze's :func:`merge_parts` by default), the others their own
    part.

    The states are small CPU objects, so the gather runs on gloo even when the ranks compute on
    GPUs (no GPU collective, no NCCL device binding, and the same path on one node or many). A
    process group the caller has already started is used as it is (with NCCL, on this rank's
    GPU)."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    try:
        backend = str(dist.get_backend())
        if backend == "nccl":  # gather_object stages the objects on the current device
            torch.cuda.set_device(torch.device(result.info.get("device", "cuda")))
        rank = dist.get_rank()
        objects = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object((result.info, result.state), objects, dst=0)
    finally:
        if owned:
            dist.destroy_process_group()
    if rank != 0:
        return result
    merged = merge(objects)
    merged.info["distributed"] = {"world_size": len(objects), "backend": backend}
    return merged
