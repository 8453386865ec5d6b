"""Finished batches of a long generation job, kept so that a killed or timed-out job resumes.

Snakemake deletes a failed job's outputs, so the batches live outside them, in
``results/{dataset}/checkpoints/{method}/<key>/``: one ``.npz`` of plain arrays per finished
batch (read with ``allow_pickle=False``), written atomically. The key digests everything the
batches depend on (the settings and the model weights), so a changed setting or a retrained model
never reuses a stale batch. A rerun recomputes at most the batch that was running; the folder is
removed once the job's outputs are complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cellflow.checkpoint import file_sha256
from cellflow.io import atomic_path

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def folder_digest(*folders: Path) -> str:
    """SHA-256 over the names and contents of every file in ``folders`` (the model weights)."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(folder)}\t{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def path_digest(path: Path) -> str:
    """SHA-256 of a file, or :func:`folder_digest` of a folder."""
    return file_sha256(path) if path.is_file() else folder_digest(path)


class BatchStore:
    """Arrays of finished batches under ``root/<key digest>/``; ``root=None`` keeps nothing."""

    def __init__(self, root: Path | None, key: Mapping[str, Any]) -> None:
        self.root = root
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
        self.folder = None if root is None else root / digest.hexdigest()[:16]
        self.reused = 0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def get_or_compute(self, name: str, compute: Callable[[], Arrays]) -> Arrays:
        """The stored arrays of batch ``name``, or ``compute()``'s, stored before returning."""
        if self.folder is None:
            return compute()
        path = self.folder / f"{name}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    arrays = {key: stored[key] for key in stored.files}
                self.reused += 1
                return arrays
            except (OSError, ValueError, zipfile.BadZipFile) as err:
                log.warning("recomputing batch %s: its stored arrays are unreadable (%s)", path,
                            err)
        arrays = compute()
        with atomic_path(path) as temporary, temporary.open("wb") as handle:
            np.savez(handle, **arrays)
        return arrays

    def clear(self) -> None:
        """Remove every stored batch of this job (all keys): its outputs are complete."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
