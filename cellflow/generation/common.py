"""What every generation method shares: the manifest format, the job, the model loaders, the
choice and batching of source images, and the summary each job writes.

Every method writes ``<out>/manifest.tsv`` with one row per generated image:

| column | meaning |
|---|---|
| method | the generation method (:data:`cellflow.generation.METHODS`) |
| source_id | id of the real source image (manifest of the data stage), or adm_<class>_<n> |
| source_class, target_class, source_label, target_label | the transition |
| frame_index | 1..N along a trajectory (1 for DDIB and ADM) |
| stair | respaced stair timestep the frame was decoded from (K for DDIB and ADM) |
| timestep | the same as a DDPM timestep (stair x stride) |
| soft_label_weight | weight of the target class in the frame's label; the rest is the source |
| path | PNG, relative to the manifest's folder |

so downstream training treats all generative methods alike. Sources come from the training
split only: validation and test images never feed a generator.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import UNet2DModel

from cellflow.bridge import BridgeConfig, EvaluationCounter, StairBridge
from cellflow.classifier import NoiseAwareClassifier, clean_logits, fit_temperature
from cellflow.config import DatasetConfig, Transition
from cellflow.data import load_images
from cellflow.diffusion import NoiseSchedule
from cellflow.io import write_text
from cellflow.resume import Sharding
from cellflow.training import to_model_range

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["method", "source_id", "source_class", "target_class", "source_label",
                    "target_label", "frame_index", "stair", "timestep", "soft_label_weight",
                    "path"]


def load_unet(folder: Path, device: torch.device) -> UNet2DModel:
    """A diffusion model folder's UNet (``<folder>/unet``, a trained or imported model)."""
    return UNet2DModel.from_pretrained(folder / "unet").to(device)


def load_classifier(folder: Path, device: torch.device) -> NoiseAwareClassifier:
    return NoiseAwareClassifier.from_pretrained(folder / "classifier").to(device)


@dataclass(frozen=True)
class GenerationJob:
    """What one generation job gets: its dataset, the settings of its method and the model
    folders it reads (``diffusion``, ``classifier``, and ``decoder`` where the dataset decodes
    with a second UNet)."""

    dataset: DatasetConfig
    schedule: NoiseSchedule
    bridge: dict[str, Any]
    settings: dict[str, Any]
    seed: int
    data_manifest: Path
    models: dict[str, Path]
    out_dir: Path
    work_dir: Path | None = None
    sharding: Sharding | None = None  # this job's part of a sharded method


def bridge_engine(schedule: NoiseSchedule, config: BridgeConfig, diffusion_dir: Path,
            classifier_dir: Path | None, calibration: pd.DataFrame | None = None,
            calibration_root: Path | None = None, decoder_dir: Path | None = None
            ) -> StairBridge:
    """The bridge on the trained models (no classifier where ``classifier_dir`` is None);
    with ``calibration`` (labelled images, the validation split) its t = 0 posteriors are
    temperature-scaled on them."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = load_unet(diffusion_dir, device)
    decoder = load_unet(decoder_dir, device) if decoder_dir is not None else None
    classifier = load_classifier(classifier_dir, device) if classifier_dir is not None else None
    temperature = 1.0
    if calibration is not None and classifier is not None:
        temperature = calibrate_temperature(classifier, calibration, calibration_root)
    return StairBridge(unet, classifier, schedule, config, temperature, decoder=decoder)


def calibrate_temperature(classifier: NoiseAwareClassifier, images: pd.DataFrame, root: Path
                          ) -> float:
    """Fit the temperature of the classifier's t = 0 logits on labelled held-out images."""
    if images.empty:
        raise ValueError("posterior stairs or labels need validation images to calibrate the "
                         "classifier on (datasets.<name>.split.val_fraction is 0?)")
    logits = clean_logits(classifier, read_images(root, images["path"]))
    temperature = fit_temperature(logits, torch.tensor(images["label"].tolist()))
    log.info("classifier calibrated on %d validation images: temperature %.3f",
             len(images), temperature)
    return temperature


