"""Command line: a thin layer over the Python API. Every subcommand has a Python twin."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

from vitspec.cli_parser import build_parser
from vitspec.errors import VitspecError, cli_names
from vitspec.outputs import OutputDir

INDEX = "index.json"  # the run folders of a several-checkpoint analyze (vitspec.sweep)


def _analyze(args: argparse.Namespace) -> int:
    ckpts = _checkpoints(args.ckpt)
    if len(ckpts) > 1:
        return _analyze_many(args, ckpts)
    args.ckpt = ckpts[0] if ckpts else None
    label = args.label or _label(args)
    name = Path(args.model[3:]).name if args.model.startswith("hf:") else args.model
    out = Path(args.out or f"runs/{name}-{label}")
    _check_paths(args)
    from vitspec.shards import distributed_shard, parse_shard

    shard = parse_shard(args.shard)  # a bad K/N fails before the model is built
    rank = distributed_shard()
    if rank is not None and rank.index != 0:  # torchrun: rank 0 writes the merged run
        from vitspec.analysis import analyze

        analyze(args.model, **_analyze_options(args, label), **_messages(args, quiet=True))
        return 0
    # the output location is claimed (its temporary sibling created) before torch is imported
    with OutputDir(out, overwrite=args.overwrite, protect=[args.images]) as tmp:
        from vitspec.analysis import analyze

        result = analyze(args.model, **_analyze_options(args, label), **_messages(args))
        result.write(tmp)
        _draw(tmp, args)
    info = result.info
    part = f" (shard {shard}, state.pt for vitspec merge)" if shard else ""
    _say(
        args,
        f"{info['images']['used']} images, {info['images_per_s']} img/s on {info['device']}"
        f" -> {out}/ (metrics.csv, spectra.csv, run.json"
        f"{', figures' if not args.no_figures else ''}){part}",
    )
    return 0


def _analyze_options(args: argparse.Namespace, label: str) -> dict:
    return dict(
        **_weights(args),
        **_inputs(args),
        sites=[s.strip() for s in args.sites.split(",") if s.strip()],
        metrics=args.metrics,
        device=args.device,
        label=label,
        featscale_form=args.featscale_form,
        shard=args.shard,
    )


def _checkpoints(values: list[str] | str | None) -> list[str]:
    """``--ckpt`` values with shell-style patterns expanded (sorted), in the order given."""
    if values is None:
        return []
    out: list[str] = []
    for value in [values] if isinstance(values, str) else values:
        if glob.has_magic(value):
            found = sorted(glob.glob(os.path.expanduser(value)))
            if not found:
                raise VitspecError(f"--ckpt {value!r} matches no file")
            out += found
        else:
            out.append(value)
    return out


def _analyze_many(args: argparse.Namespace, ckpts: list[str]) -> int:
    """One run folder per checkpoint (named by its file stem) under --out, plus index.json; the
    model is built once and every file checked before the first analysis."""
    if args.label or args.shard:
        raise VitspecError("--label and --shard take one --ckpt (each run is labelled by its stem)")
    name = Path(args.model[3:]).name if args.model.startswith("hf:") else args.model
    out = Path(args.out or f"runs/{name}-checkpoints")
    for ckpt in ckpts:
        args.ckpt = ckpt
        _check_paths(args)
    options = _analyze_options(args, "")
    for key in ("ckpt", "random_init", "label", "shard"):
        del options[key]
    from vitspec.shards import distributed_shard

    rank = distributed_shard()
    if rank is not None and rank.index != 0:  # torchrun: rank 0 writes the merged runs
        from vitspec.sweep import iter_checkpoints

        for _ in iter_checkpoints(args.model, ckpts, **options, **_messages(args, quiet=True)):
            pass
        return 0
    with OutputDir(out, overwrite=args.overwrite, protect=[args.images, *ckpts]) as tmp:
        from vitspec.sweep import iter_checkpoints, write_index, write_run

        results = {}
        for stem, result in iter_checkpoints(args.model, ckpts, **options, **_messages(args)):
            write_run(tmp, stem, result, draw=lambda folder: _draw(folder, args))
            results[stem] = result
            _say(args, f"{stem}: {result.info['images']['used']} images -> {out / stem}/")
        write_index(tmp, args.model, results)
    _say(args, f"{len(ckpts)} checkpoints -> {out}/ ({INDEX} lists the run folders)")
    return 0


def _merge(args: argparse.Namespace) -> int:
    with OutputDir(args.out, overwrite=args.overwrite, protect=args.shard_dirs) as tmp:
        from vitspec.merge import merge_runs
        from vitspec.verification.result import VerifyResult

        result = merge_runs(args.shard_dirs)
        result.write(tmp)
        _draw(tmp, args)
    used = result.info["images"]["used"]
    if isinstance(result, VerifyResult):  # verify shards: the verdict of the merged run
        return _verdict(
            args, result, Path(args.out), f"{len(args.shard_dirs)} shards, {used} images"
        )
    _say(args, f"{len(args.shard_dirs)} shards, {used} images -> {args.out}/")
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """The input paths exist (checked again, in full, by the library)."""
    for what, path in (("image folder or file", args.images), ("checkpoint", args.ckpt)):
        if path is not None and not Path(path).expanduser().exists():
            raise VitspecError(f"{what} not found: {path}")


def _label(args: argparse.Namespace) -> str:
    if args.ckpt:
        return Path(args.ckpt).stem
    return "random-init" if args.random_init else "pretrained"


def _weights(args: argparse.Namespace) -> dict:
    """The weight options of analyze / verify, from their shared flags."""
    return dict(
        ckpt=args.ckpt,
        random_init=args.random_init,
        seed=args.seed,
        ema=args.ema,
        strict=not args.non_strict,
        model_kwargs=dict(args.model_arg) if args.model_arg else None,
        img_size=args.img_size,
        trust_checkpoint=args.trust_checkpoint,
    )


def _inputs(args: argparse.Namespace) -> dict:
    """The image options of analyze / verify."""
    return dict(
        images=args.images,
        num_images=args.num_images,
        sample=args.sample,
        sample_seed=args.sample_seed,
        batch_size=args.batch_size,
    )


def _messages(args: argparse.Namespace, quiet: bool = False) -> dict:
    """Progress, notes and warnings on stderr; ``--quiet`` keeps only errors."""
    quiet = quiet or args.quiet
    return dict(
        progress=not quiet,
        log=None if quiet else lambda line: print(f"vitspec: {line}", file=sys.stderr),
        warn=(lambda _line: None) if quiet else None,
    )


def _compare(args: argparse.Namespace) -> int:
    with OutputDir(args.out, overwrite=args.overwrite, protect=args.run_dirs) as tmp:
        from vitspec.comparison import compare

        result = compare(
            args.run_dirs,
            None,
            metrics=args.metrics,
            site=args.site,
            x=args.x,
            labels=args.labels,
            allow_different_images=args.allow_different_images,
        )
        result.write(tmp)
        _draw(tmp, args)
    if result.info["images_differ"]:
        _say(args, f"the runs used different images: {result.info['images_differ']}")
    for name, have in result.info["not_in_every_run"].items():
        _say(args, f"left out {name}: only in {', '.join(have)}")
    _say(
        args,
        f"{len(result.labels)} runs, {len(result.metrics)} metrics, x = {result.info['x']}"
        f" -> {args.out}/ (compare.png, compare.pdf, table.csv, differences.csv, compare.json)",
    )
    return 0


def _draw(folder: Path, args: argparse.Namespace) -> None:
    """Figures from the tables just written into the (temporary) output folder."""
    if getattr(args, "no_figures", False):
        return
    from vitspec.reporting import draw

    draw(folder)


def _report(args: argparse.Namespace) -> int:
    from vitspec.reporting import report

    page = report(args.folders, args.out, size=args.size, band=args.band, overwrite=args.overwrite)
    figures = len(list(page.parent.rglob("*.png")))
    n = len(args.folders)
    _say(args, f"{n} folder{'s' * (n != 1)} -> {page} ({figures} figures, PNG + PDF)")
    return 0


def _metrics(args: argparse.Namespace) -> int:
    import fnmatch

    from vitspec.collect import PRE
    from vitspec.metrics import list_metrics

    specs = list_metrics()
    rows = [(s.name, s.kind, s.formula, s.source) for s in specs]
    rows += [
        (
            PRE + s.name,
            s.kind,
            f"{s.name} on the pre-scale attention A of AttnScale blocks",
            "vitspec",
        )
        for s in specs
        if s.kind.startswith("attn")
    ]
    rows = [r for r in rows if fnmatch.fnmatchcase(r[0], args.pattern)]
    if not rows:
        print(
            f"vitspec: no metric matches {args.pattern!r}; 'vitspec metrics' lists them all",
            file=sys.stderr,
        )
        return 2
    width = max(len(r[0]) for r in rows)
    for name, kind, formula, source in rows:
        print(f"{name:<{width}}  {kind:<11}  {formula}  [{source}]")
    return 0


def _verify(args: argparse.Namespace) -> int:
    sizes = _int_list(args.sizes, "--sizes") if args.sizes is not None else None
    label = "synthetic" if args.synthetic else args.label or _label(args)
    out = Path(
        args.out
        or (f"runs/verify-{label}" if args.synthetic else f"runs/verify-{args.model}-{label}")
    )
    _check_paths(args)
    from vitspec.shards import distributed_shard, parse_shard

    shard = parse_shard(args.shard)  # a bad K/N fails before the model is built
    options = dict(
        synthetic=args.synthetic,
        **_weights(args),
        **_inputs(args),
        device=args.device,
        label=args.label,
        max_steps=args.max_steps,
        sizes=sizes,
        threads=args.threads,
        shard=shard,
    )
    rank = distributed_shard()
    if rank is not None and rank.index != 0 and not args.synthetic:  # rank 0 writes the run
        from vitspec.verification import verify

        verify(args.model, **options, **_messages(args, quiet=True))
        return 0
    with OutputDir(out, overwrite=args.overwrite, protect=[args.images]) as tmp:
        from vitspec.verification import verify

        result = verify(args.model, **options, **_messages(args))
        result.write(tmp)
        _draw(tmp, args)
    part = ""
    if shard:
        part = f"shard {shard}, {result.info['images']['used']} images (state.pt for vitspec merge)"
    return _verdict(args, result, out, part)


def _verdict(args: argparse.Namespace, result, out: Path, what: str) -> int:
    """verify's summary lines and exit code: 1 when a check fails, else 0."""
    for line in result.summary_lines(None if not args.quiet else "fail"):
        print(f"vitspec: {line}", file=sys.stderr)
    failed = result.info["summary"]["failed_checks"]
    if failed:
        print(
            f"vitspec: FAIL: {', '.join(failed)} (a finding about these matrices, "
            f"not a crash; rows with status 'fail' in {out}/verify.csv)",
            file=sys.stderr,
        )
        return 1
    _say(
        args,
        f"{what + ': ' if what else ''}every applicable check passes -> {out}/ (verify.csv, "
        f"verify.json{', figures' if not args.no_figures else ''})",
    )
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VitspecError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"vitspec: {message}", file=sys.stderr)


COMMANDS = {
    "analyze": _analyze,
    "merge": _merge,
    "compare": _compare,
    "verify": _verify,
    "report": _report,
    "metrics": _metrics,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code (0 ok, 1 a finding or data problem, 2 a usage error)."""
    # Before torch is imported: large CPU buffers (attention maps, ~45 MB per layer and image at
    # N = 1370) on transparent huge pages; fresh 4 KiB pages cost more page faults than
    # arithmetic there. PyTorch's own allocator switch; a user's setting wins.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, a usage error (one line, exit 2)
        return int(exc.code or 0)
    try:
        with cli_names():
            return COMMANDS[args.command](args)
    except VitspecError as err:
        if args.debug:
            raise
        print(f"vitspec: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("vitspec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
