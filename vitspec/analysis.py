"""``vitspec.analyze``: model + images -> streamed Fourier-domain oversmoothing measures."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

from torch import nn

from vitspec.capture import check_sites
from vitspec.collect import PRE, Collector, rows
from vitspec.engine import available_sites, run
from vitspec.errors import VitspecError, option
from vitspec.merge import gather_ranks
from vitspec.metrics import MetricSpec, list_metrics
from vitspec.outputs import OutputDir
from vitspec.results import METRIC_COLUMNS, SPECTRA_COLUMNS, Result, moments_frame, validate
from vitspec.scaling import techniques
from vitspec.session import Inputs, Weights, check_request, open_session, stderr_warn
from vitspec.shards import ShardBatches, plain_state, restrict, this_part
from vitspec.sites import Unavailable


def select_metrics(patterns: str | Sequence[str] | None) -> list[MetricSpec]:
    """Metrics whose names match any of the comma-separated fnmatch patterns (default: every
    metric of the contract; ``cls_dist_cos`` is measured when asked for).

    Example:
        >>> [s.name for s in select_metrics("hc_*")]
        ['hc_dc_ratio', 'hc_energy']
    """
    specs = list_metrics()
    if patterns is None:
        return [s for s in specs if s.default]
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [s for s in specs if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(s.name, p) for s in specs)]
    if unmatched or not chosen:
        raise VitspecError(
            f"no metric matches {option('metrics')} {unmatched[0] if unmatched else patterns!r}; "
            f"allowed: {', '.join(s.name for s in specs)}"
        )
    return chosen


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
    sample: str = "first",
    sample_seed: int = 0,
    sites: Sequence[str] = ("embed", "block"),
    metrics: str | Sequence[str] | None = None,
    batch_size: int = 16,
    device: str = "auto",
    label: str | None = None,
    progress: bool | str = False,
    warn: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    model_kwargs: dict | None = None,
    img_size: int | None = None,
    featscale_form: str | None = None,
    trust_checkpoint: bool = False,
    pipeline: bool = True,
    out: str | Path | None = None,
    overwrite: bool = False,
    shard: str | tuple[int, int] | None = None,
) -> Result:
    """Capture every block's tokens and attention on a set of images and reduce them to metrics.

    Every argument is checked (and the image folder listed) before the model is built or an
    image read: a mistake costs a second, not a model load.

    Args:
        model: a timm model name or alias (``deit_small``), or an ``nn.Module`` used as is.
        ckpt: local checkpoint file (state dict, ``{'model': sd}``, safetensors, ...); several:
            :func:`vitspec.sweep.analyze_checkpoints`.
        random_init: analyse randomly initialised weights (seeded by ``seed``).
        ema: load ``model_ema`` from a training checkpoint instead of ``model``.
        strict: refuse checkpoints with missing/unexpected keys (else record warnings).
        images: folder of images (recursive) or one image file, default the bundled sample
            photographs; or an iterable of preprocessed batches (``[B, 3, H, W]`` tensors, or
            tuples whose first item is one, e.g. a ``DataLoader``).
        num_images: how many readable images (or images of the batches) to use.
        sample: ``'first'`` (sorted path order) or ``'random'`` (a uniform draw from the whole
            folder, seeded by ``sample_seed``); see :mod:`vitspec.inputs`.
        sample_seed: the seed of ``sample='random'``.
        sites: token sites among ``embed``, ``mid``, ``block``.
        metrics: fnmatch patterns of metric names (``"hc_*,attn_entropy"``); default all.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        label: run label; default the checkpoint's file stem or ``random-init``.
        progress: ``True`` shows progress on stderr (a bar on a terminal, else a line about
            every 10 % or 30 s through ``log``); ``'bar'`` / ``'lines'`` force one.
        warn: receives one-line warnings (default: print to stderr).
        log: receives one-line notes (weights, model geometry, images, progress lines); default
            none.
        model_kwargs: extra ``timm.create_model`` arguments (``depth=24``,
            ``dynamic_img_size=True``, tiny test models).
        img_size: analyse ``img_size`` x ``img_size`` images: the model is built for that size
            (a checkpoint's position embeddings are resampled by timm, and run.json says so)
            and the eval transform uses it.
        featscale_form: ``'doubled'`` / ``'single'`` FeatScale for a model given by name (see
            :func:`vitspec.loading.load_model`). Blocks with AttnScale also get ``pre_attn_*``
            rows: the attention metrics on the pre-scale attention.
        trust_checkpoint: allow a checkpoint that needs full unpickling (it can run code from
            the file); refused otherwise, naming the type it holds.
        pipeline: on CPU, run whole batches on one worker thread per torch thread, each
            with its own collectors merged at the end (:func:`vitspec.engine.run`; the same
            results to ~1e-16); ``False`` runs the metrics in the hooks of one forward loop.
        out: also write the run folder there (as :meth:`Result.save`; ``vitspec.report(out)``
            draws its figures), claimed before the work: an unwritable or occupied location
            fails at once, not after the analysis.
        overwrite: replace a previous vitspec output at ``out`` (never anything else).
        shard: ``"K/N"``: analyse only part K of N of the batches (batch b when b mod N = K;
            :mod:`vitspec.shards`) and keep the mergeable state (``Result.state``, written as
            state.pt). Under ``torchrun`` each rank is a shard by itself: the states are
            gathered once and rank 0 returns (and writes to ``out``) the merged run, the other
            ranks their own part.

    Returns:
        A ``Result`` with ``.metrics`` and ``.spectra`` DataFrames and ``.info`` provenance.

    Example:
        >>> r = analyze("vit_tiny", random_init=True, num_images=2,
        ...             model_kwargs=dict(depth=2))  # doctest: +SKIP
        >>> r.metric("hc_dc_ratio", site="block")  # doctest: +SKIP
    """
    if isinstance(ckpt, (list, tuple)):
        raise VitspecError(
            f"{option('ckpt')} takes one file; for several, vitspec.analyze_checkpoints builds "
            "the model once and writes one run folder each"
        )
    warn = warn or stderr_warn
    sites = check_sites(sites)
    specs = select_metrics(metrics)
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
    part, ranks, device = this_part(shard, device)
    request = check_request(model, weights, inputs, device)
    writes = out is not None and (ranks is None or ranks.index == 0)
    claim = OutputDir(out, overwrite=overwrite, protect=[images]) if writes else None
    with claim or nullcontext() as tmp:
        session = open_session(
            model, weights=weights, inputs=inputs, warn=warn, log=log, request=request
        )
        if part is not None:
            restrict(session, part)
        result = _measure(
            session,
            specs,
            sites,
            asked=metrics is not None,
            label=label,
            progress=progress,
            warn=warn,
            log=log,
            pipeline=pipeline,
        )
        if ranks is not None:
            result = gather_ranks(result)
        if tmp is not None:
            result.write(tmp)
    return result


def _measure(
    session,
    specs: list[MetricSpec],
    sites: tuple[str, ...],
    *,
    asked: bool,
    label,
    progress,
    warn,
    log,
    pipeline,
) -> Result:
    """Run the two metric consumers over the session and tabulate."""
    adapter = session.adapter
    specs, not_scheduled = schedule(specs, available_sites(adapter), adapter.unavailable(), warn)
    specs = _class_and_distillation(specs, session.net, not_scheduled, warn if asked else None)

    # Two consumers, token sites and attention maps: they share no state, so on CPU each runs on
    # its own worker lane beside the forward pass, keeping both cores busy.
    tokens = Collector([s for s in specs if s.kind.startswith("token")], sites, warn)
    attn = Collector([s for s in specs if s.kind.startswith("attn")], (), warn)
    consumers = [c for c in (tokens, attn) if c.sites]
    done = run(session, consumers, progress=progress, pipeline=pipeline, warn=warn, log=log)

    ids = session.ids(label)
    kinds = {s.name: s.kind for s in specs}
    kinds.update({name: "attn" for name in adapter.head_params() if attn.attn_specs})
    metric_rows, spectra_rows = rows({**tokens.moments, **attn.moments}, kinds, adapter.depth, ids)
    table = moments_frame(metric_rows, METRIC_COLUMNS)
    spectra = moments_frame(spectra_rows, SPECTRA_COLUMNS)
    validate(table, spectra)
    unavailable = not_scheduled
    for part in (done.unavailable, tokens.unavailable, attn.unavailable):
        unavailable.update(part)
    geometry = adapter.geometry(done.image_hw) if done.image_hw else []
    info = {
        **session.provenance(ids, done.used),
        "num_heads": attn.num_heads,
        "num_prefix_tokens": geometry[0].prefix if geometry else None,
        "grid": list(geometry[0].grid) if geometry else [0, 0],
        "stages": done.stages,
        "sites": list(sites),
        "metrics": [s.name for s in specs],
        "unavailable": unavailable.as_dict(),
        "attention_refused": {str(k): v for k, v in attn.refused[""].items()},
        "pre_attention_refused": {str(k): v for k, v in attn.refused[PRE].items()},
        "attention_metrics_refused": {
            f"{name} layer {layer}": why for (layer, name), why in attn.dropped.items()
        },
        "techniques": techniques(session.net),
        "dtype": "float32 forward, float64 metrics and accumulation",
        **session.timing(done.used, done.wall),
    }
    state = None
    if isinstance(session.batches, ShardBatches):
        info["shard"] = session.batches.describe()
        if session.image_set is not None:  # every selected file was decoded; keep this part's
            files = session.image_set.used
            info["images"]["files"] = [files[i] for i in session.batches.image_indices]
        state = {"tokens": plain_state(tokens.state()), "attn": plain_state(attn.state())}
    return Result(metrics=table, spectra=spectra, info=info, state=state)


def _class_and_distillation(specs, net, unavailable: Unavailable, warn) -> list[MetricSpec]:
    """Drop the metrics defined only for a class and a distillation token (``cls_dist_cos``)
    when the model has no distillation token; the reason goes to ``unavailable`` (and to
    ``warn`` when given: the metric was asked for by name)."""
    if getattr(net, "dist_token", None) is not None:
        return specs
    why = (
        "defined for 2 prefix tokens, a class and a distillation token (distilled DeiT); this "
        f"model has {getattr(net, 'num_prefix_tokens', 0)} and no distillation token"
    )
    gone = Unavailable(warn)
    for spec in specs:
        if "class_and_distillation" in spec.needs:
            gone.add(spec.name, why)
    unavailable.update(gone)
    return [s for s in specs if s.name not in gone]


def schedule(
    specs: list[MetricSpec], sites: frozenset[str], stated: dict[str, str], warn
) -> tuple[list[MetricSpec], Unavailable]:
    """The metrics whose sites the model has, and the others as unavailable (with the reason
    the adapter states for their sites, or for the metric).

    Example:
        >>> from vitspec.metrics import get_metric
        >>> kept, gone = schedule([get_metric("erank"), get_metric("attn_cos")],
        ...                       frozenset({"resid_post"}), {"pattern": "channel attention"}, None)
        >>> [s.name for s in kept], gone.as_dict()
        (['erank'], {'attn_cos': 'channel attention'})
    """
    kept, gone = [], Unavailable(warn)
    for spec in specs:
        if spec.name in stated:
            gone.add(spec.name, stated[spec.name])
        elif sites.isdisjoint(spec.sites):
            why = next((stated[s] for s in spec.sites if s in stated), None)
            gone.add(spec.name, why or f"the model has none of its sites ({', '.join(spec.sites)})")
        else:
            kept.append(spec)
    return kept, gone
