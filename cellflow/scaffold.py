"""A complete, commented config for one dataset (``cellflow new-dataset``), and the effective
config of a run (``cellflow show-config``).

``new-dataset`` reads the classes from the data (class folders) or from the dataset kind's
registry entry (an official layout), takes every model, training, generation, downstream and
evaluation size from a preset (``config/config.yaml``: the demo's tiny models; or
``config/paper.yaml``: the paper's), turns every downstream strategy on (none, every batch
augmentation and every generation method, Cellflow included) and writes the whole effective
config, each key with the one-line meaning the schema gives it. What it writes is validated
before it is written, and read back to check that the file says exactly that.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cellflow.config import (
    DatasetConfig,
    load_configs,
    load_schema,
    merged_config,
    resolve_ref,
    validate_config,
)
from cellflow.datasets import KINDS as DATASET_KINDS
from cellflow.datasets import DataError
from cellflow.datasets.common import IMAGE_EXTENSIONS, SPLITS
from cellflow.generation import METHODS
from cellflow.strategies import STRATEGIES

# The preset files, relative to the repository; the demo's latent baselines (autoencoder,
# LDM, DiT) have their tiny sizes in the file layered over the demo config.
PRESETS: Mapping[str, tuple[str, ...]] = {
    "demo": ("config/config.yaml", "config/demo-baselines.yaml"),
    "paper": ("config/paper.yaml",),
}
PRESET_SUMMARIES = {
    "demo": "tiny models and short training, minutes on a laptop CPU; trained for seconds, "
            "the models sample noise, not tissue: this checks the wiring, not the science",
    "paper": "the paper's models and training (guided-diffusion's 256-px ADM and its "
             "classifier, the latent baselines, every backbone and seed): GPU days per dataset",
}
# A preset gives every setting but these (and the downstream strategies, which are all on).
OWN_KEYS = ("datasets", "benchmark", "only_datasets")
# cellflow_cfg needs a diffusion model that also learned the unconditional epsilon.
CFG_LABEL_DROPOUT = 0.1
# The kinds new-dataset writes a config for: every labelled kind read from disk.
UNSUPPORTED_KINDS = {
    "synthetic": "kind synthetic is the generated demo dataset (config/config.yaml); "
                 "new-dataset writes a config for data on disk",
    "cpia": "kind cpia is an unlabelled pretraining pool, not a benchmark dataset: add it "
            "beside a benchmark dataset in that dataset's config (README \"Datasets\", CPIA)",
}
# BreastPathQ's cellularity bins have no names in the download; these are the README's for
# the default bin edges {0}, (0, 0.3], (0.3, 0.7], (0.7, 1].
BREASTPATHQ_BINS = ("none", "low", "medium", "high")
LINE = 96  # the width comments are wrapped to


class ScaffoldError(ValueError):
    """A config that cannot be written; the message names the folder, file or option."""


def _name_rule(definition: str) -> re.Pattern[str]:
    """A naming rule of the config schema (``$defs.<definition>.pattern``)."""
    return re.compile(load_schema()["$defs"][definition]["pattern"])


def repository_root() -> Path:
    """The checkout the package runs from (the preset files sit in its config/)."""
    return Path(__file__).resolve().parent.parent


def preset_files(preset: str) -> list[Path]:
    if preset not in PRESETS:
        raise ScaffoldError(f"--preset {preset}: unknown preset (known: {', '.join(PRESETS)})")
    files = [repository_root() / name for name in PRESETS[preset]]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise ScaffoldError(
            f"--preset {preset} reads {', '.join(PRESETS[preset])} of the cellflow "
            f"repository, and {', '.join(missing)} is not there: this cellflow is installed "
            f"without its repository ({Path(__file__).resolve().parent}). Run cellflow from "
            "a clone of the repository (`pip install -e .` in it, or `make setup`)")
    return files


def preset_config(preset: str) -> dict[str, Any]:
    """The preset's settings, validated and with every default filled in."""
    files = preset_files(preset)
    return validate_config(merged_config(files), source=" + ".join(map(str, files)))


