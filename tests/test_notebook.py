"""Both notebooks run top to bottom (on CPU, tiny models or saved folders) and show what they
promise."""

import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def _execute(name: str) -> list:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    assert time.perf_counter() - start < 120, "a notebook must run in under two minutes"
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def test_quickstart_notebook_executes():
    outputs = _execute("quickstart.ipynb")
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "hc_dc_ratio" in html and "attn_spectrum" in html
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_paper_figures_notebook_executes():
    outputs = _execute("paper_figures.ipynb")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    captions = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert len(images) >= 8
    assert "Wang et al. 2022, Fig. 4" in captions and "Park & Kim 2022, Fig. 2a" in captions
    text = "".join(o.get("text", "") for o in outputs)
    assert "report.html" in text and "tokens.png" in text


def test_notebooks_are_committed_with_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.outputs for c in code if c.source.strip()), path.name
