"""Image inputs: find a user's images (or the bundled set), decode them, batch them.

This is the only module that reads image files and timm's data config. Everything that can go wrong
with a user's folder is turned into one :class:`~vitspec.errors.VitspecError` here; a single bad
file is skipped with a one-line warning instead.

Rules, so results are reproducible:

* Candidates are the files under the folder (recursively) whose extension is one of
  :data:`IMAGE_EXTENSIONS` (case-insensitive), sorted by their relative POSIX path, or the one
  image file given. Hidden files and folders (name starting with ``.``, e.g. macOS ``._x.jpg``
  resource forks) are ignored.
* ``sample="first"``: "the first N images" are the first N *readable* candidates in that order.
  ``sample="random"``: the candidates in a seeded uniform random order (``random.Random(seed)``),
  then the first N readable of that order: a uniform draw of N paths from the whole tree, the
  same for the same seed and tree. Unreadable or truncated files are skipped, recorded in
  :attr:`ImageSet.skipped`, and do not count.
* Every image is decoded in full (``img.load()``, so a truncated file is caught) and converted with
  plain ``img.convert("RGB")``: greyscale is replicated into three channels, palette images are
  expanded, and transparency is dropped *without* compositing (RGBA/LA pixels keep their colour,
  the alpha channel is discarded). High-bit-depth greyscale (16-bit PNG / TIFF, Pillow modes
  ``I;16*``, and ``I`` holding values above 255) is scaled to 8 bits (divided by 257, so
  65535 -> 255), not clipped; float images (mode ``F``) are taken as [0, 1].
* Decoding and the timm transform run in a small thread pool that works one batch ahead of the
  caller, so reading overlaps the model's forward pass; the order of images is exactly the
  sequential order.
"""

from __future__ import annotations

import random
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitspec.errors import VitspecError, option

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_KINDS = "jpg, jpeg, png, bmp, webp, tif"
_BUNDLED = "bundled"
_MAX_NAMED_SKIPS = 5
SAMPLES = ("first", "random")


def bundled_images_dir() -> Path:
    """Folder of the small photo set that ships with vitspec (see its ``LICENSES`` file).

    Example:
        >>> sorted(p.name for p in bundled_images_dir().glob("*.jpg"))[:2]
        ['astronaut.jpg', 'chelsea.jpg']
    """
    return Path(__file__).resolve().parent / "data" / "images"


@dataclass
class ImageSet:
    """A deterministic list of candidate image files and what happened to them.

    Attributes:
        source: the folder (or image file) as an absolute path string, or ``'bundled'``.
        paths: candidate files (absolute) in the order they are tried: sorted by relative POSIX
            path (``sample='first'``) or in the seeded random order (``sample='random'``).
        num_images: how many readable images to use; ``None`` means all.
        found: how many candidate files the folder holds.
        sample: ``'first'`` or ``'random'``.
        seed: the seed of the random order.
        used: relative paths of the images actually analysed, in order (filled while iterating).
        skipped: ``{'path': rel, 'reason': str}`` for each unreadable file met while iterating.
    """

    source: str
    paths: list[Path]
    num_images: int | None
    found: int = 0
    sample: str = "first"
    seed: int = 0
    used: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    @property
    def root(self) -> Path:
        """The folder the relative paths in ``used`` and ``skipped`` are relative to."""
        if self.source == _BUNDLED:
            return bundled_images_dir()
        source = Path(self.source)
        return source.parent if source.is_file() else source

    def relpath(self, path: Path) -> str:
        """``path`` relative to :attr:`root`, as a POSIX string."""
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return Path(path).as_posix()


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _list_images(root: Path) -> list[Path]:
    found = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(rel) and p.is_file():
            found.append((rel.as_posix(), p))
    found.sort(key=lambda item: item[0])
    return [p for _, p in found]


