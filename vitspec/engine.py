"""The run engine: one forward loop over the images, handing what the hooks observe to consumers.

``open_session`` (:mod:`vitspec.session`) resolves the device, loads the model and weights, finds
the adapter and opens the images; ``run`` drives the forward passes with the hooks the consumers'
sites need, on CPU worker lanes beside the forward pass (:mod:`vitspec.pipeline`), with progress,
timing and provenance. ``analyze``'s metric collector and ``verify``'s theory checker are two
consumers of it.

A consumer has ``sites`` (a set of :mod:`vitspec.sites` names), ``start_batch(info)``,
``on(site, layer, x)``, and fixed-size ``state()`` / ``merge_state(other)`` (mergeable in
torchmetrics' sense, so sharded runs gather in one place).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from vitspec.adapters import Adapter, Geometry
from vitspec.capture import capture
from vitspec.errors import VitspecError
from vitspec.pipeline import Pipeline
from vitspec.progress import Progress, choose_mode
from vitspec.session import Inputs, Session, Weights, check_request, open_session, stderr_warn
from vitspec.sites import OPTIONAL_SITES, RESID_POST, RESID_PRE, Unavailable

# the session's names used with run (docs/engine.md) are importable from here too
__all__ = [
    "BatchInfo",
    "Consumer",
    "Inputs",
    "RunInfo",
    "Weights",
    "available_sites",
    "check_request",
    "missing_sites",
    "open_session",
    "run",
]


@dataclass(frozen=True)
class BatchInfo:
    """What a consumer learns at the start of each batch.

    Attributes:
        index: batch number from 0.
        size: images in the batch.
        image_hw: the input's (H, W).
        geometry: per layer 0..L, the token geometry (:class:`~vitspec.adapters.Geometry`).
        head_params: the adapter's per-head parameters (``{metric: {layer: [H]}}``).
    """

    index: int
    size: int
    image_hw: tuple[int, int]
    geometry: list[Geometry]
    head_params: dict = field(default_factory=dict)


class Consumer(Protocol):
    sites: frozenset[str]

    def start_batch(self, info: BatchInfo) -> None: ...
    def on(self, site: str, layer: int, x: Tensor) -> None: ...
    def state(self) -> dict: ...
    def merge_state(self, other: dict) -> None: ...


@dataclass
class RunInfo:
    """What ``run`` measured about the run itself.

    Attributes:
        used: images that went through the model.
        wall: seconds from the first batch to the last consumer's last event.
        image_hw: the last batch's (H, W).
        stages: run.json's stages (first/last layer, grid, channels, prefix).
        unavailable: sites the consumers asked for that the model lacks, and why.
    """

    used: int
    wall: float
    image_hw: tuple[int, int] | None
    stages: list[dict]
    unavailable: Unavailable


def available_sites(adapter: Adapter) -> frozenset[str]:
    """The sites ``adapter`` has at one layer or more."""
    return frozenset(site for site, _ in adapter.taps())


def missing_sites(adapter: Adapter, sites: Iterable[str], warn=None) -> Unavailable:
    """The requested sites the model lacks at some layers, with the adapter's reasons."""
    out = Unavailable(warn)
    taps = adapter.taps()
    stated = adapter.unavailable()
    for site in sorted(set(sites)):
        layers = [n for n in range(1, adapter.depth + 1) if (site, n) not in taps]
        if not layers or (site in OPTIONAL_SITES and site not in stated):
            continue
        why = stated.get(site, f"the {adapter.family} adapter has no tap for it")
        for layer in layers:
            out.add(site, why, layer)
    return out


