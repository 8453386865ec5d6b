"""One function per training stage: read the stage's inputs, train, write its outputs.

A stage's outputs are built in a staging folder and put in place at the end, so a killed job
leaves nothing half-written; its checkpoints live elsewhere (``checkpoint_root``), outside the
job's declared outputs, because Snakemake deletes the outputs of a failed job and a retry must
still find them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cellflow.checkpoint import non_finite
from cellflow.classifier import NoiseAwareClassifier
from cellflow.config import DatasetConfig
from cellflow.data import load_split
from cellflow.diffusion import (
    NoiseSchedule,
    UNetArchitecture,
    build_unet,
    ddim_sample,
    epsilon_loss,
    group_norm_groups,
)
from cellflow.figures import plot_accuracy_by_timestep, plot_loss_curve, save_sample_grid
from cellflow.io import staged_directory, write_table, write_text
from cellflow.pretrained import for_fine_tuning
from cellflow.resume import path_digest
from cellflow.training import TrainConfig, TrainResult, to_model_range, train_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    """Everything a training stage needs from the pipeline config, as plain data."""

    dataset: DatasetConfig
    noise_schedule: NoiseSchedule
    settings: Mapping[str, Any]  # the `diffusion` or `classifier` section of the config
    seed: int

    @classmethod
    def from_json(cls, text: str) -> StageSpec:
        raw = json.loads(text)
        return cls(
            dataset=DatasetConfig.from_dict(raw["dataset_name"], raw["dataset"]),
            noise_schedule=NoiseSchedule(**raw["noise_schedule"]),
            settings=raw["settings"],
            seed=raw["seed"],
        )

    def fingerprint(self, model: str, manifest: Path) -> dict[str, Any]:
        """What the trained weights depend on; checkpoints of another fingerprint never mix."""
        train = {key: value for key, value in self.settings["train"].items()
                 if key not in _NOT_IN_WEIGHTS}
        # Only where set, so that the checkpoints of runs from before these settings resume.
        extra: dict[str, Any] = {}
        if self.settings.get("label_dropout"):
            extra["label_dropout"] = self.settings["label_dropout"]
        if "init_from" in self.settings:
            extra["init_from"] = {**self.settings["init_from"],
                                  "digest": path_digest(Path(self.settings["init_from"]["path"]))}
        return {
            **extra,
            "model": model,
            "architecture": ARCHITECTURE_REVISION,
            "settings": json.loads(json.dumps({"model": self.settings["model"],
                                               "train": train})),
            "noise_schedule": asdict(self.noise_schedule),
            "classes": list(self.dataset.classes),
            "resolution": self.dataset.resolution,
            "seed": self.seed,
            "training_data_sha256": training_data_digest(manifest),
        }


# Raised whenever the code builds another network from the same model config (2: ADM's
# middle-attention GroupNorm in the UNet and ADM's attention pool in the classifier), so that
# checkpoints of the old network are never resumed into the new one.
ARCHITECTURE_REVISION = 2

# Training settings that change when and where the work is saved, not the weights: changing
# them resumes the same checkpoints (the sample grid and the classifier's evaluation settings
# are not part of the fingerprint either).
_NOT_IN_WEIGHTS = ("runtime_minutes", "checkpoint_every", "keep_checkpoints")


def training_data_digest(manifest: Path) -> str:
    """SHA-256 of the training split as the models see it: ids, labels and image bytes.

    Not of the manifest file: its ``source_path`` column holds where the raw data sat, and
    the same data read from another folder (a moved results/ tree) trains the same weights.
    """
    table = pd.read_csv(manifest, sep="\t", keep_default_na=False)
    train = table[table["split"] == "train"].sort_values("id")
    digest = hashlib.sha256()
    for row in train.itertuples(index=False):
        digest.update(f"{row.id}\t{row.label}\n".encode())
        digest.update((manifest.parent / row.path).read_bytes())
    return digest.hexdigest()


def checkpoint_folder(root: Path, fingerprint: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    return root / digest[:12]


def train_diffusion(spec: StageSpec, manifest: Path, out_dir: Path, checkpoint_root: Path
                    ) -> TrainResult:
    """Train the class-conditional UNet; write ``unet/``, ``scheduler/``, log, curve, samples."""
    images, labels = load_split(manifest, "train")
    torch.manual_seed(spec.seed)
    label_dropout = spec.settings.get("label_dropout", 0.0)
    initial: dict[str, Any] | None = None
    if "init_from" in spec.settings:
        unet, initial = for_fine_tuning(spec.settings["init_from"], "diffusion",
                                        spec.dataset.classes, "diffusion.init_from",
                                        null_class=label_dropout > 0)
        _require_resolution(unet.config.sample_size, spec, "diffusion.init_from")
    else:
        unet = build_unet(UNetArchitecture.from_dict(spec.settings["model"]),
                          spec.dataset.resolution, len(spec.dataset.classes),
                          null_class=label_dropout > 0)
    scheduler = spec.noise_schedule.ddpm()
    fingerprint = spec.fingerprint("diffusion", manifest)

    def loss(model, batch, batch_labels, generator):
        return epsilon_loss(model, scheduler, batch, batch_labels, generator, label_dropout)

    result = train_model(
        unet, loss, torch.from_numpy(images), torch.from_numpy(labels),
        TrainConfig.from_dict(spec.settings["train"]), spec.seed,
        checkpoint_folder(checkpoint_root, fingerprint), fingerprint,
        description=f"diffusion {spec.dataset.name}",
    )
    if not result.is_main_process:
        return result  # the main process samples and writes the outputs
    samples = spec.settings["samples"]
    grid_labels = torch.arange(len(spec.dataset.classes)).repeat_interleave(samples["per_class"])
    generator = torch.Generator().manual_seed(spec.seed)
    ema_unet = result.ema.eval()
    require_finite(ema_unet, f"diffusion model of {spec.dataset.name}")
    sampled = ddim_sample(ema_unet, spec.noise_schedule, grid_labels, samples["ddim_steps"],
                          generator)

    with staged_directory(out_dir) as staging:
        ema_unet.save_pretrained(staging / "unet")
        scheduler.save_pretrained(staging / "scheduler")
        save_sample_grid(
            sampled, list(spec.dataset.classes), staging / "samples.png",
            f"{spec.dataset.name}: class-conditional DDIM samples ({samples['ddim_steps']} steps) "
            f"after {spec.settings['train']['steps']} training steps")
        _write_common(staging, result, spec, fingerprint, "diffusion", initial)
    return result


def _require_resolution(sample_size: int, spec: StageSpec, key: str) -> None:
    if sample_size != spec.dataset.resolution:
        raise ValueError(f"{key}: the pretrained model is for {sample_size} px images, dataset "
                         f"'{spec.dataset.name}' is prepared at {spec.dataset.resolution} px "
                         f"(datasets.{spec.dataset.name}.resolution)")


def require_finite(model: torch.nn.Module, what: str) -> None:
    """Refuse to export weights with NaN or infinity: every later stage would run on them."""
    bad = non_finite(model.state_dict())
    if bad:
        raise FloatingPointError(f"the trained {what} has non-finite weights in "
                                 f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                                 "it is not exported")


def build_classifier(architecture: Mapping[str, Any], sample_size: int, num_classes: int
                     ) -> NoiseAwareClassifier:
    """The noise-aware classifier described by a ``classifier.model`` config section."""
    return NoiseAwareClassifier(
        sample_size=sample_size,
        num_classes=num_classes,
        block_out_channels=tuple(architecture["block_out_channels"]),
        layers_per_block=architecture["layers_per_block"],
        attention_levels=tuple(architecture["attention_levels"]),
        attention_head_dim=architecture["attention_head_dim"],
        norm_num_groups=group_norm_groups(architecture["block_out_channels"]),
        pool=architecture["pool"],
        dropout=architecture["dropout"],
    )


def train_classifier(spec: StageSpec, manifest: Path, out_dir: Path, checkpoint_root: Path
                     ) -> tuple[TrainResult, pd.DataFrame]:
    """Train the noise-aware classifier; write it with its accuracy per band of timesteps."""
    images, labels = load_split(manifest, "train")
    torch.manual_seed(spec.seed)
    initial: dict[str, Any] | None = None
    if "init_from" in spec.settings:
        classifier, initial = for_fine_tuning(spec.settings["init_from"], "classifier",
                                              spec.dataset.classes, "classifier.init_from")
        _require_resolution(classifier.config.sample_size, spec, "classifier.init_from")
    else:
        classifier = build_classifier(spec.settings["model"], spec.dataset.resolution,
                                      len(spec.dataset.classes))
    scheduler = spec.noise_schedule.ddpm()
    fingerprint = spec.fingerprint("classifier", manifest)

    def loss(model, batch, batch_labels, generator):
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch.shape[0],),
                                  generator=generator).to(batch.device)
        noise = torch.randn(batch.shape, generator=generator).to(batch.device, batch.dtype)
        logits = model(scheduler.add_noise(batch, noise, timesteps), timesteps)
        return F.cross_entropy(logits.float(), batch_labels)

    result = train_model(
        classifier, loss, torch.from_numpy(images), torch.from_numpy(labels),
        TrainConfig.from_dict(spec.settings["train"]), spec.seed,
        checkpoint_folder(checkpoint_root, fingerprint), fingerprint,
        description=f"classifier {spec.dataset.name}",
    )
    if not result.is_main_process:
        return result, pd.DataFrame()  # the main process evaluates and writes the outputs
    require_finite(result.ema, f"classifier of {spec.dataset.name}")
    val_images, val_labels = load_split(manifest, "val")
    evaluation = spec.settings["eval"]
    table = accuracy_by_timestep(result.ema.eval(), spec.noise_schedule, val_images, val_labels,
                                 evaluation["bands"], evaluation["noise_draws"], spec.seed)

    with staged_directory(out_dir) as staging:
        result.ema.save_pretrained(staging / "classifier")
        write_table(staging / "accuracy_by_t.tsv", table)
        plot_accuracy_by_timestep(
            table, 1 / len(spec.dataset.classes), staging / "accuracy_by_t.png",
            f"{spec.dataset.name}: noise-aware classifier, validation split")
        _write_common(staging, result, spec, fingerprint, "classifier", initial)
    return result, table


@torch.no_grad()
def accuracy_by_timestep(
    classifier: torch.nn.Module,
    schedule: NoiseSchedule,
    images: np.ndarray,
    labels: np.ndarray,
    bands: int,
    noise_draws: int,
    seed: int,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Accuracy on noised images, t drawn uniformly inside each of ``bands`` equal bands."""
    scheduler = schedule.ddpm()
    edges = np.linspace(0, schedule.num_train_timesteps, bands + 1).round().astype(int)
    generator = torch.Generator().manual_seed(seed)
    device = next(classifier.parameters()).device
    clean = to_model_range(torch.from_numpy(images))
    targets = torch.from_numpy(labels)
    rows = []
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        correct = total = 0
        for _ in range(noise_draws):
            for first in range(0, len(clean), batch_size):
                batch = clean[first:first + batch_size]
                t = torch.randint(int(start), int(end), (len(batch),), generator=generator)
                noise = torch.randn(batch.shape, generator=generator)
                noisy = scheduler.add_noise(batch, noise, t)
                predicted = classifier(noisy.to(device), t.to(device)).argmax(dim=1).cpu()
                correct += int((predicted == targets[first:first + batch_size]).sum())
                total += len(batch)
        rows.append({"t_start": int(start), "t_end": int(end) - 1,
                     "accuracy": correct / total, "n": total})
    return pd.DataFrame(rows)


def _write_common(staging: Path, result: TrainResult, spec: StageSpec,
                  fingerprint: Mapping[str, Any], name: str,
                  initial: Mapping[str, Any] | None = None) -> None:
    write_table(staging / "train_log.csv", result.log)
    plot_loss_curve(result.log, staging / "loss_curve.png", f"{spec.dataset.name}: {name}")
    summary = {
        "fingerprint": fingerprint,
        "steps": int(result.log["step"].max()) if len(result.log) else 0,
        "resumed_from_step": result.resumed_from_step,
        "seconds_this_run": round(result.seconds, 2),
        "final_loss_mean_last_10": float(result.log["loss"].tail(10).mean()),
        "weights": "EMA",
        # fine-tuning: the pretrained model, and which class rows it gave
        "initialised_from": initial,
    }
    write_text(staging / "training.json", json.dumps(summary, indent=2))
