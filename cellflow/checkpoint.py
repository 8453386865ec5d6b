"""Training checkpoints: safetensors weights, a JSON state file, optimizer state beside them.

A checkpoint is a folder ``step-NNNNNNN/`` that appears in one rename once all its files are
written, so a job killed mid-save leaves the previous checkpoint as the latest. Each carries the
SHA-256 of its files (``checksums.json``), checked with the finiteness of its weights before a
resume (:func:`verify_checkpoint`), so flipped bytes never train on silently. Nothing is
unpickled on load: weights are safetensors, the optimizer state is read with
``torch.load(weights_only=True)`` (tensors and plain containers only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
CHECKSUM_FILE = "checksums.json"
PARTIAL_PREFIX = ".partial-step-"


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
    staging = directory / f"{PARTIAL_PREFIX}{step:07d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for name, tensors in weights.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      staging / f"{name}.safetensors")
        torch.save(optimizer_state, staging / OPTIMIZER_FILE)
        (staging / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
        checksums = {path.name: file_sha256(path) for path in sorted(staging.iterdir())}
        (staging / CHECKSUM_FILE).write_text(json.dumps(checksums, indent=2))
    except (OSError, RuntimeError) as err:
        # torch.save reports a full disk as "enforce fail ... unexpected pos": say what it is
        shutil.rmtree(staging, ignore_errors=True)
        free = shutil.disk_usage(directory).free / 2 ** 20 if directory.exists() else 0.0
        raise CheckpointError(f"{final}: writing the checkpoint failed ({err}); {free:.0f} MiB "
                              f"free on that disk") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def remove_partial_checkpoints(directory: Path) -> list[Path]:
    """Delete the staging folders of saves that never finished (a killed job, a full disk)."""
    partial = sorted(directory.glob(f"{PARTIAL_PREFIX}*")) if directory.is_dir() else []
    for folder in partial:
        shutil.rmtree(folder, ignore_errors=True)
    return partial


def verify_checkpoint(checkpoint: Path) -> None:
    """Raise CheckpointError unless every file matches its checksum and every weight is finite.

    Checkpoints written before checksums existed are checked for finite weights only.
    """
    listed = checkpoint / CHECKSUM_FILE
    if listed.is_file():
        try:
            checksums = json.loads(listed.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{listed}: not valid JSON ({err})") from None
        for name, expected in checksums.items():
            path = checkpoint / name
            if not path.is_file():
                raise CheckpointError(f"{path}: missing")
            if file_sha256(path) != expected:
                raise CheckpointError(f"{path}: checksum mismatch (the file changed after it "
                                      f"was written)")
    for path in sorted(checkpoint.glob("*.safetensors")):
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable or truncated ({err})") from None
        bad = non_finite(tensors)
        if bad:
            raise CheckpointError(f"{path}: non-finite values in {_short(bad)}")


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity, sorted."""
    return sorted(name for name, tensor in tensors.items()
                  if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()))


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (weights files can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def newest_intact_checkpoint(directory: Path, fingerprint: Mapping[str, Any]
                             ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that passes its checks, with its state.

    Unfinished saves are removed; a checkpoint whose files fail their checksums or hold
    non-finite weights is set aside as ``corrupt-step-*`` (kept for inspection) with a warning
    naming it, so a corrupt newest checkpoint costs the work since the one before, not the run.
    One written for another configuration is an error: resuming it would mix two runs.
    """
    for partial in remove_partial_checkpoints(directory):
        log.warning("removed the unfinished checkpoint save %s", partial)
    for checkpoint in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(checkpoint)
            state = read_state(checkpoint)
        except CheckpointError as err:
            aside = checkpoint.with_name(f"corrupt-{checkpoint.name}")
            shutil.rmtree(aside, ignore_errors=True)
            checkpoint.rename(aside)
            log.warning("skipping a corrupt checkpoint, moved to %s: %s", aside, err)
            continue
        saved = state.get("fingerprint")
        if saved != dict(fingerprint):
            changed = sorted(k for k in set(saved or {}) | set(fingerprint)
                             if (saved or {}).get(k) != fingerprint.get(k))
            raise CheckpointError(
                f"{checkpoint / STATE_FILE}: written for another configuration (differs in: "
                f"{', '.join(changed)}); remove {directory} to start afresh")
        return checkpoint, state
    return None


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


def load_state_dict_file(path: Path, key: str) -> dict[str, torch.Tensor]:
    """A user-supplied weights file (``key`` names its config entry) as a dict of tensors.

    Safetensors, or a PyTorch pickle read with ``torch.load(weights_only=True)``: a pickle that
    holds anything but tensors and plain containers, such as a planted object whose unpickling
    would run code, is refused before any of it runs.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found ({key})")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} ({key}): unreadable safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} ({key}): not a plain file of tensors, refused without "
                         f"unpickling it ({str(err).splitlines()[0]})") from None
    if not isinstance(state, Mapping) or not all(
            isinstance(name, str) and isinstance(value, torch.Tensor)
            for name, value in state.items()):
        raise ValueError(f"{path} ({key}): expected a state dict of named tensors")
    return dict(state)


def _short(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"
