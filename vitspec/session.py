"""A run's session: the checked request, the model with its weights, its adapter and its images.

``check_request`` makes every check that needs no model and reads no image; ``open_session``
resolves the device, loads the model and weights (:mod:`vitspec.loading`, or an ``hf:`` folder),
finds the adapter and opens the images. :func:`vitspec.engine.run` then drives the forward loop
over the session's batches.
"""

from __future__ import annotations

import platform
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import nn

import vitspec
from vitspec import hf
from vitspec.adapters import Adapter, get_adapter
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
