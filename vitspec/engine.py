"""The run engine: one forward loop over the images, handing what the hooks observe to consumers.

``open_session`` resolves the device, loads the model and weights, finds the adapter and opens the
images; ``run`` drives the forward passes with the hooks the consumers' sites need, on CPU worker
lanes beside the forward pass (:mod:`vitspec.pipeline`), with progress, timing and provenance.
``analyze``'s metric collector and ``verify``'s theory checker are two consumers of it.

A consumer has ``sites`` (a set of :mod:`vitspec.sites` names), ``start_batch(info)``,
``on(site, layer, x)``, and fixed-size ``state()`` / ``merge_state(other)`` (mergeable in
torchmetrics' sense, so sharded runs gather in one place).
"""

from __future__ import annotations

import platform
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import timm
import torch
from torch import Tensor, nn

import vitspec
from vitspec import hf
from vitspec.adapters import Adapter, Geometry, get_adapter
from vitspec.capture import capture
from vitspec.errors import VitspecError, option
from vitspec.inputs import (
    ImageSet,
    check_count,
    eval_data_config,
    eval_transform,
    iter_batches,
    open_images,
)
from vitspec.loading import LoadedModel, ModelCache, check_weights, load_model
from vitspec.pipeline import Pipeline
from vitspec.progress import Progress, choose_mode
from vitspec.sites import OPTIONAL_SITES, RESID_POST, RESID_PRE, Unavailable


@dataclass(frozen=True)
class Weights:
    """Which weights a model name gets (see :func:`vitspec.loading.load_model`).

    Example:
        >>> Weights(random_init=True, model_kwargs={"depth": 2}).random_init
        True
    """

    ckpt: str | Path | None = None
    random_init: bool = False
    seed: int = 0
    ema: bool = False
    strict: bool = True
    model_kwargs: dict | None = None
    featscale_form: str | None = None
    img_size: int | None = None
    trust_checkpoint: bool = False


@dataclass(frozen=True)
class Inputs:
    """The images: a folder or one image file (default the bundled photographs), or
    preprocessed ``[B, 3, H, W]`` batches; ``num_images`` of them, the first (``sample='first'``)
    or a seeded uniform draw (``'random'``, ``sample_seed``); ``batch_size`` per forward pass."""

    images: str | Path | Iterable | None = None
    num_images: int | None = None
    batch_size: int = 16
    sample: str = "first"
    sample_seed: int = 0