@dataclass
class DatasetDraft:
    """A dataset's config entry, and what was found on disk to write beside it."""

    entry: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)  # images per class found on disk
    layout: str = ""  # one line on what the root holds
    skipped: list[str] = field(default_factory=list)  # folders that are not classes
    warnings: list[str] = field(default_factory=list)
    # options without a default: (commented-out example line, its meaning)
    commented_options: list[tuple[str, str]] = field(default_factory=list)


def _images_under(folder: Path) -> int:
    """The image files the class-folder reader reads under ``folder`` (sub-folders too)."""
    return sum(1 for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS
               and not path.name.startswith(".") and path.is_file())


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def folder_draft(root: Path) -> DatasetDraft:
    """Classes from the class folders of ``root`` (``root/<class>/`` or
    ``root/{train,val,test}/<class>/``, as the folder kind reads them), in sorted order."""
    layout_help = ("ROOT must hold one folder of images per class, ROOT/<class>/ with "
                   f"{', '.join(sorted(IMAGE_EXTENSIONS))} files, or ROOT/{{train,val,test}}/"
                   "<class>/ to keep an official split")
    if not root.is_dir():
        raise ScaffoldError(f"{root}: no such folder ({layout_help})")
    splits = [p.name for p in _subfolders(root) if p.name in SPLITS]
    official = "train" in splits
    bases = [(root / split, split) for split in splits] if official else [(root, "")]
    per_class: dict[str, Counter[str]] = {}
    present: dict[str, set[str]] = {}
    skipped = []
    for base, split in bases:
        for folder in _subfolders(base):
            present.setdefault(split, set()).add(folder.name)
            images = _images_under(folder)
            if images:
                per_class.setdefault(folder.name, Counter())[split] += images
            else:
                skipped.append(f"{folder.relative_to(root)}/ (no images)")
    classes = sorted(per_class)
    where = f"{root}/train" if official else str(root)
    if not classes:
        loose = any(path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
                    for path in root.iterdir())
        hint = ("; it holds images itself: ROOT is the folder above the class folders"
                if loose else "")
        raise ScaffoldError(f"{where}: no class folders with images{hint} ({layout_help})")
    if len(classes) == 1:
        raise ScaffoldError(
            f"{where}: only one class folder with images ({classes[0]}/); a dataset needs at "
            f"least two classes ({layout_help})")
    class_name = _name_rule("class_name")
    bad = [name for name in classes if not class_name.match(name)]
    if bad:
        raise ScaffoldError(
            f"{where}: class folder name(s) {', '.join(map(repr, bad))} cannot be class names "
            "(letters, digits and _ . + -, starting with a letter or digit: a class name is "
            "also a folder name of every stage's outputs); rename the folder(s)")
    for split in splits if official else ():
        missing = [name for name in classes if name not in present.get(split, set())]
        if missing and split != "val":
            raise ScaffoldError(
                f"{root / split}: no folder for class(es) {', '.join(missing)}; with an "
                f"official split every class needs a folder in train/ and test/ (val/ is "
                "optional: else carved from train)")
    draft = DatasetDraft(
        entry={"kind": "folder", "classes": classes},
        counts={name: sum(per_class[name].values()) for name in classes},
        layout=(f"official split folders {', '.join(splits)}" if official
                else "one folder per class; val and test are carved from it (split)"),
        skipped=skipped)
    for name in classes:
        if draft.counts[name] < 3:
            draft.warnings.append(
                f"{root}: class '{name}' has {draft.counts[name]} image(s); each class needs "
                "at least three readable images (train, val and test)")
    return draft


def _kind_options_schema(kind: str) -> Mapping[str, Any]:
    """The schema of ``datasets.<name>.options`` for ``kind`` (its allOf branch)."""
    schema = load_schema()
    defs = schema["$defs"]
    for branch in defs["dataset"].get("allOf", []):
        options = branch.get("then", {}).get("properties", {}).get("options")
        if options and jsonschema.Draft202012Validator(
                {**branch["if"], "$defs": defs}).is_valid({"kind": kind}):
            return resolve_ref(options, schema)
    return {}


