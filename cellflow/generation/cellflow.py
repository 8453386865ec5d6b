"""The Cellflow stair bridge as a generation method: trajectories from every training image of
a transition's source class, under classifier guidance (``cellflow``) or classifier-free
guidance (``cellflow_cfg``, the upstream's main_transflow_cfg.py)."""

from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cellflow.bridge import BridgeConfig, EvaluationCounter, StairBridge, soft_label_weight
from cellflow.config import DatasetConfig
from cellflow.diffusion import NoiseSchedule
from cellflow.figures import save_trajectory_strip
from cellflow.generation.common import (
    MANIFEST_COLUMNS,
    GenerationJob,
    add_counts,
    batch_count,
    batch_name,
    bridge_engine,
    counts,
    manifest_row,
    real_example,
    source_batches,
    to_uint8,
    transitions_of,
    write_summary,
)
from cellflow.io import save_png, staged_directory, write_table
from cellflow.resume import BatchStore, Sharding, folder_digest

STAIRS_COLUMNS = ["source_id", "target_class", "frame_index", "stair", "stair_rule",
                  "target_probability", "source_target_probability"]
_TITLES = {"cellflow": "Cellflow", "cellflow_cfg": "Cellflow, classifier-free guidance"}


def run(job: GenerationJob) -> pd.DataFrame:
    return generate_cellflow(job.dataset, job.schedule, job.bridge, job.data_manifest,
                             job.models["diffusion"], job.models["classifier"], job.out_dir,
                             job.work_dir, decoder_dir=job.models.get("decoder"),
                             sharding=job.sharding)


def run_cfg(job: GenerationJob) -> pd.DataFrame:
    """The bridge under classifier-free guidance (the diffusion model needs its null class:
    diffusion.label_dropout > 0); the classifier only measures the frames' p(target)."""
    bridge = {**job.bridge, "guidance": "free", "cfg_weight": job.settings["weight"]}
    return generate_cellflow(job.dataset, job.schedule, bridge, job.data_manifest,
                             job.models["diffusion"], job.models["classifier"], job.out_dir,
                             job.work_dir, decoder_dir=job.models.get("decoder"),
                             method="cellflow_cfg", sharding=job.sharding)