@dataclass(frozen=True)
class Request:
    """A checked request (:func:`check_request`): the device and the listed image folder."""

    device: torch.device
    image_set: ImageSet | None


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
class Session:
    """A loaded model, its adapter, and the batches it runs on.

    Attributes:
        loaded: the model and its weights' provenance.
        adapter: where its sites are.
        image_set: the image folder's files (None for tensor batches).
        batches: preprocessed ``[B, 3, H, W]`` batches.
        total: expected number of images (for the progress bar; None if unknown).
        inputs: the input options.
        device: where the model runs.
    """

    loaded: LoadedModel
    adapter: Adapter
    image_set: ImageSet | None
    batches: Iterator
    total: int | None
    inputs: Inputs
    device: torch.device

    @property
    def net(self) -> nn.Module:
        return self.loaded.model

    def ids(self, label: str | None) -> dict:
        """The leading columns: run (``<model>-<label>``), model, checkpoint."""
        ckpt = self.loaded.checkpoint
        label = label or (Path(ckpt).stem if ckpt != "random-init" else "random-init")
        return {"run": f"{self.loaded.name}-{label}", "model": self.loaded.name, "checkpoint": ckpt}

    def provenance(self, ids: dict, used: int) -> dict:
        """The run.json fields every command shares: versions, model, weights, images."""
        images = self.image_set
        return {
            "vitspec": vitspec.__version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "run": ids["run"],
            "model": self.loaded.name,
            "timm_name": self.loaded.timm_name,
            "checkpoint": self.loaded.checkpoint,
            "weights": self.loaded.provenance,
            "random_init": self.loaded.checkpoint == "random-init",
            "family": self.adapter.family,
            "depth": self.adapter.depth,
            "images": {
                "source": images.source if images else "tensors",
                "requested": self.inputs.num_images,
                "found": images.found if images else None,
                "sample": images.sample if images else "first",
                "sample_seed": images.seed if images and images.sample == "random" else None,
                "used": used,
                "skipped": images.skipped if images else [],
                "files": images.used if images else [],
            },
        }

    def timing(self, used: int, wall: float) -> dict:
        """Device, batch size, threads, wall time, images per second and the command line."""
        dev = self.device
        return {
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else platform.processor() or platform.machine(),
            "batch_size": self.inputs.batch_size,
            "threads": torch.get_num_threads(),
            "wall_time_s": round(wall, 3),
            "images_per_s": round(used / wall, 3) if wall > 0 else None,
            "command": " ".join(sys.argv),
        }


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


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or (
        device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", device)
    ):
        raise VitspecError(
            f"unknown {option('device')} {device!r}; allowed: auto, cpu, cuda, cuda:N"
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VitspecError(
            f"{option('device')} {device} was asked for but CUDA is not available on this "
            "machine; use cpu or auto"
        )
    return torch.device(device)


def check_request(
    model: str | nn.Module,
    weights: Weights = Weights(),
    inputs: Inputs = Inputs(),
    device: str | torch.device = "auto",
) -> Request:
    """Every check that needs no model and reads no image: the device, the model name and
    weight options, the batch size and the image selection (the folder is listed here).

    Example:
        >>> check_request("deit_tiny", Weights(random_init=True), Inputs(num_images=2)).device
        device(type='cpu')
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    check_count(inputs.batch_size, "batch_size")
    if hf.is_hf(model):
        if weights != Weights():
            raise VitspecError(
                f"{model}: the weights are the folder's; {option('ckpt')}, "
                f"{option('random_init')}, {option('ema')} and model options do not apply"
            )
    elif not isinstance(model, nn.Module):
        check_weights(
            model,
            ckpt=weights.ckpt,
            random_init=weights.random_init,
            model_kwargs=weights.model_kwargs,
            img_size=weights.img_size,
        )
    images, num = inputs.images, inputs.num_images
    if images is None or isinstance(images, (str, Path)):
        listed = open_images(images, num, sample=inputs.sample, seed=inputs.sample_seed)
        return Request(dev, listed)
    if num is not None:
        check_count(num, "num_images")
    if inputs.sample != "first":
        raise VitspecError(
            f"{option('sample')} {inputs.sample!r} needs an image folder: batches are used in order"
        )
    return Request(dev, None)


def load(
    model: str | nn.Module, weights: Weights = Weights(), cache: ModelCache | None = None
) -> LoadedModel:
    """A ``LoadedModel`` from a timm name (with ``weights``; the model taken from ``cache``
    when given) or an in-memory module (used as is); ``hf:PATH`` folders are opened by
    :func:`open_session`."""
    if isinstance(model, nn.Module):
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        return LoadedModel(
            model=model.eval(),
            name=name,
            timm_name=name,
            checkpoint="in-memory",
            provenance={"source": "in-memory"},
        )
    return load_model(model, **asdict(weights), cache=cache)


def open_session(
    model: str | nn.Module,
    *,
    weights: Weights = Weights(),
    inputs: Inputs = Inputs(),
    device: str | torch.device = "auto",
    warn: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    request: Request | None = None,
    cache: ModelCache | None = None,
) -> Session:
    """Load ``model``, find its adapter and start reading its images. Every user mistake is a
    one-line :class:`VitspecError` before any work: the checks of :func:`check_request` run
    first (pass its ``request`` when they already ran). The weights, model geometry and image
    lines go to ``log``. A ``cache`` (:class:`~vitspec.loading.ModelCache`) builds a model
    name once for several sessions."""
    warn = warn or stderr_warn
    request = request or check_request(model, weights, inputs, device)
    if hf.is_hf(model):
        loaded, transform = hf.load_folder(model)
    else:
        loaded, transform = load(model, weights, cache), None
    for line in loaded.provenance.get("warnings", []):
        warn(line)
    net = loaded.model.eval()
    adapter = get_adapter(net, loaded.timm_name)
    image_set, num = request.image_set, inputs.num_images
    if image_set is not None:
        transform = transform or eval_transform(net)
        batches = iter_batches(image_set, transform, inputs.batch_size, warn=warn)
        total = num if num is not None else len(image_set.paths)
    else:
        batches, total = _tensor_batches(inputs.images, num), num
    if log is not None:
        size = tuple(eval_data_config(net)["input_size"][1:]) if image_set is not None else None
        for line in _describe(loaded, adapter, image_set, size):
            log(line)
    net.to(request.device)
    return Session(loaded, adapter, image_set, batches, total, inputs, request.device)


def _describe(loaded: LoadedModel, adapter: Adapter, images, size) -> list[str]:
    """One line each: the weights, the model's geometry, the images found and used."""
    prov = loaded.provenance
    if loaded.checkpoint == "random-init":
        weights = (
            f"weights: RANDOM initialisation (seed {prov.get('seed')}): the numbers describe "
            "an untrained network"
        )
    elif prov.get("sha256"):
        weights = f"checkpoint {prov['checkpoint_path']} (sha256 {prov['sha256'][:12]}) loaded"
    else:
        weights = f"weights: {loaded.checkpoint}"
    lines = [weights, *prov.get("notes", [])]
    if images is not None:
        first = adapter.geometry(size)[0]
        h, w = first.grid
        lines.append(
            f"model {loaded.timm_name}: {adapter.depth} blocks, {first.prefix + h * w} tokens "
            f"({first.prefix} prefix + {h}x{w} grid), {size[0]}x{size[1]} images"
        )
        where = "bundled photos" if images.source == "bundled" else images.source
        use = images.num_images or images.found
        how = f"random, seed {images.seed}" if images.sample == "random" else "first in order"
        lines.append(f"images: {images.found} found in {where}, using {use} ({how})")
    return lines


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


def _tensor_batches(batches: Iterable, num_images: int | None) -> Iterator:
    """Preprocessed batches from a user's iterable, cut after ``num_images`` images."""
    seen = 0
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            raise VitspecError("images must be a folder or an iterable of [B, 3, H, W] tensors")
        if num_images is not None:
            batch = batch[: num_images - seen]
        if batch.shape[0]:
            yield batch
        seen += batch.shape[0]
        if num_images is not None and seen >= num_images:
            return
    if seen == 0:
        raise VitspecError("the image batches given were empty")


def stderr_warn(message: str) -> None:
    """The default ``warn``: one line on stderr."""
    print(f"vitspec: warning: {message}", file=sys.stderr)
