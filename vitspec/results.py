"""The result type: the long-format tables of docs/metrics.md, plain data, saved atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vitspec.errors import VitspecError
from vitspec.outputs import atomic_dir, read_info

METRIC_COLUMNS = [
    "run",
    "model",
    "checkpoint",
    "site",
    "layer",
    "depth",
    "head",
    "metric",
    "mean",
    "std",
    "n",
]
SPECTRA_COLUMNS = [
    "run",
    "model",
    "checkpoint",
    "site",
    "layer",
    "head",
    "curve",
    "freq",
    "mean",
    "std",
    "n",
]
FILES = ("metrics.csv", "spectra.csv", "run.json")


def validate(metrics: pd.DataFrame, spectra: pd.DataFrame) -> None:
    """Check both tables against the schema of docs/metrics.md (internal invariant)."""
    assert list(metrics.columns) == METRIC_COLUMNS, list(metrics.columns)
    assert list(spectra.columns) == SPECTRA_COLUMNS, list(spectra.columns)
    for df in (metrics, spectra):
        assert (df["n"] >= 1).all()
        token = df["site"] != "attn"
        assert df.loc[token, "head"].isna().all()
        assert (df.loc[~token, "head"] >= -1).all()
    keys = ["site", "layer", "head", "metric"]
    assert not metrics.duplicated(keys).any(), "duplicate metric rows"


@dataclass
class Result:
    """What ``vitspec.analyze`` returns: two tidy tables and the run's provenance.

    Attributes:
        metrics: one row per (site, layer, head, metric); columns ``METRIC_COLUMNS``.
        spectra: one row per (site, layer, head, curve, freq); columns ``SPECTRA_COLUMNS``.
        info: the run.json content (versions, model, checkpoint, images, device, timing).
        state: a shard's mergeable collector state (``--shard``), written as ``state.pt``
            (see :mod:`vitspec.shards`); None for a whole run.
    """

    metrics: pd.DataFrame
    spectra: pd.DataFrame
    info: dict = field(default_factory=dict)
    state: dict | None = None

    def metric(self, name: str, site: str | None = None, head: int | None = None) -> pd.DataFrame:
        """Rows of one metric, optionally one site and head.

        Example:
            >>> result.metric("hc_dc_ratio", site="block")[["layer", "mean"]]  # doctest: +SKIP
        """
        df = self.metrics[self.metrics["metric"] == name]
        if df.empty:
            known = ", ".join(dict.fromkeys(self.metrics["metric"]))
            raise VitspecError(f"no metric {name!r} in this result; present: {known}")
        if site is not None:
            df = df[df["site"] == site]
        if head is not None:
            df = df[df["head"] == head]
        return df.reset_index(drop=True)

    def save(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write metrics.csv, spectra.csv and run.json into ``out``, all or nothing.

        Everything is written to a temporary sibling directory that is renamed into place at the
        end, so an interrupted or failed save leaves no half-written run directory; ``overwrite``
        replaces only a previous vitspec output (see :mod:`vitspec.outputs`). The folder holds
        data only; ``vitspec.report(out)`` draws its figures from it.
        """
        with atomic_dir(out, overwrite) as tmp:
            self.write(tmp)
        return Path(out)

    def write(self, folder: Path) -> None:
        """Write the run's files into an existing (temporary) folder."""
        self.metrics.to_csv(folder / "metrics.csv", index=False, float_format="%.10g")
        self.spectra.to_csv(folder / "spectra.csv", index=False, float_format="%.10g")
        (folder / "run.json").write_text(json.dumps(self.info, indent=2, default=str) + "\n")
        if self.state is not None:
            from vitspec.shards import save_state

            save_state(folder, self.state)

    @classmethod
    def load(cls, run_dir: str | Path) -> Result:
        """Read a run directory written by ``save``."""
        run_dir = Path(run_dir)
        missing = [f for f in FILES if not (run_dir / f).is_file()]
        if missing:
            raise VitspecError(
                f"{run_dir} is not a vitspec run directory (missing {', '.join(missing)})"
            )
        dtypes = {"head": "Int64"}
        metrics = pd.read_csv(
            run_dir / "metrics.csv", dtype=dtypes, keep_default_na=False, na_values=[""]
        )
        spectra = pd.read_csv(
            run_dir / "spectra.csv", dtype=dtypes, keep_default_na=False, na_values=[""]
        )
        info = read_info(run_dir / "run.json")
        return cls(metrics=metrics, spectra=spectra, info=info)


def moments_frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    """Build a schema-ordered table; ``head`` is a nullable integer, std NaN where n == 1."""
    df = pd.DataFrame(rows, columns=columns)
    df["head"] = df["head"].astype("Int64")
    df["n"] = df["n"].astype(np.int64)
    return df


def expand_runs(paths) -> list[Path]:
    """Run folders, with a several-checkpoint folder (its ``index.json``, written by
    ``vitspec analyze --ckpt A B ...``) replaced by its run folders in order.

    Example:
        >>> expand_runs(["runs/a"])
        [PosixPath('runs/a')]
    """
    out: list[Path] = []
    for path in map(Path, paths):
        index = path / "index.json"
        if index.is_file() and not (path / "run.json").is_file():
            out += [path / run["folder"] for run in json.loads(index.read_text())["runs"]]
        else:
            out.append(path)
    return out
