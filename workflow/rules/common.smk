# Config validation, wildcard constraints and the helpers that map wildcards to paths.

import glob
import hashlib
import json
import os
import re
import sys

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import update_config, validate


def _cellflow_package():
    """Where this workflow's `cellflow` package is, and put it first for this process and
    every job (venv, --sdm conda, a cluster node), so code and workflow never come from two
    versions. A workflow on disk (a clone, a module or snakedeploy deployment given a path)
    uses the package beside it; one sourced from a hosting service or a git repository
    has none on disk and needs an installed cellflow of its own version."""
    rules = workflow.current_basedir
    source_root = os.path.normpath(
        os.path.join(rules.get_path_or_uri(secret_free=True), "..", "..")
    )
    if os.path.isfile(os.path.join(source_root, "cellflow", "__init__.py")):
        sys.path.insert(0, source_root)
        os.environ.update(
            PYTHONPATH=os.pathsep.join(
                filter(None, [source_root, os.environ.get("PYTHONPATH")])
            )
        )
        return
    with workflow.sourcecache.open(rules.join("../../cellflow/__init__.py")) as init:
        wanted = re.search(r'__version__ = "([^"]+)"', init.read()).group(1)
    try:
        import cellflow
    except ImportError:
        raise WorkflowError(
            f"this workflow is cellflow {wanted}, sourced from "
            f"{rules.get_path_or_uri(secret_free=True)}, and no cellflow package is "
            f"installed: pip install 'cellflow=={wanted}' (or run a clone of the workflow)"
        ) from None
    if cellflow.__version__ != wanted:
        raise WorkflowError(
            f"this workflow is cellflow {wanted} but the installed cellflow is "
            f"{cellflow.__version__} ({os.path.dirname(cellflow.__file__)}): "
            f"pip install 'cellflow=={wanted}', or deploy the workflow of version "
            f"{cellflow.__version__}"
        )


_cellflow_package()

from cellflow.config import (
    backbone_problems,
    dataset_configs,
    default_benchmark_name,
    feature_network_run,
    typed_overrides,
    validate_config,
)
from cellflow.datasets import KINDS as DATASET_KINDS
from cellflow.generation import LATENT_MODELS
from cellflow.generation import methods_of
from cellflow.generation import job_settings as generation_job_settings
from cellflow.io import write_text
from cellflow.keep import back_up, discard, restore_missing
from cellflow.report import missing_front_page_message

# Relative to the working directory where inside it: the front page lists them, and the same
# file named by another path must not rerun it.
CONFIG_FILES = [
    str(path) if os.path.relpath(path).startswith("..") else os.path.relpath(path)
    for path in workflow.configfiles
]
# Only settings given with --config count as a source of their own (overwrite_config also
# holds the config files' contents).
_config_sources = [str(path) for path in workflow.configfiles] + (
    ["--config"] if workflow.config_settings.config else []
)
# A nested --config value comes as strings (Snakemake reads it with YAML's base loader)
update_config(config, typed_overrides(workflow.config_settings.config or {}))
config.update(validate_config(config, source=" + ".join(_config_sources)))
config.setdefault("benchmark", default_benchmark_name(workflow.configfiles))


validate(config, schema="../schemas/config.schema.yaml")

# This config's cross-dataset outputs (benchmark table, summary figures, report front page):
# keyed by its name, so a second config run in the same folder leaves them alone.
BENCHMARK_DIR = f"results/benchmarks/{config['benchmark']}"


DATASETS = dataset_configs(config)
SYNTHETIC_DATASETS = [name for name, ds in DATASETS.items() if ds.kind == "synthetic"]
# The datasets that are benchmarked; the others are unlabelled pools (cpia), prepared for
# the models that other datasets fit on them (pretrained: results/<pool>/models/<model>).
BENCHMARK_DATASETS = {
    name: ds for name, ds in DATASETS.items() if DATASET_KINDS[ds.kind].labelled
}

# The datasets whose measured cellularity is validated: against the generator's masks, or
# against a pathologist's cellularity score (BreastPathQ).
VALIDATED_CELLULARITY = SYNTHETIC_DATASETS + [
    name
    for name, ds in BENCHMARK_DATASETS.items()
    if DATASET_KINDS[ds.kind].cellularity_scores
]

