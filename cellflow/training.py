"""The training loop shared by the diffusion model and the noise-aware classifier.

Accelerate handles devices, mixed precision, gradient accumulation and multi-GPU data
parallelism; this loop adds what makes a run repeatable and resumable:

* every random draw of step s (batch indices, augmentation, noise, t, dropout) comes from a
  generator seeded with (seed, s, micro-batch), so no RNG state needs saving and a resumed run
  takes exactly the same steps as an uninterrupted one;
* with N processes (``accelerate launch``), process k draws and trains micro-batch m·N + k of
  the step: N processes with A accumulation steps train on the same samples, timesteps and
  noise as one process with N·A accumulation steps of the same ``batch_size``, and reach its
  weights up to the order of the gradient all-reduce (``benchmarks/results/multiprocess.md``);
* checkpoints (weights, EMA weights, optimizer and LR-schedule state) are written atomically
  every ``checkpoint_every`` steps into a folder outside the job's declared outputs, and a
  rerun continues from the latest one.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from timm.utils import ModelEmaV3
from tqdm import tqdm

from cellflow.checkpoint import (
    OPTIMIZER_FILE,
    load_optimizer_state,
    load_weights,
    newest_intact_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from cellflow.logs import note

log = logging.getLogger(__name__)

LOG_COLUMNS = ["step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s"]

# (model, images in [-1, 1], labels, generator) -> scalar loss
LossFunction = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator],
                        torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    grad_accum_steps: int
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    lr_schedule: str
    grad_clip: float
    ema_decay: float
    mixed_precision: str
    gpus: int
    checkpoint_every: int
    keep_checkpoints: int
    augment: bool

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainConfig:
        return cls(**{field: raw[field] for field in cls.__dataclass_fields__})


@dataclass
class TrainResult:
    model: torch.nn.Module
    ema: torch.nn.Module
    log: pd.DataFrame
    resumed_from_step: int
    seconds: float
    # False in the other processes of a multi-process run: only the main one writes outputs.
    is_main_process: bool = True


def step_generator(seed: int, step: int, micro_batch: int) -> torch.Generator:
    """The generator of one micro-batch: a pure function of (seed, step, micro-batch)."""
    state = np.random.SeedSequence([seed, step, micro_batch]).generate_state(2, np.uint32)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator


def dihedral_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flip and 90-degree rotation per image: tissue has no canonical orientation."""
    flips = torch.rand(images.shape[0], generator=generator) < 0.5
    turns = torch.randint(0, 4, (images.shape[0],), generator=generator)
    images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    out = images.clone()
    for quarter in (1, 2, 3):
        chosen = turns == quarter
        if chosen.any():
            out[chosen] = images[chosen].rot90(quarter, dims=(-2, -1))
    return out


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range both models are trained on."""
    return images.float() / 127.5 - 1.0


def train_model(
    model: torch.nn.Module,
    loss_fn: LossFunction,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    seed: int,
    checkpoint_dir: Path,
    fingerprint: Mapping[str, Any],
    description: str = "train",
) -> TrainResult:
    """Train ``model`` on uint8 ``images`` (N, 3, H, W) and ``labels`` (N,).

    ``fingerprint`` (plain JSON data: configs, data identity) is stored in every checkpoint;
    a checkpoint whose fingerprint differs is refused rather than silently mixed in.
    """
    use_cuda = torch.cuda.is_available()
    precision = config.mixed_precision if use_cuda else "no"
    if precision != config.mixed_precision:
        log.warning("mixed_precision %s needs a GPU; training in float32 on the CPU",
                    config.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision, cpu=not use_cuda,
                              gradient_accumulation_steps=config.grad_accum_steps)
    processes = accelerator.num_processes
    micro_batch = _micro_batch_size(config, processes)
    if len(images) == 0:
        raise ValueError(f"{description}: no training images")
    if processes > 1:
        # The draws of a step depend on the number of processes: a checkpoint written by
        # another number would resume into a run that matches neither.
        fingerprint = {**fingerprint, "processes": processes}

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    schedule = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps,
                             num_training_steps=config.steps)
    # Warm-up lets a short run average over its own steps instead of the initial weights.
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True)
    # The main process removes unfinished saves and sets corrupt checkpoints aside before the
    # others look, so that no two processes rename the same folder.
    with accelerator.main_process_first():
        start = _resume(checkpoint_dir, model, ema, optimizer, schedule, fingerprint)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)

    log_path = checkpoint_dir / "train_log.csv"
    if accelerator.is_main_process:
        _truncate_log(log_path, start)
    started = time.perf_counter()
    grad_norm = torch.tensor(float("nan"))
    progress = tqdm(range(start, config.steps), initial=start, total=config.steps,
                    desc=description, unit="step",
                    disable=not accelerator.is_main_process)
    for step in progress:
        step_started = time.perf_counter()
        model.train()
        losses = []
        for micro in range(config.grad_accum_steps):
            # A whole micro-batch per process: the loss functions draw t and noise for the batch
            # they are given, so a process could not reproduce a slice of a larger one.
            generator = step_generator(seed, step, micro * processes + accelerator.process_index)
            torch.manual_seed(generator.initial_seed())  # dropout, if any, follows the step too
            chosen = torch.randint(0, len(images), (micro_batch,), generator=generator)
            batch = to_model_range(images[chosen])
            if config.augment:
                batch = dihedral_augment(batch, generator)
            batch = batch.to(accelerator.device)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = loss_fn(model, batch, labels[chosen].to(accelerator.device), generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
        schedule.step()
        ema.update(accelerator.unwrap_model(model), step=step + 1)
        done = step + 1
        row = {
            "step": done,
            "loss": float(np.mean(losses)),
            "lr": schedule.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "images_per_s": config.batch_size / (time.perf_counter() - step_started),
            "elapsed_s": time.perf_counter() - started,
        }
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"{description}: loss is {row['loss']} at step {done}; "
                                     "lower the learning rate or check the data")
        if accelerator.is_main_process:
            _append_log(log_path, row)
            progress.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            if done % config.checkpoint_every == 0 or done == config.steps:
                _save(checkpoint_dir, done, accelerator.unwrap_model(model), ema, optimizer,
                      schedule, fingerprint, config.keep_checkpoints)
        accelerator.wait_for_everyone()
    progress.close()
    log_table = pd.read_csv(log_path) if log_path.is_file() else pd.DataFrame(columns=LOG_COLUMNS)
    if len(log_table):
        note("steps", int(log_table["step"].iloc[-1]))
        note("final loss", float(log_table["loss"].iloc[-1]))
    return TrainResult(accelerator.unwrap_model(model), ema.module, log_table, start,
                       time.perf_counter() - started, accelerator.is_main_process)


def _micro_batch_size(config: TrainConfig, processes: int) -> int:
    per_step = config.grad_accum_steps * processes
    if config.batch_size % per_step:
        raise ValueError(
            f"train.batch_size {config.batch_size} is not divisible by grad_accum_steps "
            f"({config.grad_accum_steps}) x processes ({processes})")
    return config.batch_size // per_step


def _save(directory: Path, step: int, model: torch.nn.Module, ema: ModelEmaV3,
          optimizer: torch.optim.Optimizer, schedule: Any, fingerprint: Mapping[str, Any],
          keep: int) -> None:
    save_checkpoint(
        directory, step,
        weights={"model": model.state_dict(), "ema": ema.module.state_dict()},
        optimizer_state=optimizer.state_dict(),
        state={"fingerprint": dict(fingerprint), "lr_schedule": schedule.state_dict()},
    )
    prune_checkpoints(directory, keep)


def _resume(directory: Path, model: torch.nn.Module, ema: ModelEmaV3,
            optimizer: torch.optim.Optimizer, schedule: Any,
            fingerprint: Mapping[str, Any]) -> int:
    """Load the newest intact checkpoint in ``directory`` if there is one; return its step."""
    found = newest_intact_checkpoint(directory, fingerprint)
    if found is None:
        return 0
    checkpoint, state = found
    load_weights(model, checkpoint / "model.safetensors")
    load_weights(ema.module, checkpoint / "ema.safetensors")
    optimizer.load_state_dict(load_optimizer_state(checkpoint / OPTIMIZER_FILE))
    schedule.load_state_dict(state["lr_schedule"])
    log.info("resuming from %s (step %d)", checkpoint, state["step"])
    return int(state["step"])


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log rows of the steps a resumed run does not repeat."""
    if not path.is_file():
        return
    rows = pd.read_csv(path)
    rows[rows["step"] <= step].to_csv(path, index=False)


def _append_log(path: Path, row: Mapping[str, float]) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