def generate_cellflow(dataset: DatasetConfig, schedule: NoiseSchedule, bridge: dict[str, Any],
                      data_manifest: Path, diffusion_dir: Path, classifier_dir: Path,
                      out_dir: Path, work_dir: Path | None = None,
                      decoder_dir: Path | None = None, method: str = "cellflow",
                      sharding: Sharding | None = None) -> pd.DataFrame:
    """Trajectories for every configured transition; returns the generation manifest.

    With ``work_dir``, every finished batch is kept there until the outputs are complete, so
    a killed job's rerun redoes at most one batch (:class:`cellflow.resume.BatchStore`).
    ``bridge["guidance"]`` chooses classifier or classifier-free guidance (``method`` names
    the outputs); ``decoder_dir`` is a second UNet that decodes.
    """
    config = BridgeConfig.from_dict(bridge)
    data = pd.read_csv(data_manifest, sep="\t", keep_default_na=False)
    uses_posterior = "posterior" in (config.stair_selection, bridge["soft_label"])
    engine = bridge_engine(schedule, config, diffusion_dir, classifier_dir,
                     calibration=data[data["split"] == "val"] if uses_posterior else None,
                     calibration_root=data_manifest.parent, decoder_dir=decoder_dir)
    models = [diffusion_dir, classifier_dir, *([decoder_dir] if decoder_dir else [])]
    store = BatchStore(work_dir, {"method": method, "bridge": asdict(config),
                                  "temperature": engine.temperature,
                                  "models": folder_digest(*models)}, sharding,
                       total=batch_count(data, transitions_of(dataset),
                                         bridge["sources_per_transition"], bridge["batch_size"]),
                       desc=f"{method} batches")
    label_of = {name: index for index, name in enumerate(dataset.classes)}
    rows, stairs_rows, fourier_rows = [], [], []
    counter = EvaluationCounter()
    started = time.perf_counter()
    with staged_directory(out_dir) as staging:
        for transition in transitions_of(dataset):
            strip_sources, strip_frames, strip_stairs = [], [], []
            for index, (batch, images, source_labels, target_labels) in enumerate(source_batches(
                    data, data_manifest.parent, transition, bridge["sources_per_transition"],
                    bridge["batch_size"], label_of)):
                result = store.get_or_compute(
                    batch_name(transition, index, batch),
                    partial(_trajectory_arrays, engine, images, source_labels, target_labels))
                if result is None:
                    continue  # another shard's batch
                add_counts(counter, result["counter"])
                frames = result["frames"]
                for b, source_id in enumerate(batch["id"]):
                    folder = f"frames/{source_id}__{transition.source}-to-{transition.target}"
                    for m in range(config.frames):
                        stair = int(result["stairs"][b, m])
                        path = f"{folder}/{m + 1:02d}.png"
                        save_png(staging / path, frames[b, m])
                        rows.append(manifest_row(method, source_id, transition, label_of, m + 1,
                                         stair, engine.respaced.timestep(stair),
                                         soft_label_weight(
                                             bridge["soft_label"], m + 1, config.frames, stair,
                                             config.inversion_steps,
                                             float(result["target_probability"][b, m])), path))
                    fourier_rows += [
                        {"source_id": source_id, "target_class": transition.target,
                         "level": level + 1, "measure": float(value)}
                        for level, value in enumerate(result["measures"][b])]
                    stairs_rows += [
                        {"source_id": source_id, "target_class": transition.target,
                         "frame_index": m + 1, "stair": int(s),
                         "stair_rule": str(result["stair_rule"][b]),
                         "target_probability": float(result["target_probability"][b, m]),
                         "source_target_probability": float(result["source_probability"][b])}
                        for m, s in enumerate(result["stairs"][b])]
                if len(strip_sources) < bridge["strip_sources"]:
                    keep = bridge["strip_sources"] - len(strip_sources)
                    strip_sources += list(to_uint8(images[:keep]))
                    strip_frames += list(frames[:keep])
                    strip_stairs += [list(map(int, s)) for s in result["stairs"][:keep]]
            if not strip_sources:
                continue  # a shard that has none of this transition's batches
            target_example = real_example(data, data_manifest.parent, transition.target)
            save_trajectory_strip(
                strip_sources, strip_frames, strip_stairs, target_example,
                staging / "strips" / f"{transition.source}-to-{transition.target}.png",
                f"{dataset.name}: {transition.source} → {transition.target} ({_TITLES[method]})")
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        write_table(staging / "manifest.tsv", manifest)
        stairs_table = pd.DataFrame(stairs_rows, columns=STAIRS_COLUMNS)
        write_table(staging / "stairs.tsv", stairs_table)
        write_table(staging / "fourier.tsv", pd.DataFrame(fourier_rows))
        first_frames = stairs_table[stairs_table["frame_index"] == 1]
        write_summary(staging, method, config, counter, len(first_frames),
                       time.perf_counter() - started, {
                           "batches_resumed": store.reused,
                           "soft_label": bridge["soft_label"],
                           "temperature": engine.temperature,
                           "stair_rules": first_frames["stair_rule"].value_counts().to_dict(),
                           # the reference's cost is K + sum of stairs per trajectory
                           "unet_evaluations_beyond_stairs": counter.unet_evaluations - int(
                               len(first_frames) * config.inversion_steps
                               + stairs_table["stair"].sum())})
    store.clear()
    return manifest


def _trajectory_arrays(engine: StairBridge, images: torch.Tensor, source_labels: torch.Tensor,
                       target_labels: torch.Tensor) -> dict[str, np.ndarray]:
    """One batch of trajectories as plain arrays: what the outputs are written from."""
    result = engine.trajectories(images, source_labels, target_labels)
    frames = to_uint8(result.frames.flatten(0, 1)).reshape(
        len(images), engine.config.frames, *result.frames.shape[-2:], 3)
    return {"frames": frames, "stairs": result.stairs, "measures": result.measures,
            "target_probability": result.target_probability,
            "source_probability": result.source_probability,
            "stair_rule": np.array(result.stair_rule, dtype=str),
            "counter": counts(result.counter)}


