"""The proof run: the whole pipeline on config/proof.yaml, once per bridge variant (`make proof`).

Each variant is the same config with other bridge settings, run as its own Snakemake working
directory ``benchmarks/proof/<variant>/`` (its ``results/`` and ``logs/`` are the usual tree).
The first variant runs the whole DAG. The others share what no bridge setting changes: the
first variant's data, trained models, real-only downstream runs and real-image cellularity are
hard-linked into their trees (:data:`SHARED`), and they build only what a bridge setting does
change (:data:`VARIANT_TARGETS`), with Snakemake told not to rerun the shared files for their
modification times (``--rerun-triggers`` without ``mtime``). Afterwards the tables and figures
a reader needs are collected in ``benchmarks/results/proof.md`` and
``benchmarks/results/proof/<variant>/``, with the machine.

    python -m benchmarks.proof_run [--variants reference posterior] [--run ...] [--cores 2]

A rerun resumes: Snakemake skips every finished job of every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.machine import RESULTS, markdown_table
from cellflow.machine import describe_machine

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
WORK = REPO / "benchmarks" / "proof"
CONFIG = REPO / "config" / "proof.yaml"
DATASET = "proof"

# Bridge settings of each variant over config/proof.yaml (reference: the faithful defaults).
VARIANTS: dict[str, dict[str, object]] = {
    "reference": {},
    "posterior": {"timestep_spacing": "quadratic", "stair_selection": "posterior",
                  "soft_label": "posterior"},
    "posterior-linear": {"timestep_spacing": "quadratic", "stair_selection": "posterior"},
}
# What a later variant takes from the first one, and what it builds itself.
SHARED = [f"results/{DATASET}/{part}" for part in (
    "raw", "data", "models", "downstream/resnet10t/none", "evaluation/cellularity/real.tsv")]
VARIANT_TARGETS = [f"results/{DATASET}/evaluation/trajectories/summary.tsv",
                   f"results/{DATASET}/evaluation/coherence.tsv",
                   f"results/{DATASET}/downstream/summary.tsv"]
# Figures worth a look, copied next to the tables.
FIGURES = {
    "models/diffusion/samples.png": "diffusion_samples.png",
    "models/diffusion/loss_curve.png": "diffusion_loss.png",
    "models/classifier/accuracy_by_t.png": "classifier_accuracy_by_t.png",
}


def variant_config(name: str) -> Path:
    """Write the variant's config (proof.yaml with its bridge overrides) into its folder."""
    config = yaml.safe_load(CONFIG.read_text())
    config["bridge"] = {**config.get("bridge", {}), **VARIANTS[name]}
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(f"# {name}: config/proof.yaml with bridge {json.dumps(VARIANTS[name])}\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


def share_results(first: str, name: str) -> None:
    """Hard-link what the first variant computed and no bridge setting changes (SHARED)."""
    for part in SHARED:
        source, destination = WORK / first / part, WORK / name / part
        if destination.exists() or not source.exists():
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination, copy_function=os.link)
        else:
            os.link(source, destination)


def run_variant(name: str, cores: int, later: bool, dry_run: bool = False) -> float:
    config = variant_config(name)
    started = time.perf_counter()
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE),
               "--directory", str(WORK / name), "--configfile", str(config),
               "--cores", str(cores)]
    if later:  # the targets first: --rerun-triggers takes every word after it
        command[3:3] = VARIANT_TARGETS
        command += ["--rerun-triggers", "params", "input", "software-env", "code"]
    if dry_run:
        command.append("-n")
    environment = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
                       f"{os.environ.get('PATH', '')}")
    with (WORK / f"{name}.log").open("a") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env=environment, cwd=REPO)
    return time.perf_counter() - started


def trajectory_rows(name: str, results: Path) -> list[dict]:
    """Per transition: the proof run's targets, as medians over its trajectories."""
    summary = pd.read_csv(results / "evaluation" / "trajectories" / "summary.tsv", sep="\t")
    stairs = pd.read_csv(results / "trajectories" / "cellflow" / "stairs.tsv", sep="\t")
    first = stairs[stairs["frame_index"] == 1]
    rows = []
    for (source, target), group in summary.groupby(["source_class", "target_class"]):
        rules = first[first["target_class"] == target]["stair_rule"]
        rows.append({
            "variant": name, "transition": f"{source} → {target}", "trajectories": len(group),
            # count_spearman is signed towards the target: >= 0.8 is the target
            "count Spearman towards target": f"{group['count_spearman_towards'].median():.2f}",
            "landing (count)": f"{group['landing_count'].median():.2f}",
            "p(target) first": f"{group['target_probability_first'].median():.2f}",
            "p(target) last": f"{group['target_probability_last'].median():.2f}",
            "p(target) Spearman": f"{group['target_probability_spearman'].median():.2f}",
            "stair rules": ", ".join(f"{k} {v}" for k, v in rules.value_counts().items()),
            "median stairs": str(stairs[stairs["target_class"] == target]
                                 .groupby("frame_index")["stair"].median().astype(int).tolist()),
        })
    return rows


