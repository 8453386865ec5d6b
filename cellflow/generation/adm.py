"""ADM (Dhariwal & Nichol 2021): class-conditional DDIM samples from noise with classifier
guidance, ``per_class`` of every class, hard labels."""

from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cellflow.bridge import BridgeConfig, EvaluationCounter
from cellflow.config import DatasetConfig
from cellflow.diffusion import NoiseSchedule
from cellflow.generation.common import (
    MANIFEST_COLUMNS,
    GenerationJob,
    add_counts,
    bridge_engine,
    image_arrays,
    write_summary,
)
from cellflow.io import save_png, staged_directory, write_table
from cellflow.resume import BatchStore, Sharding, folder_digest


def run(job: GenerationJob) -> pd.DataFrame:
    return generate_adm(job.dataset, job.schedule, job.bridge, job.settings, job.seed,
                        job.models["diffusion"], job.models["classifier"], job.out_dir,
                        job.work_dir, sharding=job.sharding)


def generate_adm(dataset: DatasetConfig, schedule: NoiseSchedule, bridge: dict[str, Any],
                 adm: dict[str, Any], seed: int, diffusion_dir: Path, classifier_dir: Path,
                 out_dir: Path, work_dir: Path | None = None,
                 sharding: Sharding | None = None) -> pd.DataFrame:
    """Classifier-guided class-conditional DDIM samples, ``per_class`` of every class.

    Each batch draws its noise from its own generator, seeded by (seed, class, first sample),
    so a resumed job's samples equal an uninterrupted job's.
    """
    config = BridgeConfig.from_dict({**bridge, "classifier_scale": adm["classifier_scale"]})
    engine = bridge_engine(schedule, config, diffusion_dir, classifier_dir)
    store = BatchStore(work_dir, {"method": "adm", "bridge": asdict(config), "seed": seed,
                                  "models": folder_digest(diffusion_dir, classifier_dir)},
                       sharding, total=len(dataset.classes) * -(-adm["per_class"]
                                                                // bridge["batch_size"]),
                       desc="adm batches")
    rows, counter, started = [], EvaluationCounter(), time.perf_counter()
    with staged_directory(out_dir) as staging:
        for label, name in enumerate(dataset.classes):
            for first in range(0, adm["per_class"], bridge["batch_size"]):
                count = min(bridge["batch_size"], adm["per_class"] - first)
                generator = torch.Generator().manual_seed(
                    int(np.random.SeedSequence([seed, label, first]).generate_state(1)[0]))
                result = store.get_or_compute(
                    f"{name}-{first:05d}-{count}",
                    partial(image_arrays, engine.sample, torch.full((count,), label),
                            generator, dataset.resolution))
                if result is None:
                    continue  # another shard's batch
                add_counts(counter, result["counter"])
                for offset, image in enumerate(result["images"]):
                    sample_id = f"adm_{name}_{first + offset:04d}"
                    path = f"images/{name}/{sample_id}.png"
                    save_png(staging / path, image)
                    rows.append({
                        "method": "adm", "source_id": sample_id, "source_class": name,
                        "target_class": name, "source_label": label, "target_label": label,
                        "frame_index": 1, "stair": config.inversion_steps,
                        "timestep": engine.respaced.timestep(config.inversion_steps),
                        "soft_label_weight": 1.0, "path": path})
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        write_table(staging / "manifest.tsv", manifest)
        write_summary(staging, "adm", config, counter, len(rows), time.perf_counter() - started,
                       {"batches_resumed": store.reused})
    store.clear()
    return manifest


