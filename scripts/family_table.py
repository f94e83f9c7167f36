"""Regenerate the README's family table from the registered adapters.

python scripts/family_table.py          # rewrite README.md in place
python scripts/family_table.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitspec.adapters import TABLE_END, TABLE_START, family_table

README = Path(__file__).parents[1] / "README.md"


def with_table(text: str) -> str:
    """``text`` with the part between the table markers replaced by the current table."""
    head, start, rest = text.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        raise SystemExit(f"README.md lacks the markers {TABLE_START!r} ... {TABLE_END!r}")
    return f"{head}{TABLE_START}\n{family_table()}\n{TABLE_END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, do not write")
    args = parser.parse_args()
    text = README.read_text()
    new = with_table(text)
    if args.check:
        return int(new != text)
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
