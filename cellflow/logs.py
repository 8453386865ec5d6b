"""Logging set-up shared by the pipeline's entry points."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def log_to_file(log_path: str | Path) -> None:
    """Send logging and stderr (tracebacks, progress bars) to the rule's log file."""
    # A progress bar redrawn several times a second would fill a log file; every 15 s is enough.
    os.environ.setdefault("TQDM_MININTERVAL", "15")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=stream,
        force=True,
    )
