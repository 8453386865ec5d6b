"""How many jobs the paper benchmark is, and how long Snakemake takes to plan it.

Dry-runs ``config/paper.yaml`` (its data roots need not exist for planning) as it ships, and
with generation sharded over 8 and 24 jobs per method, in a scratch folder; records the job
count and the wall time of ``snakemake -n``. The target: planning stays within 5 s for 2,000
jobs, so a user's dry run before a cluster run is not a wait.

Run: python -m benchmarks.bench_dag   (appends to benchmarks/results/dag.md)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.machine import record

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def plan(config: dict, workdir: Path) -> tuple[int, float]:
    """(jobs, seconds) of one dry run of ``config``."""
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    result = subprocess.run(
        [str(SNAKEMAKE), "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
         "-n", "--quiet", "rules", "--configfile", str(path)],
        capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    total = next(line for line in result.stdout.splitlines() if line.startswith("total"))
    return int(total.split()[-1]), seconds


def main() -> None:
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    rows = []
    for shards in (1, 8, 24):
        config = {**paper, "generation": {**paper["generation"], "shards": shards}}
        with tempfile.TemporaryDirectory() as scratch:
            jobs, seconds = plan(config, Path(scratch))
        rows.append({"config": f"config/paper.yaml, generation.shards {shards}",
                     "jobs": jobs, "snakemake -n": f"{seconds:.1f} s"})
    record("dag", "Jobs of the paper benchmark and the time to plan them", rows)


if __name__ == "__main__":
    main()
