"""The generation methods: what each one needs, what it writes, how its images are labelled.

This registry is the one list of generative methods. The config schema's enum, the Snakemake
rules (one ``generate`` rule with a ``{method}`` wildcard, its model inputs, its job spec), the
downstream strategies, the evaluation image sets and the figures all read it, so a new method
is one entry here and one function. It imports nothing heavy: the workflow reads it when it
parses, and the entry points load their module only when a job runs.

Every method writes ``<out>/manifest.tsv`` in the format of :mod:`cellflow.generation.common`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["LATENT_MODELS", "METHODS", "GenerationMethod", "external_method", "hard_class",
           "job_settings", "method", "methods_of"]

# The bridge settings the one-shot baselines use; the rest (stairs, frames, soft labels,
# classifier scale) are the Cellflow bridge's own.
SHARED_BRIDGE_KEYS = ("inversion_steps", "timestep_spacing", "batch_size", "max_rows_per_call")
BRIDGE_COUNTERS = ("unet_evaluations", "unet_calls", "sequential_rounds",
                   "classifier_evaluations")
LATENT_COUNTERS = ("model_evaluations", "model_calls", "decoder_evaluations")


@dataclass(frozen=True)
class GenerationMethod:
    name: str
    summary: str
    reference: str
    # trained models its job reads, by the name of results/{dataset}/models/<name>
    models: tuple[str, ...]
    # True: translates real training images along the dataset's transitions; False: samples
    # every class from noise
    from_transitions: bool
    labels: Literal["soft", "hard"]
    # what each output row is: a trajectory frame, a translated source, or a class sample
    writes: Literal["trajectory frames", "translations", "class samples", "imported images"]
    # the work counters of its generation.json
    counters: tuple[str, ...]
    # "all" bridge settings, only the "shared" schedule and batching ones, or "none"
    bridge: Literal["all", "shared", "none"]
    # its own config section, as a dotted path, or None
    section: str | None
    seeded: bool  # draws its own noise from the run's seed
    entry_point: str  # "module:function", called with a GenerationJob

    def run(self, job: Any) -> Any:
        module, function = self.entry_point.split(":")
        runner: Callable[[Any], Any] = getattr(importlib.import_module(module), function)
        return runner(job)


METHODS: Mapping[str, GenerationMethod] = MappingProxyType({m.name: m for m in (
    GenerationMethod(
        "cellflow", "stair-bridge trajectories, classifier guidance",
        "this project (shared/reference/cellflow-algorithm.md sections 4.1-4.8)",
        models=("diffusion", "classifier"), from_transitions=True, labels="soft",
        writes="trajectory frames", counters=BRIDGE_COUNTERS,
        bridge="all", section=None, seeded=False,
        entry_point="cellflow.generation.cellflow:run"),
    GenerationMethod(
        "cellflow_cfg", "stair-bridge trajectories, classifier-free guidance",
        "the upstream CFG variant (cellflow-algorithm.md section 4.11); Ho & Salimans 2022, "
        "arXiv:2207.12598",
        # the classifier only measures p(target | frame) here; it never guides
        models=("diffusion", "classifier"), from_transitions=True, labels="soft",
        writes="trajectory frames", counters=BRIDGE_COUNTERS,
        bridge="all", section="generation.cellflow_cfg", seeded=False,
        entry_point="cellflow.generation.cellflow:run_cfg"),
    GenerationMethod(
        "ddib", "full DDIM inversion, unguided decoding with the target label",
        "Su et al. 2023 (ICLR), arXiv:2203.08382",
        models=("diffusion",), from_transitions=True, labels="hard",
        writes="translations", counters=BRIDGE_COUNTERS,
        bridge="shared", section="baselines.ddib", seeded=False,
        entry_point="cellflow.generation.ddib:run"),
    GenerationMethod(
        "adm", "class-conditional DDIM samples with classifier guidance",
        "Dhariwal & Nichol 2021 (NeurIPS), arXiv:2105.05233",
        models=("diffusion", "classifier"), from_transitions=False, labels="hard",
        writes="class samples", counters=BRIDGE_COUNTERS,
        bridge="shared", section="baselines.adm", seeded=True,
        entry_point="cellflow.generation.adm:run"),
    GenerationMethod(
        "ldm", "class-conditional latent diffusion, classifier-free guidance",
        "Rombach et al. 2022 (CVPR), arXiv:2112.10752",
        models=("autoencoder", "ldm"), from_transitions=False, labels="hard",
        writes="class samples", counters=LATENT_COUNTERS,
        bridge="none", section="baselines.ldm", seeded=True,
        entry_point="cellflow.generation.ldm:run"),
    GenerationMethod(
        "dit", "class-conditional diffusion transformer in latent space, classifier-free "
        "guidance", "Peebles & Xie 2023 (ICCV), arXiv:2212.09748",
        models=("autoencoder", "dit"), from_transitions=False, labels="hard",
        writes="class samples", counters=LATENT_COUNTERS,
        bridge="none", section="baselines.dit", seeded=True,
        entry_point="cellflow.generation.dit:run"),
)})

# Models that generation methods read beyond the diffusion model and the classifier, each
# trained by its own rule: results/{dataset}/models/<name>.
LATENT_MODELS = ("ldm", "dit")


def external_method(name: str, entry: Mapping[str, Any]) -> GenerationMethod:
    """A ``generation.external`` entry: images made elsewhere (e.g. StyleGAN-XL), imported."""
    return GenerationMethod(
        name, "images generated outside the pipeline, imported per class",
        entry.get("reference") or "external generator (generation.external)",
        models=(), from_transitions=False, labels="hard", writes="imported images",
        counters=(), bridge="none",
        section=f"generation.external.{name}", seeded=False,
        entry_point="cellflow.generation.external:run")


def methods_of(config: Mapping[str, Any]) -> dict[str, GenerationMethod]:
    """The registry and this config's external entries, by name."""
    external = config.get("generation", {}).get("external", {})
    return {**METHODS, **{name: external_method(name, entry)
                          for name, entry in external.items()}}