def official_draft(kind: str, root: Path) -> DatasetDraft:
    """The classes an official layout declares, and its options at their documented
    defaults (those without a default are written as comments)."""
    properties = _kind_options_schema(kind).get("properties", {})
    options = {key: value["default"] for key, value in properties.items() if "default" in value}
    if kind == "breastpathq":
        from cellflow.datasets.breastpathq import bin_edges

        edges = bin_edges(options)
        classes = (list(BREASTPATHQ_BINS) if len(edges) == len(BREASTPATHQ_BINS) - 1
                   else [f"bin{index}" for index in range(len(edges) + 1)])
    else:
        known = DATASET_KINDS[kind].known_classes
        if known is None:
            raise ScaffoldError(f"kind {kind} declares no classes; write its config by hand")
        classes = list(known(options))
    draft = DatasetDraft(entry={"kind": kind, "classes": classes, "options": options},
                         layout=DATASET_KINDS[kind].summary)
    draft.commented_options = [
        (f"{key}: <{value.get('type', 'value')}>", _first_sentence(value.get("description", "")))
        for key, value in properties.items() if "default" not in value]
    if not root.is_dir():
        draft.warnings.append(
            f"{root}: no such folder yet; download and unpack the {kind} dataset there "
            f"(README \"Datasets\"): `cellflow check-config` and `cellflow doctor` check it")
    return draft


def survey(draft: DatasetDraft, name: str, root: Path, resolution: int) -> None:
    """Count an official layout's images per class from its annotation files (never
    decoding an image); a layout that does not read is a warning, not an error."""
    from cellflow.doctor import warnings_logged

    if not root.is_dir():
        return
    entry = validate_config({"datasets": {name: {**draft.entry, "root": str(root),
                                                 "resolution": resolution}}})
    dataset = DatasetConfig.from_dict(name, entry["datasets"][name])
    try:
        with warnings_logged() as warned:
            listing = DATASET_KINDS[dataset.kind].quick_listing(dataset, root)
    except (DataError, OSError) as err:
        draft.warnings.append(f"{root} does not read as a {dataset.kind} download yet: {err}")
        return
    draft.warnings += warned
    per_class = Counter(raw.label_name for raw in listing.images)
    draft.counts = {class_name: per_class.get(class_name, 0) for class_name in dataset.classes}


def _consecutive(classes: Sequence[str]) -> list[dict[str, str]]:
    return [{"source": a, "target": b} for a, b in zip(classes, classes[1:], strict=False)]


def _required_multiple(config: Mapping[str, Any]) -> list[tuple[int, str]]:
    """(side multiple, why) for every model of ``config`` that halves the image side."""
    needs = []
    for model in ("diffusion", "classifier"):
        if "init_from" not in config[model]:
            levels = len(config[model]["model"]["block_out_channels"])
            needs.append((2 ** (levels - 1), f"{model}.model has {levels} levels"))
    methods = config["generation"]["methods"]
    if "ldm" in methods or "dit" in methods:
        factor = config["autoencoder"]["model"]["factor"]
        needs.append((factor, f"the autoencoder is KL-f{factor}"))
        if "ldm" in methods:
            levels = len(config["ldm"]["model"]["block_out_channels"])
            needs.append((factor * 2 ** (levels - 1),
                          f"ldm.model has {levels} levels on KL-f{factor} latents"))
        if "dit" in methods:
            patch = config["dit"]["model"]["patch_size"]
            needs.append((factor * patch, f"dit.model's patch size {patch} on KL-f{factor} "
                                          "latents"))
    return needs


def _check_resolution(config: Mapping[str, Any], resolution: int, preset: str) -> None:
    needs = _required_multiple(config)
    multiple = math.lcm(*(n for n, _ in needs)) if needs else 1
    if resolution % multiple:
        why = "; ".join(f"{reason}: {n}" for n, reason in needs if resolution % n)
        raise ScaffoldError(
            f"--resolution {resolution}: the {preset} preset's models need a multiple of "
            f"{multiple} ({why}); e.g. {max(multiple, round(resolution / multiple) * multiple)}")


@dataclass
class Scaffold:
    """A written (or to be written) config, and what to tell the user about it."""

    config: dict[str, Any]  # validated, defaults filled: what the file says
    text: str
    draft: DatasetDraft
    name: str
    preset: str
    warnings: list[str]


