"""README stays true: the two setup commands, every metric in the glossary, the metrics command."""

import re
from pathlib import Path

from vitspec.cli import main
from vitspec.metrics import list_metrics

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_setup_section_shows_the_two_commands():
    setup = README.split("## Setup", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^make \w+", setup, flags=re.M)
    assert commands == ["make demo", "make test"]


def test_glossary_names_every_registered_metric():
    glossary = README.split("## Metric glossary", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z_]+)`", glossary, flags=re.M)}
    assert {s.name for s in list_metrics()} <= rows


def test_metrics_command_lists_the_registry(capsys):
    assert main(["metrics", "attn_*"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == [
        s.name for s in list_metrics("attn_*")
    ]


def test_family_table_is_generated_from_the_adapters():
    from vitspec.adapters import TABLE_END, TABLE_START, adapter_classes, family_table

    table = README.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert table == family_table(), "run: python scripts/family_table.py"
    names = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]]
    assert names == [a.info.name for a in adapter_classes()]
