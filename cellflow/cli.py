"""The ``cellflow`` command: what a user needs outside Snakemake."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellflow.config import ConfigError, dataset_configs, load_config


def check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    for dataset in dataset_configs(config).values():
        root = f", root {dataset.root}" if dataset.root else ""
        print(f"{dataset.name}: {dataset.kind}, {len(dataset.classes)} classes, "
              f"{dataset.resolution} px{root}")
    print(f"{path}: valid")
    return 0


def _job_setup(threads: int | None, log_file: str | None) -> None:
    """What every pipeline job does first: log to its file, use its share of the CPUs."""
    from cellflow.logs import log_to_file

    if log_file:
        log_to_file(log_file)
    if threads:
        import torch  # only jobs that compute pay for importing it

        torch.set_num_threads(threads)


def train(model: str, spec_json: str, manifest: str, out: str, checkpoints: str,
          threads: int | None, log_file: str | None) -> int:
    """Train one model of one dataset; run under `accelerate launch` for several GPUs."""
    from cellflow.stages import StageSpec, train_classifier, train_diffusion

    _job_setup(threads, log_file)
    spec = StageSpec.from_json(spec_json)
    stage = train_diffusion if model == "diffusion" else train_classifier
    stage(spec, Path(manifest), Path(out), Path(checkpoints))
    return 0


def generate(method: str, spec_json: str, manifest: str, diffusion: str, classifier: str,
             out: str, threads: int | None, log_file: str | None) -> int:
    """Cellflow trajectories or a generative baseline for one dataset."""
    import json

    from cellflow.config import DatasetConfig
    from cellflow.diffusion import NoiseSchedule
    from cellflow.generate import generate_adm, generate_cellflow, generate_ddib

    _job_setup(threads, log_file)
    spec = json.loads(spec_json)
    dataset = DatasetConfig.from_dict(spec["dataset_name"], spec["dataset"])
    schedule = NoiseSchedule(**spec["noise_schedule"])
    models = (Path(diffusion), Path(classifier))
    if method == "cellflow":
        generate_cellflow(dataset, schedule, spec["bridge"], Path(manifest), *models, Path(out))
    elif method == "ddib":
        generate_ddib(dataset, schedule, spec["bridge"], spec["baselines"]["ddib"],
                      Path(manifest), *models, Path(out))
    else:
        generate_adm(dataset, schedule, spec["bridge"], spec["baselines"]["adm"], spec["seed"],
                     *models, Path(out))
    return 0


def downstream(args: argparse.Namespace) -> int:
    """Train one downstream run, or aggregate runs into the benchmark tables."""
    import json

    import pandas as pd

    from cellflow.aggregate import read_runs, summarise
    from cellflow.io import write_table

    _job_setup(args.threads, args.log)
    if args.action == "train":
        from cellflow.downstream import DownstreamTrainConfig, train_downstream

        spec = json.loads(args.spec)
        settings = spec["downstream"]
        train_downstream(
            Path(args.manifest), spec["dataset"]["classes"], spec["dataset"]["resolution"],
            args.backbone, args.strategy, settings["strategies"][args.strategy],
            DownstreamTrainConfig.from_dict(settings["train"]), args.seed, Path(args.out),
            Path(args.generated) if args.generated else None,
            settings["pretrained"].get(args.backbone))
    elif args.action == "summarize":
        runs = read_runs(args.inputs, args.dataset)
        write_table(Path(args.out).with_name("runs.tsv"), runs)
        write_table(args.out, summarise(runs))
    else:
        tables = [pd.read_csv(path, sep="\t") for path in args.inputs]
        write_table(args.out, pd.concat(tables, ignore_index=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cellflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a config file against the schema")
    check.add_argument("config", help="path to a YAML config, e.g. config/paper.yaml")
    fit = commands.add_parser("train", help="train the diffusion model or the classifier")
    fit.add_argument("model", choices=["diffusion", "classifier"])
    fit.add_argument("--spec", required=True,
                     help="JSON: dataset_name, dataset, noise_schedule, settings, seed")
    fit.add_argument("--manifest", required=True, help="prepared data manifest.tsv")
    fit.add_argument("--out", required=True, help="output folder (replaced at the end)")
    fit.add_argument("--checkpoints", required=True,
                     help="folder for resumable checkpoints, outside the declared outputs")
    fit.add_argument("--threads", type=int, help="CPU threads for torch (default: all)")
    fit.add_argument("--log", help="write logging and progress to this file")
    make = commands.add_parser("generate", help="Cellflow trajectories or a baseline")
    make.add_argument("method", choices=["cellflow", "ddib", "adm"])
    make.add_argument("--spec", required=True,
                      help="JSON: dataset_name, dataset, noise_schedule, bridge, baselines, seed")
    make.add_argument("--manifest", required=True, help="prepared data manifest.tsv")
    make.add_argument("--diffusion", required=True, help="trained diffusion model folder")
    make.add_argument("--classifier", required=True, help="trained classifier folder")
    make.add_argument("--out", required=True, help="output folder (replaced at the end)")
    make.add_argument("--threads", type=int, help="CPU threads for torch (default: all)")
    make.add_argument("--log", help="write logging and progress to this file")
    down = commands.add_parser("downstream", help="downstream classifier runs and tables")
    down.add_argument("action", choices=["train", "summarize", "benchmark"])
    down.add_argument("--spec", help="train: JSON with dataset and downstream settings")
    down.add_argument("--manifest", help="train: prepared data manifest.tsv")
    down.add_argument("--backbone", help="train: timm model name")
    down.add_argument("--strategy", help="train: augmentation strategy name")
    down.add_argument("--seed", type=int, help="train: seed of the run")
    down.add_argument("--generated", help="train: folder of a generative method's images")
    down.add_argument("--dataset", help="summarize: dataset name")
    down.add_argument("--inputs", nargs="*", default=[],
                      help="summarize: metrics.json files; benchmark: summary.tsv files")
    down.add_argument("--out", required=True, help="run folder, or the table to write")
    down.add_argument("--threads", type=int, help="CPU threads for torch (default: all)")
    down.add_argument("--log", help="write logging and progress to this file")
    args = parser.parse_args(argv)
    if args.command == "downstream":
        return downstream(args)
    if args.command == "generate":
        return generate(args.method, args.spec, args.manifest, args.diffusion, args.classifier,
                        args.out, args.threads, args.log)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "train":
        return train(args.model, args.spec, args.manifest, args.out, args.checkpoints,
                     args.threads, args.log)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