def new_dataset_config(name: str, root: str | Path, kind: str = "folder", preset: str = "demo",
                       resolution: int | None = None, command: str = "") -> Scaffold:
    """The complete config of one dataset, validated, and its commented YAML text."""
    if not _name_rule("name").match(name) or name == "benchmarks":
        raise ScaffoldError(
            f"{name!r}: a dataset name is letters, digits, '_' and '-', starting with a letter "
            "or digit (it names results/<name>/), and not 'benchmarks'")
    if kind in UNSUPPORTED_KINDS:
        raise ScaffoldError(f"--kind {kind}: {UNSUPPORTED_KINDS[kind]}")
    if kind not in DATASET_KINDS:
        usable = [k for k in DATASET_KINDS if k not in UNSUPPORTED_KINDS]
        raise ScaffoldError(f"--kind {kind}: unknown dataset kind (known: {', '.join(usable)})")
    root = Path(root)
    base = preset_config(preset)
    if resolution is None:
        resolution = next(iter(base["datasets"].values()))["resolution"]
    draft = folder_draft(root) if kind == "folder" else official_draft(kind, root)
    if kind != "folder":
        survey(draft, name, root, resolution)
    classes = draft.entry["classes"]
    # relative paths in a config start where snakemake runs: the repository
    here = Path.cwd().resolve() == repository_root()
    written_root = os.path.normpath(root) if root.is_absolute() or here else str(root.resolve())
    entry = {"kind": kind, "root": written_root, "resolution": resolution,
             "classes": classes, "transitions": _consecutive(classes)}
    if draft.entry.get("options"):
        entry["options"] = draft.entry["options"]
    raw: dict[str, Any] = {key: value for key, value in base.items() if key not in OWN_KEYS}
    raw.update(benchmark=name, only_datasets=[], datasets={name: entry})
    methods = [m for m, method in METHODS.items()
               if entry["transitions"] or not method.from_transitions]
    raw["generation"] = {**raw["generation"], "methods": methods}
    if "cellflow_cfg" in methods and not raw["diffusion"]["label_dropout"]:
        raw["diffusion"] = {**raw["diffusion"], "label_dropout": CFG_LABEL_DROPOUT}
    raw["downstream"] = {**raw["downstream"], "strategies": {
        strategy: dict(registered.defaults) for strategy, registered in STRATEGIES.items()
        if registered.kind != "generative" or strategy in methods}}
    backbones = raw["downstream"]["backbones"]
    if raw["evaluation"]["feature_network"]["backbone"] not in (None, *backbones):
        raw["evaluation"]["feature_network"]["backbone"] = None
    _check_resolution(raw, resolution, preset)
    config = validate_config(raw, source=f"the config of dataset {name}")
    dataset = config["datasets"][name]
    if not dataset["options"] and not _kind_options_schema(kind).get("properties"):
        del dataset["options"]
    ordered = schema_ordered(config)
    text = render(ordered, _comments(ordered, name, draft, preset, command))
    written = yaml.safe_load(text)
    if validate_config(written) != validate_config(ordered):  # the renderer's own check
        raise AssertionError("new-dataset: the YAML written does not read back as the config")
    return Scaffold(validate_config(written), text, draft, name, preset, list(draft.warnings))


def write_new_dataset(name: str, root: str | Path, output: str | Path | None = None,
                      kind: str = "folder", preset: str = "demo",
                      resolution: int | None = None, force: bool = False,
                      command: str = "") -> tuple[Path, Scaffold]:
    """Write the config of :func:`new_dataset_config` to ``output`` (config/<name>.yaml)."""
    output = Path(output) if output is not None else Path("config") / f"{name}.yaml"
    if output.exists() and not force:
        raise ScaffoldError(f"{output} already exists; pass --force to overwrite it (or "
                            "--output to write another file)")
    if output.is_dir():
        raise ScaffoldError(f"{output} is a folder; --output names the YAML file to write")
    scaffold = new_dataset_config(name, root, kind, preset, resolution, command)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(scaffold.text)
    return output, scaffold


