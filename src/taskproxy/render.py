"""Plain-text tables, money and JSON for the CLI and the demo (no colours, safe to pipe)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from taskproxy.money import format_usd


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """`columns` are (key, heading); numbers are right-aligned."""
    if not rows:
        return "(nothing yet)"
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    headings = [heading for _, heading in columns]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headings)]
    numeric = [
        any(_is_number(row.get(key)) for row in rows) and all(_is_number(row.get(key)) or row.get(key) is None for row in rows)
        for key, _ in columns
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(headings), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.6f}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


TASK_COLUMNS = [
    ("work_item", "work item"),
    ("status", "status"),
    ("requests", "requests"),
    ("prompt_tokens", "prompt"),
    ("completion_tokens", "completion"),
    ("total_tokens", "total"),
    ("cost", "cost (USD)"),
    ("models", "models"),
]


def tasks_table(tasks: Sequence[dict[str, Any]]) -> str:
    return table([{**t, "cost": format_usd(t["cost_usd"])} for t in tasks], TASK_COLUMNS)


def print_json(value: Any) -> None:
    """A command's `--json` output: indented, times and other values as their text."""
    print(json.dumps(value, indent=2, default=str))

