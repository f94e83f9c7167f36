"""The run engine: one forward loop over a session's images, handing what the hooks observe to
consumers.

A session (:mod:`vitspec.session`: weights, inputs, device, the loaded model, its adapter and
batches) is run by :func:`run` with the hooks the consumers' sites need, on CPU worker lanes beside
the forward pass (:mod:`vitspec.pipeline`), with a finite-activation guard, progress, and timing.
``analyze``'s metric collector and ``verify``'s theory checker are two consumers of it.

A consumer has ``sites`` (a set of :mod:`vitspec.sites` names), ``start_batch(info)``,
``on(site, layer, x)``, and fixed-size ``state()`` / ``merge_state(other)`` (mergeable in
torchmetrics' sense, so sharded runs gather in one place).
"""

from __future__ import annotations

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
from vitspec.session import (  # noqa: F401 (the engine's API: sessions are opened here)
    Inputs,
    Session,
    Weights,
    check_request,
    load,
    open_session,
    resolve_device,
    stderr_warn,
)
from vitspec.sites import OPTIONAL_SITES, RESID_POST, RESID_PRE, Unavailable


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

    On CPU with ``pipeline`` each consumer runs on its own worker lane beside the forward pass
    (every thread on one core; results identical to running inline); on CUDA inline, the
    kernels are already asynchronous. Memory stays flat in the number of images. The first
    block whose output is not finite stops the run with its name (checked on the forward
    thread, before the next block). ``progress``: see :func:`vitspec.progress.choose_mode`.
    """
    warn = warn or stderr_warn
    adapter, dev = session.adapter, session.device
    wanted = frozenset().union(*(c.sites for c in consumers))
    unavailable = missing_sites(adapter, wanted, warn)
    head_params = adapter.head_params()
    threaded = pipeline and dev.type == "cpu"
    bar = Progress(session.total, choose_mode(progress), log)
    check = _finite_check(adapter)
    used, index, image_hw = 0, 0, None
    start = time.perf_counter()
    with ExitStack() as stack:
        lanes = [stack.enter_context(Pipeline(1) if threaded else _Inline()) for _ in consumers]
        stack.callback(bar.close)
        stack.enter_context(_intra_op_threads(1 if threaded else None))
        routes: dict[str, list] = {}
        for consumer, lane in zip(consumers, lanes):
            for site in consumer.sites:
                routes.setdefault(site, []).append(lane.wrap(consumer.on))

        def emit(site: str, layer: int, x: Tensor) -> None:
            if site == RESID_POST or (site == RESID_PRE and layer == 1):
                check(site, layer, x)
            for deliver in routes.get(site, ()):
                deliver(site, layer, x)

        with torch.inference_mode(), capture(adapter, wanted | {RESID_PRE, RESID_POST}, emit):
            for batch in session.batches:
                image_hw = tuple(batch.shape[-2:])
                geometry = adapter.geometry(image_hw)
                info = BatchInfo(index, batch.shape[0], image_hw, geometry, head_params)
                for consumer, lane in zip(consumers, lanes):
                    lane.wrap(consumer.start_batch)(info)
                session.net(batch.to(dev, non_blocking=True))
                bar.update(batch.shape[0])
                used += batch.shape[0]
                index += 1
        for lane in lanes:
            lane.join()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - start
    stages = adapter.stages(image_hw) if image_hw is not None else []
    return RunInfo(used, wall, image_hw, stages, unavailable)


def _finite_check(adapter: Adapter) -> Callable[[str, int, Tensor], None]:
    """``check(site, layer, x)`` raising at the first non-finite block output (or embedding),
    naming the block by its module path."""
    names = {id(m): name for name, m in adapter.model.named_modules()}
    taps = adapter.taps()

    def where(site: str, layer: int) -> str:
        if site == RESID_PRE:
            return "the embedding (input of block 1)"
        tap = taps.get((site, layer))
        name = names.get(id(tap.module)) if tap is not None else None
        return f"block {layer} ({name})" if name else f"block {layer}"

    def check(site: str, layer: int, x: Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise VitspecError(
                f"NaN or Inf in the output of {where(site, layer)}: the model's activations are "
                "not finite (check the checkpoint and input scaling)",
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
