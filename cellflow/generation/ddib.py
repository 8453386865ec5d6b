"""DDIB (Su et al. 2023): full DDIM inversion with the source label, unguided decoding with the
target label; one endpoint per source, hard labels."""

from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from cellflow.bridge import BridgeConfig, EvaluationCounter
from cellflow.config import DatasetConfig
from cellflow.diffusion import NoiseSchedule
from cellflow.generation.common import (
    MANIFEST_COLUMNS,
    GenerationJob,
    add_counts,
    batch_count,
    batch_name,
    bridge_engine,
    image_arrays,
    manifest_row,
    source_batches,
    transitions_of,
    write_summary,
)
from cellflow.io import save_png, staged_directory, write_table
from cellflow.resume import BatchStore, Sharding, folder_digest


def run(job: GenerationJob) -> pd.DataFrame:
    return generate_ddib(job.dataset, job.schedule, job.bridge, job.settings, job.data_manifest,
                         job.models["diffusion"], None, job.out_dir, job.work_dir,
                         decoder_dir=job.models.get("decoder"), sharding=job.sharding)


def generate_ddib(dataset: DatasetConfig, schedule: NoiseSchedule, bridge: dict[str, Any],
                  ddib: dict[str, Any], data_manifest: Path, diffusion_dir: Path,
                  classifier_dir: Path | None, out_dir: Path, work_dir: Path | None = None,
                  decoder_dir: Path | None = None, sharding: Sharding | None = None
                  ) -> pd.DataFrame:
    """DDIB translations (endpoints only, hard target labels) for every transition; decoding
    is unguided, so ``classifier_dir`` is not read."""
    config = BridgeConfig.from_dict(bridge)
    engine = bridge_engine(schedule, config, diffusion_dir, None, decoder_dir=decoder_dir)
    models = [diffusion_dir, *([decoder_dir] if decoder_dir else [])]
    data = pd.read_csv(data_manifest, sep="\t", keep_default_na=False)
    store = BatchStore(work_dir, {"method": "ddib", "bridge": asdict(config),
                                  "models": folder_digest(*models)}, sharding,
                       total=batch_count(data, transitions_of(dataset),
                                         ddib["sources_per_transition"], bridge["batch_size"]),
                       desc="ddib batches")
    label_of = {name: index for index, name in enumerate(dataset.classes)}
    rows, counter, started = [], EvaluationCounter(), time.perf_counter()
    with staged_directory(out_dir) as staging:
        for transition in transitions_of(dataset):
            for index, (batch, images, source_labels, target_labels) in enumerate(source_batches(
                    data, data_manifest.parent, transition, ddib["sources_per_transition"],
                    bridge["batch_size"], label_of)):
                result = store.get_or_compute(
                    batch_name(transition, index, batch),
                    partial(image_arrays, engine.ddib, images, source_labels, target_labels))
                if result is None:
                    continue  # another shard's batch
                add_counts(counter, result["counter"])
                for source_id, image in zip(batch["id"], result["images"], strict=True):
                    path = f"images/{source_id}__{transition.source}-to-{transition.target}.png"
                    save_png(staging / path, image)
                    rows.append(manifest_row("ddib", source_id, transition, label_of, 1,
                                     config.inversion_steps,
                                     engine.respaced.timestep(config.inversion_steps), 1.0, path))
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        write_table(staging / "manifest.tsv", manifest)
        write_summary(staging, "ddib", config, counter, len(rows), time.perf_counter() - started,
                       {"batches_resumed": store.reused})
    store.clear()
    return manifest


