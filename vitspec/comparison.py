"""``vitspec.compare``: the same metrics from several run directories, overlaid and differenced.

(The module is ``comparison``, as ``analyze`` lives in ``analysis``: a submodule named
``vitspec.compare`` would shadow the function ``vitspec.compare`` once imported.)

This is the "with vs without" figure of Wang et al. (2022): a metric (by default the patch-token
cosine similarity ``patch_cos_abs``) against layer for a baseline and for variants of it
(AttnScale, FeatScale), or for models of different depths against normalised depth.

It reads only run directories (``metrics.csv``, ``run.json``); it imports neither torch nor timm.

How rows are matched in ``differences.csv`` (reference = the first run):

* runs of the reference's depth L: row for row at the same ``layer``;
* runs of another depth L': each layer l' is matched to the reference layer l whose normalised depth
  l / L is nearest to l' / L' (computed exactly in integers, ties go to the shallower reference
  layer); ``reference_layer`` says which. The embed site (layer 0) matches layer 0.

``sign`` is the sign of ``diff = mean - reference_mean`` (``0`` only for equal means, up to
1e-12 relative); it is the direction of the change of the image mean, not a significance test:
compare ``diff`` with the sd bands of the figure.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vitspec.errors import VitspecError, option
from vitspec.outputs import OutputDir, atomic_dir, read_info
from vitspec.results import Result, expand_runs

TOKEN_SITES = ("embed", "mid", "block")
X_AXES = ("layer", "depth")
FILES = ("table.csv", "differences.csv", "compare.json")
FIRST = "patch_cos_abs"  # the paper's cosine-similarity figure leads
DIFF_COLUMNS = [
    "metric",
    "site",
    "layer",
    "depth",
    "head",
    "run",
    "reference_run",
    "mean",
    "reference_mean",
    "diff",
    "rel_diff",
    "sign",
    "reference_layer",
    "same_images",
]


@dataclass
class ComparisonResult:
    """What ``vitspec.compare`` returns: the compared rows, their differences and provenance.

    Attributes:
        table: the compared rows of every run (metrics.csv columns); ``run`` holds the run label.
            Token metrics at the chosen site (head empty), attention metrics as head means
            (site ``attn``, head -1).
        differences: one row per (metric, site, layer, head) of every run but the reference, with
            columns ``DIFF_COLUMNS`` (see the module docstring for the matching rule).
        info: the compare.json content (run dirs, models, checkpoints, labels, x, site, metrics).
    """

    table: pd.DataFrame
    differences: pd.DataFrame
    info: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [run["label"] for run in self.info["runs"]]

    @property
    def metrics(self) -> list[str]:
        return list(self.info["metrics"])

    def save(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write table.csv, differences.csv and compare.json, all or nothing (data only;
        ``vitspec.report(out)`` draws the figure); ``overwrite`` replaces only a previous
        vitspec output."""
        with atomic_dir(out, overwrite) as tmp:
            self.write(tmp)
        return Path(out)

    def write(self, folder: Path) -> None:
        """Write the comparison's files into an existing (temporary) folder."""
        self.table.to_csv(folder / "table.csv", index=False, float_format="%.10g")
        self.differences.to_csv(folder / "differences.csv", index=False, float_format="%.10g")
        (folder / "compare.json").write_text(json.dumps(self.info, indent=2, default=str) + "\n")

    @classmethod
    def load(cls, out: str | Path) -> ComparisonResult:
        """Read a folder written by ``save``."""
        out = Path(out)
        missing = [f for f in FILES if not (out / f).is_file()]
        if missing:
            raise VitspecError(
                f"{out} is not a vitspec compare folder (missing {', '.join(missing)})"
            )
        read = {"dtype": {"head": "Int64"}, "keep_default_na": False, "na_values": [""]}
        return cls(
            table=pd.read_csv(out / "table.csv", **read),
            differences=pd.read_csv(out / "differences.csv", **read),
            info=read_info(out / "compare.json"),
        )


