"""Load and check a pipeline configuration; the same checks run inside Snakemake and without it.

The JSON schema in ``workflow/schemas/config.schema.yaml`` is the single description of the
configuration: it gives types, defaults and closed key sets. This module adds what a schema
cannot say (a transition must name classes of its own dataset) and turns validation errors into
messages that name the file and the dotted key.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema
import yaml

from cellflow.datasets import KINDS as DATASET_KINDS
from cellflow.generation import METHODS, methods_of
from cellflow.strategies import STRATEGIES

# In a checkout a link to workflow/schemas/config.schema.yaml (the file Snakemake validates
# with); in a built wheel a copy of it, so an installed cellflow checks configs too.
SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class GroupRule:
    """Where an image's patient or slide is read from, so that all its images share a split.

    Exactly one source is set: ``pattern`` (a regex searched on the image's path relative to
    the dataset root) or ``sheet`` with ``column`` (a sample sheet keyed by ``path_column``).
    """

    pattern: str | None = None
    sheet: Path | None = None
    column: str | None = None
    path_column: str = "path"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> GroupRule:
        """Build from one validated ``datasets.<name>.split.group`` entry."""
        return cls(
            pattern=raw.get("pattern"),
            sheet=Path(raw["sheet"]) if "sheet" in raw else None,
            column=raw.get("column"),
            path_column=raw.get("path_column", "path"),
        )


@dataclass(frozen=True)
class SplitConfig:
    val_fraction: float
    test_fraction: float
    group: GroupRule | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SplitConfig:
        """Build from one validated ``datasets.<name>.split`` entry."""
        group = raw.get("group")
        return cls(
            val_fraction=raw["val_fraction"],
            test_fraction=raw["test_fraction"],
            group=GroupRule.from_dict(group) if group is not None else None,
        )


@dataclass(frozen=True)
class SyntheticConfig:
    images_per_class: int
    image_size: int


@dataclass(frozen=True)
class PrepareConfig:
    on_corrupt: Literal["exclude", "error"]
    on_small: Literal["upscale", "error"]
    on_duplicate: Literal["drop", "error"]
    contact_sheet_images: int
    max_image_pixels: int = 1_000_000_000


@dataclass(frozen=True)
class Transition:
    source: str
    target: str


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    kind: str  # a cellflow.datasets.KINDS entry
    resolution: int
    classes: tuple[str, ...]
    transitions: tuple[Transition, ...]
    split: SplitConfig
    synthetic: SyntheticConfig | None = None  # the generator's settings: kind synthetic only
    root: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # the kind's reader settings

    @classmethod
    def from_dict(cls, name: str, raw: Mapping[str, Any]) -> DatasetConfig:
        """Build from one validated ``datasets.<name>`` entry."""
        return cls(
            name=name,
            kind=raw["kind"],
            resolution=raw["resolution"],
            classes=tuple(raw.get("classes", ())),
            transitions=tuple(Transition(**pair) for pair in raw["transitions"]),
            split=SplitConfig.from_dict(raw["split"]),
            synthetic=SyntheticConfig(**raw["synthetic"]) if "synthetic" in raw else None,
            root=Path(raw["root"]) if raw.get("root") else None,
            options=dict(raw.get("options", {})),
        )


def load_schema() -> dict[str, Any]:
    if not SCHEMA_PATH.is_file():
        raise FileNotFoundError(
            f"config schema not found at {SCHEMA_PATH}: a broken installation (reinstall "
            "cellflow, or run from its repository)"
        )
    return yaml.safe_load(SCHEMA_PATH.read_text())


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file, validate it and return it with defaults filled in."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return validate_config(raw if raw is not None else {}, source=str(path))


def merged_config(config_files: Sequence[str | Path]) -> dict[str, Any]:
    """The files' settings merged the way Snakemake merges several --configfile: in order,
    a mapping into a mapping key by key, anything else replaced."""
    merged: dict[str, Any] = {}
    for path in config_files:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        _update(merged, loaded)
    return merged


def _update(base: dict[str, Any], new: Mapping[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def load_configs(config_files: Sequence[str | Path]) -> dict[str, Any]:
    """The config a run of these files sees: merged as Snakemake merges them, validated,
    every default filled in, and the benchmark named as the workflow names it."""
    if not config_files:
        raise ConfigError("no config file given")
    config = validate_config(merged_config(config_files),
                             source=" + ".join(map(str, config_files)))
    config.setdefault("benchmark", default_benchmark_name(config_files))
    return config


def validate_config(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Return a validated copy of ``config`` with schema defaults filled in.

    Raises ConfigError listing every problem, each as ``<source>: <dotted.key>: <why>``.
    """
    config = copy.deepcopy(dict(config))
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    problems = [_describe(error) for error in validator.iter_errors(config)]
    if not problems:
        _fill_defaults(config, schema, schema)
        _resolve_pool_exclusions(config)
        problems = list(_semantic_problems(config))
    if problems:
        lines = "\n".join(f"  {source}: {problem}" for problem in sorted(set(problems)))
        raise ConfigError(f"invalid configuration in {source}:\n{lines}")
    return config


