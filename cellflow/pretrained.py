"""Models made elsewhere: used as they are (``datasets.<name>.pretrained``) or fine-tuned
(``diffusion.init_from``, ``classifier.init_from``).

A pretrained model is a folder in our format (what a training job or ``cellflow
import-guided-diffusion`` writes) or a guided-diffusion checkpoint (``.pt``, converted here with
:mod:`cellflow.guided_diffusion`). Before any job uses one it is checked against the dataset:
resolution, number and names of classes, noise schedule, each mismatch an error that names the
config key. Fine-tuning keeps every weight but the class rows (the UNet's label embedding, the
classifier's output rows): rows of classes the pretrained model knows by name are carried
over, the others start from a fresh initialisation, and the report says which were which.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from cellflow.classifier import NoiseAwareClassifier
from cellflow.diffusion import NoiseSchedule

log = logging.getLogger(__name__)

# The tensors whose rows are classes, per model kind.
CLASS_ROWS = {
    "diffusion": ("class_embedding.weight",),
    "classifier": ("attention_pool.c_proj.weight", "attention_pool.c_proj.bias", "head.weight",
                   "head.bias"),
}


@dataclass
class Pretrained:
    """A loaded pretrained model with what is known of it."""

    model: torch.nn.Module
    classes: tuple[str, ...] | None  # its class names in label order, where recorded
    schedule: dict[str, Any] | None  # its scheduler's config, where it has one
    source: dict[str, Any] = field(default_factory=dict)  # where it came from, for the record


def kind_of(model_name: str) -> str:
    """``diffusion`` for the diffusion model and the decoder UNet; ``classifier`` and
    ``autoencoder`` for themselves."""
    return model_name if model_name in ("classifier", "autoencoder") else "diffusion"


# The folder inside a model folder that holds the diffusers model, per kind.
INNER = {"diffusion": "unet", "classifier": "classifier", "autoencoder": "vae"}


def load_pretrained(entry: Mapping[str, Any], kind: str, key: str,
                    classes: Sequence[str] | None = None) -> Pretrained:
    """Read the model an entry names (a folder, or a .pt converted with its flags).

    ``classes`` is the dataset's class order a .pt checkpoint is converted to; None keeps the
    checkpoint's own order (fine-tuning from a model of other classes).
    """
    path = Path(entry["path"])
    if not path.exists():
        raise FileNotFoundError(f"{key}.path: {path} does not exist")
    if path.suffix == ".pt" and kind == "autoencoder":
        raise ValueError(f"{key}.path: a latent autoencoder is read from a diffusers "
                         f"AutoencoderKL folder (vae/), not a checkpoint file ({path})")
    if path.suffix == ".pt":
        return _convert(path, entry, kind, key, classes)
    return _read_folder(path, kind, key)


def _read_folder(path: Path, kind: str, key: str) -> Pretrained:
    """A diffusion folder holds unet/ (and scheduler/), a classifier folder classifier/, an
    autoencoder folder vae/."""
    inner = path / INNER[kind]
    if not (inner / "config.json").is_file():
        raise FileNotFoundError(
            f"{key}.path: {path} is not a {kind} model folder (no {inner.name}/config.json); "
            "convert a guided-diffusion checkpoint with `cellflow import-guided-diffusion`, "
            "or give the .pt with its adm_flags")
    model_class = {"diffusion": UNet2DModel, "classifier": NoiseAwareClassifier,
                   "autoencoder": AutoencoderKL}[kind]
    model = model_class.from_pretrained(inner)
    schedule = None
    if (path / "scheduler" / "scheduler_config.json").is_file():
        schedule = dict(DDPMScheduler.from_pretrained(path / "scheduler").config)
    return Pretrained(model, recorded_classes(path), schedule,
                      {"path": str(path), "format": "folder"})


def recorded_classes(folder: Path) -> tuple[str, ...] | None:
    """The class names a model folder records: its classes.json, a training job's
    fingerprint, or the conversion record next to it."""
    for candidate, read in ((folder / "classes.json", lambda raw: raw),
                            (folder / "training.json", lambda raw: raw["fingerprint"]["classes"]),
                            (folder.parent / "conversion.json", lambda raw: raw["classes"])):
        if candidate.is_file():
            return tuple(read(json.loads(candidate.read_text())))
    return None


def _convert(path: Path, entry: Mapping[str, Any], kind: str, key: str,
             classes: Sequence[str] | None) -> Pretrained:
    from cellflow import guided_diffusion

    state = guided_diffusion.load_checkpoint(path)
    flags_text = entry.get("adm_flags", "")
    checkpoint_classes = entry.get("checkpoint_classes")
    try:
        names = _conversion_classes(classes, checkpoint_classes, class_rows(state), key)
        # the checkpoint's own order where none of ours is asked for
        order = checkpoint_classes if classes is not None or checkpoint_classes else names
        if kind == "diffusion":
            flags = guided_diffusion.parse_unet_flags(flags_text)
            model, report = guided_diffusion.convert_unet(
                state, flags, names, checkpoint_classes=order,
                qkv_order=entry.get("qkv_order"))
            schedule = dict(guided_diffusion.noise_schedule(flags).ddpm().config)
        else:
            flags = guided_diffusion.parse_classifier_flags(flags_text)
            model, report = guided_diffusion.convert_classifier(
                state, flags, names, checkpoint_classes=order,
                qkv_order=entry.get("qkv_order"))
            schedule = None
    except (KeyError, ValueError) as error:
        raise ValueError(f"{key}: {path}: {error}") from None
    log.info("%s: converted %s (%s)", key, path, report)
    return Pretrained(model, tuple(names), schedule,
                      {"path": str(path), "format": "guided-diffusion", "conversion": report})


def class_rows(state: Mapping[str, torch.Tensor]) -> int | None:
    """How many classes a guided-diffusion UNet or classifier state dict has rows for."""
    for name in ("label_emb.weight", "out.2.c_proj.bias", "out.3.bias", "out.2.bias"):
        if name in state:
            return int(state[name].shape[0])
    return None


def _conversion_classes(classes: Sequence[str] | None, checkpoint_classes: Sequence[str] | None,
                        rows: int | None, key: str) -> list[str]:
    """The class order to convert to: the dataset's, or (fine-tuning) the checkpoint's own,
    named by checkpoint_classes or, unnamed, by their indices."""
    if classes is not None:
        return list(classes)
    if checkpoint_classes is not None:
        return list(checkpoint_classes)
    return numbered_classes(rows, key)


def numbered_classes(rows: int | None, source: str) -> list[str]:
    """'0', '1', ... for each of a checkpoint's class rows (``class_rows``), in its order."""
    from cellflow.guided_diffusion import GuidedDiffusionError

    if rows is None:
        raise GuidedDiffusionError(f"{source}: the checkpoint has no class rows (an "
                                   "unconditional model?)")
    return [str(index) for index in range(rows)]