def describe(output: Path, scaffold: Scaffold) -> str:
    """What was written, and the commands to run next."""
    config, name = scaffold.config, scaffold.name
    dataset, downstream = config["datasets"][name], config["downstream"]
    counts = scaffold.draft.counts
    classes = ", ".join(f"{c} {counts[c]}" if c in counts else c for c in dataset["classes"])
    runs = len(downstream["backbones"]) * len(downstream["strategies"]) * len(downstream["seeds"])
    shown = str(output)
    lines = [
        f"wrote {shown}: dataset '{name}' ({dataset['kind']}, {dataset['resolution']} px), "
        f"{len(dataset['classes'])} classes ({classes}{' images' if counts else ''}), "
        f"{len(dataset['transitions'])} transition(s) of consecutive classes: edit them to "
        "the biological progression",
        f"  {scaffold.preset} preset: {PRESET_SUMMARIES[scaffold.preset]}",
        f"  generation: {', '.join(config['generation']['methods'])}; downstream: "
        f"{len(downstream['strategies'])} strategies x {len(downstream['backbones'])} "
        f"backbone(s) x {len(downstream['seeds'])} seed(s) = {runs} runs; outputs in "
        f"results/{name}/ and results/benchmarks/{config['benchmark']}/",
        "next:",
        f"  cellflow check-config {shown}        # the schema, data root, weights, backbones",
        f"  snakemake -n --configfile {shown}    # the plan, job by job",
        f"  cellflow doctor --configfile {shown} # before a long run: images, disk, GPUs",
        f"  snakemake --cores all --configfile {shown}",
    ]
    here = Path.cwd().resolve()
    workflow = any((repository_root() / name).is_file()
                   for name in ("Snakefile", "workflow/Snakefile"))
    if here != repository_root() and workflow:
        lines.append(f"  (snakemake runs in the repository, {repository_root()}; relative "
                     "paths in the config start there)")
    return "\n".join(lines)


# --- show-config ---------------------------------------------------------------------------


def show_config_text(config_files: Sequence[str | Path], comments: bool = False) -> str:
    config = load_configs(config_files)
    notes = _Comments(_schema_descriptions(config)) if comments else _Comments({})
    header = [f"# the effective config of {' + '.join(map(str, config_files))} (merged in "
              "order, validated, defaults filled)"]
    return "\n".join(header) + "\n" + render(schema_ordered(config), notes)


# --- rendering -----------------------------------------------------------------------------


