"""``vitspec.verify``: check the low-pass theory of Wang et al. (ICLR 2022) on a model or on
synthetic softmax matrices, in float64, and report per layer and head how tight each bound is.

The package is ``vitspec.verification`` (not ``vitspec.verify``) so that the submodule never
shadows the function ``vitspec.verify`` on the package.

Example:
    >>> import vitspec
    >>> r = vitspec.verify("deit_small", random_init=True, num_images=2)  # doctest: +SKIP
    >>> r.passed, r.failures  # doctest: +SKIP
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import timm
import torch
from torch import nn

import vitspec
from vitspec.engine import run
from vitspec.errors import VitspecError
from vitspec.inputs import check_count
from vitspec.merge import gather_ranks
from vitspec.outputs import OutputDir
from vitspec.session import Inputs, Weights, check_request, open_session, stderr_warn
from vitspec.shards import restrict, this_part
from vitspec.verification.merge import merge_verify_parts, shard_state, unavailable
from vitspec.verification.result import CHECKS, VERIFY_COLUMNS, VerifyResult, summarise, table

__all__ = ["CHECKS", "VERIFY_COLUMNS", "VerifyResult", "check_usage", "verify"]


def verify(
    model: str | nn.Module | None = None,
    *,
    synthetic: bool = False,
    ckpt: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    ema: bool = False,
    strict: bool = True,
    images: str | Path | Iterable | None = None,
    num_images: int | None = None,
    sample: str = "first",
    sample_seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    label: str | None = None,
    max_steps: int = 512,
    sizes: Sequence[int] | None = None,
    threads: int | None = None,
    progress: bool | str = False,
    warn: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    model_kwargs: dict | None = None,
    img_size: int | None = None,
    featscale_form: str | None = None,
    trust_checkpoint: bool = False,
    out: str | Path | None = None,
    overwrite: bool = False,
    shard: str | tuple[int, int] | None = None,
) -> VerifyResult:
    """Run every check of docs/verify.md on a model's attention (streamed over images), or on the
    synthetic suite (``synthetic=True``, no model).

    Args:
        model: a timm model name or alias, or an ``nn.Module`` used as is; None with
            ``synthetic=True``.
        synthetic: run the synthetic suite instead of a model.
        ckpt, random_init, seed, ema, strict, model_kwargs, img_size, featscale_form,
            trust_checkpoint: the weights, as in ``analyze`` (``seed`` also seeds the random
            test vectors).
        images, num_images, sample, sample_seed, batch_size, device: the inputs, as in
            ``analyze``.
        label: run label (default: checkpoint file stem or ``random-init``).
        max_steps: T, the most powers ``A^t`` lowpass_limit applies (it stops earlier once
            ``r_t < 1e-12``).
        sizes: token counts N of the synthetic suite (default 16, 64, 197, 577).
        threads: torch CPU threads for the run (restored afterwards); None (default) keeps the
            current setting. On CPU the run is data-parallel: whole batches go to that many
            worker threads of one core each (batch i to thread i mod threads, its test vectors
            seeded by i), so the result does not depend on the thread count.
        progress, warn, log: as in ``analyze``.
        out, overwrite: also write the folder there (as :meth:`VerifyResult.save`),
            claimed before the work; ``overwrite`` replaces only a previous vitspec output.
        shard: ``"K/N"``: check only part K of N of the batches (batch b when b mod N = K, as
            ``analyze``; :mod:`vitspec.shards`) and keep the verifier's mergeable state
            (``VerifyResult.state``, written as state.pt for ``vitspec merge``). Under
            ``torchrun`` each rank is a shard by itself: the states are gathered once and rank 0
            returns (and writes to ``out``) the merged run, the other ranks their own part.

    Returns:
        A :class:`VerifyResult`: ``.table`` (verify.csv), ``.info`` (verify.json),
        ``.passed``, ``.failures``.

    Example:
        >>> r = verify(synthetic=True, sizes=[16])  # doctest: +SKIP
        >>> r.passed  # doctest: +SKIP
        True
    """
    check_count(max_steps, "max_steps")
    check_usage(model, synthetic=synthetic, sizes=sizes, ckpt=ckpt, random_init=random_init)
    if threads is not None:
        check_count(threads, "threads")
    part, ranks, device = this_part(shard, device)
    if synthetic and part is not None:
        raise VitspecError(
            "--shard and torchrun split a MODEL's images; run the synthetic suite in one process"
        )
    request = None
    if not synthetic:  # every check before the model is built or an image read
        weights = Weights(
            ckpt,
            random_init,
            seed,
            ema,
            strict,
            model_kwargs,
            featscale_form,
            img_size,
            trust_checkpoint,
        )
        inputs = Inputs(images, num_images, batch_size, sample, sample_seed)
        request = dict(
            weights=weights, inputs=inputs, request=check_request(model, weights, inputs, device)
        )
    writes = out is not None and (ranks is None or ranks.index == 0)
    claim = OutputDir(out, overwrite=overwrite, protect=[images]) if writes else None
    start = time.perf_counter()
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with claim or nullcontext() as tmp:
            if synthetic:
                result = _synthetic(sizes, max_steps, seed, start)
            else:
                result = _model(
                    model,
                    request,
                    label=label,
                    max_steps=max_steps,
                    seed=seed,
                    progress=progress,
                    warn=warn or stderr_warn,
                    log=log,
                    start=start,
                    part=part,
                )
                if ranks is not None:
                    result = gather_ranks(result, merge_verify_parts)
            if tmp is not None:
                result.write(tmp)
        return result
    finally:
        torch.set_num_threads(saved)


def check_usage(model, *, synthetic: bool, sizes=None, ckpt=None, random_init=False) -> None:
    """Raise a one-line :class:`VitspecError` for an impossible combination of arguments.

    Example:
        >>> check_usage(None, synthetic=True, sizes=[16])
    """
    if synthetic and model is not None:
        raise VitspecError(
            "give a MODEL or --synthetic, not both (the synthetic suite needs no model)"
        )
    if not synthetic and model is None:
        raise VitspecError("give a MODEL to verify, or --synthetic for the synthetic suite")
    if synthetic and (ckpt is not None or random_init):
        raise VitspecError(
            "--ckpt / --random-init need a MODEL; the synthetic suite has no weights"
        )
    if sizes is not None:
        if not synthetic:
            raise VitspecError("--sizes applies to the synthetic suite only (use --synthetic)")
        bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 2]
        if bad or not len(sizes):
            raise VitspecError(
                f"synthetic sizes must be whole numbers >= 2, got {bad[0] if bad else 'none'}"
            )


def _versions() -> dict:
    return {
        "vitspec": vitspec.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def _synthetic(sizes, max_steps: int, seed: int, start: float) -> VerifyResult:
    from vitspec.verification import synthetic as syn

    sizes = tuple(syn.SIZES if sizes is None else sizes)
    tallies, points = syn.run_synthetic(sizes, max_steps=max_steps, seed=seed)
    frames = [
        table(t, {"run": "synthetic", "model": f"synthetic-N{n}", "checkpoint": "none"}, {})
        for n, t in tallies.items()
    ]
    df = pd.concat(frames, ignore_index=True)
    info = {
        **_versions(),
        "run": "synthetic",
        "model": "synthetic",
        "synthetic": {
            "sizes": list(sizes),
            "widths": list(syn.WIDTHS),
            "families": list(syn.FAMILIES),
            "samples": syn.SAMPLES,
            "product_depth": syn.PRODUCT_DEPTH,
            "product_paths": syn.PRODUCT_PATHS,
        },
        "seed": seed,
        "max_steps": max_steps,
        "tolerances": CHECKS,
        "dtype": "float64",
        "threads": torch.get_num_threads(),
        "wall_time_s": round(time.perf_counter() - start, 3),
        "command": " ".join(sys.argv),
        "summary": summarise(df),
    }
    return VerifyResult(df, info, {"synthetic": pd.DataFrame(points)})


def _model(
    model, request: dict, *, label, max_steps, seed, progress, warn, log, start, part
) -> VerifyResult:
    from vitspec.verification.model import ModelVerifier

    session = open_session(model, **request, warn=warn, log=log)
    if part is not None:
        restrict(session, part)
    verifier = ModelVerifier(session.adapter, session.device, max_steps=max_steps, seed=seed)
    done = run(session, [verifier], progress=progress, warn=warn, log=log)
    if not verifier.tallies and not (part is not None and done.used == 0):
        raise VitspecError(
            f"no attention matrix was captured from {session.loaded.name}: "
            "its blocks expose no square post-softmax attention"
        )
    ids = session.ids(label)
    df = table(verifier.tallies, ids, verifier.not_applicable())
    wall = time.perf_counter() - start
    info = {
        **session.provenance(ids, done.used),
        "num_heads": verifier.num_heads,
        "tokens": verifier.n_tokens,
        "stages": done.stages,
        "unavailable": unavailable(done.unavailable.as_dict(), verifier),
        "seed": seed,
        "max_steps": max_steps,
        "tolerances": CHECKS,
        "consistency": verifier.consistency(),
        "residual_rate": verifier.residual_note(),
        "dtype": "float32 forward, float64 checks",
        **session.timing(done.used, wall),
        "summary": summarise(df),
    }
    data = {k: pd.DataFrame(v) for k, v in verifier.figure_data().items()}
    state = None
    if part is not None:
        info["shard"] = session.batches.describe()
        if session.image_set is not None:  # every selected file was decoded; keep this part's
            files = session.image_set.used
            info["images"]["files"] = [files[i] for i in session.batches.image_indices]
        state = shard_state(verifier)
    return VerifyResult(df, info, data, state)
