"""Finished batches of a long generation job, kept so that a killed or timed-out job resumes.

Snakemake deletes a failed job's outputs, so the batches live outside them, in
``results/{dataset}/checkpoints/{method}/<key>/``: one ``.npz`` of plain arrays per finished
batch (read with ``allow_pickle=False``), written atomically. The key digests everything the
batches depend on (the settings and the model weights), so a changed setting or a retrained model
never reuses a stale batch. A rerun recomputes at most the batch that was running; the folder is
removed once the job's outputs are complete.

The same store spreads one method over several jobs (:class:`Sharding`): shard ``i`` of ``n``
computes and stores the batches at positions ``i, i + n, i + 2n, ...`` of the job's batch
order, and the gather job, which runs the method as one job would, finds every batch stored
and writes the outputs. A batch's arrays depend on its inputs and its own seed only, so the
outputs are the same, byte for byte, whatever the number of shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cellflow.checkpoint import file_sha256
from cellflow.io import atomic_path
from cellflow.provenance import FOLDER_RECORD

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def folder_digest(*folders: Path) -> str:
    """SHA-256 over the names and contents of every file in ``folders`` (the model weights);
    the provenance record (when the model was made, and where) is not part of it."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*")
                           if p.is_file() and p.name != FOLDER_RECORD):
            digest.update(f"{path.relative_to(folder)}\t{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def path_digest(path: Path) -> str:
    """SHA-256 of a file, or :func:`folder_digest` of a folder."""
    return file_sha256(path) if path.is_file() else folder_digest(path)


class ShardError(ValueError):
    """Shards that do not add up to one job's batches; the message names the shard."""


def read_shard_records(records: Sequence[Path], count: int, expected: Mapping[str, Any],
                       what: str, error: type[ValueError] = ShardError,
                       check: Callable[[Path, dict[str, Any]], None] | None = None
                       ) -> list[dict[str, Any]]:
    """The records of shards ``0 .. count - 1`` of one plan (``expected``: the keys that every
    record must carry, ``shards`` among them), each once, in shard order; ``check`` sees each
    record as it is read. Anything else is an ``error`` naming the record (``what``: the job,
    in the message about a missing shard)."""
    read: dict[int, tuple[Path, dict[str, Any]]] = {}
    for path in map(Path, records):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise error(f"{path}: not a readable shard record ({err})") from None
        wrong = {key: record.get(key) for key, value in expected.items()
                 if record.get(key) != value}
        if wrong:
            raise error(f"{path}: a shard record of another plan ({wrong}; expected "
                        f"{dict(expected)})")
        index = record.get("shard")
        if index in read:
            raise error(f"{path}: shard {index} of {count} again (also {read[index][0]})")
        read[index] = (path, record)
        if check is not None:
            check(path, record)
    missing = sorted(set(range(count)) - set(read))
    if missing:
        raise error(f"{what}: no record of shard(s) {', '.join(map(str, missing))} of {count}")
    return [read[index][1] for index in range(count)]


@dataclass
class Sharding:
    """One job's part in a sharded method: ``index`` of ``count`` shards, or the gather
    (``index`` None) that assembles what ``count`` shards stored. ``stored`` collects the
    names of the batches a shard stored, for its record; ``resumed`` counts those of them an
    earlier attempt had stored already."""

    count: int = 1
    index: int | None = None
    stored: list[str] = field(default_factory=list)
    resumed: int = 0

    def __post_init__(self) -> None:
        if self.count < 1 or (self.index is not None and not 0 <= self.index < self.count):
            raise ShardError(f"shard {self.index} of {self.count}: no such shard")

    @property
    def is_shard(self) -> bool:
        return self.index is not None

    @property
    def is_gather(self) -> bool:
        return self.index is None and self.count > 1

    def owner(self, position: int) -> int:
        return position % self.count


class BatchStore:
    """Arrays of finished batches under ``root/<key digest>/``; ``root=None`` keeps nothing.

    Given the job's number of batches, ``total``, it shows the progress over the batches this
    job computes (a shard's own), with the time left: ``desc: 3/40 (8%), ... left``.
    """

    def __init__(self, root: Path | None, key: Mapping[str, Any],
                 sharding: Sharding | None = None, total: int | None = None,
                 desc: str = "batches") -> None:
        self.root = root
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
        self.folder = None if root is None else root / digest.hexdigest()[:16]
        self.reused = 0
        self.sharding = sharding or Sharding()
        self.position = 0  # of the next batch in the job's batch order
        if self.sharding.count > 1 and self.folder is None:
            raise ShardError("a sharded job needs a work folder for its batches")
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.progress = None
        if total is not None:
            own = sum(1 for position in range(total) if not self.sharding.is_shard
                      or self.sharding.owner(position) == self.sharding.index)
            self.progress = tqdm(total=own, desc=desc, unit="batch")

    def _advance(self, name: str) -> None:
        if self.progress is not None:
            self.progress.set_postfix_str(f"{name}, {self.reused} stored earlier", refresh=False)
            self.progress.update()
            if self.progress.n >= self.progress.total:
                self.progress.close()

    def get_or_compute(self, name: str, compute: Callable[[], Arrays]) -> Arrays | None:
        """The stored arrays of batch ``name``, or ``compute()``'s, stored before returning.

        A shard returns None for the batches of other shards (the caller skips them); the
        gather refuses to compute a batch its shard did not store.
        """
        position, self.position = self.position, self.position + 1
        if self.folder is None:
            arrays = compute()
            self._advance(name)
            return arrays
        sharding = self.sharding
        if sharding.is_shard and sharding.owner(position) != sharding.index:
            return None
        path = self.folder / f"{name}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    arrays = {key: stored[key] for key in stored.files}
                self.reused += 1
                if sharding.is_shard:
                    sharding.stored.append(name)
                    sharding.resumed += 1
                self._advance(name)
                return arrays
            except (OSError, ValueError, zipfile.BadZipFile) as err:
                log.warning("recomputing batch %s: its stored arrays are unreadable (%s)", path,
                            err)
        if sharding.is_gather:
            raise ShardError(
                f"batch {name} is not in {self.folder}: shard {sharding.owner(position)} of "
                f"{sharding.count} did not store it (its job failed or ran with other "
                "settings); run that shard again")
        arrays = compute()
        with atomic_path(path) as temporary, temporary.open("wb") as handle:
            np.savez(handle, **arrays)
        if sharding.is_shard:
            sharding.stored.append(name)
        self._advance(name)
        return arrays

    def clear(self) -> None:
        """Remove every stored batch of this job (all keys): its outputs are complete. A
        shard keeps its batches for the gather."""
        if self.root is not None and not self.sharding.is_shard:
            shutil.rmtree(self.root, ignore_errors=True)