def check_against_dataset(pretrained: Pretrained, kind: str, classes: Sequence[str],
                          resolution: int, schedule: NoiseSchedule, key: str) -> None:
    """Refuse a model that cannot serve this dataset, naming what differs."""
    config = pretrained.model.config
    if kind == "autoencoder":
        factor = 2 ** (len(config.block_out_channels) - 1)
        if resolution % factor:
            raise ValueError(f"{key}: the autoencoder downsamples by {factor}, which does not "
                             f"divide the dataset's {resolution} px")
        if not config.scaling_factor:
            raise ValueError(f"{key}: the autoencoder's config has no scaling_factor")
        return
    if config.sample_size != resolution:
        raise ValueError(f"{key}: the model is for {config.sample_size} px images, the dataset "
                         f"is prepared at {resolution} px (its resolution)")
    count = len(classes)
    if kind == "diffusion":
        rows = config.num_class_embeds or 0
        if rows not in (count, count + 1):
            raise ValueError(f"{key}: the model has {rows} label embeddings, the dataset "
                             f"{count} classes ({', '.join(classes)}); a class-conditional "
                             f"model needs {count}, or {count + 1} with the null class")
    elif config.num_classes != count:
        raise ValueError(f"{key}: the classifier has {config.num_classes} classes, the dataset "
                         f"{count} ({', '.join(classes)})")
    if pretrained.classes is not None and tuple(pretrained.classes[:count]) != tuple(classes):
        raise ValueError(f"{key}: the model's classes are {', '.join(pretrained.classes)} in "
                         f"label order, the dataset's {', '.join(classes)}; convert it with "
                         "the dataset's class order (checkpoint_classes)")
    if pretrained.schedule is not None:
        expected = dict(schedule.ddpm().config)
        differing = [name for name in ("num_train_timesteps", "beta_start", "beta_end",
                                       "beta_schedule")
                     if pretrained.schedule.get(name) != expected.get(name)]
        if differing:
            raise ValueError(
                f"{key}: the model was trained with another noise schedule ("
                + ", ".join(f"{name} {pretrained.schedule.get(name)} here "
                            f"{expected.get(name)}" for name in differing)
                + "); set noise_schedule to the model's")


