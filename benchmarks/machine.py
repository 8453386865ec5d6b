"""Describe the machine a benchmark ran on, and append results to a Markdown file."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

from cellflow.machine import describe_machine

RESULTS = Path(__file__).resolve().parent / "results"


def markdown_table(rows: list[dict[str, object]], cell: Callable[[object], str] = str) -> str:
    """``rows`` (one dict each, the first one's keys as columns) as a Markdown table."""
    columns = list(rows[0])
    return "\n".join([
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows),
    ])


def record(name: str, title: str, rows: list[dict[str, object]]) -> Path:
    """Append a dated Markdown table of ``rows`` to ``results/<name>.md`` and print it."""
    RESULTS.mkdir(exist_ok=True)
    lines = [
        f"## {title}",
        "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {describe_machine()}",
        "",
        markdown_table(rows),
        "",
    ]
    path = RESULTS / f"{name}.md"
    with path.open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
