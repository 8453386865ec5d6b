"""How long the shell commands are that a run prints, for the demo and the paper config.

Dry-runs each config with ``-p`` in a scratch folder and measures every printed ``Shell
command:`` line: the count, the longest, the median, and how many exceed 500 characters. The
target: one short line per job, so a user can read the run in a terminal (the tests hold every
command under 600 characters).

Run: python -m benchmarks.bench_commands   (appends to benchmarks/results/commands.md)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.machine import record

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def printed_commands(config: Path) -> list[str]:
    with tempfile.TemporaryDirectory() as scratch:
        result = subprocess.run(
            [str(SNAKEMAKE), "--snakefile", str(SNAKEFILE), "--directory", scratch, "-n", "-p",
             "--configfile", str(config)], capture_output=True, text=True, check=True)
    return [line.split("Shell command:", 1)[1].strip()
            for line in (result.stdout + result.stderr).splitlines() if "Shell command:" in line]


def main() -> None:
    rows = []
    for name in ("config", "paper"):
        lengths = [len(command) for command in printed_commands(REPO / "config" / f"{name}.yaml")]
        rows.append({"config": f"config/{name}.yaml", "commands": len(lengths),
                     "longest": max(lengths), "median": int(statistics.median(lengths)),
                     "over 500 characters": sum(length > 500 for length in lengths)})
    record("commands", "Printed shell commands of a dry run (characters)", rows)


if __name__ == "__main__":
    main()