def run(
    session: Session,
    consumers: Sequence[Consumer],
    *,
    progress: bool | str = False,
    pipeline: bool = True,
    warn: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> RunInfo:
    """The one forward loop: every batch through the model with the consumers' sites hooked.

    On CPU with ``pipeline`` and two or more torch threads, when every consumer can ``spawn()``
    an empty twin, the run is data-parallel: whole batches go to that many worker threads of one
    core each (batch i to thread i mod threads), each with its own consumers, folded together
    with ``merge_state`` at the end; every batch is measured as in a single thread and no core
    waits for another. Otherwise each consumer runs on its own worker lane beside the forward
    pass; on CUDA inline, the kernels are already asynchronous. Memory stays flat in the number
    of images. Progress (``True``: a bar on a terminal, else lines through ``log``; see
    :mod:`vitspec.progress`). Every block's output is checked for NaN/Inf on the forward
    thread, so the error names the first block that produced one, before any consumer sees it.
    """
    warn = warn or stderr_warn
    adapter, dev = session.adapter, session.device
    sites = frozenset().union(*(c.sites for c in consumers))
    unavailable = missing_sites(adapter, sites, warn)
    head_params = adapter.head_params()
    threaded = pipeline and dev.type == "cpu"
    bar = Progress(session.total, choose_mode(progress), log)
    guard = _finite_guard(adapter)
    workers = torch.get_num_threads() if threaded else 1
    start = time.perf_counter()
    if workers > 1 and all(hasattr(c, "spawn") for c in consumers):
        used, image_hw = _data_parallel(session, consumers, workers, head_params, bar, guard)
    else:
        used, image_hw = _lanes(session, consumers, threaded, head_params, bar, guard)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - start
    stages = adapter.stages(image_hw) if image_hw is not None else []
    return RunInfo(used, wall, image_hw, stages, unavailable)


def _global(session: Session, local: int) -> int:
    """The run's index of the session's ``local``-th batch (a shard runs every N-th batch)."""
    batches = session.batches
    return batches.global_index(local) if hasattr(batches, "global_index") else local


def _watched(adapter: Adapter, sites: frozenset[str]) -> frozenset[str]:
    """The consumers' sites plus the block outputs the finite guard checks."""
    return sites | (available_sites(adapter) & {RESID_PRE, RESID_POST})


def _lanes(session: Session, consumers, threaded: bool, head_params: dict, bar, guard):
    """One forward pass at a time; each consumer on its own worker lane beside it (threaded)."""
    adapter, dev = session.adapter, session.device
    sites = frozenset().union(*(c.sites for c in consumers))
    used, index, image_hw = 0, 0, None
    with ExitStack() as stack:
        lanes = [stack.enter_context(Pipeline(1) if threaded else _Inline()) for _ in consumers]
        stack.callback(bar.close)
        stack.enter_context(_intra_op_threads(1 if threaded else None))
        routes: dict[str, list] = {}
        for consumer, lane in zip(consumers, lanes):
            for site in consumer.sites:
                routes.setdefault(site, []).append(lane.wrap(consumer.on))

        def emit(site: str, layer: int, x: Tensor) -> None:
            guard(site, layer, x)
            for deliver in routes.get(site, ()):
                deliver(site, layer, x)

        with torch.inference_mode(), capture(adapter, _watched(adapter, sites), emit):
            for batch in session.batches:
                image_hw = tuple(batch.shape[-2:])
                geometry = adapter.geometry(image_hw)
                info = BatchInfo(
                    _global(session, index), batch.shape[0], image_hw, geometry, head_params
                )
                for consumer, lane in zip(consumers, lanes):
                    lane.wrap(consumer.start_batch)(info)
                session.net(batch.to(dev, non_blocking=True))
                bar.update(batch.shape[0])
                used += batch.shape[0]
                index += 1
        for lane in lanes:
            lane.join()
    return used, image_hw


def _data_parallel(session: Session, consumers, workers: int, head_params: dict, bar, guard):
    """Whole batches over ``workers`` threads (batch i on thread i mod workers, one core each),
    each thread with its own copies of the consumers (``spawn()``), folded into ``consumers``
    with ``merge_state`` in thread order at the end."""
    adapter, dev = session.adapter, session.device
    sites = frozenset().union(*(c.sites for c in consumers))
    teams = [list(consumers)] + [[c.spawn() for c in consumers] for _ in range(workers - 1)]
    local = threading.local()
    queues = [queue.Queue(maxsize=1) for _ in range(workers)]
    errors: list[BaseException] = []

    def emit(site: str, layer: int, x: Tensor) -> None:
        guard(site, layer, x)
        if local.deferred is not None:
            return
        for consumer in local.team:
            if site in consumer.sites:
                try:
                    consumer.on(site, layer, x)
                except VitspecError as err:
                    # held until the block's output: the guard's error names the block
                    local.deferred = err
                    return

    def work(team, jobs) -> None:
        torch.set_num_threads(1)
        local.team = team
        with torch.inference_mode():
            while (job := jobs.get()) is not None:
                if not errors:
                    try:
                        info, batch = job
                        local.deferred = None
                        for consumer in team:
                            consumer.start_batch(info)
                        session.net(batch.to(dev, non_blocking=True))
                        if local.deferred is not None:
                            raise local.deferred
                        bar.update(batch.shape[0])  # done, not merely queued
                    except BaseException as err:  # handed to the main thread
                        errors.append(err)

    threads = [
        threading.Thread(target=work, args=(team, jobs), name=f"vitspec-{i}", daemon=True)
        for i, (team, jobs) in enumerate(zip(teams, queues))
    ]
    used, index, image_hw = 0, 0, None
    with capture(adapter, _watched(adapter, sites), emit):
        for t in threads:
            t.start()
        try:
            for batch in session.batches:
                if errors:
                    break
                image_hw = tuple(batch.shape[-2:])
                geometry = adapter.geometry(image_hw)
                info = BatchInfo(
                    _global(session, index), batch.shape[0], image_hw, geometry, head_params
                )
                queues[index % workers].put((info, batch))
                used += batch.shape[0]
                index += 1
        finally:
            for jobs in queues:
                jobs.put(None)
            for t in threads:
                t.join()
            bar.close()
    if errors:
        raise errors[0]
    for team in teams[1:]:
        for mine, theirs in zip(consumers, team):
            mine.merge_state(theirs.state())
    return used, image_hw


def _finite_guard(adapter: Adapter) -> Callable[[str, int, Tensor], None]:
    """A check of the embedding and of every block output: a VitspecError (exit 1) naming the
    first block whose output is not finite."""
    names = {id(m): n for n, m in adapter.model.named_modules()}

    def check(site: str, layer: int, x: Tensor) -> None:
        if site not in (RESID_PRE, RESID_POST) or (site == RESID_PRE and layer != 1):
            return
        if bool(torch.isfinite(x).all()):
            return
        if site == RESID_PRE:
            where = "the embedding (the input of block 1)"
        else:
            module = names.get(id(adapter.taps()[(site, layer)].module))
            where = f"block {layer}" + (f" ({module})" if module else "")
        raise VitspecError(
            f"NaN or Inf in the output of {where}: the model's activations are not finite "
            "(check the checkpoint and input scaling)",
            exit_code=1,
        )

    return check


@contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads in this thread (None: unchanged), then restore."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Inline:
    """The Pipeline interface, running every callback at once in the calling thread."""

    def wrap(self, fn):
        return fn

    def join(self) -> None:
        pass

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        pass