def downstream_rows(name: str, results: Path) -> list[dict]:
    summary = pd.read_csv(results / "downstream" / "summary.tsv", sep="\t")
    keep = summary[summary["metric"].isin(["balanced_accuracy", "accuracy", "macro_f1"])]
    return [{"variant": name, **row} for row in keep.to_dict("records")]


def fidelity_rows(name: str, results: Path) -> list[dict]:
    rows = []
    for path in sorted((results / "evaluation" / "fidelity").glob("*.tsv")):
        table = pd.read_csv(path, sep="\t")
        overall = table[table["class"] == "all"] if "class" in table else table
        for row in overall.to_dict("records"):
            rows.append({"variant": name, "image_set": path.stem, **row})
    return rows


def markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "(none)"
    return markdown_table(table.to_dict("records"),
                          lambda value: f"{value:.3f}" if isinstance(value, float) else str(value))


def collect(names: list[str], seconds: dict[str, float]) -> Path:
    trajectories, downstream, fidelity, timings = [], [], [], []
    for name in names:
        results = WORK / name / "results" / DATASET
        trajectories += trajectory_rows(name, results)
        downstream += downstream_rows(name, results)
        fidelity += fidelity_rows(name, results)
        generation = json.loads((results / "trajectories" / "cellflow" / "generation.json")
                                .read_text())
        # elapsed_s of the last logged step: the training itself, whichever call ran it
        training = {model: pd.read_csv(results / "models" / model / "train_log.csv")["elapsed_s"]
                    .max() for model in ("diffusion", "classifier")}
        timings.append({
            "variant": name,
            "wall minutes (this call)": f"{seconds.get(name, float('nan')) / 60:.1f}",
            "trajectories minutes": f"{generation['seconds'] / 60:.1f}",
            "UNet evaluations per trajectory": f"{generation['unet_evaluations_per_output']:.0f}",
            **{f"{model} training minutes": f"{value / 60:.1f}"
               for model, value in training.items()}})
        out = RESULTS / "proof" / name
        out.mkdir(parents=True, exist_ok=True)
        for source, target in FIGURES.items():
            if (results / source).is_file():
                shutil.copyfile(results / source, out / target)
        for strip in (results / "trajectories" / "cellflow" / "strips").glob("*.png"):
            shutil.copyfile(strip, out / f"strip_{strip.name}")
        for table in ("evaluation/trajectories/summary.tsv", "downstream/summary.tsv",
                      "trajectories/cellflow/stairs.tsv", "trajectories/cellflow/generation.json"):
            shutil.copyfile(results / table, out / table.replace("/", "_"))
    report = RESULTS / "proof.md"
    report.write_text("\n\n".join([
        "# Proof run (`make proof`, config/proof.yaml)",
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {describe_machine()}",
        "Variants: " + "; ".join(f"`{n}`: bridge {json.dumps(VARIANTS[n])}" for n in names),
        "## Run time", markdown(pd.DataFrame(timings)),
        "## Trajectories (medians per transition; targets: Spearman >= 0.8, landing in "
        "[0.7, 1.3], p(target) last >= 0.9)", markdown(pd.DataFrame(trajectories)),
        "## Downstream (paired difference to `none` over seeds, 95% t-interval)",
        markdown(pd.DataFrame(downstream)),
        "## Fidelity (class all; `adm` = classifier-guided samples of the diffusion model)",
        markdown(pd.DataFrame(fidelity)),
    ]) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["reference", "posterior"],
                        choices=sorted(VARIANTS), help="the first one runs the whole DAG")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--run", nargs="*", choices=sorted(VARIANTS),
                        help="run only these of the variants (default: all; none: only "
                             "gather the tables and figures of finished ones)")
    parser.add_argument("--dry-run", action="store_true", help="plan the runs, run nothing")
    args = parser.parse_args()
    seconds = {}
    for index, name in enumerate(args.variants):
        if args.run is None or name in args.run:
            if index:
                share_results(args.variants[0], name)
            seconds[name] = run_variant(name, args.cores, later=index > 0,
                                        dry_run=args.dry_run)
    if args.dry_run:
        return
    print(collect(args.variants, seconds))


if __name__ == "__main__":
    main()
