"""Helpers shared by every benchmark: flags, JSON output, a readable table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence


def parse_args(description: str, argv: Sequence[str] | None = None,
               extra: Any = None) -> argparse.Namespace:
    """The common flags --quick and --json FILE; ``extra(parser)`` may add more."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small run, about a minute")
    parser.add_argument("--json", metavar="FILE", default=None, help="write results as JSON")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def write_json(path: str | Path | None, data: dict) -> None:
    """Write ``data`` as indented JSON (creating parent folders); no-op for None."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table with rich (plain text if rich is missing)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join(columns))
        for row in cells:
            print(" | ".join(row))
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in cells:
        table.add_row(*row)
    Console().print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
