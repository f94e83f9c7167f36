"""Fold the shards of one analysis (or verify run) into the folder one process would have written.

``vitspec merge DIR... --out DIR`` reads shard folders (``analyze --shard K/N``, or
``verify --shard K/N``: :mod:`vitspec.verification.merge`);
:func:`gather_ranks` does the same in memory under ``torchrun`` (the ranks' fixed-size states
are gathered once, to rank 0). Shards of different models, checkpoints, options or image
selections, overlapping shards and incomplete sets are refused with one line naming the
difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vitspec.collect import PRE, Collector, rows
from vitspec.errors import VitspecError
from vitspec.metrics import get_metric, list_metrics
from vitspec.outputs import read_info
from vitspec.results import METRIC_COLUMNS, SPECTRA_COLUMNS, Result, moments_frame, validate
from vitspec.shards import check_shards, collector_state, load_state, merged_info

__all__ = ["gather_ranks", "merge_parts", "merge_runs"]

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


def _merged_info(infos: list[dict], attn: Collector) -> dict:
    """The first shard's run.json with the images, timing and refusals of all of them."""
    info = merged_info(infos, ("unavailable", "attention_metrics_refused"))
    info["attention_refused"] = {str(k): v for k, v in attn.refused[""].items()}
    info["pre_attention_refused"] = {str(k): v for k, v in attn.refused[PRE].items()}
    info["num_heads"] = attn.num_heads or info.get("num_heads")
    return info


# ---- torch.distributed --------------------------------------------------------------------
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
