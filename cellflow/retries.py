"""What a retried cluster job asks for: the previous attempts' failures decide it.

A job killed at its time limit needs more time, not more memory; one killed for memory needs
more memory; one that failed in its own code needs neither (its retry only guards against a
flaky node). SLURM writes why it ended a job into the job's own log, which the Snakemake
SLURM executor keeps per attempt under `.snakemake/slurm_logs/rule_<rule>/<wildcards>/`.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

TIME_LIMIT, OUT_OF_MEMORY, OTHER = "time_limit", "out_of_memory", "other"

# What slurmstepd and the kernel write when they end a job. Only host memory: a CUDA
# out-of-memory error is not cured by more host memory, so it counts as a failure of the code.
_FAILURE_PATTERNS = {
    TIME_LIMIT: re.compile(r"CANCELLED AT \S+ DUE TO TIME LIMIT|\bTIMEOUT\b"),
    OUT_OF_MEMORY: re.compile(
        r"oom[-_ ]kill|OUT_OF_MEMORY|Exceeded job memory limit|\bMemoryError\b",
        re.IGNORECASE),
}

# The resource each kind of failure grows.
GROWS_AFTER = {"runtime": TIME_LIMIT, "mem_mb": OUT_OF_MEMORY}


def failure_reason(log_text: str) -> str:
    """`time_limit`, `out_of_memory` or `other`, from the text of a failed job's log."""
    for reason, pattern in _FAILURE_PATTERNS.items():
        if pattern.search(log_text):
            return reason
    return OTHER


def slurm_log_folder(root: str | Path, rule: str, wildcard_values: Iterable[str]) -> Path:
    """Where the Snakemake SLURM executor keeps the logs of one job's attempts."""
    return Path(root) / f"rule_{rule}" / "_".join(map(str, wildcard_values)).replace("/", "_")


def previous_failures(log_folder: Path, attempts: int, exclude: str | None = None) -> list[str]:
    """The failure reasons of a job's `attempts` newest SLURM logs (but `exclude`, a file name),
    oldest first; fewer when the executor kept fewer: a job run locally has none."""
    if attempts < 1 or not log_folder.is_dir():
        return []
    logs = sorted((path for path in log_folder.glob("*.log") if path.name != exclude),
                  key=lambda path: path.stat().st_mtime)
    return [failure_reason(path.read_text(errors="replace")) for path in logs[-attempts:]]


def retried_limit(resource: str, base: int, failures: Sequence[str],
                  cap: int | None = None) -> int:
    """`base` once more for every earlier attempt that died for want of `resource`, but never
    above `cap` (what the partition offers), as a request no node can meet is refused; a base
    already above it is left for SLURM to refuse by name."""
    grown = base * (1 + sum(reason == GROWS_AFTER[resource] for reason in failures))
    return grown if cap is None else max(base, min(grown, cap))


def _minutes(slurm_time: str) -> int | None:
    """SLURM's `[days-]hours:minutes:seconds` (or `minutes`) in whole minutes; None when
    unlimited."""
    if slurm_time in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, clock = slurm_time.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if len(parts) == 1:  # minutes
        hours, minutes, seconds = 0, parts[0], 0
    else:
        hours, minutes, seconds = ([0] * (3 - len(parts)) + parts)
    return (int(days or 0) * 24 + hours) * 60 + minutes + (seconds > 0)


@functools.cache
def partition_limits(partition: str | None = None) -> dict[str, int]:
    """What one job can get in a partition (the default one when None): the largest node
    memory (`mem_mb`) and the time limit (`runtime`, minutes); empty where no SLURM answers,
    and without `runtime` for a partition without a time limit."""
    if shutil.which("sinfo") is None:
        return {}
    command = ["sinfo", "-h", "-o", "%P|%l|%m"] + (["-p", partition] if partition else [])
    try:
        listing = subprocess.run(command, capture_output=True, text=True, timeout=30,
                                 check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return {}
    limits: dict[str, int] = {}
    for line in listing.splitlines():
        name, time_limit, memory = line.split("|")
        if not (name.rstrip("*") == partition if partition else name.endswith("*")):
            continue
        minutes = _minutes(time_limit)
        if minutes is not None:
            limits["runtime"] = max(limits.get("runtime", 0), minutes)
        if memory.rstrip("+").isdigit():
            limits["mem_mb"] = max(limits.get("mem_mb", 0), int(memory.rstrip("+")))
    return limits