def check_count(value: Any, name: str) -> None:
    """Refuse anything but a whole number >= 1, naming the option as the caller spells it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VitspecError(f"{option(name)} must be a whole number >= 1, got {value!r}")


def open_images(
    folder: str | Path | None = None,
    num_images: int | None = None,
    *,
    sample: str = "first",
    seed: int = 0,
) -> ImageSet:
    """List the images of ``folder`` (recursively), or the bundled set when ``folder`` is None.

    Nothing is decoded here; unreadable files are found (and skipped) by :func:`iter_batches`.

    Args:
        folder: a directory of images, one image file, or ``None`` for the bundled sample photos.
        num_images: use N readable images; ``None`` for all.
        sample: ``'first'`` (sorted order) or ``'random'`` (a seeded uniform draw).
        seed: the seed of ``sample='random'``.

    Raises:
        VitspecError: the folder is missing, holds no image files, holds fewer than
            ``num_images``, or an argument is out of range.

    Example:
        >>> images = open_images(num_images=4)
        >>> images.source, images.num_images, len(images.paths) >= 10
        ('bundled', 4, True)
    """
    if num_images is not None:
        check_count(num_images, "num_images")
    if sample not in SAMPLES:
        raise VitspecError(
            f"{option('sample')} must be one of {', '.join(SAMPLES)}, got {sample!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise VitspecError(f"{option('sample_seed')} must be a whole number, got {seed!r}")
    if folder is None:
        root, source = bundled_images_dir(), _BUNDLED
    else:
        root = Path(folder).expanduser().absolute()
        source = str(root)
    if root.is_file():
        if root.suffix.lower() not in IMAGE_EXTENSIONS:
            raise VitspecError(f"{root} is not an image file ({_KINDS}) or a folder")
        paths = [root]
    elif root.is_dir():
        paths = _list_images(root)
    else:
        raise VitspecError(f"image folder or file not found: {root}")
    if not paths:
        raise VitspecError(f"no images ({_KINDS}) in {root}")
    if num_images is not None and num_images > len(paths):
        where = "the bundled images" if source == _BUNDLED else root
        raise VitspecError(
            f"{option('num_images')} is {num_images} but only {len(paths)} image "
            f"file{'s were' if len(paths) != 1 else ' was'} found in {where}"
        )
    found = len(paths)
    if sample == "random":
        random.Random(seed).shuffle(paths)
    return ImageSet(source, paths, num_images, found=found, sample=sample, seed=seed)


def eval_data_config(model: torch.nn.Module) -> dict:
    """timm's data config for ``model`` (``timm.data.resolve_model_data_config``), with one fix.

    timm reads the size from the model's ``pretrained_cfg``, which does not change when a model is
    built with another ``img_size`` (``create_model(..., img_size=64)`` still says 224). When the
    model has a fixed input size (a ``patch_embed.img_size`` and no ``dynamic_img_size``) that
    differs, ``input_size`` is set to the model's size so the forward pass accepts the images.
    Interpolation, mean, std, crop_pct and crop_mode are timm's, unchanged.

    Example:
        >>> import timm
        >>> m = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=1)
        >>> eval_data_config(m)["input_size"]
        (3, 64, 64)
    """
    import timm.data

    cfg = dict(timm.data.resolve_model_data_config(model))
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    dynamic = bool(getattr(model, "dynamic_img_size", False)) or bool(
        getattr(patch_embed, "dynamic_img_size", False)
    )
    if img_size is not None and not dynamic:
        hw = tuple(
            int(s) for s in (img_size if isinstance(img_size, (tuple, list)) else (img_size,) * 2)
        )
        chans = cfg["input_size"][0]
        if tuple(cfg["input_size"][1:]) != hw:
            cfg["input_size"] = (chans, *hw)
    return cfg


def eval_transform(model: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """timm's evaluation transform for ``model``: resize, centre crop, to tensor, normalise.

    Exactly ``timm.data.create_transform(**cfg, is_training=False)`` with ``cfg`` from
    :func:`eval_data_config`.

    Example:
        >>> import timm
        >>> from PIL import Image
        >>> m = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=1)
        >>> eval_transform(m)(Image.new("RGB", (100, 80))).shape
        torch.Size([3, 64, 64])
    """
    import timm.data

    return timm.data.create_transform(**eval_data_config(model), is_training=False)


def _read(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()  # full decode: truncated files raise here
        return to_rgb8(img)


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB; high-bit-depth greyscale is scaled to 0..255 (Pillow's own convert clips it).

    Example:
        >>> grey16 = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
        >>> to_rgb8(grey16).getpixel((0, 0))
        (255, 255, 255)
    """
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        scale = 1 / 257  # 16-bit: 65535 / 257 = 255
        if img.mode == "F":
            scale = 255.0
        elif img.mode == "I" and values.max(initial=0) <= 255:
            scale = 1.0  # a 32-bit container of 8-bit values
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def _load(path: Path, transform: Callable) -> torch.Tensor | str:
    """Decode and transform one file; return the tensor, or a short reason it could not be read."""
    try:
        img = _read(path)
    except Exception as err:  # noqa: BLE001 - any decode failure means "skip this file"
        message = " ".join(str(err).split())[:200]
        return f"{type(err).__name__}: {message}" if message else type(err).__name__
    return transform(img)


