"""The ``cellflow`` command: what a user needs outside Snakemake."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from cellflow.config import ConfigError, dataset_configs, load_configs
from cellflow.generation import METHODS
from cellflow.logs import note

# The model folders a generation job may read, one --<name> option each.
MODEL_ARGUMENTS = ("diffusion", "classifier", "decoder", "autoencoder", "ldm", "dit")
SPEC_HELP = "the job's settings, a JSON file (or text): "
GPUS_HELP = "GPUs this job computes on (a local run pins free devices: cellflow.gpu_slots)"
# The commands pipeline jobs run; each writes a provenance record with its output.
JOB_COMMANDS = ("data", "train", "generate", "use-pretrained", "downstream", "evaluate",
                "figures")


def spec_text(value: str) -> str:
    """A job's settings: the JSON file the workflow wrote for it (logs/{dataset}/specs/), or
    the JSON itself (a command typed by hand)."""
    if value.lstrip().startswith("{"):
        return value
    try:
        return Path(value).read_text()
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read the settings file {value}: "
                                         f"{err.strerror}") from None


def check_config(paths: str | list[str], schema_only: bool = False) -> int:
    """Validate config files (merged in order, as Snakemake merges them) and, unless
    ``schema_only``, what they need of this machine: data roots, weights, timm backbones."""
    from cellflow.config import environment_problems

    paths = [paths] if isinstance(paths, str) else list(paths)
    source = " + ".join(paths)
    try:
        config = load_configs(paths)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    for dataset in dataset_configs(config).values():
        root = f", root {dataset.root}" if dataset.root else ""
        print(f"{dataset.name}: {dataset.kind}, {len(dataset.classes)} classes, "
              f"{dataset.resolution} px{root}")
    problems = [] if schema_only else environment_problems(config)
    if problems:
        lines = "\n".join(f"  {source}: {problem}" for problem in problems)
        print(f"{source} cannot run on this machine:\n{lines}", file=sys.stderr)
        return 1
    checked = "schema" if schema_only else "schema, data roots, weights and backbones"
    print(f"{source}: valid ({checked})")
    return 0


def new_dataset(args: argparse.Namespace) -> int:
    """Write a complete, commented config for one dataset (cellflow.scaffold)."""
    import shlex

    from cellflow.scaffold import ScaffoldError, describe, write_new_dataset

    command = shlex.join(["cellflow", "new-dataset", args.name, args.root, "--kind", args.kind,
                          "--preset", args.preset]
                         + (["--resolution", str(args.resolution)] if args.resolution else []))
    try:
        output, scaffold = write_new_dataset(
            args.name, args.root, output=args.output, kind=args.kind, preset=args.preset,
            resolution=args.resolution, force=args.force, command=command)
    except (ScaffoldError, ConfigError) as err:
        print(f"new-dataset: {err}", file=sys.stderr)
        return 1
    for warning in scaffold.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(describe(output, scaffold))
    return 0


def show_config(paths: list[str], comments: bool) -> int:
    """Print the effective config of these files: merged, validated, defaults filled."""
    from cellflow.scaffold import show_config_text

    try:
        text = show_config_text(paths, comments=comments)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def _job_setup(threads: int | None, log_file: str | None) -> None:
    """What every pipeline job does first: log to its file (which names the machine and the
    GPUs the job sees), use its share of the CPUs. Under `accelerate launch` each process
    logs to a file of its own and takes its share of the job's threads."""
    from cellflow.logs import log_to_file

    rank, processes = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if log_file:
        from cellflow.machine import describe_machine

        log_to_file(log_file if rank == 0 else f"{log_file}.rank{rank}")
        logging.getLogger("cellflow").info("machine: %s", describe_machine())
    if threads:
        import torch  # only jobs that compute pay for importing it

        torch.set_num_threads(max(1, threads // processes))


def train(model: str, spec_json: str, manifest: str, out: str, checkpoints: str,
          threads: int | None, log_file: str | None, autoencoder: str | None = None) -> int:
    """Train one model of one dataset; run under `accelerate launch` for several GPUs."""
    from cellflow.stages import StageSpec, train_classifier, train_diffusion

    _job_setup(threads, log_file)
    spec = StageSpec.from_json(spec_json)
    if model in ("diffusion", "classifier", "autoencoder"):
        if model == "autoencoder":
            from cellflow.autoencoder import train_autoencoder as stage
        else:
            stage = train_diffusion if model == "diffusion" else train_classifier
        stage(spec, Path(manifest), Path(out), Path(checkpoints))
        return 0
    if autoencoder is None:
        raise SystemExit(f"train {model}: needs --autoencoder (the latent autoencoder folder)")
    from cellflow.latent import train_dit, train_ldm

    latent_stage = train_ldm if model == "ldm" else train_dit
    latent_stage(spec, Path(manifest), Path(autoencoder), Path(out), Path(checkpoints))
    return 0


def generate(method: str, spec_json: str, manifest: str, models: dict[str, str | None],
             out: str, work: str | None, threads: int | None, log_file: str | None,
             shard: int | None = None, shards: int = 1,
             shard_records: list[str] | None = None) -> int:
    """One generation method (:data:`cellflow.generation.METHODS`) for one dataset: the whole
    method, one shard of it (``--out`` is then the shard's record), or the gather of its
    shards' batches."""
    import json

    from cellflow.config import DatasetConfig
    from cellflow.diffusion import NoiseSchedule
    from cellflow.generation import method as generation_method
    from cellflow.generation.common import GenerationJob
    from cellflow.generation.shards import run_gather, run_shard

    _job_setup(threads, log_file)
    spec = json.loads(spec_json)
    chosen = generation_method(method, spec["method"])
    missing = [name for name in chosen.models if not models.get(name)]
    if missing:
        raise SystemExit(f"generate {method}: needs --{' --'.join(missing)}")
    job = GenerationJob(
        dataset=DatasetConfig.from_dict(spec["dataset_name"], spec["dataset"]),
        schedule=NoiseSchedule(**spec["noise_schedule"]),
        bridge=spec["bridge"], settings=spec["method"], seed=spec.get("seed", 0),
        data_manifest=Path(manifest),
        models={name: Path(path) for name, path in models.items() if path},
        out_dir=Path(out), work_dir=Path(work) if work else None)
    if shard is not None:
        note("batches", len(run_shard(chosen, job, shard, shards, Path(out))))
        return 0
    if shards > 1:
        manifest = run_gather(chosen, job, [Path(record) for record in shard_records or []],
                              shards)
    else:
        manifest = chosen.run(job)
    note("images", len(manifest))
    return 0


def data(args: argparse.Namespace) -> int:
    """Render a synthetic dataset, or check, resize and split one dataset."""
    import json

    from cellflow.config import DatasetConfig, PrepareConfig

    _job_setup(None, args.log)  # neither needs torch: its threads are the job's own
    spec = json.loads(args.spec)
    dataset = DatasetConfig.from_dict(spec["dataset_name"], spec["dataset"])
    out_dir = Path(args.out).parent
    if args.action == "synthesize":
        from cellflow.synthetic import generate_dataset

        generate_dataset(out_dir=out_dir, class_names=dataset.classes,
                         images_per_class=dataset.synthetic.images_per_class,
                         size=dataset.synthetic.image_size, seed=spec["seed"])
        return 0
    from cellflow.data import prepare_dataset, read_ground_truth

    manifest = prepare_dataset(
        dataset=dataset, prepare=PrepareConfig(**spec["prepare"]), raw_root=Path(args.raw_root),
        out_dir=out_dir, seed=spec["seed"], threads=args.threads,
        ground_truth=read_ground_truth(args.ground_truth) if args.ground_truth else None)
    for split, count in sorted(manifest["split"].value_counts().items()):
        note(f"{split} images", count)
    return 0


def use_pretrained(spec_json: str, manifest: str, out: str, threads: int | None,
                   log_file: str | None) -> int:
    """Check a dataset's pretrained model and write it where a trained one would be."""
    import json

    from cellflow.pretrained import use_pretrained as adopt

    _job_setup(threads, log_file)
    adopt(json.loads(spec_json), Path(manifest), Path(out))
    return 0


def downstream(args: argparse.Namespace) -> int:
    """Train one downstream run, or aggregate runs into the benchmark tables."""
    import json

    import pandas as pd

    from cellflow.aggregate import (
        mean_confusion,
        per_class_summary,
        read_metrics,
        read_runs,
        summarise,
    )
    from cellflow.io import write_table

    _job_setup(args.threads, args.log)
    if args.action == "train":
        from cellflow.downstream import DownstreamTrainConfig, train_downstream

        spec = json.loads(args.spec)
        settings = spec["downstream"]
        metrics = train_downstream(
            Path(args.manifest), spec["dataset"]["classes"], spec["dataset"]["resolution"],
            args.backbone, args.strategy, settings["strategies"][args.strategy],
            DownstreamTrainConfig.from_dict(settings["train"]), args.seed, Path(args.out),
            Path(args.generated) if args.generated else None,
            settings["pretrained"].get(args.backbone), Path(args.work) if args.work else None)
        note("epochs", metrics["epochs_run"])
        note("test balanced accuracy", metrics["test"]["balanced_accuracy"])
    elif args.action == "summarize":
        out = Path(args.out)
        runs = read_runs(args.inputs, args.dataset)
        write_table(out.with_name("runs.tsv"), runs)
        metrics = read_metrics(args.inputs, args.dataset)
        write_table(out.with_name("per_class.tsv"), per_class_summary(metrics))
        write_table(out.with_name("confusion.tsv"), mean_confusion(metrics))
        write_table(out, summarise(runs))
    else:
        tables = [pd.read_csv(path, sep="\t") for path in args.inputs]
        write_table(args.out, pd.concat(tables, ignore_index=True))
    return 0


def _feature_spaces(spec: dict, domain_weights: str, manifest: Path) -> list:
    """The dataset's feature spaces; their features are cached per image set in
    results/{dataset}/checkpoints/features/ (beside data/, outside every declared output)."""
    from cellflow.checkpoint import file_sha256
    from cellflow.metrics import (
        FeatureSpace,
        domain_feature_network,
        inception_feature_network,
    )

    dataset, evaluation = spec["dataset"], spec["evaluation"]
    backbone, seed = spec["feature_network"]
    cache = Path(manifest).parent.parent / "checkpoints" / "features"
    spaces = [FeatureSpace(
        "domain", domain_feature_network(backbone, len(dataset["classes"]),
                                         dataset["resolution"], Path(domain_weights)),
        f"domain: {backbone} trained on real images only (strategy none, seed {seed})",
        file_sha256(Path(domain_weights)), cache)]
    if evaluation["inception_weights"]:
        weights = Path(evaluation["inception_weights"])
        spaces.append(FeatureSpace(
            "inception", inception_feature_network(weights),
            "inception: Inception-v3 pool3 (2015-12-05 weights)", file_sha256(weights), cache))
    return spaces


def evaluate(args: argparse.Namespace) -> int:
    """One evaluation table of one dataset: cellularity, fidelity, trajectories, coherence."""
    networks = args.action in ("fidelity", "trajectories", "coherence", "memorization", "shard")
    # The cellularity actions run processes, not torch threads: they need not import torch.
    _job_setup(args.threads if networks else None, args.log)
    workers = args.threads or 1
    import json

    from cellflow import evaluate as stages
    from cellflow.cellularity import CellularityConfig
    from cellflow.io import read_table, write_table, write_text

    spec = json.loads(args.spec)
    evaluation, classes = spec["evaluation"], spec["dataset"]["classes"]
    device = None
    if networks:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = Path(args.manifest)
    generated = Path(args.generated) if args.generated else None
    cellularity_config = CellularityConfig.from_dict(evaluation["cellularity"])
    if args.action == "cellularity" and args.shard_records is not None:
        from cellflow.evaluation_shards import assemble_cellularity, remove_parts

        write_table(args.out, assemble_cellularity(spec["dataset_name"], args.image_set,
                                                   args.shard_records, args.shards,
                                                   Path(args.work)))
        remove_parts(Path(args.work), args.shards)
    elif args.action == "cellularity":
        write_table(args.out, stages.cellularity(args.image_set, manifest, generated,
                                                 cellularity_config, workers))
    elif args.action == "shard":
        from cellflow.evaluation_shards import run_shard

        run_shard(spec["dataset_name"], args.image_set, manifest, generated, cellularity_config,
                  _feature_spaces(spec, args.features, manifest), args.shard, args.shards,
                  Path(args.work), Path(args.out), workers, device)
    elif args.action == "validate-cellularity":
        from cellflow.cellularity import (
            SCORE_COLUMN,
            validate_against_ground_truth,
            validate_against_scores,
        )

        prepared = read_table(manifest)
        validate = (validate_against_scores if SCORE_COLUMN in prepared.columns
                    else validate_against_ground_truth)
        table, summary = validate(prepared, manifest.parent, cellularity_config, workers)
        write_table(args.out, table)
        write_text(Path(args.out).with_suffix(".json"), json.dumps(summary, indent=2))
    elif args.action == "fidelity":
        spaces = _feature_spaces(spec, args.features, manifest)
        write_table(args.out, stages.fidelity(
            spec["dataset_name"], args.image_set, manifest, generated, classes, spaces,
            evaluation["kid_subset_size"], evaluation["kid_subsets"], spec["seed"], device))
    elif args.action == "trajectories":
        from cellflow.classifier import NoiseAwareClassifier

        classifier = NoiseAwareClassifier.from_pretrained(Path(args.classifier) / "classifier")
        frames, summary = stages.analyse_trajectories(
            manifest, read_table(args.real_cellularity),
            read_table(args.generated_cellularity), generated, classifier, classes,
            device)
        write_table(Path(args.out) / "frames.tsv", frames)
        write_table(Path(args.out) / "summary.tsv", summary)
    elif args.action == "memorization":
        from cellflow.memorization import nearest_real_neighbours

        domain = _feature_spaces(spec, args.features, manifest)[:1]
        neighbours, reference = nearest_real_neighbours(manifest, generated, domain,
                                                        device=device)
        write_table(Path(args.out) / "neighbours.tsv", neighbours)
        write_table(Path(args.out) / "reference.tsv", reference)
    else:
        from dataclasses import replace

        # One small image set per trajectory: not worth a cache file each.
        domain = replace(_feature_spaces(spec, args.features, manifest)[0], cache=None)
        write_table(args.out, stages.temporal_coherence(
            manifest, generated, domain, evaluation["coherence_shuffles"], spec["seed"],
            device))
    return 0


def _benchmark_files(paths: list[str]):
    """Snakemake benchmark files with the rule, dataset and job each belongs to.

    Paths are ``results/<dataset>/benchmarks/<rule>.tsv`` (or ``.../<rule>/<job>.tsv``) for
    one dataset's jobs, ``results/benchmarks/<benchmark>/jobs/<rule>[/<job>].tsv`` for the
    cross-dataset ones.
    """
    import pandas as pd

    tables = []
    for path in map(Path, paths):
        parts = path.parts
        cross_dataset = "jobs" in parts and parts[parts.index("jobs") - 2] == "benchmarks"
        at = parts.index("jobs") if cross_dataset else parts.index("benchmarks")
        table = pd.read_csv(path, sep="\t", na_values=["-"])
        table["rule"] = parts[at + 1] if len(parts) > at + 2 else path.stem
        table["job"] = path.stem
        table["dataset"] = "" if cross_dataset else parts[at - 1]
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def figures(args: argparse.Namespace) -> int:
    """One benchmark figure (PNG + PDF) and, for the summaries, its table (TSV + Markdown)."""
    _job_setup(None, args.log)
    import json

    import pandas as pd

    from cellflow import figures as draw
    from cellflow.io import read_table
    from cellflow.machine import describe_machine

    out, table = Path(args.out), Path(args.table) if args.table else None
    if args.kind == "classification":
        runs = pd.concat(map(read_table, args.runs), ignore_index=True) if args.runs else None
        draw.classification_benchmark(read_table(args.inputs[0]), out, table, args.metric,
                                      runs)
    elif args.kind == "fidelity":
        draw.fidelity_benchmark(pd.concat(map(read_table, args.inputs), ignore_index=True),
                                out, table)
    elif args.kind == "trajectories":
        summaries = [read_table(path).assign(dataset=Path(path).parts[-4])
                     for path in args.inputs]
        coherence = [read_table(path).assign(dataset=Path(path).parts[-3])
                     for path in args.coherence]
        fidelity = (pd.concat(map(read_table, args.fidelity), ignore_index=True)
                    if args.fidelity else None)
        draw.trajectory_benchmark(pd.concat(summaries, ignore_index=True),
                                  pd.concat(coherence, ignore_index=True), out, table, fidelity)
    elif args.kind == "side-by-side":
        fidelity = pd.concat(map(read_table, args.fidelity), ignore_index=True)
        flags = {method: codes for (_, method), codes in draw.method_flags(fidelity).items()}
        generated = [draw.GeneratedSet(Path(folder).name,
                                       read_table(Path(folder) / "manifest.tsv"), Path(folder),
                                       flags.get(Path(folder).name, ""))
                     for folder in args.inputs]
        data = read_table(args.manifest)
        draw.side_by_side(data, Path(args.manifest).parent, generated, args.classes.split(","),
                          out, args.title, args.per_method)
    elif args.kind == "memorization":
        from cellflow.memorization import DEFAULT_QUANTILE, flag_summary, memorization_summary

        folders = [Path(path).parent for path in args.inputs]
        neighbours = pd.concat([read_table(folder / "neighbours.tsv") for folder in folders],
                               ignore_index=True)
        reference = read_table(folders[0] / "reference.tsv")
        summary = memorization_summary(neighbours, reference)
        summary.insert(0, "dataset", args.title)
        summary = flag_summary(summary, args.title)
        draw.memorization_table(summary, table, DEFAULT_QUANTILE)
        draw.memorization_ratios(neighbours, reference, out,
                                 f"{args.title}: distance to the nearest training image",
                                 DEFAULT_QUANTILE)
    elif args.kind == "closest-pairs":
        draw.closest_pairs_figure(read_table(args.inputs[0]), Path(args.generated),
                                  Path(args.manifest).parent, out, args.title)
    elif args.kind == "per-class":
        draw.per_class_figure(read_table(args.inputs[0]), read_table(args.confusion), out,
                              table, args.title)
    elif args.kind == "front-page":
        from cellflow.report import front_page

        def by_dataset(paths: list[str]) -> dict[str, list[Path]]:
            grouped: dict[str, list[Path]] = {}
            for path in map(Path, paths):  # results/{dataset}/figures/[tables/]<name>
                grouped.setdefault(path.parts[path.parts.index("figures") - 1], []).append(path)
            return grouped

        front_page(args.title, {Path(path).stem: Path(path) for path in args.inputs},
                   {Path(path).stem: Path(path) for path in args.figures},
                   by_dataset(args.side_by_side), args.configs.split(","), out, table,
                   by_dataset(args.dataset_tables))
    elif args.kind == "strips":
        data = read_table(args.manifest)
        images = Path(args.manifest).parent
        sources = dict(zip(data["id"], images / data["path"], strict=True))
        examples = (data[data["split"] == "train"].sort_values("id")
                    .drop_duplicates("label_name"))
        draw.trajectory_strips(
            read_table(Path(args.generated) / "manifest.tsv"), Path(args.generated), sources,
            dict(zip(examples["label_name"], images / examples["path"], strict=True)), out,
            args.title, args.per_transition)
    elif args.kind == "cellularity":
        draw.cellularity_curves(read_table(args.frames), read_table(args.real), out, args.title)
    elif args.kind == "fourier":
        generated = Path(args.generated)
        draw.fourier_stairs(read_table(generated / "fourier.tsv"),
                            read_table(generated / "stairs.tsv"), out, args.title,
                            args.per_transition)
    elif args.kind == "training":
        runs = {" / ".join(Path(path).parts[-4:-1]): pd.read_csv(path)
                for path in args.inputs}
        draw.training_curves(pd.read_csv(Path(args.diffusion) / "train_log.csv"),
                             pd.read_csv(Path(args.classifier) / "train_log.csv"),
                             read_table(Path(args.classifier) / "accuracy_by_t.tsv"), runs, out,
                             args.title)
    elif args.kind == "runtimes":
        from cellflow.provenance import provenance_table, records_under

        records = provenance_table(records_under(args.provenance))
        draw.runtime_table(_benchmark_files(args.inputs), out, table, describe_machine(),
                           records)
    else:
        validation = Path(args.inputs[0])
        draw.cellularity_validation(read_table(validation),
                                    json.loads(validation.with_suffix(".json").read_text()),
                                    out, args.title)
    return 0


def import_guided_diffusion(args: argparse.Namespace) -> int:
    """Convert guided-diffusion checkpoints into model folders (cellflow.guided_diffusion)."""
    from cellflow.guided_diffusion import (
        GuidedDiffusionError,
        convert_files,
        describe_conversion,
        load_checkpoint,
    )
    from cellflow.pretrained import class_rows, numbered_classes

    def split(text: str) -> list[str]:
        return [name.strip() for name in text.split(",") if name.strip()]

    checkpoint_classes = split(args.checkpoint_classes) if args.checkpoint_classes else None
    try:
        # No class order of ours (a model of other classes, to fine-tune from): keep the
        # checkpoint's, named by --checkpoint-classes or numbered.
        checkpoint = args.unet or args.classifier
        classes = (split(args.classes) if args.classes else checkpoint_classes
                   or numbered_classes(class_rows(load_checkpoint(checkpoint)), checkpoint))
        record = convert_files(
            args.out, classes, unet=args.unet, unet_flags=args.unet_flags,
            classifier=args.classifier, classifier_flags=args.classifier_flags,
            checkpoint_classes=checkpoint_classes or (None if args.classes else classes),
            qkv_order=args.qkv_order)
    except (GuidedDiffusionError, FileNotFoundError) as err:
        print(f"import-guided-diffusion: {err}", file=sys.stderr)
        return 1
    print(describe_conversion(record, args.out))
    return 0


def doctor(args: argparse.Namespace) -> int:
    from cellflow.doctor import run_doctor

    findings = run_doctor(args.configfile, profile=args.profile, results=args.results,
                          workflow_dir=Path(__file__).resolve().parent.parent)
    for finding in findings:
        print(finding.line(), flush=True)
    problems = sum(finding.severity == "problem" for finding in findings)
    print(f"{problems} problem(s)" if problems else "no problems found")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    import cellflow

    # @FILE stands for the arguments in FILE, one a line: the workflow passes long file
    # lists so, keeping every printed command one short line
    parser = argparse.ArgumentParser(prog="cellflow", description=__doc__,
                                     fromfile_prefix_chars="@")
    parser.add_argument("--version", action="version", version=f"cellflow {cellflow.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check-config", help="validate config files: the schema, and what they need of this "
                             "machine (data roots, weights files, timm backbone names)")
    check.add_argument("config", nargs="+",
                       help="YAML config(s), e.g. config/paper.yaml; several are merged in "
                            "order, as snakemake --configfile merges them")
    check.add_argument("--schema-only", action="store_true",
                       help="only what the workflow checks when it parses (the schema and the "
                            "consistency of the keys): no files, no timm; e.g. on a machine "
                            "without the data")
    scaffold = commands.add_parser(
        "new-dataset", help="write a complete, commented config for one dataset",
        description="Write a complete, commented config for one dataset: its classes (from "
                    "the class folders of ROOT, or those its official kind declares), "
                    "transitions of consecutive classes, every downstream strategy (every "
                    "batch augmentation and every generation method, Cellflow included), and "
                    "the sizes of a preset. It is validated before it is written.")
    scaffold.add_argument("name", help="the dataset's name (results/NAME/; also the "
                                       "benchmark's: results/benchmarks/NAME/)")
    scaffold.add_argument("root", help="the data: class folders ROOT/<class>/*.png (or "
                                       "ROOT/{train,val,test}/<class>/), or the unpacked "
                                       "download of an official kind")
    scaffold.add_argument("--kind", default="folder",
                          help="folder (default: class folders) or an official layout: mhist, "
                               "chaoyang, bci, aml, prcc, breastpathq, gleason2019 "
                               "(README \"Datasets\")")
    scaffold.add_argument("--preset", choices=["demo", "paper"], default="demo",
                          help="model, training, generation, downstream and evaluation sizes: "
                               "demo (config/config.yaml: tiny, minutes on a CPU; default) or "
                               "paper (config/paper.yaml)")
    scaffold.add_argument("--output", help="the file to write (default: config/NAME.yaml)")
    scaffold.add_argument("--resolution", type=int,
                          help="side in pixels every stage sees (default: the preset's, 32 "
                               "for demo, 256 for paper)")
    scaffold.add_argument("--force", action="store_true", help="overwrite an existing file")
    show = commands.add_parser(
        "show-config", help="print the effective config: files merged in order as snakemake "
                            "merges them, validated, every default filled in")
    show.add_argument("config", nargs="+", help="YAML config(s), merged in order")
    show.add_argument("--comments", action="store_true",
                      help="each key with its meaning from the schema")
    preflight = commands.add_parser(
        "doctor", help="preflight check of a run: data, weights, disk, SLURM, GPUs")
    preflight.add_argument("--configfile", nargs="+", required=True,
                           help="config file(s), merged in order as Snakemake merges them")
    preflight.add_argument("--profile", help="the Snakemake profile the run will use (slurm: "
                                             "also check the cluster set-up)")
    preflight.add_argument("--results", default="results",
                           help="where the run writes (for the free-disk check)")
    stage = commands.add_parser("data", help="render the synthetic dataset, prepare a dataset")
    stage.add_argument("action", choices=["synthesize", "prepare"])
    stage.add_argument("--spec", type=spec_text, required=True,
                       help=SPEC_HELP + "dataset_name, dataset, seed (prepare: and prepare)")
    stage.add_argument("--raw-root", help="prepare: the dataset's raw images")
    stage.add_argument("--ground-truth", help="prepare: a synthetic dataset's ground_truth.tsv")
    stage.add_argument("--out", required=True,
                       help="synthesize: raw/ground_truth.tsv; prepare: data/manifest.tsv "
                            "(the other outputs go beside it)")
    stage.add_argument("--threads", type=int, help="CPU threads (default: all)")
    stage.add_argument("--log", help="write logging and progress to this file")
    fit = commands.add_parser("train", help="train the diffusion model or the classifier")
    fit.add_argument("model", choices=["diffusion", "classifier", "autoencoder", "ldm", "dit"])
    fit.add_argument("--spec", type=spec_text, required=True,
                     help=SPEC_HELP + "dataset_name, dataset, noise_schedule, settings, seed")
    fit.add_argument("--manifest", required=True, help="prepared data manifest.tsv")
    fit.add_argument("--out", required=True, help="output folder (replaced at the end)")
    fit.add_argument("--checkpoints", required=True,
                     help="folder for resumable checkpoints, outside the declared outputs")
    fit.add_argument("--autoencoder", help="ldm, dit: the latent autoencoder folder (vae/)")
    fit.add_argument("--threads", type=int, help="CPU threads for torch (default: all)")
    fit.add_argument("--gpus", type=int, default=0, help=GPUS_HELP)
    fit.add_argument("--log", help="write logging and progress to this file")
    make = commands.add_parser("generate", help="Cellflow trajectories or a baseline")
    make.add_argument("method", help=f"{', '.join(METHODS)}, or a generation.external entry")
    make.add_argument("--spec", type=spec_text, required=True,
                      help=SPEC_HELP + "dataset_name, dataset, noise_schedule, bridge, method,"
                      " seed")
    make.add_argument("--manifest", required=True, help="prepared data manifest.tsv")
    make.add_argument("--diffusion", help="diffusion model folder (unet/)")
    make.add_argument("--classifier", help="classifier folder (classifier/), if the method "
                                           "reads one")
    make.add_argument("--decoder", help="a second diffusion model folder that decodes")
    make.add_argument("--autoencoder", help="latent autoencoder folder (vae/): ldm, dit")
    make.add_argument("--ldm", help="latent diffusion model folder (model/)")
    make.add_argument("--dit", help="diffusion transformer folder (model/)")
    make.add_argument("--out", required=True, help="output folder (replaced at the end)")
    make.add_argument("--work", help="folder for finished batches, so that a rerun resumes "
                                     "(outside the outputs; removed when they are complete)")
    make.add_argument("--shard", type=int,
                      help="compute only this shard (0-based) of --shards; --out is its record")
    make.add_argument("--shards", type=int, default=1,
                      help="the number of shards; without --shard, gather their batches")
    make.add_argument("--shard-records", nargs="*", default=[],
                      help="the gather: every shard's record")
    make.add_argument("--threads", type=int, help="CPU threads for torch (default: all)")
    make.add_argument("--gpus", type=int, default=0, help=GPUS_HELP)
    make.add_argument("--log", help="write logging and progress to this file")
    adopt = commands.add_parser("use-pretrained",
                                help="check a dataset's pretrained model and put it in place")
    adopt.add_argument("--spec", type=spec_text, required=True,
                       help=SPEC_HELP + "dataset_name, dataset, noise_schedule, model, key, "
                            "pretrained, settings, seed")
    adopt.add_argument("--manifest", required=True, help="prepared data manifest.tsv")
    adopt.add_argument("--out", required=True, help="model folder (replaced at the end)")
    adopt.add_argument("--threads", type=int, help="CPU threads for torch (default: all)")
    adopt.add_argument("--gpus", type=int, default=0, help=GPUS_HELP)
    adopt.add_argument("--log", help="write logging and progress to this file")
    down = commands.add_parser("downstream", help="downstream classifier runs and tables")
    down.add_argument("action", choices=["train", "summarize", "benchmark"])
    down.add_argument("--spec", type=spec_text,
                      help="train: " + SPEC_HELP + "dataset, downstream")
    down.add_argument("--manifest", help="train: prepared data manifest.tsv")
    down.add_argument("--backbone", help="train: timm model name")
    down.add_argument("--strategy", help="train: augmentation strategy name")
    down.add_argument("--seed", type=int, help="train: seed of the run")
    down.add_argument("--generated", help="train: folder of a generative method's images")
    down.add_argument("--work", help="train: folder for the per-epoch checkpoint, so that a "
                                     "rerun resumes (outside the outputs; removed at the end)")
    down.add_argument("--dataset", help="summarize: dataset name")
    down.add_argument("--inputs", nargs="*", default=[],
                      help="summarize: metrics.json files; benchmark: summary.tsv files")
    down.add_argument("--out", required=True, help="run folder, or the table to write")
    down.add_argument("--threads", type=int, help="CPU threads for torch (default: all)")
    down.add_argument("--gpus", type=int, default=0, help=GPUS_HELP)
    down.add_argument("--log", help="write logging and progress to this file")
    score = commands.add_parser("evaluate", help="evaluation tables of one dataset")
    score.add_argument("action", choices=["cellularity", "validate-cellularity", "fidelity",
                                          "trajectories", "coherence", "memorization",
                                          "shard"])
    score.add_argument("--spec", type=spec_text, required=True,
                       help=SPEC_HELP + "dataset_name, dataset, evaluation, feature_network, seed")
    score.add_argument("--manifest", required=True, help="prepared data manifest.tsv")
    score.add_argument("--image-set",
                       help="cellularity, fidelity: real images or one method's")
    score.add_argument("--generated", help="a generation folder (trajectories/<method>)")
    score.add_argument("--features",
                       help="fidelity, coherence, shard: feature network weights")
    score.add_argument("--shard", type=int, help="shard: which shard of --shards to compute")
    score.add_argument("--shards", type=int, help="shard, cellularity: shards of the image set")
    score.add_argument("--shard-records", nargs="*", default=None,
                       help="cellularity: assemble the table from these shards' records")
    score.add_argument("--work", help="shard, cellularity: the shards' work folder")
    score.add_argument("--classifier", help="trajectories: trained classifier folder")
    score.add_argument("--real-cellularity", help="trajectories: cellularity of real images")
    score.add_argument("--generated-cellularity", help="trajectories: cellularity of frames")
    score.add_argument("--out", required=True, help="the table (or folder) to write")
    score.add_argument("--threads", type=int, help="CPU threads for torch (default: all)")
    score.add_argument("--gpus", type=int, default=0, help=GPUS_HELP)
    score.add_argument("--log", help="write logging and progress to this file")
    draw = commands.add_parser("figures", help="one benchmark figure and its table")
    draw.add_argument("kind", choices=["classification", "fidelity", "trajectories", "strips",
                                       "cellularity", "fourier", "training", "runtimes",
                                       "cellularity-validation", "side-by-side", "per-class",
                                       "memorization", "closest-pairs", "front-page"])
    draw.add_argument("--inputs", nargs="*", default=[],
                      help="the tables drawn (classification: benchmark.tsv; fidelity: "
                           "fidelity tables; trajectories: summaries; training: downstream "
                           "train logs; runtimes: benchmark files; cellularity-validation: "
                           "the validation table)")
    draw.add_argument("--coherence", nargs="*", default=[], help="trajectories: coherence")
    draw.add_argument("--provenance", nargs="*", default=[],
                      help="runtimes: output trees whose provenance records say where jobs ran")
    draw.add_argument("--runs", nargs="*", default=[],
                      help="classification: runs.tsv of each dataset (seeds, n test)")
    draw.add_argument("--fidelity", nargs="*", default=[],
                      help="trajectories, side-by-side: fidelity tables (their flags)")
    draw.add_argument("--confusion", help="per-class: downstream/confusion.tsv")
    draw.add_argument("--classes", help="side-by-side: the dataset's classes, comma-separated")
    draw.add_argument("--per-method", type=int, default=4,
                      help="side-by-side: images per class and method")
    draw.add_argument("--figures", nargs="*", default=[], help="front-page: summary PNGs")
    draw.add_argument("--side-by-side", nargs="*", default=[],
                      help="front-page: each dataset's side-by-side PNG")
    draw.add_argument("--configs", default="", help="front-page: the run's config files")
    draw.add_argument("--dataset-tables", nargs="*", default=[],
                      help="front-page: each dataset's flagged tables (memorization)")
    draw.add_argument("--manifest", help="strips: prepared data manifest.tsv")
    draw.add_argument("--generated", help="strips, fourier: trajectories/cellflow folder")
    draw.add_argument("--frames", help="cellularity: evaluation/trajectories/frames.tsv")
    draw.add_argument("--real", help="cellularity: evaluation/cellularity/real.tsv")
    draw.add_argument("--diffusion", help="training: models/diffusion folder")
    draw.add_argument("--classifier", help="training: models/classifier folder")
    draw.add_argument("--metric", default="balanced_accuracy", help="classification metric")
    draw.add_argument("--per-transition", type=int, default=3, help="trajectories shown")
    draw.add_argument("--title", default="", help="figure title")
    draw.add_argument("--out", required=True, help="figure path without suffix")
    draw.add_argument("--table", help="table path without suffix (summaries)")
    draw.add_argument("--log", help="write logging to this file")
    gd = commands.add_parser("import-guided-diffusion",
                             help="convert openai guided-diffusion checkpoints into model folders")
    gd.add_argument("--unet", help="guided-diffusion UNet checkpoint (.pt state dict)")
    gd.add_argument("--unet-flags", default="",
                    help="its flags as in guided-diffusion's README (MODEL_FLAGS), quoted "
                         "(a lone --flag=value needs --unet-flags=...)")
    gd.add_argument("--classifier", help="guided-diffusion classifier checkpoint (.pt)")
    gd.add_argument("--classifier-flags", default="",
                    help="its flags (CLASSIFIER_FLAGS), quoted")
    gd.add_argument("--classes",
                    help="our class order, comma-separated (the config's dataset classes); "
                         "omitted: the checkpoint's order, to fine-tune from (init_from)")
    gd.add_argument("--checkpoint-classes",
                    help="the checkpoint's label order, comma-separated (default: the class "
                         "names sorted, guided-diffusion's order)")
    gd.add_argument("--qkv-order", choices=["legacy", "new"],
                    help="attention qkv layout (default: from use_new_attention_order)")
    gd.add_argument("--out", required=True,
                    help="folder for diffusion/, classifier/ and conversion.json")
    args = parser.parse_args(argv)
    if args.command not in JOB_COMMANDS:
        return _dispatch(args)
    gpus = getattr(args, "gpus", 0)  # the figure jobs have no --gpus
    if gpus:
        from cellflow.gpu_slots import acquire

        # a local run on a multi-GPU machine: free devices of this job's own, taken before
        # anything starts CUDA (which reads CUDA_VISIBLE_DEVICES once); under SLURM the
        # allocation's devices as given. They stay locked until this process exits.
        acquire(gpus)
    from cellflow.provenance import config_digest, recorded

    # most figure jobs' --out is a stem, and their record goes with the PNG; the front page's
    # is its HTML file (a record is written for the outputs that exist)
    outputs = [Path(args.out + ".png"), Path(args.out)] if args.command == "figures" \
        else [Path(args.out)]
    if getattr(args, "shard", None) is not None:
        outputs = []  # a shard's record is temporary and holds its provenance itself
    positional = next(getattr(args, name) for name in ("model", "method", "action", "kind")
                      if hasattr(args, name))
    spec = getattr(args, "spec", None)
    shard = getattr(args, "shard", None)
    started = time.perf_counter()
    with recorded(outputs, rule=f"{args.command} {positional}",
                  shard=f"{shard} of {args.shards}" if shard is not None else None,
                  config_hash=config_digest(spec) if spec else None):
        code = _dispatch(args)
        if code:
            raise SystemExit(code)  # a job that reports failure gets no record
    if os.environ.get("RANK", "0") == "0":
        from cellflow.logs import job_summary

        name = f"{args.command} {positional}" + (f" shard {shard}" if shard is not None else "")
        # a shard's output is its record (the batches it names lie in the shared work folder)
        written = outputs if shard is None else [Path(args.out)]
        summary = job_summary(name, written, time.perf_counter() - started)
        logging.getLogger("cellflow").info(summary)
        print(summary, file=sys.__stdout__, flush=True)  # the terminal, not the log
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "import-guided-diffusion":
        return import_guided_diffusion(args)
    if args.command == "figures":
        return figures(args)
    if args.command == "evaluate":
        return evaluate(args)
    if args.command == "downstream":
        return downstream(args)
    if args.command == "generate":
        return generate(args.method, args.spec, args.manifest,
                        {name: getattr(args, name) for name in MODEL_ARGUMENTS},
                        args.out, args.work, args.threads, args.log, args.shard,
                        args.shards, args.shard_records)
    if args.command == "data":
        return data(args)
    if args.command == "use-pretrained":
        return use_pretrained(args.spec, args.manifest, args.out, args.threads, args.log)
    if args.command == "doctor":
        return doctor(args)
    if args.command == "check-config":
        return check_config(args.config, schema_only=args.schema_only)
    if args.command == "new-dataset":
        return new_dataset(args)
    if args.command == "show-config":
        return show_config(args.config, args.comments)
    if args.command == "train":
        return train(args.model, args.spec, args.manifest, args.out, args.checkpoints,
                     args.threads, args.log, args.autoencoder)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