def source_batches(data: pd.DataFrame, root: Path, transition: Transition, count: int,
                    batch_size: int, label_of: dict[str, int]
                    ) -> Iterator[tuple[pd.DataFrame, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of source images of one transition, with their source and target labels."""
    sources = pick_sources(data, transition.source, count)
    for batch in batches(sources, batch_size):
        yield (batch, read_images(root, batch["path"]),
               torch.full((len(batch),), label_of[transition.source]),
               torch.full((len(batch),), label_of[transition.target]))


def batch_count(data: pd.DataFrame, transitions: Sequence[Transition], count: int,
                batch_size: int) -> int:
    """How many batches source_batches yields over ``transitions``: a job's progress total."""
    return sum(-(-len(pick_sources(data, transition.source, count)) // batch_size)
               for transition in transitions)


def pick_sources(manifest: pd.DataFrame, source_class: str, count: int) -> pd.DataFrame:
    """Training images of one class, the first ``count`` by id (0: all), for a stable choice."""
    rows = manifest[(manifest["split"] == "train") & (manifest["label_name"] == source_class)]
    rows = rows.sort_values("id")
    if rows.empty:
        raise ValueError(f"no training image of class '{source_class}' to start trajectories from")
    return rows if count == 0 else rows.head(count)


def read_images(root: Path, paths: pd.Series) -> torch.Tensor:
    return to_model_range(torch.from_numpy(load_images(root, paths)))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as the reference saves frames."""
    scaled = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def batches(table: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    for first in range(0, len(table), size):
        yield table.iloc[first:first + size]


def batch_name(transition: Transition, index: int, batch: pd.DataFrame) -> str:
    """A stored batch's name: its place, and a digest of its sources (a changed split is new)."""
    sources = hashlib.sha256("\n".join(batch["id"]).encode()).hexdigest()[:12]
    return f"{transition.source}-to-{transition.target}-{index:05d}-{sources}"


def image_arrays(method: Callable[..., tuple[torch.Tensor, EvaluationCounter]], *inputs: Any
                  ) -> dict[str, np.ndarray]:
    """One batch of a one-image-per-input method (DDIB, ADM) as plain arrays."""
    images, used = method(*inputs)
    return {"images": to_uint8(images), "counter": counts(used)}


def transitions_of(dataset: DatasetConfig) -> tuple[Transition, ...]:
    if not dataset.transitions:
        raise ValueError(f"dataset '{dataset.name}' has no transitions configured "
                         f"(datasets.{dataset.name}.transitions)")
    return dataset.transitions


def manifest_row(method: str, source_id: str, transition: Transition, label_of: dict[str, int],
         frame: int, stair: int, timestep: int, weight: float, path: str) -> dict[str, Any]:
    return {"method": method, "source_id": source_id, "source_class": transition.source,
            "target_class": transition.target, "source_label": label_of[transition.source],
            "target_label": label_of[transition.target], "frame_index": frame, "stair": stair,
            "timestep": timestep, "soft_label_weight": weight, "path": path}


def real_example(data: pd.DataFrame, root: Path, class_name: str) -> np.ndarray:
    row = data[(data["split"] == "train") & (data["label_name"] == class_name)].sort_values("id")
    return to_uint8(read_images(root, row["path"].head(1)))[0]


def counts(counter: EvaluationCounter) -> np.ndarray:
    """A counter as a plain array, stored with its batch's outputs."""
    return np.array(list(asdict(counter).values()))


def add_counts(total: EvaluationCounter, part: np.ndarray) -> None:
    for name, value in zip(asdict(total), part.tolist(), strict=True):
        setattr(total, name, getattr(total, name) + value)


def write_summary(staging: Path, method: str, config: BridgeConfig, counter: EvaluationCounter,
                   outputs: int, seconds: float, extra: dict[str, Any] | None = None) -> None:
    summary = {
        "method": method,
        "bridge": asdict(config),
        "outputs": outputs,
        "seconds": round(seconds, 2),
        **asdict(counter),
        "unet_evaluations_per_output": counter.unet_evaluations / max(outputs, 1),
        **(extra or {}),
    }
    write_text(staging / "generation.json", json.dumps(summary, indent=2))
    log.info("%s: %s", method, summary)
