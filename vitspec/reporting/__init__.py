"""``vitspec.report``: figures and a self-contained HTML page from saved folders.

Analyze runs, verify runs and compare folders are data only; this layer reads them and draws
(through :mod:`vitspec.plots`), so a run saved with ``--no-figures`` gets its figures later and
several runs, a verify run and a comparison share one page. No torch is imported.

(The package is ``reporting``, as ``analyze`` lives in ``analysis``: a submodule named
``vitspec.report`` would shadow the function ``vitspec.report``.)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import vitspec
from vitspec.errors import VitspecError
from vitspec.outputs import atomic_dir, record_files
from vitspec.plots import Drawn, save, style
from vitspec.plots.compare import compare_figures
from vitspec.plots.figures import overlay_figures, run_figures
from vitspec.plots.layers import BANDS
from vitspec.plots.style import check_size
from vitspec.plots.verify import verify_figures
from vitspec.reporting import page
from vitspec.reporting.folders import (
    Folder,
    check_table,
    difference_table,
    first_crossings,
    open_folders,
    slug,
    summary,
)

__all__ = ["draw", "report"]
HTML = "report.html"


def figures_of(folder: Folder, *, size: str, band: str) -> dict[str, Drawn]:
    """The figure set of one folder (call inside ``style(size)``)."""
    if folder.kind == "analyze":
        return run_figures(folder.data, size=size, band=band, label=folder.label)
    if folder.kind == "verify":
        return verify_figures(folder.data, size=size)
    return compare_figures(folder.data.table, folder.data.info, size=size, band=band)


def _check(size: str, band: str) -> None:
    check_size(size)
    if band not in BANDS:
        raise VitspecError(f"unknown band {band!r}; allowed: {', '.join(BANDS)}")


def draw(folder: str | Path, *, size: str = "page", band: str = "sd") -> list[Path]:
    """Draw a saved folder's figures into it (PNG 200 dpi + PDF), beside its tables.

    This is what ``vitspec analyze``, ``verify`` and ``compare`` call after saving; each file is
    replaced whole, nothing else in the folder is touched.

    Example:
        >>> paths = draw("runs/deit_small-random-init", size="column")  # doctest: +SKIP
    """
    _check(size, band)
    (one,) = open_folders([folder])
    paths: list[Path] = []
    with style(size):
        for stem, drawn in figures_of(one, size=size, band=band).items():
            paths += save(drawn.figure, one.path, stem)
    record_files(one.path, paths)
    return paths


def report(
    folders: str | Path | Sequence[str | Path],
    out: str | Path | None = None,
    *,
    size: str = "page",
    band: str = "sd",
    overwrite: bool = False,
) -> Path:
    """One HTML page (and every figure as PNG + PDF) from analyze, verify and compare folders.

    Args:
        folders: one folder or several (analyze runs, verify runs, compare folders, any order;
            a several-checkpoint folder of ``vitspec analyze --ckpt A B ...`` for its runs).
        out: output folder (``report.html`` plus a sub-folder of figures per input), written
            all or nothing; ``None`` with one folder draws into that folder itself.
        size: ``"column"`` (3.5 in wide) or ``"page"`` (7.16 in).
        band: ``"sd"`` (spread over images) or ``"se"`` (standard error of the mean).
        overwrite: replace an existing ``out``.

    Returns:
        The path of ``report.html``.

    Example:
        >>> vitspec.report(["runs/a", "runs/b", "runs/cmp"], "runs/rep")  # doctest: +SKIP
        PosixPath('runs/rep/report.html')
    """
    paths = [folders] if isinstance(folders, (str, Path)) else list(folders)
    if not paths:
        raise VitspecError("report needs at least one folder")
    _check(size, band)
    opened = open_folders(paths)
    if out is None:
        if len(opened) > 1:
            raise VitspecError("give --out (out=...) when reporting on several folders")
        folder = opened[0].path
        before = set(folder.iterdir())
        page_path = _write(opened, folder, size, band, in_place=True)
        record_files(folder, (set(folder.iterdir()) - before) | {page_path})
        return page_path
    with atomic_dir(Path(out), overwrite, protect=paths) as tmp:
        _write(opened, tmp, size, band, in_place=False)
        manifest = {
            "vitspec": vitspec.__version__,
            "command": " ".join(sys.argv),
            "folders": [{"kind": f.kind, "label": f.label, "path": str(f.path)} for f in opened],
            "size": size,
            "band": band,
        }
        (tmp / "report.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out) / HTML


def _write(folders: list[Folder], root: Path, size: str, band: str, in_place: bool) -> Path:
    sections = []
    runs = {f.label: f.data for f in folders if f.kind == "analyze"}
    with style(size):
        for f in folders:
            where = root if in_place else root / slug(f.label)
            where.mkdir(exist_ok=True)
            drawn = figures_of(f, size=size, band=band)
            sections.append(_section(f, drawn, where, root))
        if len(runs) > 1:
            where = root / "overlay"
            where.mkdir(exist_ok=True)
            drawn = overlay_figures(runs, size=size, band=band)
            body = "<p>The analyze runs of this report on shared axes.</p>"
            sections.append(("overlay", "Runs overlaid", body + _figures(drawn, where, root)))
    kinds = ", ".join(f"{f.kind} {f.label}" for f in folders)
    intro = (
        f"<p>Made by <code>vitspec report</code> from: {page.esc(kinds)}. Figure size "
        f"{page.esc(size)}; bands = {page.esc(band)} over images. Every figure is also "
        "saved as PNG (200 dpi) and PDF beside this page.</p>"
    )
    if any(f.kind != "compare" and f.data.info.get("random_init") for f in folders):
        intro += (
            '<p class="warn">RANDOM INIT: some runs use untrained random weights; their '
            "numbers describe an untrained network.</p>"
        )
    text = page.page("vitspec report", sections, intro)
    (root / HTML).write_text(text, encoding="utf-8")
    return root / HTML


def _figures(drawn: dict[str, Drawn], where: Path, root: Path) -> str:
    parts = []
    for stem, d in drawn.items():
        png, pdf = save(d.figure, where, stem)
        files = f"{png.relative_to(root)}, {pdf.relative_to(root)}"
        parts.append(page.figure(png, d.caption, files, f"{where.name}-{stem}"))
    return "".join(parts)


def _section(f: Folder, drawn: dict[str, Drawn], where: Path, root: Path) -> tuple:
    anchor = slug(f.label)
    if f.kind == "analyze":
        crossings = first_crossings(f.data)
        body = (
            page.pairs([("folder", f.path), *page.provenance(f.data.info)])
            + "<h3>Summary</h3>"
            + page.table(summary(f.data))
            + "<p>First layer where <code>patch_cos_abs</code> (site block, layer 0 = embed) "
            "exceeds 0.5: "
            + page.esc(crossings[0.5])
            + "; exceeds 0.9: "
            + page.esc(crossings[0.9])
            + ".</p>"
        )
        heading = f"Run {f.label}"
    elif f.kind == "verify":
        status = f.data.info.get("summary", {}).get("status", "?")
        body = (
            page.pairs([("folder", f.path), *page.provenance(f.data.info)])
            + f"<h3>Checks (overall: {page.esc(status)})</h3>"
            + page.table(check_table(f.data))
            + "<p>Every row of <code>verify.csv</code> (per layer and head) is in the "
            "folder.</p>"
        )
        heading = f"Verify {f.label}"
    else:
        info = f.data.info
        runs = [
            (
                r["label"],
                f"{r.get('model')} [{r.get('checkpoint')}] from {r.get('dir')}"
                + (f", sha256 {r['sha256']}" if r.get("sha256") else ""),
            )
            for r in info["runs"]
        ]
        body = (
            page.pairs(
                [
                    ("folder", f.path),
                    ("reference", info.get("reference")),
                    ("site", info.get("site")),
                    ("x", info.get("x")),
                    *runs,
                    ("vitspec", info.get("vitspec")),
                ]
            )
            + "<h3>Differences from the reference</h3>"
            + page.table(difference_table(f.data))
            + "<p>Per layer: <code>differences.csv</code> in the folder.</p>"
        )
        heading = f"Compare {f.label}"
    return anchor, heading, body + _figures(drawn, where, root)
