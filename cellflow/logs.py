"""Logging set-up shared by the pipeline's entry points."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path


class _Tee:
    """A text stream writing to several files: the rule's log and this attempt's copy."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def fileno(self) -> int:
        return self.streams[0].fileno()

    def isatty(self) -> bool:
        return False


def attempt_log_path(log_path: str | Path, started: float | None = None) -> Path:
    """Where this attempt's copy of a rule's log goes: `<folder>/attempts/<log name>/<UTC start
    time>[-slurm<job id>]-<pid>.log`. Snakemake deletes a rule's log before each attempt, so a
    retried job would otherwise keep only its last attempt's story."""
    log_path = Path(log_path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    job = os.environ.get("SLURM_JOB_ID")
    name = f"{stamp}{f'-slurm{job}' if job else ''}-{os.getpid()}.log"
    return log_path.parent / "attempts" / log_path.name.removesuffix(".log") / name


def log_to_file(log_path: str | Path) -> None:
    """Send logging and stderr (tracebacks, progress bars) to the rule's log file, and a copy
    to the attempt's own file (see attempt_log_path)."""
    # A progress bar redrawn several times a second would fill a log file; every 15 s is enough.
    os.environ.setdefault("TQDM_MININTERVAL", "15")
    log_path = Path(log_path)
    attempt_path = attempt_log_path(log_path)
    attempt_path.parent.mkdir(parents=True, exist_ok=True)
    # both live as long as the process
    stream = _Tee(open(log_path, "w", buffering=1),  # noqa: SIM115
                  open(attempt_path, "w", buffering=1))  # noqa: SIM115
    sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=stream,
        force=True,
    )
