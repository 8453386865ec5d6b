"""Logging set-up shared by the pipeline's entry points."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from functools import partialmethod
from pathlib import Path

PLAIN_PROGRESS = ("{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%), {elapsed} elapsed, "
                  "{remaining} left, {rate_fmt}{postfix}")
# Key numbers of the running job (note()), printed in its summary line.
_NOTES: dict[str, str] = {}

class _Tee:
    """A text stream writing to several files: the rule's log and this attempt's copy.

    A progress bar redraws its line after a carriage return; in a file each redraw becomes a
    line of its own (tqdm's padding stripped), so that a pager or grep reads the log.
    """

    def __init__(self, *streams):
        self.streams = streams
        self._line_open = False

    def write(self, text: str) -> int:
        written = len(text)
        if "\r" in text:
            lines = [line.rstrip() for line in text.replace("\r", "\n").split("\n")]
            text = "\n".join(lines)
            if not self._line_open:
                text = text.lstrip("\n")
            while "\n\n" in text:
                text = text.replace("\n\n", "\n")
        if text:
            self._line_open = not text.endswith("\n")
        for stream in self.streams:
            stream.write(text)
        return written

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
    # A progress bar redrawn several times a second would fill a log file; every 15 s is
    # enough, as a plain line with the count, the rate and the time left. tqdm reads its
    # TQDM_* variables when it is imported: the variables are for the job's child processes,
    # the partial method for this one.
    os.environ.setdefault("TQDM_MININTERVAL", "15")
    os.environ.setdefault("TQDM_BAR_FORMAT", PLAIN_PROGRESS)
    from tqdm import tqdm

    tqdm.__init__ = partialmethod(tqdm.__init__,
                                  mininterval=float(os.environ["TQDM_MININTERVAL"]),
                                  bar_format=os.environ["TQDM_BAR_FORMAT"])
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


def note(name: str, value: object) -> None:
    """Record one of the job's key numbers for its summary line (job_summary)."""
    _NOTES[name] = f"{value:.4g}" if isinstance(value, float) else str(value)


def _size(total: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if total < 1000 or unit == "GB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1000
    raise AssertionError("unreachable")


def job_summary(name: str, outputs: Sequence[Path], seconds: float) -> str:
    """One line for the end of a job: what it wrote (files, bytes), its key numbers (note())
    and its wall time."""
    files = [path for output in outputs if output.exists()
             for path in ([output] if output.is_file() else output.rglob("*"))
             if path.is_file()]
    wrote = ", ".join(str(output) for output in outputs if output.exists()) or "nothing"
    notes = "".join(f", {key} {value}" for key, value in _NOTES.items())
    minutes, rest = divmod(seconds, 60)
    took = f"{int(minutes)} min {rest:.0f} s" if minutes else f"{rest:.1f} s"
    return (f"done: {name} wrote {wrote} ({len(files)} files, "
            f"{_size(sum(path.stat().st_size for path in files))}){notes} in {took}")
