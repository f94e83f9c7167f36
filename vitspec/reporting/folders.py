"""Open saved folders (analyze runs, verify runs, compare folders) and summarise them as tables.

Reads only files (CSV, JSON): no torch, no model. ``open_folder`` tells the kinds apart by the
files they hold.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vitspec.comparison import ComparisonResult
from vitspec.errors import VitspecError
from vitspec.results import Result, expand_runs

KINDS = {
    "analyze": ("metrics.csv", "spectra.csv", "run.json"),
    "verify": ("verify.csv", "verify.json"),
    "compare": ("table.csv", "differences.csv", "compare.json"),
}
THRESHOLDS = (0.5, 0.9)


@dataclass
class VerifyRun:
    """A saved verify folder: verify.csv (``table``), verify.json (``info``) and the figures'
    small tables (``figure_data``), read without importing the verifier (no torch)."""

    table: pd.DataFrame
    info: dict
    figure_data: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass
class Folder:
    """One input of a report: its kind, path, unique label and loaded content."""

    kind: str
    path: Path
    label: str
    data: object


def folder_kind(path: Path) -> str:
    """``"analyze"``, ``"verify"`` or ``"compare"`` from the files ``path`` holds.

    Raises:
        VitspecError: not a directory, or none of the three file sets is complete.
    """
    if not path.is_dir():
        raise VitspecError(f"{path} is not a directory (give analyze, verify or compare folders)")
    for kind, files in KINDS.items():
        if all((path / f).is_file() for f in files):
            return kind
    expected = "; ".join(f"{k}: {', '.join(f)}" for k, f in KINDS.items())
    raise VitspecError(f"{path} is not a vitspec folder (expected the files of {expected})")


def _load_verify(path: Path) -> VerifyRun:
    table = pd.read_csv(
        path / "verify.csv",
        dtype={"layer": "Int64", "head": "Int64"},
        keep_default_na=False,
        na_values=[""],
    )
    info = json.loads((path / "verify.json").read_text())
    data = {k: pd.DataFrame(v) for k, v in info.pop("figure_data", {}).items()}
    return VerifyRun(table=table, info=info, figure_data=data)


def open_folders(paths: list[str | Path]) -> list[Folder]:
    """Load every folder; labels are run names (compare: the run labels joined), made unique.
    A several-checkpoint folder (``index.json``) stands for its run folders, in order.

    Example:
        >>> [f.kind for f in open_folders(["runs/a", "runs/cmp"])]  # doctest: +SKIP
        ['analyze', 'compare']
    """
    folders = []
    for path in expand_runs(paths):
        kind = folder_kind(path)
        if kind == "analyze":
            data = Result.load(path)
            name = data.info.get("run") or path.name
        elif kind == "verify":
            data = _load_verify(path)
            name = f"verify {data.info.get('run') or path.name}"
        else:
            data = ComparisonResult.load(path)
            name = " vs ".join(run["label"] for run in data.info["runs"])
        folders.append(Folder(kind, path, str(name), data))
    counts = Counter(f.label for f in folders)
    for f in folders:
        if counts[f.label] > 1:
            f.label = f"{f.label} ({f.path.name})"
    counts = Counter(f.label for f in folders)
    for i, f in enumerate(folders):
        if counts[f.label] > 1:
            f.label = f"{f.label} #{i + 1}"
    return folders


def slug(text: str) -> str:
    """A file-name-safe form of a label.

    Example:
        >>> slug("deit_tiny-random init (a)")
        'deit_tiny-random_init_a'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def summary(result: Result) -> pd.DataFrame:
    """Per metric and site: the value at the last layer (mean, sd, n) and the mean over layers.

    Token metrics at ``block`` and ``mid`` (layers 1..L), attention metrics as the head mean;
    the ``embed`` value (layer 0) is its own column.
    """
    m = result.metrics
    rows = []
    keep = (m["site"].isin(["block", "mid"]) & m["head"].isna()) | (
        (m["site"] == "attn") & (m["head"] == -1).fillna(False)
    )
    for (metric, site), g in m[keep].groupby(["metric", "site"], sort=False):
        g = g.sort_values("layer")
        last = g.iloc[-1]
        embed = m[(m["metric"] == metric) & (m["site"] == "embed")]["mean"]
        rows.append(
            {
                "metric": metric,
                "site": site if site != "attn" else "attn (head mean)",
                "embed (layer 0)": float(embed.iloc[0])
                if len(embed) and site == "block"
                else np.nan,
                "last layer": int(last["layer"]),
                "last-layer mean": float(last["mean"]),
                "last-layer sd": float(last["std"]),
                "mean over layers": float(g["mean"].mean()),
                "n images": int(last["n"]),
            }
        )
    return pd.DataFrame(rows)


def first_crossings(result: Result, metric: str = "patch_cos_abs") -> dict[float, str]:
    """For each threshold t in (0.5, 0.9): the first layer (site block, embed = layer 0) whose
    image mean of ``metric`` exceeds t, or ``"never (max x)"``.

    Example:
        >>> first_crossings(result)  # doctest: +SKIP
        {0.5: 'layer 7', 0.9: 'never (max 0.81)'}
    """
    m = result.metrics
    df = m[(m["metric"] == metric) & m["site"].isin(["embed", "block"]) & m["head"].isna()]
    df = df.sort_values("layer")
    out = {}
    for t in THRESHOLDS:
        above = df[df["mean"] > t]
        if df.empty:
            out[t] = "not measured"
        elif above.empty:
            out[t] = f"never (max {df['mean'].max():.3g})"
        else:
            out[t] = f"layer {int(above['layer'].iloc[0])}"
    return out


def check_table(run: VerifyRun) -> pd.DataFrame:
    """verify.json's per-check verdicts as one row per check."""
    rows = []
    for name, c in run.info.get("summary", {}).get("checks", {}).items():
        rows.append(
            {
                "check": name,
                "status": c["status"],
                "cases": c["cases"],
                "violations": c["violations"],
                "max slack": c["max_slack"],
                "tolerance": c["tolerance"],
                "fails at": ", ".join(c["failing"][:6]) + (" ..." if len(c["failing"]) > 6 else ""),
                "not applicable": "; ".join(c["not_applicable"]),
            }
        )
    return pd.DataFrame(rows)


def difference_table(comparison: ComparisonResult) -> pd.DataFrame:
    """Per metric and run: last-layer means, their difference, the mean difference over
    layers, the largest |diff| and at which layer, and how many layers go up / down."""
    rows = []
    for (metric, run), g in comparison.differences.groupby(["metric", "run"], sort=False):
        g = g.sort_values("layer")
        last = g.iloc[-1]
        worst = g.loc[g["diff"].abs().idxmax()]
        rows.append(
            {
                "metric": metric,
                "run": run,
                "reference": last["reference_run"],
                "last layer": int(last["layer"]),
                "reference mean": float(last["reference_mean"]),
                "run mean": float(last["mean"]),
                "diff (last)": float(last["diff"]),
                "mean diff": float(g["diff"].mean()),
                "max |diff|": float(abs(worst["diff"])),
                "at layer": int(worst["layer"]),
                "layers +/-": f"{int((g['sign'] == '+').sum())}/{int((g['sign'] == '-').sum())}",
            }
        )
    return pd.DataFrame(rows)