def _flow(value: Any) -> str:
    """``value`` as one line of YAML (flow style for lists and mappings)."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_flow(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    # a scalar as PyYAML quotes it (strings that read as numbers, booleans, '1+', ...)
    return yaml.safe_dump([value], default_flow_style=True, width=1_000_000,
                          allow_unicode=True).strip()[1:-1]


@dataclass
class _Comments:
    """Comments of the rendered YAML by key path: ``after`` (end of line, or wrapped above
    when too long), ``before`` (lines above), ``inside`` (commented-out lines at the end of a
    mapping's keys), ``blank`` (a blank line above)."""

    after: dict[tuple[str, ...], str]
    before: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    inside: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    blank: set[tuple[str, ...]] = field(default_factory=set)


def render(config: Mapping[str, Any], comments: _Comments) -> str:
    lines: list[str] = []
    _render_mapping(config, (), 0, lines, comments)
    return "\n".join(lines) + "\n"


def _comment_lines(text: str, pad: str) -> list[str]:
    return [f"{pad}# {line}" for line in textwrap.wrap(
        text, max(40, LINE - len(pad) - 2), break_long_words=False, break_on_hyphens=False)]


def _render_mapping(value: Mapping[str, Any], path: tuple[str, ...], indent: int,
                    lines: list[str], comments: _Comments) -> None:
    pad = " " * indent
    for key, item in value.items():
        here = (*path, str(key))
        if here in comments.blank and lines:
            lines.append("")
        for text in comments.before.get(here, []):
            lines += _comment_lines(text, pad) if text else [f"{pad}#"]
        note = comments.after.get(here)
        head = f"{pad}{_flow(key)}:"
        nested = isinstance(item, Mapping) and bool(item)
        records = (isinstance(item, list) and bool(item)
                   and all(isinstance(v, Mapping) for v in item))
        line = head if nested or records else f"{head} {_flow(item)}"
        if note and len(line) + len(note) + 4 <= LINE and not (nested and not path):
            lines.append(f"{line}  # {note}")
        else:
            lines += _comment_lines(note, pad) if note else []
            lines.append(line)
        if nested:
            _render_mapping(item, here, indent + 2, lines, comments)
        elif records:
            lines += [f"{pad}  - {_flow(record)}" for record in item]
        inside = comments.inside.get(here, [])
        if inside and isinstance(item, Mapping) and not item:
            # examples of an empty mapping: the whole entry, commented out, to replace it
            lines.append(f"{pad}# {_flow(key)}:")
            lines += [f"{pad}#   {text}" for text in inside]
        else:
            lines += [f"{pad}  # {text}" for text in inside]


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.search(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)(?<!\bal)\.(\s|$)", text)
    return text[:match.start() + 1] if match else text


def _schema_descriptions(config: Mapping[str, Any]) -> dict[tuple[str, ...], str]:
    """The first sentence of the schema's description of every key of ``config``."""
    schema = load_schema()
    found: dict[tuple[str, ...], str] = {}
    _describe(config, schema, (), schema, found)
    return found


def _properties(instance: Mapping[str, Any], node: Mapping[str, Any],
                root: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The schemas of ``instance``'s keys, in the schema's order: the node's properties and
    those of the conditional parts that apply to it (a dataset kind's options)."""
    properties = {key: resolve_ref(sub, root) for key, sub in node.get("properties", {}).items()}
    for branch in node.get("allOf", []):
        then = branch.get("then", {})
        if then.get("properties") and jsonschema.Draft202012Validator(
                {**branch["if"], "$defs": root.get("$defs", {})}).is_valid(instance):
            for key, sub in then["properties"].items():
                properties[key] = {**properties.get(key, {}), **resolve_ref(sub, root)}
    return properties


def _subschema(key: str, properties: Mapping[str, Any], node: Mapping[str, Any],
               root: Mapping[str, Any]) -> Mapping[str, Any] | None:
    extra = node.get("additionalProperties")
    sub = properties.get(key, extra if isinstance(extra, Mapping) else None)
    return None if sub is None else resolve_ref(sub, root)


def _describe(instance: Any, node: Mapping[str, Any], path: tuple[str, ...],
              root: Mapping[str, Any], found: dict[tuple[str, ...], str]) -> None:
    node = resolve_ref(node, root)
    if not isinstance(instance, Mapping):
        return
    properties = _properties(instance, node, root)
    for key, value in instance.items():
        sub = _subschema(key, properties, node, root)
        if sub is None:
            continue
        if sub.get("description"):
            found[(*path, key)] = _first_sentence(sub["description"])
        _describe(value, sub, (*path, key), root, found)


def schema_ordered(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with every mapping's keys in the schema's order (free-form keys,
    such as dataset names, keep theirs)."""
    schema = load_schema()
    return _ordered(config, schema, schema)


def _ordered(instance: Any, node: Mapping[str, Any] | None, root: Mapping[str, Any]) -> Any:
    if not isinstance(instance, Mapping):
        return instance
    node = resolve_ref(node, root) if node is not None else {}
    properties = _properties(instance, node, root)
    keys = [key for key in properties if key in instance]
    keys += [key for key in instance if key not in properties]
    return {key: _ordered(instance[key], _subschema(key, properties, node, root), root)
            for key in keys}


def _comments(config: Mapping[str, Any], name: str, draft: DatasetDraft, preset: str,
              command: str) -> _Comments:
    """The schema's meaning of every key, and what new-dataset knows beyond it."""
    notes = _Comments(_schema_descriptions(config))
    after, before, inside = notes.after, notes.before, notes.inside
    notes.blank = {(key,) for key in config}
    dataset = config["datasets"][name]
    kind, files = dataset["kind"], " + ".join(PRESETS[preset])
    first = next(iter(config))
    before[(first,)] = [
        f"Cellflow config of dataset '{name}', written by `{command or 'cellflow new-dataset'}`"
        ".", "",
        f"Sizes of the models, training, generation, downstream runs and evaluation: the "
        f"{preset} preset ({files}): {PRESET_SUMMARIES[preset]}.", "",
        "Every downstream strategy runs: none (basic augmentation only), every batch "
        "augmentation, and the images of every generation method, Cellflow included, so that "
        "Cellflow is benchmarked against all of them.", "",
        "Every key below is described in workflow/schemas/config.schema.yaml (a misspelt key "
        "is an error); the comments give the first sentence. Check the file with `cellflow "
        "check-config` (and `cellflow doctor` before a long run), plan the run with "
        "`snakemake -n --configfile` this file.", ""]
    here = ("datasets", name)
    counts = draft.counts
    found = (": " + ", ".join(f"{c} {counts[c]}" for c in dataset["classes"]) + " images"
             if counts else "")
    before[here] = [f"{DATASET_KINDS[kind].summary}."] + (
        [f"Found: {draft.layout}{found}."] if kind == "folder" else [])
    if draft.skipped:
        before[here].append("Not classes: " + ", ".join(draft.skipped) + ".")
    after[(*here, "root")] = "relative paths start where snakemake runs (the repository)"
    after[(*here, "resolution")] = ("side in pixels of the images every stage sees (images "
                                    "are resized to it)")
    after[(*here, "classes")] = ("label order: label i = classes[i]" + (
        f"; images {', '.join(f'{c} {counts[c]}' for c in dataset['classes'])}"
        if counts and kind != "folder" else ""))
    if kind != "folder":
        after[(*here, "classes")] += "; a subset (in any order) of the kind's classes works"
    before[(*here, "transitions")] = [
        "Consecutive classes in the order above: EDIT them to the biological progression "
        "(e.g. normal -> hyperplastic -> neoplastic). Cellflow, cellflow_cfg and DDIB "
        "translate real images of each source class towards its target."]
    paper = _paper_dataset_of_kind(kind)
    if paper is not None:
        before[(*here, "transitions")].append(
            f"config/paper.yaml uses classes {_flow(paper['classes'])} with transitions "
            + ", ".join(f"{t['source']} -> {t['target']}" for t in paper["transitions"]) + ".")
    if "options" in dataset:
        inside[(*here, "options")] = []
        for example, meaning in draft.commented_options:  # the options without a default
            if len(example) + len(meaning) <= 80:
                inside[(*here, "options")].append(f"{example}  # {meaning}")
            else:
                inside[(*here, "options")] += [f"# {line}" for line in textwrap.wrap(
                    meaning, 80, break_on_hyphens=False)] + [example]
    inside[(*here, "split")] = [
        "group: { pattern: \"^(TCGA-\\\\w+-\\\\w+)\" }  # one split per patient or slide: a "
        "regex on the path under the root",
        "group: { sheet: samples.tsv, column: patient }  # or a sample sheet with a path column"]
    inside[(*here, "pretrained")] = [
        f"diffusion: {{ path: pretrained/{name}/diffusion }}  # from `cellflow "
        "import-guided-diffusion` (README)",
        f"classifier: {{ path: pretrained/{name}/classifier }}"]
    after[("benchmark",)] = (f"results/benchmarks/{config['benchmark']}/: the benchmark "
                             "table, summary figures and report front page")
    after[("generation", "methods")] = ("every generation method: Cellflow and its "
                                        "baselines")
    if "cellflow_cfg" in config["generation"]["methods"]:
        before[("diffusion", "label_dropout")] = [
            f"{config['diffusion']['label_dropout']}: the null class cellflow_cfg "
            "(classifier-free guidance) needs; 0, with cellflow_cfg out of generation.methods "
            "and downstream.strategies, trains the model as config/paper.yaml does."]
        after.pop(("diffusion", "label_dropout"), None)
    before[("downstream", "strategies")] = [
        "Every strategy, each with its paper's settings written out (ratio: generated images "
        "per real training image); delete an entry to leave it out."]
    after.pop(("downstream", "strategies"), None)
    for strategy in config["downstream"]["strategies"]:
        registered = STRATEGIES.get(strategy)
        if registered is not None:
            after[("downstream", "strategies", strategy)] = registered.reference
    return notes


def _paper_dataset_of_kind(kind: str) -> Mapping[str, Any] | None:
    """config/paper.yaml's dataset of this kind, if the repository has one."""
    path = repository_root() / "config" / "paper.yaml"
    if kind == "folder" or not path.is_file():
        return None
    datasets = (yaml.safe_load(path.read_text()) or {}).get("datasets", {})
    return next((entry for entry in datasets.values() if entry.get("kind") == kind
                 and entry.get("transitions")), None)


__all__ = ["PRESETS", "Scaffold", "ScaffoldError", "describe",
           "new_dataset_config", "preset_config", "render", "show_config_text",
           "write_new_dataset"]