def _default_warn(message: str) -> None:
    print(message, file=sys.stderr)


def iter_batches(
    images: ImageSet,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    *,
    warn: Callable[[str], None] | None = None,
    num_workers: int = 2,
) -> Iterator[torch.Tensor]:
    """Yield float32 batches ``[B, 3, H, W]`` of the first ``images.num_images`` readable images.

    Clears and refills ``images.used`` and ``images.skipped``. Files are decoded in a thread pool
    of ``num_workers`` threads working up to one batch ahead; the order is the sorted order, the
    same as a sequential loop. No file after the N-th readable one is opened. The last batch may
    be smaller than ``batch_size``. Closing the iterator (or dropping it) shuts the pool down.

    Args:
        images: from :func:`open_images`.
        transform: PIL image -> ``[3, H, W]`` tensor, usually :func:`eval_transform`.
        batch_size: images per batch, >= 1.
        warn: called once per skipped file with ``"skipping unreadable image REL: REASON"``;
            the default prints that line to stderr.
        num_workers: decoding threads, >= 1.

    Raises:
        VitspecError: bad ``batch_size``/``num_workers``, or no candidate file was readable.

    Example:
        >>> images = open_images(num_images=3)
        >>> to_tensor = lambda im: torch.zeros(3, 8, 8)
        >>> [b.shape[0] for b in iter_batches(images, to_tensor, batch_size=2)], len(images.used)
        ([2, 1], 3)
    """
    check_count(batch_size, "batch_size")
    check_count(num_workers, "num_workers")
    return _batches(images, transform, batch_size, warn or _default_warn, num_workers)


def _batches(
    images: ImageSet,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    warn: Callable[[str], None],
    num_workers: int,
) -> Iterator[torch.Tensor]:
    images.used.clear()
    images.skipped.clear()
    limit = images.num_images if images.num_images is not None else len(images.paths)
    window = 2 * batch_size  # the batch being filled plus the next one
    todo = iter(images.paths)
    pending: deque[tuple[Path, Future]] = deque()
    batch: list[torch.Tensor] = []
    accepted = 0
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="vitspec-decode")
    try:
        while True:
            # Never queue more files than could still be needed: each queued file yields at most
            # one image, so nothing past the N-th readable file is ever opened.
            while len(pending) < min(window, limit - accepted):
                path = next(todo, None)
                if path is None:
                    break
                pending.append((path, pool.submit(_load, path, transform)))
            if not pending:
                break
            path, future = pending.popleft()
            result = future.result()
            rel = images.relpath(path)
            if isinstance(result, str):
                images.skipped.append({"path": rel, "reason": result})
                warn(f"skipping unreadable image {rel}: {result}")
                continue
            images.used.append(rel)
            batch.append(result)
            accepted += 1
            if len(batch) == batch_size:
                out, batch = torch.stack(batch).to(torch.float32), []
                yield out
        if batch:
            yield torch.stack(batch).to(torch.float32)
        if accepted == 0:
            names = [s["path"] for s in images.skipped]
            shown = ", ".join(names[:_MAX_NAMED_SKIPS]) + (
                " ..." if len(names) > _MAX_NAMED_SKIPS else ""
            )
            where = "the bundled images" if images.source == _BUNDLED else images.source
            raise VitspecError(
                f"no readable image in {where} ({len(names)} files skipped: {shown})"
            )
    finally:
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def synthetic_batches(
    n: int, batch_size: int, size: tuple[int, int], seed: int = 0
) -> Iterator[torch.Tensor]:
    """Yield ``n`` standard-normal float32 images ``[B, 3, H, W]`` (already "normalised").

    Image ``i`` is the same whatever ``batch_size`` is (each image is drawn separately from one
    seeded generator), so benchmarks with different batch sizes see the same data.

    Example:
        >>> [b.shape[0] for b in synthetic_batches(5, 2, (16, 16))]
        [2, 2, 1]
    """
    check_count(n, "n")
    check_count(batch_size, "batch_size")
    if len(size) != 2:
        raise VitspecError(f"size must be (height, width), got {size!r}")
    for s in size:
        check_count(s, "image height and width")
    gen = torch.Generator().manual_seed(seed)
    height, width = int(size[0]), int(size[1])
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        yield torch.stack([torch.randn(3, height, width, generator=gen) for _ in range(count)])
