"""`vitspec report`: one self-contained page and PNG + PDF figures from analyze, verify and compare
folders; figures for a run saved with --no-figures; TrueType fonts only; renders in Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

import vitspec
import vitspec.analysis
import vitspec.session
from vitspec.cli import main

TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two analyze runs (the second with --no-figures), a verify run, a compare folder."""
    root = tmp_path_factory.mktemp("folders")
    mp = pytest.MonkeyPatch()
    real = vitspec.session.load_model
    mp.setattr(
        vitspec.session,
        "load_model",
        lambda name, **kw: real(name, **{**kw, "model_kwargs": TINY}),
    )
    try:
        common = ["--random-init", "--num-images", "3", "--quiet"]
        assert (
            main(
                [
                    "analyze",
                    "deit_tiny",
                    *common,
                    "--out",
                    str(root / "a"),
                    "--sites",
                    "embed,mid,block",
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "analyze",
                    "deit_tiny",
                    *common,
                    "--seed",
                    "1",
                    "--out",
                    str(root / "b"),
                    "--label",
                    "seed1",
                    "--no-figures",
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    "verify",
                    "deit_tiny",
                    "--random-init",
                    "--num-images",
                    "2",
                    "--quiet",
                    "--out",
                    str(root / "v"),
                    "--no-figures",
                ]
            )
            == 0
        )
    finally:
        mp.undo()
    assert (
        main(
            [
                "compare",
                str(root / "a"),
                str(root / "b"),
                "--labels",
                "a,b",
                "--out",
                str(root / "cmp"),
                "--quiet",
            ]
        )
        == 0
    )
    return root


@pytest.fixture(scope="module")
def page(folders):
    out = folders / "report"
    dirs = [str(folders / d) for d in ("a", "b", "v", "cmp")]
    assert main(["report", *dirs, "--out", str(out), "--quiet"]) == 0
    return out


def test_saved_folders_hold_data_and_analyze_draws_after_saving(folders):
    assert not list((folders / "b").glob("*.png"))  # --no-figures
    assert {p.name for p in (folders / "v").iterdir()} == {"verify.csv", "verify.json"}
    assert (folders / "a" / "tokens.png").exists() and (folders / "cmp" / "compare.pdf").exists()


def test_page_embeds_every_figure_and_refers_to_nothing_outside(page):
    html = (page / "report.html").read_text()
    images = re.findall(r'<img [^>]*src="([^"]*)"', html)
    assert len(images) >= 12
    assert all(src.startswith("data:image/png;base64,") for src in images)
    for src in images[:3]:
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    refs = re.findall(r'(?:src|href|action|data)\s*=\s*["\']([^"\']*)', html)
    assert all(r.startswith(("data:", "#")) for r in refs), refs
    assert not re.search(r"<(script|link|iframe|object|embed)\b|@import|url\(", html)
    assert len(re.findall("<figcaption>", html)) == len(images)
    pngs, pdfs = list(page.rglob("*.png")), list(page.rglob("*.pdf"))
    assert len(pngs) >= 12 and len(pdfs) >= 12 and len(pngs) == len(images)
    with Image.open(pngs[0]) as png:
        assert round(png.info["dpi"][0]) == 200


def test_page_holds_provenance_summaries_checks_and_differences(page):
    html = (page / "report.html").read_text()
    for text in (
        "RANDOM INIT",
        "deit_tiny_patch16_224",
        "versions",
        "torch",
        "command",
        "Summary",
        "last-layer mean",
        "mean over layers",
        "First layer where <code>patch_cos_abs</code>",
        "exceeds 0.9",
        "Checks (overall: pass)",
        "row_stochastic",
        "lowpass_limit",
        "Differences from the reference",
        "max |diff|",
        "Runs overlaid",
    ):
        assert text in html, text
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", html, flags=re.S)
    tokens = next(c for c in captions if c.startswith("Token metrics against layer"))
    assert "band = ± sd over 3 images" in tokens and "Sites: block" in tokens
    assert any("black line on the colour bar is log N = 2.833 nats" in c for c in captions)


def test_no_pdf_embeds_a_type3_font(page):
    pdffonts = _debian_tool(("pdffonts",), "poppler-utils")
    if pdffonts is None:
        pytest.skip(
            "no pdffonts: poppler-utils is missing and cannot be installed (not root or no apt-get)"
        )
    for pdf in sorted(page.rglob("*.pdf")):
        out = subprocess.run([pdffonts, str(pdf)], capture_output=True, text=True, check=True)
        rows = out.stdout.splitlines()[2:]
        assert rows, pdf
        assert not [r for r in rows if "Type 3" in r], (pdf, rows)
        assert all("TrueType" in r for r in rows), (pdf, rows)


def test_report_on_one_run_draws_its_figures_in_place_and_reproducibly(folders, tmp_path):
    run = tmp_path / "b"
    shutil.copytree(folders / "b", run)
    page = vitspec.report(run, size="column", band="se")
    assert page == run / "report.html"
    first = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".png", ".pdf")}
    assert {"tokens.png", "cosine.pdf", "attn_spectrum_map.png", "attn_entropy_map.pdf"} <= set(
        first
    )
    with Image.open(run / "tokens.png") as png:
        assert png.size[0] == 700  # 3.5 in at 200 dpi
    assert "band = ± se (sd / sqrt(n)) over 3 images" in page.read_text()
    vitspec.report(run, size="column", band="se")
    again = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".png", ".pdf")}
    assert again == first  # byte for byte: a committed report does not change when remade


def test_one_line_errors(folders, tmp_path, capsys):
    cases = [
        (["report", str(folders / "a"), str(folders / "b")], "give --out"),
        (["report", str(tmp_path)], "is not a vitspec folder"),
        (["report", str(folders / "a"), "--out", str(folders / "a")], "it holds the input"),
    ]
    for argv, fragment in cases:
        code = main(argv)
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
    with pytest.raises(vitspec.VitspecError, match="allowed: column, page"):
        vitspec.report(folders / "a", tmp_path / "x", size="poster")


def _debian_tool(names: tuple[str, ...], package: str) -> str | None:
    """The first of ``names`` on PATH, else install Debian's ``package`` (as root) and retry."""
    for name in names:
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        quiet = {"capture_output": True, "timeout": 600}
        subprocess.run(["apt-get", "update", "-qq"], **quiet)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], **quiet)
        return shutil.which(names[0])
    return None


def test_page_renders_in_headless_chromium(page, tmp_path):
    browser = _debian_tool(("chromium", "chromium-browser", "google-chrome"), "chromium")
    if browser is None:
        pytest.skip("no chromium: not installed and cannot install it (not root or no apt-get)")
    shot = tmp_path / "shot.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,2400",
        f"--screenshot={shot}",
        (page / "report.html").as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.exists(), "chromium wrote no screenshot"
    with Image.open(shot) as image:
        colours = image.convert("L").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20  # text and figures, not a blank page


def test_example_report_is_small_and_the_readme_shows_two_of_its_figures():
    root = Path(__file__).parents[1]
    report = root / "reports" / "toy_scaling" / "report"
    assert (report / "report.html").exists()
    assert sum(p.stat().st_size for p in report.rglob("*") if p.is_file()) < 5_000_000
    readme = (root / "README.md").read_text()
    shown = re.findall(r"\]\((reports/toy_scaling/report/[^)]+\.png)\)", readme)
    assert len(shown) >= 2 and all((root / p).exists() for p in shown)
