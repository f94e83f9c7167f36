"""``vitspec.analyze``: model + images -> streamed Fourier-domain oversmoothing measures."""

from __future__ import annotations

import fnmatch
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from tqdm.auto import tqdm

import vitspec
from vitspec.adapters import Adapter, get_adapter
from vitspec.capture import capture, check_sites
from vitspec.collect import Collector, rows
from vitspec.errors import VitspecError
from vitspec.inputs import ImageSet, eval_transform, iter_batches, open_images
from vitspec.loading import LoadedModel, load_model
from vitspec.metrics import MetricSpec, list_metrics
from vitspec.pipeline import Pipeline
from vitspec.results import METRIC_COLUMNS, SPECTRA_COLUMNS, Result, moments_frame, validate
from vitspec.scaling import techniques


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise VitspecError(f"unknown device {device!r}; allowed: auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VitspecError(
            "--device cuda was asked for but CUDA is not available on this machine; "
            "use --device cpu or auto"
        )
    return torch.device(device)


def select_metrics(patterns: str | Sequence[str] | None) -> list[MetricSpec]:
    """Metrics whose names match any of the comma-separated fnmatch patterns (default: all but
    the opt-in ones, e.g. ``cls_dist_cos``)."""
    specs = list_metrics()
    if patterns is None:
        return [s for s in specs if not s.opt_in]
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [s for s in specs if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(s.name, p) for s in specs)]
    if unmatched or not chosen:
        raise VitspecError(
            f"no metric matches {unmatched[0] if unmatched else patterns!r}; "
            f"allowed: {', '.join(s.name for s in specs)}"
        )
    return chosen


def load(model: str | nn.Module, **weights) -> LoadedModel:
    """A ``LoadedModel`` from a name (``weights``: the keyword arguments of
    :func:`vitspec.loading.load_model`) or an in-memory module (used as is)."""
    if isinstance(model, nn.Module):
        name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        return LoadedModel(
            model=model.eval(),
            name=name,
            timm_name=name,
            checkpoint="in-memory",
            provenance={"source": "in-memory"},
        )
    return load_model(model, **weights)


@dataclass
class Source:
    """A loaded model, its adapter, and the batches it is to run on (shared by analyze, verify).

    Attributes:
        loaded: the model and its weights' provenance.
        net: the model, in eval mode, on ``device``.
        adapter: where its blocks and attention are.
        image_set: the image folder's files (None for tensor batches).
        batches: preprocessed ``[B, 3, H, W]`` batches.
        total: expected number of images (for the progress bar; None if unknown).
        num_images: the number asked for.
        device: where the model runs.
        batch_size: images per batch.
    """

    loaded: LoadedModel
    net: nn.Module
    adapter: Adapter
    image_set: ImageSet | None
    batches: Iterator
    total: int | None
    num_images: int | None
    device: torch.device
    batch_size: int

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
                "requested": self.num_images,
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
            "batch_size": self.batch_size,
            "threads": torch.get_num_threads(),
            "wall_time_s": round(wall, 3),
            "images_per_s": round(used / wall, 3) if wall > 0 else None,
            "command": " ".join(sys.argv),
        }