# Configured datasets that this run leaves out (only_datasets): their finished results stay in
# this config's cross-dataset tables and figures, read as they are on disk.
LEFT_OUT_DATASETS = [
    name
    for name, entry in config["datasets"].items()
    if name not in DATASETS and DATASET_KINDS[entry["kind"]].labelled
]


def left_out_results(pattern):
    """The files of the left-out datasets that match `pattern` (a glob with {dataset})."""
    return sorted(
        path
        for dataset in LEFT_OUT_DATASETS
        for path in glob.glob(pattern.format(dataset=dataset), recursive=True)
    )


for _name, _dataset in DATASETS.items():
    if _dataset.kind != "synthetic" and not _dataset.root.is_dir():
        logger.warning(
            f"dataset '{_name}': data root {_dataset.root} does not exist yet "
            f"(datasets.{_name}.root); its jobs are planned but will fail until it is filled in"
        )


def choice(names):
    """A wildcard regex matching exactly these names (never a path fragment)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


DOWNSTREAM = config["downstream"]
# The registry's methods and this config's external ones (cellflow.generation).
GENERATION_METHODS = methods_of(config)
GENERATIVE_STRATEGIES = tuple(GENERATION_METHODS)
# What the evaluation rules measure: the real images, or one generative method's.
IMAGE_SETS = ("real", *GENERATIVE_STRATEGIES)
FEATURE_BACKBONE, FEATURE_SEED = feature_network_run(config)


wildcard_constraints:
    dataset=choice(DATASETS),
    backbone=choice(DOWNSTREAM["backbones"]),
    strategy=choice(DOWNSTREAM["strategies"]),
    seed=r"\d+",
    image_set=choice(IMAGE_SETS),
    method=choice(GENERATIVE_STRATEGIES),


# Settings that only size a job (a cluster time limit, a device count). They stay out of every
# job's params, so raising a time limit after a time-out never replans finished work.
RESOURCE_KEYS = ("runtime_minutes", "gpus")


def canonical(value):
    """A copy with every dict in sorted key order: Snakemake compares params as printed, so a
    config that lists the same values in another order must print the same."""
    return json.loads(json.dumps(value, sort_keys=True))


def without_resources(section, keep=()):
    return {k: v for k, v in section.items() if k not in RESOURCE_KEYS or k in keep}


def job_file(wildcards, kind, suffix, text):
    """`text` as a file under the job's log folder (logs/{dataset}/specs/, or the benchmark's
    for a cross-dataset job) that the command names instead of carrying it, so that a printed
    command stays one short line. Named by its content, the path changes exactly when the
    text does (Snakemake's params trigger), and a plan writes each file once."""
    if hasattr(wildcards, "dataset"):
        folder = f"logs/{wildcards.dataset}/specs"
    else:
        folder = f"logs/benchmarks/{config['benchmark']}/specs"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = f"{folder}/{kind}-{digest}{suffix}"
    if not os.path.exists(path):
        write_text(path, text)
    return path


def spec_file(make_spec):
    """The job's settings, `make_spec`'s JSON, as a file: `--spec <path>`."""
    kind = make_spec.__name__.removesuffix("_spec")
    return lambda wildcards: job_file(
        wildcards, kind, ".json", make_spec(wildcards) + "\n"
    )


def listed(name=None):
    """The files of input `name` (None: every input) as an argument file, `@<path>`, one file
    a line, that the cellflow command expands in place (argparse's fromfile_prefix_chars):
    a job that reads a file per dataset, seed or method still prints one short command.
    """

    def argument(wildcards, input):
        files = getattr(input, name) if name else input
        text = "".join(f"{path}\n" for path in files)
        return f"@{job_file(wildcards, name or 'inputs', '.txt', text)}"

    return argument


def data_spec(wildcards):
    """What the data stage of a dataset reads: its entry, the preparation settings, the seed."""
    return json.dumps(
        canonical(
            {
                "dataset_name": wildcards.dataset,
                "dataset": config["datasets"][wildcards.dataset],
                "prepare": config["prepare"],
                "seed": config["seed"],
            }
        )
    )


def raw_root(wildcards):
    """Where the raw class folders of a dataset are: generated, or the configured root."""
    dataset = DATASETS[wildcards.dataset]
    if dataset.kind == "synthetic":
        return f"results/{wildcards.dataset}/raw/images"
    return str(dataset.root)


def prepare_inputs(wildcards):
    """Raw inputs of the data stage: the root and the kind's annotation files (a changed label
    file prepares the dataset again); a missing one is left to the job to report."""
    dataset = DATASETS[wildcards.dataset]
    if dataset.kind == "synthetic":
        return {
            "images": f"results/{wildcards.dataset}/raw/images",
            "ground_truth": f"results/{wildcards.dataset}/raw/ground_truth.tsv",
        }
    inputs = {"root": str(dataset.root)} if dataset.root.is_dir() else {}
    annotations = DATASET_KINDS[dataset.kind].annotation_files(
        dataset.root, dataset.options
    )
    existing = [str(path) for path in annotations if path.exists()]
    if existing:
        inputs["annotations"] = existing
    group = dataset.split.group
    if group is not None and group.sheet is not None:
        # A changed sample sheet regroups the split: the data stage reruns.
        inputs["group_sheet"] = str(group.sheet)
    return inputs


def raw_listing(wildcards):
    """A digest of every file under a folder dataset's root (path, size, modification time).

    As a param it reruns the data stage when images are added, removed or replaced inside a
    class folder, which leaves the root folder's own modification time unchanged. Official
    layouts are followed through their annotation files instead: walking a 100 GB download
    at every start would cost minutes.
    """
    dataset = DATASETS[wildcards.dataset]
    if dataset.kind != "folder" or not dataset.root.is_dir():
        return ""
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(dataset.root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            status = os.stat(path)
            relative = os.path.relpath(path, dataset.root)
            digest.update(
                f"{relative}\t{status.st_size}\t{status.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()[:16]


def data_outputs(dataset):
    return [
        f"results/{dataset}/data/manifest.tsv",
        f"results/{dataset}/data/class_counts.tsv",
        f"results/{dataset}/data/group_counts.tsv",
    ]


def needed_models(dataset):
    """The models a dataset's jobs read: the diffusion model and the classifier always (the
    evaluation and the figures use them), those of its generation methods, the given ones.
    """
    if dataset not in BENCHMARK_DATASETS:
        return pool_models(dataset)
    models = ["diffusion", "classifier"]
    for method in generative_methods(dataset):
        models += GENERATION_METHODS[method].models
    models += list(config["datasets"][dataset]["pretrained"])
    return list(dict.fromkeys(models))


def fitting_pool(path, model):
    """The unlabelled pool whose fitted model a pretrained entry's path names, or None."""
    for pool in DATASETS:
        if pool not in BENCHMARK_DATASETS:
            if os.path.normpath(path) == f"results/{pool}/models/{model}":
                return pool
    return None


def pool_models(pool):
    """The models of an unlabelled pool that other datasets use as pretrained ones."""
    return [
        model
        for entries in DATASETS_PRETRAINED.values()
        for model, entry in entries.items()
        if fitting_pool(entry["path"], model) == pool
    ]


def model_outputs(dataset):
    return [f"results/{dataset}/models/{model}" for model in needed_models(dataset)]


def trained_datasets(model):
    """The datasets whose model of this kind is trained here, not given as pretrained."""
    return [
        name
        for name in DATASETS
        if model not in DATASETS_PRETRAINED[name] and model in needed_models(name)
    ]


DATASETS_PRETRAINED = {
    name: config["datasets"][name]["pretrained"] for name in DATASETS
}


def pretrained_entry(wildcards):
    """The dataset's entry for this model, or None: use_pretrained is asked about every model
    path while the DAG is built, and a trained model is not its to make."""
    return DATASETS_PRETRAINED.get(wildcards.dataset, {}).get(wildcards.model)


def pretrained_inputs(wildcards):
    """The data manifest and the pretrained model (a folder or a .pt), where it exists: a
    missing one is left to the job to report with the config key that names it."""
    entry = pretrained_entry(wildcards)
    if entry is None:
        return {}
    inputs = {"manifest": f"results/{wildcards.dataset}/data/manifest.tsv"}
    fitted_here = fitting_pool(entry["path"], wildcards.model) is not None
    if fitted_here or os.path.exists(entry["path"]):
        inputs["source"] = entry["path"]
    return inputs


def pretrained_spec(wildcards):
    """The JSON a pretrained-model job gets: the dataset, the schedule, the entry and the
    settings of the figures and tables a trained model of this kind comes with."""
    kind = "classifier" if wildcards.model == "classifier" else "diffusion"
    section = config[kind]
    return json.dumps(
        {
            "dataset_name": wildcards.dataset,
            "dataset": config["datasets"][wildcards.dataset],
            "noise_schedule": config["noise_schedule"],
            "model": wildcards.model,
            "key": f"datasets.{wildcards.dataset}.pretrained.{wildcards.model}",
            "pretrained": pretrained_entry(wildcards),
            "settings": {
                key: section[key] for key in ("samples", "eval") if key in section
            },
            "seed": config["seed"],
        },
        sort_keys=True,
    )


def model_folder(dataset, model):
    """A model folder a generation job reads: diffusion, classifier, or the decoder UNet,
    which is the diffusion model unless the dataset names a pretrained one."""
    if (
        model == "decoder"
        and "decoder" not in config["datasets"][dataset]["pretrained"]
    ):
        return None
    return f"results/{dataset}/models/{model}"


def generation_inputs(wildcards):
    """The data manifest and the model folders the method reads (its registry entry)."""
    inputs = {"manifest": f"results/{wildcards.dataset}/data/manifest.tsv"}
    for model in (*GENERATION_METHODS[wildcards.method].models, "decoder"):
        folder = model_folder(wildcards.dataset, model)
        translates = GENERATION_METHODS[wildcards.method].from_transitions
        if folder is not None and (model != "decoder" or translates):
            inputs[model] = folder
    return inputs


def generation_model_arguments(wildcards, input):
    """--<model> <folder> for every model folder the job reads (all inputs but the data)."""
    return " ".join(
        f"--{model} {getattr(input, model)}"
        for model in input.keys()
        if model not in ("manifest", "shards")
    )


def generation_shards(dataset, method):
    """How many jobs compute a method's batches (generation.shards); imported images are
    only read, never sharded."""
    if GENERATION_METHODS[method].writes == "imported images":
        return 1
    shards = config["generation"]["shards"]
    return shards if isinstance(shards, int) else shards.get(dataset, 1)


def shard_records(wildcards):
    """The records of a sharded method's shards, which its gather job reads."""
    count = generation_shards(wildcards.dataset, wildcards.method)
    if count == 1:
        return []
    return [
        f"results/{wildcards.dataset}/trajectories/shards/{wildcards.method}/{index}-of-{count}.json"
        for index in range(count)
    ]


def gather_arguments(wildcards, input):
    """--shards N --shard-records ... for the gather of a sharded method; '' otherwise."""
    if not input.shards:
        return ""
    return f"--shards {len(input.shards)} --shard-records {input.shards}"


def generation_gpus(wildcards):
    """The GPUs a generate job computes on: none for a gather, whose shards computed."""
    sharded = generation_shards(wildcards.dataset, wildcards.method) > 1
    return 0 if sharded else config["bridge"]["gpus"]


def generation_spec(wildcards):
    """The JSON a generation job gets: its dataset, the schedule and what its method uses."""
    return json.dumps(
        {
            "dataset_name": wildcards.dataset,
            "dataset": config["datasets"][wildcards.dataset],
            "noise_schedule": config["noise_schedule"],
            **generation_job_settings(wildcards.method, config),
        },
        sort_keys=True,
    )


def has_trajectories(dataset):
    """Whether Cellflow trajectories are made for a dataset: the trajectory analyses, the
    coherence measure and the trajectory figures read them."""
    return "cellflow" in generative_methods(dataset)


def generative_methods(dataset):
    """The configured methods this dataset can run: those that translate real images only
    where it has transitions."""
    return [
        name
        for name in config["generation"]["methods"]
        if DATASETS[dataset].transitions
        or not GENERATION_METHODS[name].from_transitions
    ]


def image_sets(dataset):
    """What the evaluation measures of a dataset: its real images and each method's."""
    return ["real", *generative_methods(dataset)]


def generation_outputs(dataset):
    return [
        f"results/{dataset}/trajectories/{method}"
        for method in generative_methods(dataset)
    ]


def downstream_inputs(wildcards):
    """The data manifest, and for a generative strategy the folder of its images."""
    inputs = {"manifest": f"results/{wildcards.dataset}/data/manifest.tsv"}
    if wildcards.strategy in GENERATIVE_STRATEGIES:
        inputs["generated"] = (
            f"results/{wildcards.dataset}/trajectories/{wildcards.strategy}"
        )
    return inputs


def downstream_spec(wildcards):
    """One run's settings: its strategy, the training settings and its backbone's weights,
    not the lists of other strategies and seeds (adding a seed runs only the new runs).
    """
    pretrained = DOWNSTREAM["pretrained"].get(wildcards.backbone)
    return json.dumps(
        {
            "dataset": config["datasets"][wildcards.dataset],
            "downstream": {
                "strategies": {
                    wildcards.strategy: DOWNSTREAM["strategies"][wildcards.strategy]
                },
                "train": without_resources(DOWNSTREAM["train"]),
                "pretrained": {wildcards.backbone: pretrained} if pretrained else {},
            },
        },
        sort_keys=True,
    )


def downstream_generated_argument(wildcards, input):
    return f"--generated {input.generated}" if "generated" in input.keys() else ""


def run_folder(wildcards, output):
    return os.path.dirname(output.metrics)


def downstream_runs(wildcards):
    return [
        f"results/{wildcards.dataset}/downstream/{backbone}/{strategy}/seed{seed}/metrics.json"
        for backbone in DOWNSTREAM["backbones"]
        for strategy in DOWNSTREAM["strategies"]
        for seed in DOWNSTREAM["seeds"]
    ]


def feature_network_weights(wildcards):
    """The in-domain feature space: the downstream network trained on real images only."""
    return (
        f"results/{wildcards.dataset}/downstream/{FEATURE_BACKBONE}/none/"
        f"seed{FEATURE_SEED}/model.safetensors"
    )


def evaluation_spec(wildcards):
    return json.dumps(
        {
            "dataset_name": wildcards.dataset,
            "dataset": config["datasets"][wildcards.dataset],
            # the number of shards changes how the tables are computed, not what they hold
            "evaluation": {
                key: value
                for key, value in without_resources(config["evaluation"]).items()
                if key != "shards"
            },
            "feature_network": [FEATURE_BACKBONE, FEATURE_SEED],
            "seed": config["seed"],
        },
        sort_keys=True,
    )


def image_set_inputs(wildcards):
    """The data manifest, and for a generative method the folder of its images."""
    inputs = {"manifest": f"results/{wildcards.dataset}/data/manifest.tsv"}
    if wildcards.image_set != "real":
        inputs["generated"] = (
            f"results/{wildcards.dataset}/trajectories/{wildcards.image_set}"
        )
    return inputs


# Where the shards of an image set's evaluation leave their cellularity rows.
EVALUATION_WORK = "results/{dataset}/checkpoints/evaluation/{image_set}"


def evaluation_shards(dataset):
    """How many jobs measure each image set of a dataset (evaluation.shards)."""
    shards = config["evaluation"]["shards"]
    return shards if isinstance(shards, int) else shards.get(dataset, 1)


def evaluation_shard_records(wildcards):
    """The records of an image set's shards, which its cellularity and fidelity jobs read."""
    count = evaluation_shards(wildcards.dataset)
    if count == 1:
        return []
    return [
        f"results/{wildcards.dataset}/evaluation/shards/{wildcards.image_set}/"
        f"{index}-of-{count}.json"
        for index in range(count)
    ]


def cellularity_shard_arguments(wildcards, input):
    if not input.shards:
        return ""
    return (
        f"--shard-records {' '.join(input.shards)} --shards {len(input.shards)}"
        f" --work {EVALUATION_WORK.format(**wildcards)}"
    )


def generated_argument(wildcards, input):
    return f"--generated {input.generated}" if "generated" in input.keys() else ""


def evaluation_outputs(dataset):
    outputs = [
        f"results/{dataset}/evaluation/{table}/{image_set}.tsv"
        for table in ("cellularity", "fidelity")
        for image_set in image_sets(dataset)
    ]
    if dataset in VALIDATED_CELLULARITY:
        outputs.append(f"results/{dataset}/evaluation/cellularity_validation.tsv")
    if has_trajectories(dataset):
        outputs += [
            f"results/{dataset}/evaluation/trajectories/summary.tsv",
            f"results/{dataset}/evaluation/coherence.tsv",
        ]
    return outputs


def final_outputs():
    """Everything `snakemake` builds by default, for the selected datasets."""
    return [
        path
        for name in DATASETS
        for path in data_outputs(name)
        + model_outputs(name)
        + (generation_outputs(name) + evaluation_outputs(name))
        * (name in BENCHMARK_DATASETS)
    ] + [f"{BENCHMARK_DIR}/benchmark.tsv", *figure_outputs(), FRONT_PAGE]


def training_spec(model):
    """The JSON a training job gets: its dataset, the noise schedule and its config section
    (less the time limit; train.gpus stays, as the number of processes changes the draws).
    """

    def spec(wildcards):
        settings = dict(config[model])
        settings["train"] = without_resources(settings["train"], keep=("gpus",))
        return json.dumps(
            {
                "dataset_name": wildcards.dataset,
                "dataset": config["datasets"][wildcards.dataset],
                "noise_schedule": config["noise_schedule"],
                "settings": settings,
                "seed": config["seed"],
            },
            sort_keys=True,
        )

    spec.__name__ = f"{model}_training_spec"
    return spec


def training_inputs(model):
    """The data manifest, the model that init_from fine-tunes (a changed file retrains), and
    for a latent model the autoencoder it works in."""

    def inputs(wildcards):
        name = model or wildcards.model
        paths = {"manifest": f"results/{wildcards.dataset}/data/manifest.tsv"}
        init_from = config[name].get("init_from")
        if init_from is not None and os.path.exists(init_from["path"]):
            paths["init_from"] = init_from["path"]
        if name in LATENT_MODELS:
            paths["autoencoder"] = f"results/{wildcards.dataset}/models/autoencoder"
        return paths

    return inputs


def latent_training_spec(wildcards):
    return training_spec(wildcards.model)(wildcards)


def latent_launcher(wildcards):
    return python_launcher(wildcards.model)


def latent_runtime(wildcards):
    return config[wildcards.model]["train"]["runtime_minutes"]


def latent_gpus(wildcards):
    return config[wildcards.model]["train"]["gpus"]


def python_launcher(model):
    """`python -m`, or `accelerate launch -m` over several GPUs (data parallel), started by
    cellflow.gpu_slots so that on a local run the launch holds devices of its own (its
    workers find them taken)."""
    gpus = config[model]["train"]["gpus"]
    if gpus > 1:
        return (
            f"python -m cellflow.gpu_slots {gpus} --"
            f" accelerate launch --multi_gpu --num_processes {gpus} --num_machines 1"
            " --dynamo_backend no --main_process_port 0 -m"
        )
    return "python -m"


def stem(key):
    """An output path without its suffix: the figure functions add .png/.pdf, .tsv/.md."""

    def path(wildcards, output):
        return os.path.splitext(output[key])[0]

    return path


def trajectory_datasets():
    return [name for name in BENCHMARK_DATASETS if has_trajectories(name)]


def trajectory_tables(table):
    """One trajectory table (`summary` or `coherence`) of every dataset with trajectories."""
    path = {
        "summary": "results/{dataset}/evaluation/trajectories/summary.tsv",
        "coherence": "results/{dataset}/evaluation/coherence.tsv",
    }[table]
    return expand(path, dataset=trajectory_datasets()) + left_out_results(path)


def dataset_figure_outputs(dataset):
    names = ["training_curves", "side_by_side", "memorization", "per_class"]
    if has_trajectories(dataset):
        names += ["trajectory_strips", "cellularity_curves", "fourier_stairs"]
    if dataset in SYNTHETIC_DATASETS:
        names.append("cellularity_validation")
    return [f"results/{dataset}/figures/{name}.png" for name in names] + [
        f"results/{dataset}/figures/closest_pairs/{method}.png"
        for method in generative_methods(dataset)
    ]


def summary_names():
    """The cross-dataset figures, each with a table of the same name, in report order."""
    names = ["classification", "fidelity"]
    if trajectory_datasets():
        names.append("trajectories")
    return names + ["runtimes"]


def summary_figure_outputs():
    return [f"{BENCHMARK_DIR}/figures/{name}.png" for name in summary_names()]


def figure_outputs():
    return summary_figure_outputs() + [
        path
        for dataset in BENCHMARK_DATASETS
        for path in dataset_figure_outputs(dataset)
    ]


FRONT_PAGE = f"{BENCHMARK_DIR}/front_page.html"

# The report opens on this config's front page (workflow/report/workflow.rst includes it).
# Asked with another --configfile than the run's, say which one would work, instead of
# failing on the first output of the wrong config.
if "--report" in sys.argv and not os.path.exists(FRONT_PAGE):
    raise WorkflowError(missing_front_page_message(config["benchmark"], "results"))


def summary_tables():
    """The cross-dataset tables the report's front page shows."""
    return [f"{BENCHMARK_DIR}/tables/{name}.tsv" for name in summary_names()]


def fidelity_tables(wildcards):
    return [
        f"results/{dataset}/evaluation/fidelity/{image_set}.tsv"
        for dataset in BENCHMARK_DATASETS
        for image_set in image_sets(dataset)
    ] + left_out_results("results/{dataset}/evaluation/fidelity/*.tsv")


def job_benchmarks(wildcards):
    """The benchmark file of every job that computes something (figure jobs excluded)."""
    files = [rules.benchmark_table.benchmark]
    for dataset in BENCHMARK_DATASETS:
        per_dataset = [
            rules.prepare_data,
            rules.summarize_downstream,
        ]
        for model, training in (
            ("diffusion", rules.train_diffusion),
            ("classifier", rules.train_classifier),
            ("autoencoder", rules.train_autoencoder),
        ):
            if dataset in trained_datasets(model):
                files.append(training.benchmark.format(dataset=dataset))
        files += expand(
            rules.train_latent.benchmark,
            dataset=dataset,
            model=[m for m in LATENT_MODELS if dataset in trained_datasets(m)],
        )
        files += expand(
            rules.use_pretrained.benchmark,
            dataset=dataset,
            model=list(config["datasets"][dataset]["pretrained"]),
        )
        if dataset in SYNTHETIC_DATASETS:
            per_dataset.append(rules.synthesize_dataset)
        if dataset in VALIDATED_CELLULARITY:
            per_dataset.append(rules.validate_cellularity)
        if has_trajectories(dataset):
            per_dataset += [rules.analyse_trajectories, rules.temporal_coherence]
        files += [rule.benchmark.format(dataset=dataset) for rule in per_dataset]
        files += expand(
            rules.generate.benchmark,
            dataset=dataset,
            method=generative_methods(dataset),
        )
        files += [
            rules.generate_shard.benchmark.format(
                dataset=dataset, method=method, shard=index, shards=count
            )
            for method in generative_methods(dataset)
            for count in [generation_shards(dataset, method)]
            if count > 1
            for index in range(count)
        ]
        files += expand(
            rules.train_downstream.benchmark,
            dataset=dataset,
            backbone=DOWNSTREAM["backbones"],
            strategy=DOWNSTREAM["strategies"],
            seed=DOWNSTREAM["seeds"],
        )
        files += expand(
            [rules.measure_cellularity.benchmark, rules.fidelity.benchmark],
            dataset=dataset,
            image_set=image_sets(dataset),
        )
        files += expand(
            rules.memorization.benchmark,
            dataset=dataset,
            method=generative_methods(dataset),
        )
    return files + [
        path
        for path in left_out_results("results/{dataset}/benchmarks/**/*.tsv")
        if f"{os.sep}benchmarks{os.sep}figures{os.sep}" not in path
    ]


# A rerun's previous good outputs are kept (hard links, outside every declared output) until it
# has replaced them: the Snakefile's onstart/onerror/onsuccess hooks call these.
PREVIOUS_OUTPUTS = "results/.previous"


def check_backbones():
    """Stop a run that would train a downstream network of no known timm name before any
    job starts, instead of failing an hour in (the parse does not import timm)."""
    if any(job.rule.name == "train_downstream" for job in workflow.dag.needrun_jobs()):
        problems = list(backbone_problems(config))
        if problems:
            raise WorkflowError("\n".join(problems))


def keep_previous_outputs():
    """Put back what a killed run could not, then keep the outputs the planned jobs will
    delete before they rerun (checkpoints excluded: they are no job's output)."""
    restore_missing(PREVIOUS_OUTPUTS)
    planned = [
        str(path)
        for job in workflow.dag.needrun_jobs()
        for path in job.output
        if str(path).startswith("results/")
    ]
    back_up(planned, PREVIOUS_OUTPUTS)
