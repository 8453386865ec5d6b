"""One generation method spread over several jobs: shards compute, one gather writes.

Shard ``i`` of ``n`` runs the method with a :class:`~cellflow.resume.Sharding` that makes it
compute and store only its batches (positions ``i, i + n, ...`` of the method's batch order)
in the job's work folder, and writes a small record of what it stored; its other outputs are
scratch. The gather checks that the records are the ``n`` shards of one plan, runs the method
as one job would (every batch is found stored; a missing one is an error naming its shard)
and writes the method's outputs exactly as an unsharded job does.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from cellflow.generation import GenerationMethod
from cellflow.generation.common import GenerationJob
from cellflow.io import write_text
from cellflow.provenance import collect
from cellflow.resume import ShardError, Sharding, read_shard_records

__all__ = ["ShardError", "check_shard_records", "run_gather", "run_shard"]

log = logging.getLogger(__name__)


def run_shard(method: GenerationMethod, job: GenerationJob, index: int, count: int,
              record: Path) -> list[str]:
    """Compute and store shard ``index`` of ``count``; write its record; return its batches."""
    if job.work_dir is None:
        raise ShardError(f"shard {index} of {count} of {method.name}: needs a work folder")
    sharding = Sharding(count, index)
    started = datetime.now(timezone.utc)
    job.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=job.work_dir, prefix=f".shard{index}-") as scratch:
        method.run(replace(job, out_dir=Path(scratch) / "outputs", sharding=sharding))
    log.info("shard %d of %d of %s: %d batches, %d of them stored by an earlier attempt", index,
             count, method.name, len(sharding.stored), sharding.resumed)
    write_text(record, json.dumps({
        "method": method.name, "dataset": job.dataset.name, "shard": index, "shards": count,
        "batches": sharding.stored, "resumed": sharding.resumed,
        # the record is temporary (the gather consumes it), so its provenance is inside it
        "provenance": collect(started, config_hash=None, shard=f"{index} of {count}",
                              rule=f"generate {method.name}")}, indent=2) + "\n")
    return sharding.stored


def check_shard_records(records: Sequence[Path], count: int, method: str, dataset: str
                        ) -> list[dict[str, Any]]:
    """The records of shards ``0 .. count - 1`` of one method and dataset, each once, with
    no batch stored by two of them; anything else is an error naming the record."""
    stored_by: dict[str, Path] = {}

    def batches_once(path: Path, record: dict[str, Any]) -> None:
        for batch in record["batches"]:
            if batch in stored_by:
                raise ShardError(f"{path}: batch {batch} was stored by {stored_by[batch]} too")
            stored_by[batch] = path

    return read_shard_records(records, count,
                              {"method": method, "dataset": dataset, "shards": count},
                              f"{method} of {dataset}", check=batches_once)


def run_gather(method: GenerationMethod, job: GenerationJob, records: Sequence[Path],
               count: int) -> pd.DataFrame:
    """Check the ``count`` shards' records and write the method's outputs from their batches."""
    check_shard_records(records, count, method.name, job.dataset.name)
    return method.run(replace(job, sharding=Sharding(count)))