def compare(
    run_dirs: Sequence[str | Path],
    out: str | Path | None,
    *,
    metrics: str | Sequence[str] | None = None,
    site: str = "block",
    x: str | None = None,
    labels: str | Sequence[str] | None = None,
    overwrite: bool = False,
    allow_different_images: bool = False,
) -> ComparisonResult:
    """Overlay the same metrics from several runs and tabulate per-layer differences.

    Args:
        run_dirs: two or more run directories written by ``vitspec analyze`` / ``Result.save``;
            the first is the reference of ``differences.csv``.
        out: output directory (table.csv, differences.csv, compare.json; the CLI adds the
            figure, ``vitspec.report(out)`` draws it); ``None`` computes without writing.
        metrics: metric names or fnmatch patterns (list or comma-separated string). Default: every
            token metric at ``site`` and every attention head-mean metric present in all runs,
            ``patch_cos_abs`` first.
        site: token site, ``embed``, ``mid`` or ``block`` (attention metrics are always per block).
        x: ``"layer"`` or ``"depth"`` (layer / L); default ``depth`` when the runs' depths differ.
        labels: one unique label per run (list or comma-separated string); default each run.json's
            ``run`` field, with the directory name added where two are equal.
        overwrite: replace a previous vitspec output at ``out``.
        allow_different_images: compare runs measured on different image sets (refused by
            default, naming the first difference: a metric's change between such runs mixes the
            models' difference with the images'); the figure, differences.csv (``same_images``)
            and compare.json then say so.

    Returns:
        A ``ComparisonResult`` (``.table``, ``.differences``, ``.info``).

    Example:
        >>> c = compare(["runs/base", "runs/attnscale"], "runs/cmp")  # doctest: +SKIP
        >>> c.differences.query("metric == 'patch_cos_abs'")  # doctest: +SKIP
    """
    run_dirs = expand_runs(run_dirs)  # a several-checkpoint folder stands for its runs
    if len(run_dirs) < 2:
        raise VitspecError(f"compare needs at least 2 run directories, got {len(run_dirs)}")
    seen: dict[Path, Path] = {}
    for d in run_dirs:
        first = seen.setdefault(d.resolve(), d)
        if first is not d:
            raise VitspecError(f"run directory {d} is given twice (as {first} and {d})")
    if x is not None and x not in X_AXES:
        raise VitspecError(f"unknown x axis {x!r}; allowed: {', '.join(X_AXES)}")
    if site not in TOKEN_SITES:
        raise VitspecError(f"unknown site {site!r}; allowed: {', '.join(TOKEN_SITES)}")
    # the output location is claimed (checked, its temporary sibling made) before the work
    claim = OutputDir(out, overwrite=overwrite, protect=run_dirs) if out is not None else None
    with claim or nullcontext() as tmp:
        comparison = _compare(run_dirs, metrics, site, x, labels, allow_different_images)
        if tmp is not None:
            comparison.write(tmp)
    return comparison


def _compare(run_dirs, metrics, site, x, labels, allow_different_images) -> ComparisonResult:
    results = [Result.load(d) for d in run_dirs]
    images_differ = _image_difference(results, run_dirs)
    if images_differ and not allow_different_images:
        raise VitspecError(
            f"the runs were measured on different images: {images_differ}; pass "
            f"{option('allow_different_images', 'True')} to compare them anyway"
        )
    labels = _labels(results, run_dirs, labels)
    depths = [_depth(r) for r in results]
    x = x or ("depth" if len(set(depths)) > 1 else "layer")
    names = _select_metrics(results, labels, run_dirs, metrics, site)
    table = pd.concat(
        [_rows(r, label, names, site) for r, label in zip(results, labels)], ignore_index=True
    )
    differences = _differences(table, labels, depths, names, same_images=not images_differ)
    info = {
        "vitspec": _version(),
        "command": " ".join(sys.argv),
        "reference": labels[0],
        "site": site,
        "x": x,
        "metrics": names,
        "images_differ": images_differ,
        "not_in_every_run": _not_shared(results, labels, site, names),
        "matching": {
            label: "layer" if d == depths[0] else "nearest normalised depth"
            for label, d in zip(labels[1:], depths[1:])
        },
        "runs": [
            _provenance(r, d, label, depth)
            for r, d, label, depth in zip(results, run_dirs, labels, depths)
        ],
    }
    return ComparisonResult(table=table, differences=differences, info=info)


