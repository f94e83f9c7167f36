"""``VerifyResult``: the verify.csv table, the verify.json summary and the figures' small tables.

Plain data (pandas and dicts, no tensors); saved all-or-nothing with
:func:`vitspec.outputs.atomic_dir`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from vitspec.errors import VitspecError
from vitspec.outputs import atomic_dir, read_info
from vitspec.verification.checks import PREMISE_TOL, RECON_TOL, RTOL
from vitspec.verification.tally import PREMISE, Tallies, Tally  # noqa: F401 (re-exported)

VERIFY_COLUMNS = [
    "run",
    "model",
    "checkpoint",
    "check",
    "layer",
    "head",
    "cases",
    "violations",
    "max_slack",
    "tolerance",
    "status",
    "reason",
]
STATUSES = ("pass", "fail", "not-applicable")

#: every check in report order, with its tolerance (see docs/verify.md)
CHECKS: dict[str, float] = {
    "row_stochastic": PREMISE_TOL,
    "dc_passthrough": PREMISE_TOL,
    "hc_contraction": RTOL,
    "lowpass_limit": RTOL,
    "product_lowpass": RTOL,
    "logit_bound": RTOL,
    "msa_bound": RTOL,
    "msa_residual": RTOL,
    "msa_reconstruction": RECON_TOL,
    "attnscale_gain": RTOL,
}
FILES = ("verify.csv", "verify.json")


def table(tallies: Tallies, ids: dict, na: dict[tuple, str]) -> pd.DataFrame:
    """verify.csv rows in check, layer, head order.

    Args:
        tallies: the counters.
        ids: leading columns (run, model, checkpoint).
        na: ``(check, layer, head) -> reason`` for rows that are not applicable (their counters,
            if any, are dropped).
    """
    rows = []
    keys = set(tallies) | set(na)
    order = {name: i for i, name in enumerate(CHECKS)}

    def sort_key(key):
        check, layer, head = key
        return (
            order[check],
            -1 if layer is None else layer,
            -2 if head is None else (math.inf if head == -1 else head),
        )

    for key in sorted(keys, key=sort_key):
        check, layer, head = key
        row = {**ids, "check": check, "layer": layer, "head": head, "tolerance": CHECKS[check]}
        if key in na:
            row.update(
                cases=0, violations=0, max_slack=math.nan, status="not-applicable", reason=na[key]
            )
        else:
            t = tallies[key]
            row.update(
                cases=t.cases,
                violations=t.violations,
                max_slack=t.max_slack,
                status="fail" if t.violations else "pass",
                reason="",
            )
        rows.append(row)
    df = pd.DataFrame(rows, columns=VERIFY_COLUMNS)
    for col in ("layer", "head"):
        df[col] = df[col].astype("Int64")
    for col in ("cases", "violations"):
        df[col] = df[col].astype("int64")
    return df


def summarise(df: pd.DataFrame) -> dict:
    """Per-check verdicts: status (fail if any row fails; not-applicable if every row is),
    cases, violations, max slack, tolerance, the failing (layer, head) pairs and N/A reasons."""
    checks = {}
    for name in CHECKS:
        rows = df[df["check"] == name]
        if rows.empty:
            continue
        applicable = rows[rows["status"] != "not-applicable"]
        status = (
            "fail"
            if (rows["status"] == "fail").any()
            else "pass"
            if not applicable.empty
            else "not-applicable"
        )
        failing = rows[rows["status"] == "fail"]
        na = rows[rows["status"] == "not-applicable"]
        checks[name] = {
            "status": status,
            "cases": int(applicable["cases"].sum()),
            "violations": int(applicable["violations"].sum()),
            "max_slack": float(applicable["max_slack"].max()) if not applicable.empty else None,
            "tolerance": CHECKS[name],
            "failing": [_where(r) for r in failing.itertuples()],
            "not_applicable": sorted(set(na["reason"])),
            "not_applicable_layers": sorted({int(v) for v in na["layer"].dropna()}),
        }
    failed = [name for name, c in checks.items() if c["status"] == "fail"]
    return {"status": "fail" if failed else "pass", "failed_checks": failed, "checks": checks}


def layer_ranges(layers: list[int]) -> str:
    """``[5, 6, 7, 9]`` -> ``'layers 5-7, 9'``.

    Example:
        >>> layer_ranges([5, 6, 7, 9]), layer_ranges([3]), layer_ranges([])
        ('layers 5-7, 9', 'layer 3', '')
    """
    if not layers:
        return ""
    parts, start = [], layers[0]
    for prev, cur in zip(layers, [*layers[1:], None]):
        if cur is None or cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    word = "layer" if len(layers) == 1 else "layers"
    return f"{word} {', '.join(parts)}"


def _where(row) -> str:
    parts = [row.model] if str(row.model).startswith("synthetic") else []
    if not pd.isna(row.layer):
        parts.append(f"layer {row.layer}")
    if not pd.isna(row.head):
        parts.append("random head paths" if row.head == -1 else f"head {row.head}")
    return " ".join(parts) or "all"


@dataclass
class VerifyResult:
    """What ``vitspec.verify`` returns.

    Attributes:
        table: verify.csv, one row per (check, layer, head); columns ``VERIFY_COLUMNS``.
        info: verify.json: ``summary`` (per-check verdicts) and the provenance of a run.json.
        figure_data: small fixed-size tables the figures draw (``gains``, ``curves``,
            ``products``, ``blocks``, ``synthetic``), saved inside verify.json.
        state: a shard's mergeable verifier state (``--shard``), written as ``state.pt`` (see
            :mod:`vitspec.verification.state`); None for a whole run.
    """

    table: pd.DataFrame
    info: dict
    figure_data: dict[str, pd.DataFrame] = field(default_factory=dict)
    state: dict | None = None

    @property
    def passed(self) -> bool:
        """True when no check fails (not-applicable rows do not fail)."""
        return not (self.table["status"] == "fail").any()

    @property
    def failures(self) -> pd.DataFrame:
        """The failing rows."""
        return self.table[self.table["status"] == "fail"].reset_index(drop=True)

    def summary_lines(self, status: str | None = None) -> list[str]:
        """One line per check (only those with ``status`` if given): verdict, cases,
        violations, largest slack, tolerance, where it fails and why it is not applicable."""
        lines = []
        for name, c in self.info["summary"]["checks"].items():
            if status is not None and c["status"] != status:
                continue
            slack = "n/a" if c["max_slack"] is None else f"{c['max_slack']:.4g}"
            verdict = c["status"].upper()
            if c["not_applicable"] and c["status"] != "not-applicable":
                layers = layer_ranges(c.get("not_applicable_layers", []))
                verdict += f" (n/a at {layers})" if layers else " (partly n/a)"
            line = (
                f"{name:<19} {verdict:<14} cases {c['cases']:<8} "
                f"violations {c['violations']:<5} max slack {slack:<10} "
                f"tol {c['tolerance']:g}"
            )
            if c["failing"]:
                line += f"  FAILS at: {', '.join(c['failing'][:6])}"
                line += " ..." if len(c["failing"]) > 6 else ""
            if c["not_applicable"]:
                line += f"  not applicable: {c['not_applicable'][0]}"
            lines.append(line)
        return lines

    def save(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write verify.csv and verify.json (with the figures' tables) into ``out``, all or
        nothing; ``overwrite`` replaces only a previous vitspec output. ``vitspec.report(out)``
        draws the figures from them."""
        with atomic_dir(out, overwrite) as tmp:
            self.write(tmp)
        return Path(out)

    def write(self, folder: Path) -> None:
        """Write the verify files into an existing (temporary) folder."""
        self.table.to_csv(folder / "verify.csv", index=False, float_format="%.10g")
        info = {
            **self.info,
            "figure_data": {k: v.to_dict(orient="list") for k, v in self.figure_data.items()},
        }
        text = json.dumps(_jsonable(info), indent=2, default=str, allow_nan=False)
        (folder / "verify.json").write_text(text + "\n")
        if self.state is not None:
            from vitspec.shards import save_state

            save_state(folder, self.state)

    @classmethod
    def load(cls, out: str | Path) -> VerifyResult:
        """Read a directory written by ``save``."""
        out = Path(out)
        missing = [f for f in FILES if not (out / f).is_file()]
        if missing:
            raise VitspecError(
                f"{out} is not a vitspec verify directory (missing {', '.join(missing)})"
            )
        df = pd.read_csv(
            out / "verify.csv",
            dtype={"layer": "Int64", "head": "Int64"},
            keep_default_na=False,
            na_values=[""],
        )
        df["reason"] = df["reason"].astype(object).fillna("")
        info = read_info(out / "verify.json")
        data = {k: pd.DataFrame(v) for k, v in info.pop("figure_data", {}).items()}
        return cls(table=df, info=info, figure_data=data)


def _jsonable(obj):
    """NaN and infinities as null (strict JSON), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