def method(name: str, settings: Mapping[str, Any] | None = None) -> GenerationMethod:
    """A registered method, or an external one given its ``generation.external`` entry."""
    if name in METHODS:
        return METHODS[name]
    if settings is not None and "root" in settings:
        return external_method(name, settings)
    raise ValueError(f"unknown generation method '{name}' (known: {', '.join(METHODS)}, or a "
                     "generation.external entry)")


def job_settings(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``config`` that one method's job depends on, and nothing else, so that
    changing another method's settings never reruns this one."""
    known = methods_of(config)
    if name not in known:
        raise ValueError(f"unknown generation method '{name}' (known: {', '.join(known)})")
    chosen = known[name]
    bridge = {key: value for key, value in config["bridge"].items()
              if key not in ("runtime_minutes", "gpus")}
    if chosen.bridge == "shared":
        bridge = {key: bridge[key] for key in SHARED_BRIDGE_KEYS}
    elif chosen.bridge == "none":
        bridge = {}
    settings: dict[str, Any] = {"bridge": bridge, "method": {}}
    if chosen.section is not None:
        node: Any = config
        for part in chosen.section.split("."):
            node = node[part]
        settings["method"] = dict(node)
    if chosen.entry_point.startswith("cellflow.generation.external:"):
        settings["method"]["name"] = name
    if chosen.seeded:
        settings["seed"] = config["seed"]
    return settings


def hard_class(manifest: pd.DataFrame) -> pd.Series:
    """The class a generated image counts as (a manifest's rows): its target once the target
    weight reaches 1/2, its source before."""
    return manifest["target_class"].where(manifest["soft_label_weight"] >= 0.5,
                                          manifest["source_class"])
