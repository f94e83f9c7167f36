"""Command line: a thin layer over the Python API. Every subcommand has a Python twin."""

from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import sys
from pathlib import Path

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vitspec", description="Fourier-domain oversmoothing measures for Vision Transformers."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    p = sub.add_parser(
        "analyze",
        help="stream every metric of a timm ViT into a run directory",
        description="Capture per-layer tokens and attention of a timm ViT on images "
        "and write metrics.csv, spectra.csv, run.json and figures.",
    )
    p.add_argument(
        "model",
        help="timm model name or alias (deit_tiny, deit_small, deit_base, "
        "deit_small_distilled, vit_tiny, vit_small, vit_base), or hf:FOLDER for a local "
        "Hugging Face transformers model (needs vitspec[hf])",
    )
    _add_weights(p, many=True)
    p.add_argument(
        "--featscale-form",
        choices=("doubled", "single"),
        default=None,
        help="FeatScale form for a checkpoint with blocks.*.lamb1/lamb2: doubled "
        "(released DeiT code, gains 1+2s/1+2t) or single (default: doubled for "
        "DeiT/ViT, single for CaiT; registered names keep their own)",
    )
    _add_inputs(p)
    p.add_argument(
        "--sites", default="embed,block", help="token sites: embed,mid,block (default: embed,block)"
    )
    p.add_argument(
        "--metrics",
        default=None,
        metavar="PATTERNS",
        help="comma-separated metric name patterns, e.g. 'hc_*,attn_entropy' (default: all)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="run directory (default: runs/<model>-<label>); with several --ckpt, the folder "
        "of their run folders (default runs/<model>-checkpoints)",
    )
    p.add_argument("--label", help="run label (default: checkpoint file stem or random-init)")
    p.add_argument(
        "--shard",
        metavar="K/N",
        help="analyse part K of N (batches b with b mod N = K) and save state.pt for "
        "'vitspec merge'; under torchrun every rank is a shard by itself",
    )
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    _add_common(p)
    p.set_defaults(func=_analyze)

    p = sub.add_parser(
        "merge",
        help="fold 'analyze --shard K/N' (or 'verify --shard K/N') folders into one folder",
        description="Merge the shards of one analysis or one verify run (every K of N, same "
        "model, weights, options and images) into the folder a one-process run writes. For "
        "verify shards the exit code is verify's: 1 when a check fails.",
    )
    p.add_argument("shard_dirs", nargs="+", metavar="DIR", help="shard run folders")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged run folder")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    _add_common(p)
    p.set_defaults(func=_merge)

    p = sub.add_parser(
        "compare",
        help="overlay the same metrics from several run directories",
        description="Overlay metrics of several runs (mean +/- sd against layer or "
        "normalised depth) and tabulate per-layer differences against "
        "the first run.",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories written by 'vitspec analyze'; the first is the reference",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory: compare.png/.pdf, differences.csv, compare.json",
    )
    p.add_argument(
        "--metrics",
        default=None,
        metavar="NAMES",
        help="comma-separated metric names or patterns (default: every token metric at "
        "--site and attention head mean shared by all runs, patch_cos_abs first)",
    )
    p.add_argument(
        "--site", default="block", help="token site: embed, mid or block (default block)"
    )
    p.add_argument(
        "--x",
        choices=["layer", "depth"],
        default=None,
        help="x axis (default: depth = layer / L when the runs' depths differ, else layer)",
    )
    p.add_argument(
        "--labels",
        default=None,
        metavar="A,B,...",
        help="one label per run (default: each run.json's run name)",
    )
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument(
        "--allow-different-images",
        action="store_true",
        help="compare runs measured on different image sets (refused by default)",
    )
    _add_common(p)
    p.set_defaults(func=_compare)

    p = sub.add_parser(
        "verify",
        help="check the low-pass theory (Wang et al. 2022) on a model's attention, in float64",
        description="Check each statement of the low-pass theory of self-attention on the "
        "attention matrices and block inputs of a timm ViT (or, with --synthetic, on random "
        "softmax matrices) and write verify.csv, verify.json and figures. Exit 0 when no check "
        "fails, 1 when one fails, 2 on usage errors.",
    )
    p.add_argument(
        "model", nargs="?", default=None, help="timm model name or alias (omit with --synthetic)"
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="run the synthetic suite (random logits, N in --sizes), no model",
    )
    p.add_argument(
        "--sizes",
        default=None,
        metavar="N,N,...",
        help="token counts of the synthetic suite (default 16,64,197,577)",
    )
    _add_weights(p)
    _add_inputs(p)
    p.add_argument(
        "--max-steps",
        type=_positive,
        default=512,
        metavar="T",
        help="most powers A^t for lowpass_limit (default 512)",
    )
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="CPU worker threads, one batch each (default: torch's setting, all cores)",
    )
    p.add_argument(
        "--out", metavar="DIR", help="output directory (default: runs/verify-<model>-<label>)"
    )
    p.add_argument("--label", help="run label (default: checkpoint file stem or random-init)")
    p.add_argument(
        "--shard",
        metavar="K/N",
        help="check part K of N of the images (batches b with b mod N = K) and save state.pt "
        "for 'vitspec merge'; under torchrun every rank is a shard by itself",
    )
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    _add_common(p)
    p.set_defaults(func=_verify)

    p = sub.add_parser(
        "report",
        help="figures and one self-contained HTML page from saved folders",
        description="Draw the figures (PNG 200 dpi + PDF) of analyze runs, verify runs and "
        "compare folders and write report.html (figures embedded, provenance, summary tables). "
        "With one folder and no --out, the figures are drawn into that folder.",
    )
    p.add_argument(
        "folders",
        nargs="+",
        metavar="DIR",
        help="analyze run, verify run or compare folders (a several-checkpoint folder: its runs)",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (required with several folders)")
    p.add_argument(
        "--size",
        choices=("column", "page"),
        default="page",
        help="figure width: column (3.5 in) or page (7.16 in) (default page)",
    )
    p.add_argument(
        "--band",
        choices=("sd", "se"),
        default="sd",
        help="band around the mean: sd over images or se of the mean (default sd)",
    )
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_common(p)
    p.set_defaults(func=_report)

    p = sub.add_parser("metrics", help="list the metrics with their formulas and sources")
    p.add_argument("pattern", nargs="?", default="*", help="name pattern, e.g. 'attn_*'")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_metrics)
    return parser


