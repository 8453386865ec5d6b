"""Generation stage: Cellflow trajectories (classifier or classifier-free guidance) and the
DDIB and ADM baselines, in one output format.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from diffusers import UNet2DModel
from tqdm import tqdm

from cellflow.bridge import BridgeConfig, EvaluationCounter, StairBridge, soft_label_weight
from cellflow.classifier import NoiseAwareClassifier, clean_logits, fit_temperature
from cellflow.config import DatasetConfig, Transition
from cellflow.data import load_images
from cellflow.diffusion import NoiseSchedule
from cellflow.figures import save_trajectory_strip
from cellflow.io import save_png, staged_directory, write_table, write_text
from cellflow.resume import BatchStore, folder_digest
from cellflow.training import to_model_range

log = logging.getLogger(__name__)

_TITLES = {"cellflow": "Cellflow", "cellflow_cfg": "Cellflow, classifier-free guidance"}

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


def run_cellflow(job: GenerationJob) -> pd.DataFrame:
    return generate_cellflow(job.dataset, job.schedule, job.bridge, job.data_manifest,
                             job.models["diffusion"], job.models["classifier"], job.out_dir,
                             job.work_dir, decoder_dir=job.models.get("decoder"))


def run_cellflow_cfg(job: GenerationJob) -> pd.DataFrame:
    """The bridge under classifier-free guidance (the diffusion model needs its null class:
    diffusion.label_dropout > 0); the classifier only measures the frames' p(target)."""
    bridge = {**job.bridge, "guidance": "free", "cfg_weight": job.settings["weight"]}
    return generate_cellflow(job.dataset, job.schedule, bridge, job.data_manifest,
                             job.models["diffusion"], job.models["classifier"], job.out_dir,
                             job.work_dir, decoder_dir=job.models.get("decoder"),
                             method="cellflow_cfg")


def run_ddib(job: GenerationJob) -> pd.DataFrame:
    return generate_ddib(job.dataset, job.schedule, job.bridge, job.settings, job.data_manifest,
                         job.models["diffusion"], None, job.out_dir, job.work_dir,
                         decoder_dir=job.models.get("decoder"))


def run_adm(job: GenerationJob) -> pd.DataFrame:
    return generate_adm(job.dataset, job.schedule, job.bridge, job.settings, job.seed,
                        job.models["diffusion"], job.models["classifier"], job.out_dir,
                        job.work_dir)