def _image_difference(results: list[Result], dirs: list[Path]) -> str | None:
    """The first way a run's image set differs from the first run's (source, count, a file)."""

    def images(r: Result) -> tuple[str, list[str]]:
        info = r.info.get("images") or {}
        return str(info.get("source")), list(info.get("files") or [])

    ref_source, ref_files = images(results[0])
    for r, d in zip(results[1:], dirs[1:]):
        source, files = images(r)
        if source != ref_source:
            return f"{dirs[0]} used {ref_source}, {d} used {source}"
        if len(files) != len(ref_files):
            return f"{dirs[0]} used {len(ref_files)} images, {d} used {len(files)}"
        for i, (a, b) in enumerate(zip(ref_files, files)):
            if a != b:
                return f"image {i + 1} is {a} in {dirs[0]} but {b} in {d}"
    return None


def _labels(results: list[Result], dirs: list[Path], labels) -> list[str]:
    if labels is not None:
        if isinstance(labels, str):
            labels = [s.strip() for s in labels.split(",")]
        labels = [str(s) for s in labels]
        if len(labels) != len(results):
            raise VitspecError(
                f"got {len(labels)} labels for {len(results)} runs; give one per run"
            )
        if len(set(labels)) != len(labels) or not all(labels):
            raise VitspecError(f"labels must be unique and non-empty, got {','.join(labels)}")
        return labels
    base = [str(r.info.get("run") or d.name) for r, d in zip(results, dirs)]
    counts = Counter(base)
    named = [f"{b} ({d.name})" if counts[b] > 1 else b for b, d in zip(base, dirs)]
    counts = Counter(named)
    return [f"{n} #{i + 1}" if counts[n] > 1 else n for i, n in enumerate(named)]


def _depth(result: Result) -> int:
    depth = result.info.get("depth")
    if isinstance(depth, int) and depth > 0:
        return depth
    m = result.metrics
    return int(m.loc[m["site"].isin(["block", "attn", "mid"]), "layer"].max())


def _available(result: Result, site: str) -> list[str]:
    """Metric names with rows at ``site`` (token, head empty) or as attention head means."""
    m = result.metrics
    token = m.loc[(m["site"] == site) & m["head"].isna(), "metric"]
    attn = m.loc[(m["site"] == "attn") & (m["head"] == -1).fillna(False), "metric"]
    return list(dict.fromkeys([*token, *attn]))


