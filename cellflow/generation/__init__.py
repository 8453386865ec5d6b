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
from typing import Any, Literal

__all__ = ["METHODS", "GenerationMethod", "method", "job_settings"]

# The bridge settings the one-shot baselines use; the rest (stairs, frames, soft labels,
# classifier scale) are the Cellflow bridge's own.
SHARED_BRIDGE_KEYS = ("inversion_steps", "timestep_spacing", "batch_size", "max_rows_per_call")


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
    # "all" bridge settings, or only the "shared" schedule and batching ones
    bridge: Literal["all", "shared"]
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
        bridge="all", section=None, seeded=False,
        entry_point="cellflow.generation.cellflow:run"),
    GenerationMethod(
        "cellflow_cfg", "stair-bridge trajectories, classifier-free guidance",
        "the upstream CFG variant (cellflow-algorithm.md section 4.11); Ho & Salimans 2022, "
        "arXiv:2207.12598",
        # the classifier only measures p(target | frame) here; it never guides
        models=("diffusion", "classifier"), from_transitions=True, labels="soft",
        bridge="all", section="generation.cellflow_cfg", seeded=False,
        entry_point="cellflow.generation.cellflow:run_cfg"),
    GenerationMethod(
        "ddib", "full DDIM inversion, unguided decoding with the target label",
        "Su et al. 2023 (ICLR), arXiv:2203.08382",
        models=("diffusion",), from_transitions=True, labels="hard",
        bridge="shared", section="baselines.ddib", seeded=False,
        entry_point="cellflow.generation.ddib:run"),
    GenerationMethod(
        "adm", "class-conditional DDIM samples with classifier guidance",
        "Dhariwal & Nichol 2021 (NeurIPS), arXiv:2105.05233",
        models=("diffusion", "classifier"), from_transitions=False, labels="hard",
        bridge="shared", section="baselines.adm", seeded=True,
        entry_point="cellflow.generation.adm:run"),
)})


def method(name: str) -> GenerationMethod:
    if name not in METHODS:
        raise ValueError(f"unknown generation method '{name}' (known: {', '.join(METHODS)})")
    return METHODS[name]


def job_settings(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``config`` that one method's job depends on, and nothing else, so that
    changing another method's settings never reruns this one."""
    chosen = method(name)
    bridge = {key: value for key, value in config["bridge"].items()
              if key not in ("runtime_minutes", "gpus")}
    if chosen.bridge == "shared":
        bridge = {key: bridge[key] for key in SHARED_BRIDGE_KEYS}
    settings: dict[str, Any] = {"bridge": bridge, "method": {}}
    if chosen.section is not None:
        node: Any = config
        for part in chosen.section.split("."):
            node = node[part]
        settings["method"] = node
    if chosen.seeded:
        settings["seed"] = config["seed"]
    return settings
