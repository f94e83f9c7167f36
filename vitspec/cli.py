"""Command line: a thin layer over the Python API. Every subcommand has a Python twin."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitspec.errors import VitspecError


def _analyze(args: argparse.Namespace) -> int:
    from vitspec.analysis import analyze
    from vitspec.loading import resolve_model_name
    from vitspec.results import check_out_dir

    resolve_model_name(args.model)  # an unknown name fails before anything else is said or done
    label = args.label or (
        Path(args.ckpt).stem if args.ckpt else "random-init" if args.random_init else "pretrained"
    )
    out = Path(args.out or f"runs/{args.model}-{label}")
    check_out_dir(out, args.overwrite)  # before the work, not after it
    if args.random_init:
        _say(
            args,
            f"analysing {args.model} with RANDOM weights (seed {args.seed}): "
            "the numbers describe an untrained network",
        )
    result = analyze(
        args.model,
        ckpt=args.ckpt,
        random_init=args.random_init,
        seed=args.seed,
        ema=args.ema,
        strict=not args.non_strict,
        images=args.images,
        num_images=args.num_images,
        sites=[s.strip() for s in args.sites.split(",") if s.strip()],
        metrics=args.metrics,
        batch_size=args.batch_size,
        device=args.device,
        label=label,
        progress=not args.quiet and sys.stderr.isatty(),
        featscale_form=args.featscale_form,
    )
    result.save(out, overwrite=args.overwrite)
    _draw(out, args)
    info = result.info
    for note in info.get("weights", {}).get("notes", []):
        _say(args, note)
    _say(
        args,
        f"{info['images']['used']} images, {info['images_per_s']} img/s on {info['device']}"
        f" -> {out}/ (metrics.csv, spectra.csv, run.json"
        f"{', figures' if not args.no_figures else ''})",
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from vitspec.comparison import compare

    result = compare(
        args.run_dirs,
        args.out,
        metrics=args.metrics,
        site=args.site,
        x=args.x,
        labels=args.labels,
        overwrite=args.overwrite,
    )
    _draw(Path(args.out), args)
    for name, have in result.info["not_in_every_run"].items():
        _say(args, f"left out {name}: only in {', '.join(have)}")
    _say(
        args,
        f"{len(result.labels)} runs, {len(result.metrics)} metrics, x = {result.info['x']}"
        f" -> {args.out}/ (compare.png, compare.pdf, table.csv, differences.csv, compare.json)",
    )
    return 0


def _draw(out: Path, args: argparse.Namespace) -> None:
    """Figures from the saved folder (the data are on disk first; figures can be redrawn)."""
    if getattr(args, "no_figures", False):
        return
    from vitspec.reporting import draw

    draw(out)


def _report(args: argparse.Namespace) -> int:
    from vitspec.reporting import report

    page = report(args.folders, args.out, size=args.size, band=args.band,
                  overwrite=args.overwrite)
    figures = len(list(page.parent.rglob("*.png")))
    _say(args, f"{len(args.folders)} folders -> {page} ({figures} figures, PNG + PDF)")
    return 0


def _metrics(args: argparse.Namespace) -> int:
    from vitspec.metrics import list_metrics

    specs = list_metrics(args.pattern)
    width = max((len(s.name) for s in specs), default=0)
    for spec in specs:
        print(f"{spec.name:<{width}}  {spec.kind:<11}  {spec.formula}  [{spec.source}]")
    return 0 if specs else 2


def _verify(args: argparse.Namespace) -> int:
    from vitspec.results import check_out_dir
    from vitspec.verification import check_usage, verify

    sizes = _int_list(args.sizes, "--sizes") if args.sizes is not None else None
    check_usage(args.model, synthetic=args.synthetic, sizes=sizes, ckpt=args.ckpt,
                random_init=args.random_init)
    label = "synthetic" if args.synthetic else args.label or (
        Path(args.ckpt).stem if args.ckpt else "random-init" if args.random_init else "pretrained")
    out = Path(args.out or (f"runs/verify-{label}" if args.synthetic
                            else f"runs/verify-{args.model}-{label}"))
    check_out_dir(out, args.overwrite)  # before the work, not after it
    result = verify(
        args.model, synthetic=args.synthetic, ckpt=args.ckpt, random_init=args.random_init,
        seed=args.seed, ema=args.ema, strict=not args.non_strict, images=args.images,
        num_images=args.num_images, batch_size=args.batch_size, device=args.device,
        label=args.label, max_steps=args.max_steps, sizes=sizes, threads=args.threads,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    result.save(out, overwrite=args.overwrite)
    _draw(out, args)
    if args.random_init:
        _say(args, f"verified {args.model} with RANDOM weights (seed {args.seed}): the numbers "
                   "describe an untrained network")
    for line in result.summary_lines(None if not args.quiet else "fail"):
        print(f"vitspec: {line}", file=sys.stderr)
    failed = result.info["summary"]["failed_checks"]
    if failed:
        print(f"vitspec: FAIL: {', '.join(failed)} (a finding about these matrices, "
              f"not a crash; rows with status 'fail' in {out}/verify.csv)", file=sys.stderr)
        return 1
    _say(args, f"every applicable check passes -> {out}/ (verify.csv, verify.json"
               f"{', figures' if not args.no_figures else ''})")
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
    parser = argparse.ArgumentParser(
        prog="vitspec", description="Fourier-domain oversmoothing measures for Vision Transformers."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "analyze",
        help="stream every metric of a timm ViT into a run directory",
        description="Capture per-layer tokens and attention of a timm ViT on images "
        "and write metrics.csv, spectra.csv, run.json and figures.",
    )
    p.add_argument(
        "model",
        help="timm model name or alias (deit_tiny, deit_small, deit_base, "
        "deit_small_distilled, vit_tiny, vit_small, vit_base)",
    )
    _add_weights(p)
    p.add_argument(
        "--featscale-form",
        choices=("doubled", "single"),
        default=None,
        help="FeatScale form for a checkpoint with blocks.*.lamb1/lamb2: doubled "
        "(released DeiT code, gains 1+2s/1+2t) or single (default: doubled for "
        "DeiT/ViT, single for CaiT; registered names keep their own)",
    )
    p.add_argument(
        "--images",
        metavar="DIR",
        help="image folder, searched recursively (default: the bundled sample photographs)",
    )
    p.add_argument("--num-images", type=int, metavar="N", help="first N readable images, sorted")
    p.add_argument(
        "--sites", default="embed,block", help="token sites: embed,mid,block (default: embed,block)"
    )
    p.add_argument(
        "--metrics",
        default=None,
        metavar="PATTERNS",
        help="comma-separated metric name patterns, e.g. 'hc_*,attn_entropy' (default: all)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<model>-<label>)")
    p.add_argument("--label", help="run label (default: checkpoint file stem or random-init)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    _add_common(p)
    p.set_defaults(func=_analyze)

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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
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
    p.add_argument("model", nargs="?", default=None,
                   help="timm model name or alias (omit with --synthetic)")
    p.add_argument("--synthetic", action="store_true",
                   help="run the synthetic suite (random logits, N in --sizes), no model")
    p.add_argument("--sizes", default=None, metavar="N,N,...",
                   help="token counts of the synthetic suite (default 16,64,197,577)")
    _add_weights(p)
    p.add_argument("--images", metavar="DIR",
                   help="image folder, searched recursively (default: the bundled photographs)")
    p.add_argument("--num-images", type=int, metavar="N", help="first N readable images, sorted")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--max-steps", type=int, default=512, metavar="T",
                   help="most powers A^t for lowpass_limit (default 512)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the checks are many small LAPACK calls)")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default: runs/verify-<model>-<label>)")
    p.add_argument("--label", help="run label (default: checkpoint file stem or random-init)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
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
    p.add_argument("folders", nargs="+", metavar="DIR",
                   help="analyze run, verify run or compare folders")
    p.add_argument("--out", metavar="DIR", help="output folder (required with several folders)")
    p.add_argument("--size", choices=("column", "page"), default="page",
                   help="figure width: column (3.5 in) or page (7.16 in) (default page)")
    p.add_argument("--band", choices=("sd", "se"), default="sd",
                   help="band around the mean: sd over images or se of the mean (default sd)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    _add_common(p)
    p.set_defaults(func=_report)

    p = sub.add_parser("metrics", help="list the metrics with their formulas and sources")
    p.add_argument("pattern", nargs="?", default="*", help="name pattern, e.g. 'attn_*'")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_metrics)
    return parser


def _add_weights(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weights")
    w = g.add_mutually_exclusive_group()
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
        help="load despite missing/unexpected keys (recorded in run.json)",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _version() -> str:
    from vitspec import __version__

    return f"vitspec {__version__}"


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code (0 ok, 1 a finding or data problem, 2 a usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