def with_dataset_classes(pretrained: Pretrained, kind: str, classes: Sequence[str],
                         fresh: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``fresh`` (built like the pretrained model but for the dataset's classes) with every
    pretrained weight, class rows mapped by name where the pretrained model knows the class.

    Returns the model and a report: which classes were carried over and which start fresh.
    """
    known = {name: index for index, name in enumerate(pretrained.classes or ())}
    source = pretrained.model.state_dict()
    target = fresh.state_dict()
    mismatched = [name for name in target if name not in source
                  or (source[name].shape != target[name].shape
                      and name not in CLASS_ROWS[kind])]
    unused = [name for name in source if name not in target]
    if mismatched or unused:
        raise ValueError(f"the pretrained {kind} model's weights do not fit the model built "
                         f"from it: {', '.join((mismatched + unused)[:6])}")
    carried, started = [], []
    for name in classes:
        (carried if name in known else started).append(name)
    merged = {}
    for name, tensor in target.items():
        if name not in CLASS_ROWS[kind]:
            merged[name] = source[name]
            continue
        rows = tensor.clone()
        for index, class_name in enumerate(classes):
            if class_name in known:
                rows[index] = source[name][known[class_name]]
        if known and len(rows) == len(classes) + 1 and len(source[name]) == len(known) + 1:
            rows[-1] = source[name][-1]  # both have the null class of classifier-free guidance
        merged[name] = rows
    fresh.load_state_dict(merged)
    return fresh, {"carried_over": carried, "fresh": started,
                   "pretrained_classes": len(known) or None}


def for_fine_tuning(entry: Mapping[str, Any], kind: str, classes: Sequence[str], key: str,
                    null_class: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model ``init_from`` names, rebuilt for the dataset's classes (and the null class of
    classifier-free guidance), with its pretrained weights; and what was carried over."""
    pretrained = load_pretrained(entry, kind, key)
    config = dict(pretrained.model.config)
    if kind == "diffusion":
        fresh = UNet2DModel.from_config({**config, "num_class_embeds": len(classes)
                                         + int(null_class)})
    else:
        fresh = NoiseAwareClassifier.from_config({**config, "num_classes": len(classes)})
    model, report = with_dataset_classes(pretrained, kind, classes, fresh)
    report["source"] = pretrained.source
    log.info("%s: fine-tuning from %s; classes carried over: %s; starting fresh: %s", key,
             entry["path"], ", ".join(report["carried_over"]) or "none",
             ", ".join(report["fresh"]) or "none")
    return model, report


def use_pretrained(spec: Mapping[str, Any], manifest: Path, out_dir: Path) -> Pretrained:
    """Check a dataset's pretrained model and write it where a trained one would be, with the
    figures and tables a trained one comes with (DDIM samples; accuracy by timestep)."""
    import pandas as pd

    from cellflow.config import DatasetConfig
    from cellflow.data import load_split
    from cellflow.diffusion import ddim_sample
    from cellflow.figures import plot_accuracy_by_timestep, save_sample_grid
    from cellflow.io import staged_directory, write_table, write_text
    from cellflow.stages import accuracy_by_timestep
    from cellflow.training import LOG_COLUMNS

    dataset = DatasetConfig.from_dict(spec["dataset_name"], spec["dataset"])
    schedule = NoiseSchedule(**spec["noise_schedule"])
    kind, key = kind_of(spec["model"]), spec["key"]
    pretrained = load_pretrained(spec["pretrained"], kind, key, dataset.classes)
    check_against_dataset(pretrained, kind, dataset.classes, dataset.resolution, schedule, key)
    model = pretrained.model.eval()
    settings = spec["settings"]
    with staged_directory(out_dir) as staging:
        if kind == "autoencoder":
            model.save_pretrained(staging / "vae")
        elif kind == "diffusion":
            model.save_pretrained(staging / "unet")
            schedule.ddpm().save_pretrained(staging / "scheduler")
            samples = settings["samples"]
            labels = torch.arange(len(dataset.classes)).repeat_interleave(samples["per_class"])
            sampled = ddim_sample(model, schedule, labels, samples["ddim_steps"],
                                  torch.Generator().manual_seed(spec["seed"]))
            save_sample_grid(sampled, list(dataset.classes), staging / "samples.png",
                             f"{dataset.name}: class-conditional DDIM samples "
                             f"({samples['ddim_steps']} steps) of the pretrained {spec['model']}")
        else:
            model.save_pretrained(staging / "classifier")
            images, labels = load_split(manifest, "val")
            evaluation = settings["eval"]
            table = accuracy_by_timestep(model, schedule, images, labels, evaluation["bands"],
                                         evaluation["noise_draws"], spec["seed"])
            write_table(staging / "accuracy_by_t.tsv", table)
            plot_accuracy_by_timestep(
                table, 1 / len(dataset.classes), staging / "accuracy_by_t.png",
                f"{dataset.name}: pretrained noise-aware classifier, validation split")
        write_table(staging / "train_log.csv", pd.DataFrame(columns=LOG_COLUMNS))
        write_text(staging / "classes.json", json.dumps(list(dataset.classes)))
        write_text(staging / "pretrained.json", json.dumps(
            {"key": key, **pretrained.source}, indent=2, default=str))
    return pretrained
