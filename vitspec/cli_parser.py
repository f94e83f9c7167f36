"""The command line's grammar: every subcommand, option, default and help text, and the checks
argparse makes on values (whole numbers, devices, ``KEY=VALUE`` model arguments). The command
functions are :mod:`vitspec.cli`'s; ``args.command`` names the one to run.
"""

from __future__ import annotations

import argparse
import ast
import re

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``vitspec`` parser; ``args.command`` is the subcommand's name.

    Example:
        >>> build_parser().parse_args(["metrics", "attn_*"]).command
        'metrics'
    """
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
    _add_run_outputs(p, "analyse")

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
    _add_run_outputs(p, "check")

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

    p = sub.add_parser("metrics", help="list the metrics with their formulas and sources")
    p.add_argument("pattern", nargs="?", default="*", help="name pattern, e.g. 'attn_*'")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
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


def _add_run_outputs(p: argparse.ArgumentParser, verb: str) -> None:
    """--label, --shard, --overwrite, --no-figures and the common options of a command that
    runs a model (analyze, verify)."""
    p.add_argument("--label", help="run label (default: checkpoint file stem or random-init)")
    p.add_argument(
        "--shard",
        metavar="K/N",
        help=f"{verb} part K of N of the images (batches b with b mod N = K) and save "
        "state.pt for 'vitspec merge'; under torchrun every rank is a shard by itself",
    )
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    _add_common(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _version() -> str:
    from vitspec import __version__

    return f"vitspec {__version__}"