def _resolve_pool_exclusions(config: dict[str, Any]) -> None:
    """An unlabelled pool's default leakage guard: the kinds of the config's other datasets."""
    entries = config["datasets"]
    for name, entry in entries.items():
        options = entry.get("options", {})
        if "exclude_overlap_with" in options and options["exclude_overlap_with"] is None:
            options["exclude_overlap_with"] = sorted(
                {other["kind"] for other_name, other in entries.items() if other_name != name
                 and DATASET_KINDS[other["kind"]].labelled
                 and other["kind"] not in ("folder", "synthetic")})


def dataset_configs(config: Mapping[str, Any]) -> dict[str, DatasetConfig]:
    """The datasets a run covers: all of them, or those named by ``only_datasets``."""
    return {name: DatasetConfig.from_dict(name, config["datasets"][name])
            for name in _selected(config)}


def prepare_config(config: Mapping[str, Any]) -> PrepareConfig:
    return PrepareConfig(**config["prepare"])


def _dotted(path: Iterator[Any] | Any) -> str:
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in path]
    return "".join(parts).lstrip(".") or "(top level)"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _dotted(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        described = []
        for key in unknown:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = (f" (did you mean '{close[0]}'?)" if close
                    else f" (allowed: {', '.join(allowed)})")
            prefix = "" if where == "(top level)" else f"{where}."
            described.append(f"{prefix}{key}: unknown key{hint}")
        return "; ".join(described)
    return f"{where}: {error.message}"


def resolve_ref(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """``schema`` with its local $ref followed; its own keys (description, default) win."""
    while "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref are supported in the config schema, got {ref}")
        node: Any = root
        for part in ref[2:].split("/"):
            node = node[part]
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _fill_defaults(instance: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> None:
    """Insert schema defaults into ``instance`` in place, recursing through objects."""
    schema = resolve_ref(schema, root)
    if not isinstance(instance, dict):
        return
    for key, subschema in schema.get("properties", {}).items():
        subschema = resolve_ref(subschema, root)
        if key not in instance and "default" in subschema:
            instance[key] = copy.deepcopy(subschema["default"])
        if key in instance:
            _fill_defaults(instance[key], subschema, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in schema.get("properties", {}):
                _fill_defaults(value, extra, root)
    for branch in schema.get("allOf", []):
        # a conditional part (a dataset kind's options) fills its defaults where it applies
        if "then" in branch and jsonschema.Draft202012Validator(
                {**branch["if"], "$defs": root.get("$defs", {})}).is_valid(instance):
            _fill_defaults(instance, branch["then"], root)


def feature_network_run(config: Mapping[str, Any]) -> tuple[str, int]:
    """(backbone, seed) of the real-data-only downstream run used as the feature space."""
    chosen, downstream = config["evaluation"]["feature_network"], config["downstream"]
    backbone = chosen["backbone"] if chosen["backbone"] is not None else downstream["backbones"][0]
    return backbone, chosen["seed"] if chosen["seed"] is not None else downstream["seeds"][0]


def _semantic_problems(config: Mapping[str, Any]) -> Iterator[str]:
    if "benchmarks" in config["datasets"]:
        yield ("datasets.benchmarks: the name is reserved (results/benchmarks/ holds the "
               "cross-dataset outputs); rename the dataset")
    yield from _feature_network_problems(config)
    yield from _bridge_problems(config["bridge"], config["noise_schedule"])
    yield from _generation_problems(config)
    datasets = config["datasets"]
    for name in config["only_datasets"]:
        if name not in datasets:
            yield f"only_datasets: unknown dataset '{name}' (configured: {', '.join(datasets)})"
    for name, dataset in datasets.items():
        yield from DATASET_KINDS[dataset["kind"]].config_problems(name, dataset)
        if not DATASET_KINDS[dataset["kind"]].labelled:
            # a pool is only prepared (and fitted on); it has no classes to translate
            for key in ("transitions", "pretrained"):
                if dataset[key]:
                    yield (f"datasets.{name}.{key}: kind {dataset['kind']} is an unlabelled "
                           "pool; it has no classes to model or translate")
            continue
        classes = dataset["classes"]
        for index, transition in enumerate(dataset["transitions"]):
            for end in ("source", "target"):
                if transition[end] not in classes:
                    yield (
                        f"datasets.{name}.transitions[{index}].{end}: unknown class "
                        f"'{transition[end]}' (classes: {', '.join(classes)})"
                    )
            if transition["source"] == transition["target"]:
                yield f"datasets.{name}.transitions[{index}]: source and target are the same class"
        translating = [method for method in config["downstream"]["strategies"]
                       if method in METHODS and METHODS[method].from_transitions]
        if translating and not dataset["transitions"] and name in _selected(config):
            yield (f"downstream.strategies: {', '.join(translating)} need transitions, and "
                   f"dataset '{name}' has none (datasets.{name}.transitions)")
        for model, entry in dataset["pretrained"].items():
            yield from _pretrained_problems(f"datasets.{name}.pretrained.{model}", entry)
        split = dataset["split"]
        if split["val_fraction"] + split["test_fraction"] >= 0.9:
            yield f"datasets.{name}.split: val_fraction + test_fraction leaves under 10% to train"


def _generation_problems(config: Mapping[str, Any]) -> Iterator[str]:
    methods = config["generation"]["methods"]
    known = methods_of(config)
    for section in ("generation", "evaluation"):
        shards = config[section]["shards"]
        for name in shards if isinstance(shards, dict) else ():
            if name not in config["datasets"]:
                yield (f"{section}.shards.{name}: unknown dataset (configured: "
                       f"{', '.join(config['datasets'])})")
    clashing = sorted(set(config["generation"]["external"]) & (set(METHODS) | set(STRATEGIES)))
    for name in clashing:
        yield (f"generation.external.{name}: the name is taken by a built-in method or "
               "strategy; rename the entry")
    for name in methods:
        if name not in known:
            yield (f"generation.methods: unknown method '{name}' (built in: "
                   f"{', '.join(METHODS)}; or add it under generation.external)")
    for strategy in config["downstream"]["strategies"]:
        if strategy not in STRATEGIES and strategy not in known:
            yield (f"downstream.strategies.{strategy}: unknown strategy (spatial: "
                   f"{', '.join(name for name, s in STRATEGIES.items() if s.kind != 'generative')}"
                   f"; generative: {', '.join(known)})")
        elif strategy in known and strategy not in methods:
            yield (f"downstream.strategies.{strategy}: trains on the images of generation "
                   f"method '{strategy}', which generation.methods ({', '.join(methods)}) "
                   f"does not run")
    if "cellflow_cfg" in methods and not config["diffusion"]["label_dropout"]:
        trained = [name for name in _selected(config)
                   if "diffusion" not in config["datasets"][name]["pretrained"]]
        if trained:
            yield ("generation.methods: cellflow_cfg needs a diffusion model that knows the "
                   "unconditional epsilon: set diffusion.label_dropout > 0 (0.1 is usual) "
                   f"for the models trained for {', '.join(trained)}")
    for model in ("diffusion", "classifier"):
        if "init_from" in config[model]:
            yield from _pretrained_problems(f"{model}.init_from", config[model]["init_from"])


def _pretrained_problems(key: str, entry: Mapping[str, Any]) -> Iterator[str]:
    checkpoint = entry["path"].endswith(".pt")
    if checkpoint and "adm_flags" not in entry:
        yield (f"{key}.adm_flags: a guided-diffusion checkpoint ({entry['path']}) needs its "
               "architecture flags")
    for option in ("adm_flags", "checkpoint_classes", "qkv_order"):
        if not checkpoint and option in entry:
            yield (f"{key}.{option}: only for a .pt checkpoint; {entry['path']} is read as a "
                   "converted model folder")


def _bridge_problems(bridge: Mapping[str, Any], schedule: Mapping[str, Any]) -> Iterator[str]:
    steps, total = bridge["inversion_steps"], schedule["num_train_timesteps"]
    if bridge["timestep_spacing"] == "uniform" and total % steps:
        yield (f"bridge.inversion_steps: {steps} must divide noise_schedule.num_train_timesteps "
               f"({total}) with uniform timestep_spacing")
    if steps > total:
        yield f"bridge.inversion_steps: {steps} exceeds num_train_timesteps ({total})"
    if bridge["frames"] > steps:
        yield (f"bridge.frames: {bridge['frames']} stairs do not fit in {steps} inversion steps "
               f"(bridge.inversion_steps)")


def _feature_network_problems(config: Mapping[str, Any]) -> Iterator[str]:
    downstream, chosen = config["downstream"], config["evaluation"]["feature_network"]
    if "none" not in downstream["strategies"]:
        yield ("evaluation.feature_network: needs the downstream strategy 'none' (the network "
               "trained on real images only gives the in-domain feature space)")
    if chosen["backbone"] is not None and chosen["backbone"] not in downstream["backbones"]:
        yield (f"evaluation.feature_network.backbone: '{chosen['backbone']}' is not one of "
               f"downstream.backbones ({', '.join(downstream['backbones'])})")
    if chosen["seed"] is not None and chosen["seed"] not in downstream["seeds"]:
        yield (f"evaluation.feature_network.seed: {chosen['seed']} is not one of "
               f"downstream.seeds ({', '.join(map(str, downstream['seeds']))})")


def _selected(config: Mapping[str, Any]) -> list[str]:
    return config.get("only_datasets") or list(config["datasets"])


def default_benchmark_name(config_files: Sequence[str | Path]) -> str:
    """The name of a run's cross-dataset outputs when the config sets no ``benchmark``: its
    (last) config file's name, made a valid folder name (``paper`` for config/paper.yaml)."""
    if not config_files:
        return "default"
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(config_files[-1]).stem).strip("-_")
    return name or "default"


# What a config needs of the machine it runs on (files on disk, timm's model names). These
# checks read the file system and import timm (and so torch), so the workflow's parse-time
# validation above never runs them: `cellflow check-config` and `cellflow doctor` do.


def weight_paths(config: Mapping[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """(config key, path, must be a file) of every weights path and imported-image root of a
    validated config."""
    for name, dataset in config["datasets"].items():
        for model, entry in dataset.get("pretrained", {}).items():
            yield f"datasets.{name}.pretrained.{model}.path", entry["path"], False
    for model in ("diffusion", "classifier"):
        if "init_from" in config[model]:
            yield f"{model}.init_from.path", config[model]["init_from"]["path"], False
    for backbone, path in config["downstream"]["pretrained"].items():
        yield f"downstream.pretrained.{backbone}", path, True
    if config["evaluation"]["inception_weights"]:
        yield "evaluation.inception_weights", config["evaluation"]["inception_weights"], True
    for method, entry in config["generation"]["external"].items():
        yield f"generation.external.{method}.root", entry["root"], False


def data_paths(config: Mapping[str, Any]) -> Iterator[tuple[str, str, Literal["file", "folder"]]]:
    """(config key, path, what it must be) of the data the selected datasets read: each root
    (every kind but synthetic), sample sheet and split-list folder."""
    for name in _selected(config):
        entry = config["datasets"][name]
        if entry["kind"] != "synthetic":
            yield f"datasets.{name}.root", entry["root"], "folder"
        group = entry["split"].get("group") or {}
        if "sheet" in group:
            yield f"datasets.{name}.split.group.sheet", group["sheet"], "file"
        if entry.get("options", {}).get("split_lists"):
            yield f"datasets.{name}.options.split_lists", entry["options"]["split_lists"], "folder"


def fitted_by_this_run(config: Mapping[str, Any], path: str) -> bool:
    """Whether ``path`` is a model this run fits on one of its unlabelled pools
    (results/<pool>/models/...), so that it need not exist yet."""
    pools = [f"results/{name}/models/" for name, entry in config["datasets"].items()
             if not DATASET_KINDS[entry["kind"]].labelled]
    return any(os.path.normpath(path).startswith(pool) for pool in pools)


def path_problem(path: str, must_be: Literal["file", "folder", "any"] = "any") -> str | None:
    """Why ``path`` cannot be read as it must be, or None."""
    target = Path(path)
    if must_be == "folder" and not target.is_dir():
        return f"{path} does not exist or is not a folder"
    if not target.exists():
        return f"{path} not found"
    if must_be == "file" and not target.is_file():
        return f"{path} is not a file"
    if target.is_file() and (target.stat().st_size == 0 or not os.access(target, os.R_OK)):
        return f"{path} is empty or unreadable"
    return None


def backbone_problems(config: Mapping[str, Any]) -> Iterator[str]:
    """Every downstream backbone that is no timm model name, with the closest names."""
    import timm  # lazily: it imports torch, which the workflow's parse never needs

    known: list[str] | None = None
    for index, name in enumerate(config["downstream"]["backbones"]):
        if timm.is_model(name):
            continue
        known = known if known is not None else timm.list_models()
        close = difflib.get_close_matches(name, known, n=1)
        hint = (f" (did you mean {close[0]}?)" if close
                else " (`python -c 'import timm; print(timm.list_models())'` lists them)")
        yield f"downstream.backbones[{index}]: unknown timm model '{name}'{hint}"


def environment_problems(config: Mapping[str, Any], backbones: bool = True) -> list[str]:
    """What stops a validated config from running on this machine, each as ``<key>: <why>``:
    a missing data root, sample sheet or split list, a missing weights file or model folder
    (not those this run fits on its pools), and, with ``backbones``, an unknown timm model."""
    problems = []
    for key, path, must_be in data_paths(config):
        problem = path_problem(path, must_be)
        if problem:
            problems.append(f"{key}: {problem}")
    for key, path, must_be_file in weight_paths(config):
        if not fitted_by_this_run(config, path):
            problem = path_problem(path, "file" if must_be_file else "any")
            if problem:
                problems.append(f"{key}: {problem}")
    if backbones:
        problems += backbone_problems(config)
    return problems


def typed_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` (Snakemake's ``--config``) with the scalars the schema types restored.

    Snakemake reads a nested ``--config 'bridge={"runtime_minutes": 30}'`` with YAML's base
    loader, which keeps every scalar a string; a string where the schema allows no string
    is read as YAML (``"30"`` -> 30, ``"true"`` -> True) and kept when it then has a type
    the schema allows; ``null`` is None wherever null is allowed. Class names and other
    strings stay strings.
    """
    schema = load_schema()
    return _typed(dict(overrides), schema, schema)


_JSON_TYPES = {"integer": int, "number": (int, float), "boolean": bool, "null": type(None)}


def _allowed_types(schema: Mapping[str, Any], root: Mapping[str, Any]) -> set[str]:
    schema = resolve_ref(schema, root)
    kinds = schema.get("type", [])
    types = set(kinds if isinstance(kinds, list) else [kinds])
    for choice in ("oneOf", "anyOf"):
        for branch in schema.get(choice, []):
            types |= _allowed_types(branch, root)
    if "enum" in schema:
        types |= {"string" if isinstance(v, str) else "number" for v in schema["enum"]}
    return types


def _typed(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any]) -> Any:
    schema = resolve_ref(schema, root)
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        return {key: _typed(item, schema.get("properties", {}).get(
                    key, extra if isinstance(extra, Mapping) else {}), root)
                for key, item in value.items()}
    if isinstance(value, list):
        items = schema.get("items", {})
        return [_typed(item, items, root) for item in value]
    if not isinstance(value, str):
        return value
    types = _allowed_types(schema, root)
    if not types:
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if "string" in types:  # a string stays one, but for the null of a "string or null" key
        return None if parsed is None and "null" in types else value
    wanted = tuple(_JSON_TYPES[kind] for kind in types if kind in _JSON_TYPES)
    # bool is an int to Python: a "true" is a boolean only where the schema has one
    if isinstance(parsed, bool) and "boolean" not in types:
        return value
    return parsed if wanted and isinstance(parsed, wanted) else value
