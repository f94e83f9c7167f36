"""The package's imports flow one way (design notes): every import of every module, with its full
module name, goes to a stage at or left of the importer's stage.

    errors, sites -> functional -> metrics -> adapters, loading, inputs -> capture -> engine
      -> consumers (collect, verification checks) -> results, analyze, verify -> plots -> cli
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "vitspec"

# module-name prefix -> stage; the longest matching prefix wins
STAGES = {
    "vitspec.errors": 0,
    "vitspec.sites": 0,
    "vitspec.outputs": 0,
    "vitspec.progress": 0,
    "vitspec.functional": 1,
    "vitspec.metrics": 2,
    "vitspec.adapters": 3,
    "vitspec.scaling": 3,
    "vitspec.checkpoints": 3,
    "vitspec.loading": 3,
    "vitspec.fitting": 3,
    "vitspec.inputs": 3,
    "vitspec.hf": 3,
    "vitspec.pipeline": 3,
    "vitspec.capture": 4,
    "vitspec.shards": 3,
    "vitspec.session": 5,
    "vitspec.engine": 5,
    "vitspec.collect": 6,
    "vitspec.verification.checks": 6,
    "vitspec.verification.trajectory": 6,
    "vitspec.verification.model": 6,
    "vitspec.verification.blockchecks": 6,
    "vitspec.verification.summaries": 6,
    "vitspec.verification.synthetic": 6,
    "vitspec.verification.tally": 6,
    "vitspec.verification.state": 6,
    "vitspec.results": 7,
    "vitspec.verification.result": 7,
    "vitspec.verification.merge": 7,
    "vitspec.verification": 7,
    "vitspec.analysis": 7,
    "vitspec.sweep": 7,
    "vitspec.merge": 7,
    "vitspec.comparison": 8,
    "vitspec.reporting": 8,
    "vitspec.plots": 8,
    "vitspec.cli_parser": 9,
    "vitspec.cli": 9,
    "vitspec.__main__": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Full names of the vitspec modules ``name`` imports (anywhere in the file; ``from a import
    b`` counts ``a.b`` when that is a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    return {m for m in found if m == "vitspec" or m.startswith("vitspec.")}


def stage(name: str) -> int:
    matches = [p for p in STAGES if name == p or name.startswith(p + ".")]
    assert matches, f"{name} has no stage in the layering table"
    return STAGES[max(matches, key=len)]


def test_every_module_has_a_stage_and_imports_only_leftwards():
    wrong = []
    for name in MODULES:
        if name == "vitspec":
            continue
        for other in imports(name) - {"vitspec"}:  # the package itself: __version__ only
            if stage(other) > stage(name):
                wrong.append(f"{name} -> {other}")
    assert wrong == [], wrong


def test_the_named_rules_hold_on_full_module_names():
    for name in MODULES:
        got = imports(name)
        if name.startswith("vitspec.verification"):
            assert not {"vitspec.analysis", "vitspec.collect"} & got, name
        if name.startswith("vitspec.functional"):
            banned = {"vitspec.capture", "vitspec.engine", "vitspec.results", "vitspec.inputs"}
            assert not banned & got, name


def test_result_types_never_import_the_plots():
    for name in ("vitspec.results", "vitspec.verification.result", "vitspec.comparison"):
        assert not any(m.startswith("vitspec.plots") for m in imports(name)), name


def test_plots_never_import_torch():
    code = (
        "import sys, importlib, pkgutil, vitspec.plots as p\n"
        "for m in pkgutil.iter_modules(p.__path__):\n"
        "    importlib.import_module('vitspec.plots.' + m.name)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_import_scanner_sees_full_names():
    assert "vitspec.engine" in imports("vitspec.analysis")
    assert "vitspec.adapters.base" in imports("vitspec.adapters.vit")
    assert "vitspec.verification.model" in imports("vitspec.verification")
    with pytest.raises(AssertionError, match="no stage"):
        stage("vitspec.unplaced")


def test_importing_vitspec_leaves_the_environment_alone():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = (
        "import os, vitspec.loading, vitspec.analysis, vitspec.verification, vitspec.cli\n"
        "print(os.environ.get('HF_HUB_OFFLINE'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "None"
