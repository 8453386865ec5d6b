"""Downstream classifiers: a timm backbone trained on real images plus an augmentation strategy.

The comparison the paper rests on, so every run is built the same way: the same real training
split, the same epochs and early stopping on the real validation split, the same test split
for the metrics; strategies differ only in what happens to a training batch (spatial
strategies) or in which generated images join the training set (generative ones). Generated
images never reach validation or test.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from torchmetrics.functional.classification import multiclass_calibration_error
from tqdm import tqdm

from cellflow.augment import basic_augment, build_batch_augmentation
from cellflow.checkpoint import (
    OPTIMIZER_FILE,
    load_optimizer_state,
    load_weights,
    newest_intact_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from cellflow.data import load_images, load_split
from cellflow.io import atomic_path, staged_directory, write_table, write_text
from cellflow.strategies import resolve_params, strategy
from cellflow.training import step_generator, to_model_range

log = logging.getLogger(__name__)

# Backbones whose patch grid depends on the input size: built for the dataset's resolution.
_SIZED_FAMILIES = ("vit", "deit", "swin", "eva", "beit", "cait", "xcit")


@dataclass(frozen=True)
class DownstreamTrainConfig:
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_epochs: int
    patience: int
    imbalance: str  # none | weighted_sampler | weighted_loss
    mixed_precision: str
    colour_jitter: float

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DownstreamTrainConfig:
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


def create_backbone(name: str, num_classes: int, resolution: int,
                    pretrained_file: str | None = None) -> torch.nn.Module:
    """A timm model by name, sized for the dataset; weights only from a local file."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(f"unknown backbone '{name}'; any timm model name is valid"
                         + (f", close matches: {', '.join(close)}" if close else ""))
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if name.startswith(_SIZED_FAMILIES):
        kwargs["img_size"] = resolution
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise FileNotFoundError(
                f"pretrained weights for '{name}' not found at {pretrained_file} "
                f"(downstream.pretrained.{name}); weights cannot be downloaded here")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
    return timm.create_model(name, **kwargs)


def soft_targets(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(labels, dtype=torch.long), num_classes).float()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against soft targets; equals F.cross_entropy on one-hot rows."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if class_weights is not None:
        return -(targets * class_weights * log_probs).sum(-1).sum() / (
            (targets * class_weights).sum())
    return -(targets * log_probs).sum(-1).mean()


def generated_training_set(manifest_dir: Path, count: int, num_classes: int, seed: int
                           ) -> tuple[np.ndarray, torch.Tensor]:
    """``count`` generated images of one method (seeded choice) with their soft labels."""
    manifest = pd.read_csv(manifest_dir / "manifest.tsv", sep="\t", keep_default_na=False)
    if manifest.empty or count == 0:
        return np.zeros((0, 3, 1, 1), np.uint8), torch.zeros(0, num_classes)
    order = np.random.default_rng(seed).permutation(len(manifest))[:count]
    rows = manifest.iloc[np.sort(order)]
    images = load_images(manifest_dir, rows["path"])
    weight = torch.tensor(rows["soft_label_weight"].to_numpy(), dtype=torch.float32)[:, None]
    targets = ((1 - weight) * soft_targets(rows["source_label"].to_numpy(), num_classes)
               + weight * soft_targets(rows["target_label"].to_numpy(), num_classes))
    return images, targets


