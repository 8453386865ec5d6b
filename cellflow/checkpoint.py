"""Training checkpoints: safetensors weights, a JSON state file, optimizer state beside them.

A checkpoint is a folder ``step-NNNNNNN/`` that appears in one rename once all its files are
written, so a job killed mid-save leaves the previous checkpoint as the latest. Nothing is
unpickled on load: weights are safetensors, the optimizer state is read with
``torch.load(weights_only=True)`` (tensors and plain containers only).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def save_checkpoint(
    directory: Path,
    step: int,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    optimizer_state: Mapping[str, Any],
    state: Mapping[str, Any],
) -> Path:
    """Write ``weights`` (name -> state dict) as ``<name>.safetensors`` and the rest beside."""
    final = directory / f"step-{step:07d}"
    staging = directory / f".partial-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, tensors in weights.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  staging / f"{name}.safetensors")
    torch.save(optimizer_state, staging / OPTIMIZER_FILE)
    (staging / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial folders never match the pattern)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step-*") if (p / STATE_FILE).is_file())


def prune_checkpoints(directory: Path, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a complete checkpoint)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file into ``model``, naming every key or shape that does not match."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable or truncated ({err})") from None
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    for key in sorted(set(expected) & set(tensors)):
        if tensors[key].shape != expected[key].shape:
            problems.append(f"'{key}' has shape {tuple(tensors[key].shape)} in the file but "
                            f"{tuple(expected[key].shape)} in the model")
    if problems:
        raise CheckpointError(f"{path}: does not match the model: " + "; ".join(problems))
    model.load_state_dict(tensors)


def load_optimizer_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable, truncated or not plain tensors ({err})"
                              ) from None


def _short(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"