def open_source(
    model: str | nn.Module,
    *,
    images,
    num_images: int | None,
    batch_size: int,
    device: torch.device,
    warn: Callable[[str], None],
    **weights,
) -> Source:
    """Load ``model`` (``weights``: see :func:`load`), find its adapter and
    open its images; every user mistake is a one-line :class:`VitspecError` before any work."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise VitspecError(f"--batch-size must be >= 1, got {batch_size!r}")
    loaded = load(model, **weights)
    for line in loaded.provenance.get("warnings", []):
        warn(line)
    net = loaded.model.eval()
    adapter = get_adapter(net, loaded.timm_name)
    if images is None or isinstance(images, (str, Path)):
        image_set = open_images(images, num_images)
        batches = iter_batches(image_set, eval_transform(net), batch_size, warn=warn)
        total = num_images if num_images is not None else len(image_set.paths)
    else:
        image_set, batches, total = None, _tensor_batches(images, num_images), num_images
    net.to(device)
    return Source(loaded, net, adapter, image_set, batches, total, num_images, device, batch_size)


def analyze(
    model: str | nn.Module,
    *,
    ckpt: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    ema: bool = False,
    strict: bool = True,
    images: str | Path | Iterable | None = None,
    num_images: int | None = None,
    sites: Sequence[str] = ("embed", "block"),
    metrics: str | Sequence[str] | None = None,
    batch_size: int = 16,
    device: str = "auto",
    label: str | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
    model_kwargs: dict | None = None,
    featscale_form: str | None = None,
    pipeline: bool = True,
) -> Result:
    """Capture every block's tokens and attention on a set of images and reduce them to metrics.

    Args:
        model: a timm model name or alias (``deit_small``), or an ``nn.Module`` used as is.
        ckpt: local checkpoint file (state dict, ``{'model': sd}``, safetensors, ...).
        random_init: analyse randomly initialised weights (seeded by ``seed``).
        ema: load ``model_ema`` from a training checkpoint instead of ``model``.
        strict: refuse checkpoints with missing/unexpected keys (else record warnings).
        images: folder of images (recursive), default the bundled sample photographs; or an
            iterable of preprocessed batches (``[B, 3, H, W]`` tensors, or tuples whose first
            item is one, e.g. a ``DataLoader``).
        num_images: the first N readable images in sorted path order (or of the batches).
        sites: token sites among ``embed``, ``mid``, ``block``.
        metrics: fnmatch patterns of metric names (``"hc_*,attn_entropy"``); default all.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        label: run label; default the checkpoint's file stem or ``random-init``.
        progress: show a tqdm bar on stderr (the CLI turns it on for terminals).
        warn: receives one-line warnings (default: print to stderr).
        model_kwargs: extra ``timm.create_model`` arguments (tiny test models).
        featscale_form: ``'doubled'`` / ``'single'`` FeatScale for a model given by name (see
            :func:`vitspec.loading.load_model`). Blocks with AttnScale also get ``pre_attn_*``
            rows: the attention metrics on the pre-scale attention.
        pipeline: on CPU, compute the metrics on two worker threads (token sites, attention)
            that overlap the forward pass (same results; ``False`` runs them in the hooks).

    Returns:
        A ``Result`` with ``.metrics`` and ``.spectra`` DataFrames and ``.info`` provenance.

    Example:
        >>> r = analyze("vit_tiny", random_init=True, num_images=2,
        ...             model_kwargs=dict(depth=2))  # doctest: +SKIP
        >>> r.metric("hc_dc_ratio", site="block")  # doctest: +SKIP
    """
    warn = warn or _stderr_warn
    sites = check_sites(sites)
    specs = select_metrics(metrics)
    dev = resolve_device(device)
    src = open_source(
        model,
        ckpt=ckpt,
        random_init=random_init,
        seed=seed,
        ema=ema,
        strict=strict,
        model_kwargs=model_kwargs,
        featscale_form=featscale_form,
        images=images,
        num_images=num_images,
        batch_size=batch_size,
        device=dev,
        warn=warn,
    )
    net, adapter, batches = src.net, src.adapter, src.batches
    unavailable = {
        s.name: f"defined for {s.num_prefix} prefix tokens (class, distillation); this model "
        f"has {adapter.num_prefix}"
        for s in specs
        if s.num_prefix not in (None, adapter.num_prefix)
    }
    specs = [s for s in specs if s.name not in unavailable]
    if metrics is not None:  # asked for by name: say why it is not measured
        for name, why in unavailable.items():
            warn(f"{name} not measured: {why}")

    # Two lanes, each with its own collector: token sites and attention maps share no state, so
    # on CPU each lane runs on its own worker thread beside the forward pass (vitspec.pipeline),
    # keeping both cores busy; on CUDA the kernels are already asynchronous and run inline.
    tokens = Collector([s for s in specs if s.kind.startswith("token")], adapter.num_prefix, warn)
    attn = Collector([s for s in specs if s.kind.startswith("attn")], adapter.num_prefix, warn)
    attention = bool(attn.attn_specs)
    bar = tqdm(total=src.total, unit="img", disable=not progress, file=sys.stderr, leave=False)
    used = 0
    start = time.perf_counter()
    threaded = pipeline and dev.type == "cpu"
    # threaded: every thread runs its torch ops on one core (the forward pass too), so the
    # forward and the two lanes share the cores without OpenMP teams pre-empting each other
    with (
        _lane(threaded) as token_lane,
        _lane(threaded) as attn_lane,
        _intra_op_threads(1 if threaded else None),
    ):
        with (
            torch.inference_mode(),
            capture(
                adapter,
                sites=sites,
                on_tokens=token_lane.wrap(tokens.on_tokens),
                on_attention=attn_lane.wrap(attn.on_attention) if attention else None,
                on_pre_attention=(
                    attn_lane.wrap(attn.on_pre_attention)
                    if attention and adapter.has_pre_attention
                    else None
                ),
            ),
        ):
            for batch in batches:
                grid = adapter.grid(tuple(batch.shape[-2:]))
                token_lane.wrap(tokens.start_batch)(grid)
                attn_lane.wrap(attn.start_batch)(grid)
                net(batch.to(dev, non_blocking=True))
                bar.update(batch.shape[0])
                used += batch.shape[0]
        token_lane.join()
        attn_lane.join()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - start
    bar.close()

    ids = src.ids(label)
    kinds = {s.name: s.kind for s in specs}
    metric_rows, spectra_rows = rows({**tokens.moments, **attn.moments}, kinds, adapter.depth, ids)
    table = moments_frame(metric_rows, METRIC_COLUMNS)
    spectra = moments_frame(spectra_rows, SPECTRA_COLUMNS)
    validate(table, spectra)
    info = {
        **src.provenance(ids, used),
        "num_heads": attn.num_heads,
        "num_prefix_tokens": adapter.num_prefix,
        "grid": list(tokens.grid),
        "sites": list(sites),
        "metrics": [s.name for s in specs],
        "unavailable": unavailable,
        "attention_refused": {str(k): v for k, v in attn.refused.items()},
        "pre_attention_refused": {str(k): v for k, v in attn.refused_pre.items()},
        "attention_metrics_refused": {
            f"{name} layer {layer}": why for (layer, name), why in attn.refused_metrics.items()
        },
        "techniques": techniques(net),
        "dtype": "float32 forward, float64 metrics and accumulation",
        **src.timing(used, wall),
    }
    return Result(metrics=table, spectra=spectra, info=info)


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


def _lane(threaded: bool):
    return Pipeline(threads=1) if threaded else _Inline()


class _Inline:
    """The Pipeline interface, running every callback at once in the calling thread."""

    def wrap(self, fn):
        return fn

    def join(self) -> None:
        pass

    def __enter__(self):
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


def _stderr_warn(message: str) -> None:
    print(f"vitspec: warning: {message}", file=sys.stderr)