def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int,
             device: torch.device, batch_size: int = 128) -> dict[str, Any]:
    """The model's softmax probabilities on ``images``, scored by ``classification_metrics``."""
    model.eval()
    probabilities = []
    with torch.no_grad():
        for first in range(0, len(images), batch_size):
            batch = to_model_range(torch.from_numpy(images[first:first + batch_size])).to(device)
            probabilities.append(F.softmax(model(batch).float(), dim=-1).cpu())
    return classification_metrics(torch.cat(probabilities).numpy(), labels, num_classes)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int
                           ) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, one-vs-rest AUROC, calibration error, per-class
    precision/recall/F1 and the confusion matrix (rows: true class) of class probabilities."""
    predicted = probs.argmax(1)
    classes = list(range(num_classes))
    try:
        auroc = (roc_auc_score(labels, probs[:, 1]) if num_classes == 2 else
                 roc_auc_score(labels, probs, multi_class="ovr", labels=classes))
    except ValueError:  # a class absent from this split: AUROC undefined
        auroc = float("nan")
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", labels=classes,
                                   zero_division=0)),
        "auroc": float(auroc),
        "ece": calibration_error(probs, labels, num_classes),
        "per_class": [{"class_index": index, "precision": float(precision[index]),
                       "recall": float(recall[index]), "f1": float(f1[index]),
                       "support": int(support[index])} for index in classes],
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
        "n": int(len(labels)),
    }


def calibration_error(probs: np.ndarray, labels: np.ndarray, num_classes: int,
                      bins: int = 15) -> float:
    """Expected calibration error (L1, equal-width bins) of the top-class probability.

    The multiclass form also for two classes: the binary one bins the positive-class
    probability, a different quantity, and the number should mean the same on every dataset.
    """
    return float(multiclass_calibration_error(
        torch.from_numpy(probs).float(), torch.from_numpy(np.asarray(labels)).long(),
        num_classes, n_bins=bins, norm="l1"))


def train_downstream(
    manifest: Path,
    classes: list[str],
    resolution: int,
    backbone: str,
    strategy_name: str,
    strategy_params: Mapping[str, Any] | None,
    config: DownstreamTrainConfig,
    seed: int,
    out_dir: Path,
    generated_dir: Path | None = None,
    pretrained_file: str | None = None,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Train, early-stop on validation, evaluate on test; write the run folder, return metrics.

    With ``work_dir`` (outside the run's declared outputs, which Snakemake deletes when a job
    fails) the run checkpoints after every epoch and a killed or timed-out run resumes from
    its last finished epoch to the same weights an uninterrupted run reaches; the checkpoint
    is removed once the run folder is written.
    """
    chosen = strategy(strategy_name, generated=generated_dir is not None)
    params = resolve_params(strategy_name, strategy_params, generated=generated_dir is not None)
    num_classes = len(classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = load_split(manifest, "train")
    targets = soft_targets(labels, num_classes)
    real_count = len(images)
    if chosen.kind == "generative":
        if generated_dir is None:
            raise ValueError(f"strategy '{strategy_name}' needs the folder of its generated "
                             "images (trajectories/<method>/)")
        extra, extra_targets = generated_training_set(
            generated_dir, round(params["ratio"] * real_count), num_classes, seed)
        if len(extra):
            images = np.concatenate([images, extra])
            targets = torch.cat([targets, extra_targets])
    val_images, val_labels = load_split(manifest, "val")
    test_images, test_labels = load_split(manifest, "test")
    batch_augmentation = build_batch_augmentation(strategy_name, params)

    torch.manual_seed(seed)
    model = create_backbone(backbone, num_classes, resolution, pretrained_file).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(images) / config.batch_size))
    total = steps_per_epoch * config.epochs
    warmup = steps_per_epoch * config.warmup_epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine(step, warmup,
                                                                                 total))
    class_weights = _class_weights(targets, config.imbalance, device)
    sample_weights = _sample_weights(targets) if config.imbalance == "weighted_sampler" else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and config.mixed_precision != "no")

    rows, best, best_state, stale, first_epoch, resumed_seconds = [], -1.0, None, 0, 0, 0.0
    checkpoints = None
    if work_dir is not None:
        from cellflow.stages import checkpoint_folder, training_data_digest

        fingerprint = {
            "classes": list(classes), "resolution": resolution, "backbone": backbone,
            "strategy": strategy_name, "strategy_params": params, "seed": seed,
            "train": asdict(config), "pretrained": pretrained_file,
            "training_data": training_data_digest(manifest),
            "validation": len(val_images), "generated": _folder_digest(generated_dir)}
        checkpoints = checkpoint_folder(Path(work_dir), fingerprint)
        found = newest_intact_checkpoint(checkpoints, fingerprint)
        if found is not None:
            checkpoint, state = found
            load_weights(model, checkpoint / "model.safetensors")
            saved = load_optimizer_state(checkpoint / OPTIMIZER_FILE)
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["rng"])
            schedule.load_state_dict(state["lr_schedule"])
            best_state = load_file(str(checkpoint / "best.safetensors"))
            rows, best, stale = state["rows"], state["best"], state["stale"]
            first_epoch, resumed_seconds = state["step"], state["seconds"]
            log.info("resuming from %s (epoch %d of %d)", checkpoint, first_epoch,
                     config.epochs)
    started = time.perf_counter() - resumed_seconds
    # A run killed after its early stop was saved has nothing left to train.
    last_epoch = first_epoch if stale >= config.patience else config.epochs
    for epoch in tqdm(range(first_epoch, last_epoch), initial=first_epoch,
                      total=config.epochs, desc=f"{backbone}/{strategy_name}/seed{seed}",
                      unit="epoch"):
        model.train()
        generator = step_generator(seed, epoch, 0)
        order = (torch.multinomial(sample_weights, len(images), replacement=True,
                                   generator=generator) if sample_weights is not None
                 else torch.randperm(len(images), generator=generator))
        losses = []
        for first in range(0, len(order), config.batch_size):
            index = order[first:first + config.batch_size]
            batch = basic_augment(to_model_range(torch.from_numpy(images[index.numpy()])),
                                  generator, config.colour_jitter)
            batch_targets = targets[index]
            if batch_augmentation is not None and len(index) > 1:
                batch, batch_targets = batch_augmentation(batch, batch_targets, generator)
            with autocast:
                logits = model(batch.to(device))
            loss = soft_cross_entropy(logits, batch_targets.to(device), class_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        recalibrate_batch_norm(model, images, device, config.batch_size)
        validation = evaluate(model, val_images, val_labels, num_classes, device)
        rows.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                     "val_accuracy": validation["accuracy"],
                     "val_balanced_accuracy": validation["balanced_accuracy"],
                     "lr": schedule.get_last_lr()[0],
                     "elapsed_s": time.perf_counter() - started})
        if validation["balanced_accuracy"] > best:
            best, stale = validation["balanced_accuracy"], 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        if checkpoints is not None:
            save_checkpoint(
                checkpoints, epoch + 1,
                weights={"model": model.state_dict(), "best": best_state},
                optimizer_state={"optimizer": optimizer.state_dict(),
                                 "rng": torch.get_rng_state()},
                state={"fingerprint": fingerprint, "lr_schedule": schedule.state_dict(),
                       "rows": rows, "best": best, "stale": stale,
                       "seconds": time.perf_counter() - started})
            prune_checkpoints(checkpoints, keep=1)
        if stale >= config.patience:
            log.info("early stop after epoch %d (no better validation for %d epochs)",
                     epoch + 1, config.patience)
            break
    model.load_state_dict(best_state)
    metrics = {
        "backbone": backbone, "strategy": strategy_name, "strategy_kind": chosen.kind,
        "strategy_params": params, "seed": seed, "real_train_images": real_count,
        "generated_train_images": len(images) - real_count,
        "epochs_run": len(rows), "best_val_balanced_accuracy": best,
        "seconds": round(time.perf_counter() - started, 2),
        "val": evaluate(model, val_images, val_labels, num_classes, device),
        "test": evaluate(model, test_images, test_labels, num_classes, device),
        "classes": classes,
    }
    with staged_directory(out_dir) as staging:
        with atomic_path(staging / "model.safetensors") as temporary:
            save_file({k: v.contiguous() for k, v in best_state.items()}, str(temporary))
        write_table(staging / "train_log.csv", pd.DataFrame(rows))
        write_text(staging / "metrics.json", json.dumps(metrics, indent=2))
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return metrics


