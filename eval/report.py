"""The run report: one row per artifact, written as report.md and report.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def columns_of(rows: list[dict[str, Any]], first: list[str]) -> list[str]:
    seen = list(first)
    for row in rows:
        seen.extend(k for k in row if k not in seen)
    return seen


def render_report(title: str, rows: list[dict[str, Any]], notes: list[str]) -> str:
    cols = columns_of(rows, ["artifact", "stage"])
    body = [f"# {title}", "", markdown_table(rows, cols), ""]
    body += [f"- {n}" for n in notes]
    return "\n".join(body) + "\n"


def write_report(directory: Path, title: str, rows: list[dict[str, Any]], notes: list[str],
                 settings: dict[str, Any]) -> None:
    (directory / "report.md").write_text(render_report(title, rows, notes))
    (directory / "report.json").write_text(json.dumps({"title": title, "settings": settings, "rows": rows,
                                                       "notes": notes}, indent=2, default=str))
