"""Shards of one analysis and their merge: ``--shard K/N``, ``vitspec merge`` and torchrun.

The parts are whole batches: the images are selected (``--num-images``, ``--sample``), skipped
when unreadable and batched exactly as in one process, and batch ``b`` (b = 0, 1, ...) belongs
to shard ``b mod N``. Every batch is therefore measured exactly as in a one-process run (same
images in the same forward pass), the parts are disjoint and nothing is padded or repeated;
the last shards may hold one batch fewer. A shard saves the collectors' fixed-size state
(:data:`STATE_FILE`, float64 moments) beside its tables; :func:`merge_runs` folds the shards'
states with Chan's parallel update and writes the run folder a one-process run would have
written (means equal to ~1e-15 relative, the same n).

Every shard decodes every selected file (unreadable ones change the batch boundaries), but only
its own batches go through the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vitspec.errors import VitspecError
from vitspec.metrics import Moments

__all__ = [
    "STATE_FILE",
    "Shard",
    "ShardBatches",
    "distributed_device",
    "distributed_shard",
    "parse_shard",
    "restrict",
    "shard_total",
]

STATE_FILE = "state.pt"

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


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` (0-based): the batches ``b`` with ``b % count == index``.

    Example:
        >>> str(Shard(1, 4)), Shard(1, 4).owns(5)
        ('1/4', True)
    """

    index: int
    count: int

    def owns(self, batch: int) -> bool:
        return batch % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(value: str | Shard | tuple[int, int] | None) -> Shard | None:
    """``"K/N"`` (or ``(K, N)``) as a :class:`Shard`; None stays None.

    Example:
        >>> parse_shard("0/2")
        Shard(index=0, count=2)
    """
    if value is None or isinstance(value, Shard):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
        if match is None:
            raise VitspecError(f"--shard must be K/N (e.g. 0/4), got {value!r}")
        value = (int(match[1]), int(match[2]))
    k, n = value
    if not (isinstance(k, int) and isinstance(n, int)) or n < 1 or not 0 <= k < n:
        raise VitspecError(f"--shard K/N needs 0 <= K < N, got {k}/{n}")
    return Shard(k, n)


class ShardBatches:
    """The batches of ``batches`` that ``shard`` owns, with their global batch and image
    indices (filled while iterating).

    Example:
        >>> parts = ShardBatches([torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(1, 1)],
        ...                      Shard(0, 2))
        >>> [b.shape[0] for b in parts], parts.batch_indices, parts.image_indices
        ([2, 1], [0, 2], [0, 1, 4])
    """

    def __init__(self, batches: Iterable, shard: Shard):
        self.batches = batches
        self.shard = shard
        self.batch_indices: list[int] = []
        self.image_indices: list[int] = []

    def __iter__(self) -> Iterator:
        start = 0
        for b, batch in enumerate(self.batches):
            size = batch.shape[0]
            if self.shard.owns(b):
                self.batch_indices.append(b)
                self.image_indices.extend(range(start, start + size))
                yield batch
            start += size

    def global_index(self, local: int) -> int:
        """The global batch index of this shard's ``local``-th batch."""
        return self.shard.index + local * self.shard.count

    def describe(self) -> dict:
        """run.json's ``shard`` entry."""
        return {
            "index": self.shard.index,
            "count": self.shard.count,
            "batches": self.batch_indices,
            "images": self.image_indices,
        }


def shard_total(total: int | None, batch_size: int, part: Shard) -> int | None:
    """Images in ``part``'s batches when no file is skipped (for the progress display).

    Example:
        >>> shard_total(5, 2, Shard(0, 2)), shard_total(5, 2, Shard(1, 2))
        (3, 2)
    """
    if total is None:
        return None
    sizes = [min(batch_size, total - b * batch_size) for b in range(-(-total // batch_size))]
    return sum(size for b, size in enumerate(sizes) if part.owns(b))


def restrict(session, part: Shard) -> None:
    """Run only ``part``'s batches of a :class:`~vitspec.session.Session` (and count only
    their images in its progress total)."""
    session.batches = ShardBatches(session.batches, part)
    session.total = shard_total(session.total, session.inputs.batch_size, part)


def distributed_shard() -> Shard | None:
    """This process's shard under ``torchrun`` (``RANK`` of ``WORLD_SIZE`` > 1), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Shard(int(os.environ["RANK"]), world)


def distributed_device(device: str) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA is asked for (or ``auto`` finds
    it), else ``cpu``."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return f"cuda:{local}" if wants_cuda else "cpu"


def this_part(shard: str | Shard | tuple[int, int] | None, device: str):
    """This process's part of a run and its device: ``(part, ranks, device)``.

    ``part`` is ``shard`` (``"K/N"``), or under torchrun this rank's shard, which is then also
    ``ranks`` (else None) and runs on the rank's own GPU when CUDA is used.

    Example:
        >>> this_part("1/2", "cpu")  # outside torchrun
        (Shard(index=1, count=2), None, 'cpu')
    """
    part, ranks = parse_shard(shard), distributed_shard()
    if ranks is None:
        return part, None, device
    if part is not None:
        raise VitspecError("--shard cannot be combined with torchrun: each rank is a shard")
    return ranks, ranks, distributed_device(device)


# ---- collector state on disk (tensors and plain Python only: loads with weights_only) --------
def plain_state(state: dict) -> dict:
    """A :meth:`vitspec.collect.Collector.state` as lists, dicts and tensors."""
    unavailable = state["unavailable"]
    return {
        "moments": [
            [site, layer, head, name, acc.n, acc.mean.cpu(), acc.m2.cpu()]
            for (site, layer, head, name), acc in state["moments"].items()
            if acc.mean is not None
        ],
        "refused": {kind: dict(layers) for kind, layers in state["refused"].items()},
        "dropped": [[layer, name, why] for (layer, name), why in state["dropped"].items()],
        "num_heads": state["num_heads"],
        "unavailable": [
            [what, why, sorted(layers)] for (what, why), layers in unavailable._layers.items()
        ],
    }


def collector_state(plain: dict) -> dict:
    """The inverse of :func:`plain_state`: a state :meth:`Collector.merge_state` accepts."""
    from vitspec.sites import Unavailable

    moments = {}
    for site, layer, head, name, n, mean, m2 in plain["moments"]:
        acc = Moments()
        acc.n, acc.mean, acc.m2 = int(n), mean.to(torch.float64), m2.to(torch.float64)
        moments[(site, layer, head, name)] = acc
    unavailable = Unavailable()
    for what, why, layers in plain["unavailable"]:
        unavailable._layers[(what, why)] = set(layers)
        unavailable._seen.add(why)
    return {
        "moments": moments,
        "refused": {kind: dict(layers) for kind, layers in plain["refused"].items()},
        "dropped": {(layer, name): why for layer, name, why in plain["dropped"]},
        "num_heads": plain["num_heads"],
        "unavailable": unavailable,
    }


def save_state(folder: Path, states: dict) -> None:
    """Write ``{consumer name: plain state}`` to ``folder / STATE_FILE``."""
    torch.save(states, folder / STATE_FILE)


def load_state(folder: Path) -> dict:
    """Read a shard's :data:`STATE_FILE` (plain data only: no code runs on loading)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise VitspecError(f"{folder} holds no {STATE_FILE}: it is not a shard (run with --shard)")
    return torch.load(path, weights_only=True)


# ---- the rules of a merge (vitspec.merge, vitspec.verification.merge) ----------------------
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