def _add_weights(p: argparse.ArgumentParser, many: bool = False) -> None:
    g = p.add_argument_group("weights")
    w = g.add_mutually_exclusive_group()
    if many:
        w.add_argument(
            "--ckpt",
            nargs="+",
            metavar="FILE",
            help="local checkpoint(s) (.pth, .pt, .bin, .safetensors) or a quoted glob; "
            "several: one run folder each under --out, plus index.json",
        )
    else:
        w.add_argument(
            "--ckpt", metavar="FILE", help="local checkpoint (.pth, .pt, .bin, .safetensors)"
        )
    w.add_argument(
        "--random-init", action="store_true", help="random weights (every output says so)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    g.add_argument("--ema", action="store_true", help="load model_ema from a training checkpoint")
    g.add_argument(
        "--non-strict",
        action="store_true",
        help="load despite missing/unexpected keys (recorded in run.json; never drops blocks)",
    )
    g.add_argument(
        "--model-arg",
        action="append",
        type=_model_arg,
        metavar="KEY=VALUE",
        help="timm.create_model argument, value a Python literal (repeatable), e.g. depth=24",
    )
    g.add_argument(
        "--img-size",
        type=_positive,
        metavar="N",
        help="analyse N x N images (model built for N; position embeddings resampled by timm)",
    )
    g.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow a checkpoint that needs full unpickling (it can run code from the file)",
    )


def _add_inputs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images")
    g.add_argument(
        "--images",
        metavar="PATH",
        help="image folder (searched recursively) or one image file "
        "(default: the bundled sample photographs)",
    )
    g.add_argument("--num-images", type=_positive, metavar="N", help="how many readable images")
    g.add_argument(
        "--sample",
        choices=("first", "random"),
        default="first",
        help="first N in sorted path order, or N drawn uniformly at random (default first)",
    )
    g.add_argument(
        "--sample-seed", type=int, default=0, metavar="S", help="seed of --sample random (0)"
    )
    g.add_argument("--batch-size", type=_positive, default=16, metavar="B")
    g.add_argument(
        "--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default: auto)"
    )


_OVERWRITE_HELP = (
    "replace a previous vitspec output at --out (only a folder vitspec wrote, holding nothing "
    "else; never ., .., home or an input folder)"
)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _device(text: str) -> str:
    if text not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", text):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; allowed: auto, cpu, cuda, cuda:N"
        )
    return text


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. depth=24), got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()  # a bare word: a string (e.g. global_pool=avg)
    return key.strip(), value


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit code 2, like every other vitspec error."""

    def error(self, message: str):
        self.exit(2, f"vitspec: error: {self.prog.removeprefix('vitspec ')}: {message}\n")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _version() -> str:
    from vitspec import __version__

    return f"vitspec {__version__}"


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
            return args.func(args)
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