def _select_metrics(results, labels, dirs, patterns, site) -> list[str]:
    available = [_available(r, site) for r in results]
    if patterns is None:
        names = [n for n in available[0] if all(n in a for a in available[1:])]
        if not names:
            raise VitspecError(f"the runs share no metric at site {site!r}")
        return sorted(names, key=lambda n: n != FIRST)  # stable: patch_cos_abs first
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    union = list(dict.fromkeys(n for a in available for n in a))
    names = []
    for pattern in patterns:
        matched = [n for n in union if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise VitspecError(
                f"no metric {pattern!r} at site {site!r} in any run; present: "
                f"{', '.join(union) or 'none'}"
            )
        names += [n for n in matched if n not in names]
    for a, label, d in zip(available, labels, dirs):
        missing = [n for n in names if n not in a]
        if missing:
            raise VitspecError(
                f"metric {missing[0]!r} is absent from run {label!r} ({d}) "
                f"(token metrics at site {site!r}, attention head means); "
                f"present there: {', '.join(a) or 'none'}"
            )
    return names


def _not_shared(results, labels, site, names) -> dict[str, list[str]]:
    """Metrics some runs have and others lack (left out of the default selection), by run."""
    available = [_available(r, site) for r in results]
    union = dict.fromkeys(n for a in available for n in a if n not in names)
    return {
        n: [lab for a, lab in zip(available, labels) if n in a]
        for n in union
        if not all(n in a for a in available)
    }


def _rows(result: Result, label: str, names: list[str], site: str) -> pd.DataFrame:
    m = result.metrics
    token = (m["site"] == site) & m["head"].isna()
    attn = (m["site"] == "attn") & (m["head"] == -1).fillna(False)
    rows = m[m["metric"].isin(names) & (token | attn)].copy()
    rows["run"] = label
    order = {n: i for i, n in enumerate(names)}
    rows = rows.sort_values(
        ["metric", "layer"], key=lambda s: s.map(order) if s.name == "metric" else s, kind="stable"
    )
    return rows.reset_index(drop=True)


def _differences(
    table: pd.DataFrame,
    labels: list[str],
    depths: list[int],
    names: list[str],
    *,
    same_images: bool,
) -> pd.DataFrame:
    ref = table[table["run"] == labels[0]]
    ref_depth = depths[0]
    parts = []
    for label, depth in zip(labels[1:], depths[1:]):
        cur = table[table["run"] == label]
        for (metric, site), group in cur.groupby(["metric", "site"], sort=False):
            cand = ref[(ref["metric"] == metric) & (ref["site"] == site)].sort_values("layer")
            if cand.empty:
                continue
            layers = group["layer"].to_numpy(np.int64)
            ref_layers = cand["layer"].to_numpy(np.int64)
            if depth == ref_depth:
                keep = np.isin(layers, ref_layers)
                group, matched = group[keep], layers[keep]
            else:  # |l'/L' - l/L| compared as |l' L - l L'| in integers; argmin keeps the first
                gap = np.abs(layers[:, None] * ref_depth - ref_layers[None, :] * depth)
                matched = ref_layers[gap.argmin(axis=1)]
            ref_mean = cand.set_index("layer")["mean"].loc[matched].to_numpy(float)
            mean = group["mean"].to_numpy(float)
            diff = mean - ref_mean
            tol = 1e-12 * np.maximum(np.abs(mean), np.abs(ref_mean))
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(ref_mean != 0, diff / np.abs(ref_mean), np.nan)
            parts.append(
                pd.DataFrame(
                    {
                        "metric": metric,
                        "site": site,
                        "layer": group["layer"].to_numpy(),
                        "depth": group["depth"].to_numpy(),
                        "head": group["head"].array,
                        "run": label,
                        "reference_run": labels[0],
                        "mean": mean,
                        "reference_mean": ref_mean,
                        "diff": diff,
                        "rel_diff": rel,
                        "sign": np.where(diff > tol, "+", np.where(diff < -tol, "-", "0")),
                        "reference_layer": matched,
                        "same_images": same_images,
                    }
                )
            )
    if not parts:
        return pd.DataFrame(columns=DIFF_COLUMNS)
    out = pd.concat(parts, ignore_index=True)[DIFF_COLUMNS]
    out["head"] = out["head"].astype("Int64")
    return out


def _provenance(result: Result, run_dir: Path, label: str, depth: int) -> dict:
    info = result.info
    weights = info.get("weights") if isinstance(info.get("weights"), dict) else {}
    return {
        "label": label,
        "dir": str(run_dir),
        "abs_dir": str(run_dir.resolve()),
        "run": info.get("run"),
        "model": info.get("model"),
        "timm_name": info.get("timm_name"),
        "checkpoint": info.get("checkpoint"),
        "sha256": weights.get("sha256"),
        "random_init": info.get("random_init"),
        "depth": depth,
        "images_used": info.get("images", {}).get("used"),
        "vitspec": info.get("vitspec"),
    }


def _version() -> str:
    from vitspec import __version__

    return __version__