def _engine(schedule: NoiseSchedule, config: BridgeConfig, diffusion_dir: Path,
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


def _source_batches(data: pd.DataFrame, root: Path, transition: Transition, count: int,
                    batch_size: int, label_of: dict[str, int], method: str
                    ) -> Iterator[tuple[pd.DataFrame, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of source images of one transition, with their source and target labels."""
    sources = pick_sources(data, transition.source, count)
    for batch in tqdm(list(_batches(sources, batch_size)),
                      desc=f"{method} {transition.source}->{transition.target}"):
        yield (batch, read_images(root, batch["path"]),
               torch.full((len(batch),), label_of[transition.source]),
               torch.full((len(batch),), label_of[transition.target]))


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


def _batches(table: pd.DataFrame, size: int) -> Iterator[pd.DataFrame]:
    for first in range(0, len(table), size):
        yield table.iloc[first:first + size]


def generate_cellflow(dataset: DatasetConfig, schedule: NoiseSchedule, bridge: dict[str, Any],
                      data_manifest: Path, diffusion_dir: Path, classifier_dir: Path,
                      out_dir: Path, work_dir: Path | None = None,
                      decoder_dir: Path | None = None, method: str = "cellflow"
                      ) -> pd.DataFrame:
    """Trajectories for every configured transition; returns the generation manifest.

    With ``work_dir``, every finished batch is kept there until the outputs are complete, so
    a killed job's rerun redoes at most one batch (:class:`cellflow.resume.BatchStore`).
    ``bridge["guidance"]`` chooses classifier or classifier-free guidance (``method`` names
    the outputs); ``decoder_dir`` is a second UNet that decodes.
    """
    config = BridgeConfig.from_dict(bridge)
    data = pd.read_csv(data_manifest, sep="\t", keep_default_na=False)
    uses_posterior = "posterior" in (config.stair_selection, bridge["soft_label"])
    engine = _engine(schedule, config, diffusion_dir, classifier_dir,
                     calibration=data[data["split"] == "val"] if uses_posterior else None,
                     calibration_root=data_manifest.parent, decoder_dir=decoder_dir)
    models = [diffusion_dir, classifier_dir, *([decoder_dir] if decoder_dir else [])]
    store = BatchStore(work_dir, {"method": method, "bridge": asdict(config),
                                  "temperature": engine.temperature,
                                  "models": folder_digest(*models)})
    label_of = {name: index for index, name in enumerate(dataset.classes)}
    rows, stairs_rows, fourier_rows = [], [], []
    counter = EvaluationCounter()
    started = time.perf_counter()
    with staged_directory(out_dir) as staging:
        for transition in _transitions(dataset):
            strip_sources, strip_frames, strip_stairs = [], [], []
            for index, (batch, images, source_labels, target_labels) in enumerate(_source_batches(
                    data, data_manifest.parent, transition, bridge["sources_per_transition"],
                    bridge["batch_size"], label_of, method)):
                result = store.get_or_compute(
                    _batch_name(transition, index, batch),
                    partial(_trajectory_arrays, engine, images, source_labels, target_labels))
                _add_counts(counter, result["counter"])
                frames = result["frames"]
                for b, source_id in enumerate(batch["id"]):
                    folder = f"frames/{source_id}__{transition.source}-to-{transition.target}"
                    for m in range(config.frames):
                        stair = int(result["stairs"][b, m])
                        path = f"{folder}/{m + 1:02d}.png"
                        save_png(staging / path, frames[b, m])
                        rows.append(_row(method, source_id, transition, label_of, m + 1,
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
            target_example = _real_example(data, data_manifest.parent, transition.target)
            save_trajectory_strip(
                strip_sources, strip_frames, strip_stairs, target_example,
                staging / "strips" / f"{transition.source}-to-{transition.target}.png",
                f"{dataset.name}: {transition.source} → {transition.target} ({_TITLES[method]})")
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        write_table(staging / "manifest.tsv", manifest)
        stairs_table = pd.DataFrame(stairs_rows)
        write_table(staging / "stairs.tsv", stairs_table)
        write_table(staging / "fourier.tsv", pd.DataFrame(fourier_rows))
        first_frames = stairs_table[stairs_table["frame_index"] == 1]
        _write_summary(staging, method, config, counter, len(first_frames),
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
            "counter": _counts(result.counter)}


def _batch_name(transition: Transition, index: int, batch: pd.DataFrame) -> str:
    """A stored batch's name: its place, and a digest of its sources (a changed split is new)."""
    sources = hashlib.sha256("\n".join(batch["id"]).encode()).hexdigest()[:12]
    return f"{transition.source}-to-{transition.target}-{index:05d}-{sources}"


def generate_ddib(dataset: DatasetConfig, schedule: NoiseSchedule, bridge: dict[str, Any],
                  ddib: dict[str, Any], data_manifest: Path, diffusion_dir: Path,
                  classifier_dir: Path | None, out_dir: Path, work_dir: Path | None = None,
                  decoder_dir: Path | None = None) -> pd.DataFrame:
    """DDIB translations (endpoints only, hard target labels) for every transition; decoding
    is unguided, so ``classifier_dir`` is not read."""
    config = BridgeConfig.from_dict(bridge)
    engine = _engine(schedule, config, diffusion_dir, None, decoder_dir=decoder_dir)
    models = [diffusion_dir, *([decoder_dir] if decoder_dir else [])]
    store = BatchStore(work_dir, {"method": "ddib", "bridge": asdict(config),
                                  "models": folder_digest(*models)})
    data = pd.read_csv(data_manifest, sep="\t", keep_default_na=False)
    label_of = {name: index for index, name in enumerate(dataset.classes)}
    rows, counter, started = [], EvaluationCounter(), time.perf_counter()
    with staged_directory(out_dir) as staging:
        for transition in _transitions(dataset):
            for index, (batch, images, source_labels, target_labels) in enumerate(_source_batches(
                    data, data_manifest.parent, transition, ddib["sources_per_transition"],
                    bridge["batch_size"], label_of, "ddib")):
                result = store.get_or_compute(
                    _batch_name(transition, index, batch),
                    partial(_image_arrays, engine.ddib, images, source_labels, target_labels))
                _add_counts(counter, result["counter"])
                for source_id, image in zip(batch["id"], result["images"], strict=True):
                    path = f"images/{source_id}__{transition.source}-to-{transition.target}.png"
                    save_png(staging / path, image)
                    rows.append(_row("ddib", source_id, transition, label_of, 1,
                                     config.inversion_steps,
                                     engine.respaced.timestep(config.inversion_steps), 1.0, path))
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        write_table(staging / "manifest.tsv", manifest)
        _write_summary(staging, "ddib", config, counter, len(rows), time.perf_counter() - started,
                       {"batches_resumed": store.reused})
    store.clear()
    return manifest


def generate_adm(dataset: DatasetConfig, schedule: NoiseSchedule, bridge: dict[str, Any],
                 adm: dict[str, Any], seed: int, diffusion_dir: Path, classifier_dir: Path,
                 out_dir: Path, work_dir: Path | None = None) -> pd.DataFrame:
    """Classifier-guided class-conditional DDIM samples, ``per_class`` of every class.

    Each batch draws its noise from its own generator, seeded by (seed, class, first sample),
    so a resumed job's samples equal an uninterrupted job's.
    """
    config = BridgeConfig.from_dict({**bridge, "classifier_scale": adm["classifier_scale"]})
    engine = _engine(schedule, config, diffusion_dir, classifier_dir)
    store = BatchStore(work_dir, {"method": "adm", "bridge": asdict(config), "seed": seed,
                                  "models": folder_digest(diffusion_dir, classifier_dir)})
    rows, counter, started = [], EvaluationCounter(), time.perf_counter()
    with staged_directory(out_dir) as staging:
        for label, name in enumerate(dataset.classes):
            for first in tqdm(range(0, adm["per_class"], bridge["batch_size"]),
                              desc=f"adm {name}"):
                count = min(bridge["batch_size"], adm["per_class"] - first)
                generator = torch.Generator().manual_seed(
                    int(np.random.SeedSequence([seed, label, first]).generate_state(1)[0]))
                result = store.get_or_compute(
                    f"{name}-{first:05d}-{count}",
                    partial(_image_arrays, engine.sample, torch.full((count,), label),
                            generator, dataset.resolution))
                _add_counts(counter, result["counter"])
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
        _write_summary(staging, "adm", config, counter, len(rows), time.perf_counter() - started,
                       {"batches_resumed": store.reused})
    store.clear()
    return manifest


def _image_arrays(method: Callable[..., tuple[torch.Tensor, EvaluationCounter]], *inputs: Any
                  ) -> dict[str, np.ndarray]:
    """One batch of a one-image-per-input method (DDIB, ADM) as plain arrays."""
    images, used = method(*inputs)
    return {"images": to_uint8(images), "counter": _counts(used)}


def _transitions(dataset: DatasetConfig) -> tuple[Transition, ...]:
    if not dataset.transitions:
        raise ValueError(f"dataset '{dataset.name}' has no transitions configured "
                         f"(datasets.{dataset.name}.transitions)")
    return dataset.transitions


def _row(method: str, source_id: str, transition: Transition, label_of: dict[str, int],
         frame: int, stair: int, timestep: int, weight: float, path: str) -> dict[str, Any]:
    return {"method": method, "source_id": source_id, "source_class": transition.source,
            "target_class": transition.target, "source_label": label_of[transition.source],
            "target_label": label_of[transition.target], "frame_index": frame, "stair": stair,
            "timestep": timestep, "soft_label_weight": weight, "path": path}


def _real_example(data: pd.DataFrame, root: Path, class_name: str) -> np.ndarray:
    row = data[(data["split"] == "train") & (data["label_name"] == class_name)].sort_values("id")
    return to_uint8(read_images(root, row["path"].head(1)))[0]


def _counts(counter: EvaluationCounter) -> np.ndarray:
    """A counter as a plain array, stored with its batch's outputs."""
    return np.array(list(asdict(counter).values()))


def _add_counts(total: EvaluationCounter, part: np.ndarray) -> None:
    for name, value in zip(asdict(total), part.tolist(), strict=True):
        setattr(total, name, getattr(total, name) + value)


def _write_summary(staging: Path, method: str, config: BridgeConfig, counter: EvaluationCounter,
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
