"""One image set's evaluation spread over several jobs: shards compute, the evaluation jobs
assemble.

Shard ``i`` of ``n`` measures the cellularity of the set's rows ``i, i + n, ...`` into the
work folder, and runs each feature network over chunks ``i, i + n, ...`` of the two image sets
that FID/KID compares (the real training images, and the set itself), which the feature cache
keeps (:meth:`cellflow.metrics.FeatureSpace.store_shard`); it writes a small record. The
cellularity job then assembles the rows in order, the table one job would have measured; the
fidelity job reads every chunk's features from the cache and reduces them to FID/KID, which
need all features of both sets at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from cellflow.cellularity import CellularityConfig
from cellflow.evaluate import (
    cellularity_images,
    fidelity_images,
    fidelity_sets,
    measure_rows,
)
from cellflow.io import read_table, write_table, write_text
from cellflow.provenance import collect
from cellflow.resume import read_shard_records

if TYPE_CHECKING:
    import torch

    from cellflow.metrics import FeatureSpace

log = logging.getLogger(__name__)


class EvaluationShardError(ValueError):
    """Shard records that are not the shards of one plan, or a part they name is missing."""


def part_path(work: Path, shard: int, shards: int) -> Path:
    return Path(work) / f"cellularity-{shard}-of-{shards}.tsv"


def remove_parts(work: Path, shards: int) -> None:
    """Remove the shards' cellularity rows once the table is written (the feature chunks stay:
    they are the feature cache)."""
    for shard in range(shards):
        part_path(work, shard, shards).unlink(missing_ok=True)


def run_shard(dataset: str, image_set: str, data_manifest: Path, generated_dir: Path | None,
              cellularity_config: CellularityConfig, spaces: Sequence[FeatureSpace],
              shard: int, shards: int, work: Path, record: Path, workers: int = 1,
              device: torch.device | None = None) -> dict[str, Any]:
    """Compute shard ``shard`` of ``shards`` of one image set; write its record and return it."""
    if not 0 <= shard < shards:
        raise EvaluationShardError(f"shard {shard} of {shards}: no such shard")
    started = datetime.now(timezone.utc)
    root, table = cellularity_images(image_set, data_manifest, generated_dir)
    rows = table.iloc[shard::shards]
    measured = measure_rows(image_set, root, rows, cellularity_config, workers)
    measured.insert(0, "position", rows.index.to_numpy())
    write_table(part_path(work, shard, shards), measured)
    real, other, _ = fidelity_sets(image_set, data_manifest, generated_dir)
    images = fidelity_images(image_set, data_manifest, generated_dir, real, other)
    chunks = {space.name: sum(space.store_shard(part, shard, shards, device=device)
                              for part in images) for space in spaces}
    log.info("%s: %s shard %d of %d: cellularity of %d of %d images, %s feature chunks",
             dataset, image_set, shard, shards, len(rows), len(table),
             ", ".join(f"{count} {name}" for name, count in chunks.items()))
    content = {"dataset": dataset, "image_set": image_set, "shard": shard, "shards": shards,
               "rows": len(rows), "feature_chunks": chunks,
               # the record is temporary (the evaluation jobs consume it): its provenance is in it
               "provenance": collect(started, config_hash=None, shard=f"{shard} of {shards}",
                                     rule=f"evaluate shard {image_set}")}
    write_text(record, json.dumps(content, indent=2) + "\n")
    return content


def check_records(records: Sequence[Path], shards: int, dataset: str, image_set: str
                  ) -> list[dict[str, Any]]:
    """The records of shards ``0 .. shards - 1`` of one image set, each once; anything else is
    an error naming the record."""
    return read_shard_records(records, shards,
                              {"dataset": dataset, "image_set": image_set, "shards": shards},
                              f"{image_set} of {dataset}", error=EvaluationShardError)


def assemble_cellularity(dataset: str, image_set: str, records: Sequence[Path], shards: int,
                         work: Path) -> pd.DataFrame:
    """The cellularity table of the whole image set from its shards' parts, in row order."""
    check_records(records, shards, dataset, image_set)
    parts = []
    for shard in range(shards):
        path = part_path(work, shard, shards)
        if not path.is_file():
            raise EvaluationShardError(f"{path}: the cellularity of shard {shard} of {shards} "
                                       "is missing (its job ran elsewhere or was cleaned up); "
                                       "run that shard again")
        parts.append(read_table(path))
    table = pd.concat(parts, ignore_index=True).sort_values("position", kind="stable")
    if table["position"].tolist() != list(range(len(table))):
        raise EvaluationShardError(f"{image_set} of {dataset}: the shards' rows are not each "
                                   f"row of the image set once (parts in {work})")
    return table.drop(columns="position").reset_index(drop=True)
