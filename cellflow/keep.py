"""Keep a job's previous good outputs until its rerun has replaced them.

Snakemake deletes the outputs of a job before it reruns it, so a rerun that fails (a full disk,
a time-out, a bug) used to leave nothing where the previous result was. Before the jobs run,
the workflow hard-links the existing outputs of every job it is about to run into a store
(no data is copied: our jobs replace files by rename, which leaves the linked originals
intact); when the run fails or was killed, every output that is missing again is moved back
from the store, dated to the first second of 1970 so that the next run still redoes the job
(Snakemake would otherwise take the old file for a finished result). After a successful run
the store is removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

RECORD = "outputs.json"
RESTORED_MTIME = 1


def _link_tree(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, destination, copy_function=os.link, symlinks=True)
    else:
        os.link(source, destination)


def back_up(outputs: Iterable[str | Path], store: Path) -> list[Path]:
    """Hard-link each existing output (file or folder, relative to the working directory) into
    ``store`` and record it; return what was backed up."""
    store = Path(store)
    recorded = _recorded(store)
    kept = []
    for output in map(Path, outputs):
        if output.is_absolute() or not output.exists() or output in recorded:
            continue
        copy = store / "files" / output
        if copy.is_dir():
            shutil.rmtree(copy)
        else:
            copy.unlink(missing_ok=True)
        try:
            _link_tree(output, copy)
        except OSError as err:  # another file system, no hard links: keep no backup of it
            log.warning("cannot keep the previous %s (%s)", output, err)
            continue
        recorded.add(output)
        kept.append(output)
    if recorded:
        store.mkdir(parents=True, exist_ok=True)
        (store / RECORD).write_text(json.dumps(sorted(map(str, recorded)), indent=2))
    return kept


def restore_missing(store: Path) -> list[Path]:
    """Move back every backed-up output that is missing now (its job failed or was killed);
    date it older than any input so that the next run redoes it; remove the store."""
    store = Path(store)
    restored = []
    for output in sorted(_recorded(store)):
        copy = store / "files" / output
        if output.exists() or not copy.exists():
            continue
        output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(copy, output)
        for path in [output, *(output.rglob("*") if output.is_dir() else [])]:
            # 1, not 0: Snakemake reads a modification time of 0 as none and skips the check.
            os.utime(path, (RESTORED_MTIME, RESTORED_MTIME), follow_symlinks=False)
        restored.append(output)
        log.warning("kept the previous %s: its rerun did not finish (the next run redoes it)",
                    output)
    discard(store)
    return restored


def discard(store: Path) -> None:
    shutil.rmtree(store, ignore_errors=True)


def _recorded(store: Path) -> set[Path]:
    record = Path(store) / RECORD
    return set(map(Path, json.loads(record.read_text()))) if record.is_file() else set()
