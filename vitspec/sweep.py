"""Several checkpoints of one model in one run: training epochs, seeds, with and without AttnScale.

:func:`analyze_checkpoints` (``vitspec analyze MODEL --ckpt A.pth B.pth ...``) checks every
checkpoint file against the model before any image is read, builds the model once, and analyses
each checkpoint in turn on the same images. Each checkpoint gets a fresh copy of the model built
once (:class:`~vitspec.loading.ModelCache`): techniques added, weights left at their
initialisation, buffers and hooks never carry over, and the image list, collectors and progress
are new for each, so every checkpoint's tables equal those of a separate
:func:`vitspec.analyze` with that ``ckpt``.

A saved series is a folder of run folders, one per checkpoint named by its file stem, and an
``index.json`` listing them; :func:`vitspec.compare` and :func:`vitspec.report` take the folder.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from vitspec.analysis import _measure, select_metrics
from vitspec.capture import check_sites
from vitspec.errors import VitspecError, option
from vitspec.hf import is_hf
from vitspec.loading import ModelCache, check_checkpoint, check_weights
from vitspec.merge import gather_ranks
from vitspec.outputs import OutputDir, seal
from vitspec.results import Result
from vitspec.session import Inputs, Request, Weights, check_request, open_session, stderr_warn
from vitspec.shards import distributed_device, distributed_shard, restrict

INDEX = "index.json"


def iter_checkpoints(
    model: str,
    ckpts: Sequence[str | Path],
    *,
    seed: int = 0,
    ema: bool = False,
    strict: bool = True,
    images: str | Path | Iterable | None = None,
    num_images: int | None = None,
    sample: str = "first",
    sample_seed: int = 0,
    sites: Sequence[str] = ("embed", "block"),
    metrics: str | Sequence[str] | None = None,
    batch_size: int = 16,
    device: str = "auto",
    progress: bool | str = False,
    warn: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    model_kwargs: dict | None = None,
    img_size: int | None = None,
    featscale_form: str | None = None,
    trust_checkpoint: bool = False,
    pipeline: bool = True,
) -> Iterator[tuple[str, Result]]:
    """Analyse each checkpoint in turn; yield ``(file stem, Result)`` as each one finishes.

    Before the first result: the options, the image folder and every file are checked (exists,
    readable, safe to unpickle, EMA entry, block count, keys and shapes after timm's filter,
    against the model built once), so a bad last file fails in seconds, naming it. The options
    are those of :func:`vitspec.analyze`; each run is labelled by its checkpoint's file stem.
    Tensor batches (``images`` an iterable) are read once, so give a folder here. Under
    ``torchrun`` each rank analyses its shard of every checkpoint and the states are gathered
    once per checkpoint: rank 0 gets the merged runs, the other ranks their parts.

    Example:
        >>> for stem, r in iter_checkpoints("deit_small", ["e1.pth", "e2.pth"]):  # doctest: +SKIP
        ...     print(stem, r.metric("hc_dc_ratio", site="block")["mean"].iloc[-1])
    """
    warn = warn or stderr_warn
    ckpts = _check_series(model, ckpts)
    sites = check_sites(sites)
    specs = select_metrics(metrics)
    inputs = Inputs(images, num_images, batch_size, sample, sample_seed)
    ranks = distributed_shard()
    if ranks is not None:
        device = distributed_device(device)
    if images is not None and not isinstance(images, (str, Path)):
        raise VitspecError(
            f"{option('images')} must be a folder or an image file with several checkpoints "
            "(an iterable of batches is used up by the first)"
        )
    common = dict(
        seed=seed,
        ema=ema,
        strict=strict,
        model_kwargs=model_kwargs,
        featscale_form=featscale_form,
        trust_checkpoint=trust_checkpoint,
        img_size=img_size,
    )
    weights = [Weights(ckpt=c, **common) for c in ckpts]
    request = check_request(model, weights[0], inputs, device)
    for w in weights[1:]:
        check_weights(model, ckpt=w.ckpt, model_kwargs=model_kwargs, img_size=img_size)
    cache = ModelCache()
    for ckpt in ckpts:
        with _naming(ckpt):
            check_checkpoint(model, ckpt, cache=cache, **common)
    if log is not None:
        log(f"{len(ckpts)} checkpoints fit {model}: the model is built once, copied for each")
    with _process_group(ranks):
        for ckpt, w in zip(ckpts, weights):
            # the listed images afresh for each run: iterating fills their used / skipped lists
            listed = request.image_set
            fresh = dataclasses.replace(listed, paths=list(listed.paths), used=[], skipped=[])
            with _naming(ckpt):
                session = open_session(
                    model,
                    weights=w,
                    inputs=inputs,
                    warn=warn,
                    log=log,
                    request=Request(request.device, fresh),
                    cache=cache,
                )
                if ranks is not None:
                    restrict(session, ranks)
                result = _measure(
                    session,
                    specs,
                    sites,
                    asked=metrics is not None,
                    label=Path(ckpt).stem,
                    progress=progress,
                    warn=warn,
                    log=log,
                    pipeline=pipeline,
                )
                if ranks is not None:
                    result = gather_ranks(result)
            del session  # the model copy goes before the next one is made
            yield Path(ckpt).stem, result


def analyze_checkpoints(
    model: str,
    ckpts: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    **options,
) -> dict[str, Result]:
    """Analyse several checkpoints of one model (built once) on the same images.

    Args:
        model: a timm model name or alias.
        ckpts: checkpoint files, two or more usually (``sorted(glob.glob("ckpts/*.pth"))``);
            their file stems label the runs and must differ.
        out: also write the series there: one run folder per checkpoint, named by its stem,
            and ``index.json``; claimed before the work. :func:`vitspec.compare` and
            :func:`vitspec.report` accept the folder.
        overwrite: replace a previous vitspec output at ``out`` (written by rank 0 alone under
            ``torchrun``).
        **options: those of :func:`iter_checkpoints` (:func:`vitspec.analyze`'s but ``ckpt``,
            ``random_init``, ``label`` and ``shard``).

    Returns:
        ``{file stem: Result}`` in the order of ``ckpts``; each Result equals that of
        ``vitspec.analyze(model, ckpt=...)`` with the same options.

    Example:
        >>> runs = analyze_checkpoints("deit_small", ["e1.pth", "e2.pth"],
        ...                            num_images=8, out="runs/epochs")  # doctest: +SKIP
        >>> runs["e2"].metric("hc_dc_ratio", site="block")  # doctest: +SKIP
    """
    protect = [options.get("images"), *ckpts]
    ranks = distributed_shard()
    writes = out is not None and (ranks is None or ranks.index == 0)
    claim = OutputDir(out, overwrite=overwrite, protect=protect) if writes else None
    results: dict[str, Result] = {}
    with claim or nullcontext() as tmp:
        for stem, result in iter_checkpoints(model, ckpts, **options):
            if tmp is not None:
                write_run(tmp, stem, result)
            results[stem] = result
        if tmp is not None:
            write_index(tmp, model, results)
    return results


def write_run(root: Path, stem: str, result: Result, draw: Callable | None = None) -> Path:
    """Write ``result`` into the run folder ``root/stem`` (figures by ``draw(folder)`` when
    given) and seal it; return the folder."""
    folder = root / stem
    folder.mkdir()
    result.write(folder)
    if draw is not None:
        draw(folder)
    seal(folder)
    return folder


def write_index(root: Path, model: str, results: dict[str, Result]) -> None:
    """``index.json``: the model and, per checkpoint in order, its run folder, run name, file
    and sha256 (``vitspec.results.expand_runs`` reads it)."""
    runs = [
        {
            "folder": stem,
            "run": r.info["run"],
            "checkpoint": r.info["weights"]["checkpoint_path"],
            "sha256": r.info["weights"]["sha256"],
        }
        for stem, r in results.items()
    ]
    index = {"kind": "vitspec checkpoints", "model": model, "runs": runs}
    (root / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _check_series(model, ckpts) -> list[str | Path]:
    """A model name and a list of checkpoint files with distinct stems."""
    if not isinstance(model, str) or is_hf(model):
        raise VitspecError(
            "several checkpoints need a timm model name (a module or hf: folder has its weights)"
        )
    if isinstance(ckpts, (str, Path)) or not ckpts:
        raise VitspecError(f"{option('ckpt')} takes a list of checkpoint files, got {ckpts!r}")
    stems = [Path(c).stem for c in ckpts]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise VitspecError(
            f"{option('ckpt')} files share the stem {twice[0]!r}: runs are named by it"
        )
    return list(ckpts)


@contextmanager
def _process_group(ranks) -> Iterator[None]:
    """Under torchrun, one gloo process group for the whole series (each checkpoint's states
    are gathered in it), unless the caller started one."""
    import torch.distributed as dist

    owned = ranks is not None and not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        if owned:
            dist.destroy_process_group()


class _naming:
    """Prefix a VitspecError raised in the block with the checkpoint's path, unless it names
    the file already."""

    def __init__(self, ckpt: str | Path):
        self.ckpt = str(ckpt)

    def __enter__(self) -> None:
        pass

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is VitspecError and Path(self.ckpt).name not in str(exc):
            raise VitspecError(f"{self.ckpt}: {exc}", exc.exit_code) from None
        return False
