"""Describe the machine a benchmark ran on, and append results to a Markdown file."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kib = int(meminfo.read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except ImportError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs{memory}, {gpu}; "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def record(name: str, title: str, rows: list[dict[str, object]]) -> Path:
    """Append a dated Markdown table of ``rows`` to ``results/<name>.md`` and print it."""
    RESULTS.mkdir(exist_ok=True)
    columns = list(rows[0])
    lines = [
        f"## {title}",
        "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {describe_machine()}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows),
        "",
    ]
    path = RESULTS / f"{name}.md"
    with path.open("a") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