def _folder_digest(folder: Path | None) -> str | None:
    """What the generated images a run trains on are: their manifest's bytes."""
    if folder is None:
        return None
    return hashlib.sha256((Path(folder) / "manifest.tsv").read_bytes()).hexdigest()


def recalibrate_batch_norm(model: torch.nn.Module, images: np.ndarray, device: torch.device,
                           batch_size: int) -> None:
    """Set BatchNorm running statistics to averages over the training images (of batch means).

    A small dataset gives few optimizer steps per epoch (48 images at batch 16: 3), too few for
    the running averages (momentum 0.1) to forget their initial values; the evaluated network
    then predicts one class for everything though it ranks the images well. torch's
    ``update_bn`` recomputes them in one pass over the un-augmented training images.
    """
    if not any(isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
               for module in model.modules()):
        return
    batches = [to_model_range(torch.from_numpy(images[first:first + batch_size])).to(device)
               for first in range(0, len(images), batch_size)]
    torch.optim.swa_utils.update_bn(batches, model, device)


def _cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _class_weights(targets: torch.Tensor, imbalance: str, device: torch.device
                   ) -> torch.Tensor | None:
    if imbalance != "weighted_loss":
        return None
    counts = targets.sum(0).clamp(min=1e-6)
    return (counts.sum() / (len(counts) * counts)).to(device)


def _sample_weights(targets: torch.Tensor) -> torch.Tensor:
    """Inverse class frequency per image, so each class is drawn equally often."""
    counts = targets.sum(0).clamp(min=1e-6)
    return (targets / counts).sum(1)
