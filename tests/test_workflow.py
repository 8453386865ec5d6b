"""The Snakemake workflow itself: dry runs of both shipped configs, lint, the demo data stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(workdir), *args]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run or dry run, as rule -> number of jobs."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = {}
    for line in table.splitlines()[3:]:
        rule, _, count = line.rpartition(" ")
        if count.isdigit():
            counts[rule.strip()] = int(count)
    return counts


def tiny_demo_config(tmp_path: Path) -> Path:
    """The demo config with fewer images and a few training steps: the wiring, not the science."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["datasets"]["synthetic"]["synthetic"]["images_per_class"] = 8
    for model in ("diffusion", "classifier"):
        config[model]["train"].update(steps=3, checkpoint_every=2, batch_size=4)
    config["diffusion"]["samples"] = {"per_class": 1, "ddim_steps": 2}
    config["classifier"]["eval"] = {"bands": 2, "noise_draws": 1}
    config["bridge"].update(inversion_steps=10, frames=2, sources_per_transition=2)
    config["baselines"] = {"ddib": {"sources_per_transition": 1}, "adm": {"per_class": 1}}
    config["downstream"].update(strategies={"none": {}, "cellflow": {}}, seeds=[0])
    config["downstream"]["train"].update(epochs=1, batch_size=8)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dry_run_of_the_demo_config(tmp_path):
    result = snakemake(tmp_path, "-n", "--configfile", str(REPO / "config" / "config.yaml"))
    assert "synthesize_dataset" in result.stdout and "prepare_data" in result.stdout


def test_dry_run_of_the_paper_config_names_missing_roots(tmp_path):
    result = snakemake(tmp_path, "-n", "--configfile", str(REPO / "config" / "paper.yaml"))
    log = result.stdout + result.stderr
    assert "dataset 'mhist': data root data/mhist does not exist yet" in log
    assert "results/synthetic" not in log, "the demo dataset must not leak into the paper run"
    counts = job_counts(result.stdout)
    assert counts["prepare_data"] == counts["train_diffusion"] == 7


def test_one_dataset_can_be_selected_on_the_command_line(tmp_path):
    paper = str(REPO / "config" / "paper.yaml")
    result = snakemake(tmp_path, "-n", "--configfile", paper, "--config", "only_datasets=[mhist]")
    assert job_counts(result.stdout)["prepare_data"] == 1
    assert "wildcards: dataset=mhist" in result.stdout
    typo = snakemake(tmp_path, "-n", "--configfile", paper, "--config", "only_datasets=[mhsit]",
                     check=False)
    assert typo.returncode != 0
    assert "paper.yaml + --config: only_datasets: unknown dataset 'mhsit'" in typo.stdout


def test_misspelt_key_fails_naming_it(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["datasets"]["synthetic"]["resolutoin"] = 32
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--configfile", str(path), check=False)
    assert result.returncode != 0
    assert "datasets.synthetic.resolutoin: unknown key (did you mean 'resolution'?)" in (
        result.stdout + result.stderr)
    assert str(path) in result.stdout + result.stderr


def test_every_rule_declares_log_benchmark_threads_and_resources():
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, ResourceSettings

    with SnakemakeApi() as api:
        workflow_api = api.workflow(
            snakefile=REPO / "Snakefile", workdir=REPO,
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=[REPO / "config" / "config.yaml"]),
        )
        rules = [rule for rule in workflow_api._workflow.rules if rule.name != "all"]
    assert rules
    for rule in rules:
        assert rule.log, f"rule {rule.name} has no log"
        assert rule.benchmark, f"rule {rule.name} has no benchmark"
        assert {"mem_mb", "runtime"} <= set(rule.resources), f"rule {rule.name} resources"


def test_lint_and_format_are_clean():
    result = snakemake(REPO, "--lint", check=False)
    assert result.returncode == 0 and "Lints for" not in result.stdout + result.stderr, (
        result.stdout + result.stderr)
    fmt = subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "workflow/rules"],
                         cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr
    ruff = subprocess.run([str(BIN / "ruff"), "check", "cellflow", "tests", "benchmarks",
                           "workflow/scripts"], cwd=REPO, capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    config = tiny_demo_config(tmp_path)
    snakemake(tmp_path, "--cores", "2", "--configfile", str(config))
    data = tmp_path / "results" / "synthetic" / "data"
    manifest = pd.read_csv(data / "manifest.tsv", sep="\t", keep_default_na=False)
    assert len(manifest) == 24
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert {"progression", "nuclei_count", "nuclear_area_fraction", "mask_path"} <= set(
        manifest.columns)
    assert all((data / path).is_file() for path in manifest["path"])
    assert all((data / path).is_file() for path in manifest["mask_path"])
    # the generator's progression bands survive into the manifest, class by class
    bands = manifest.groupby("label")["progression"].agg(["min", "max"])
    assert (bands["max"].iloc[:-1].to_numpy() <= bands["min"].iloc[1:].to_numpy()).all()
    assert (tmp_path / "logs" / "synthetic" / "prepare_data.log").is_file()
    assert (tmp_path / "results" / "synthetic" / "benchmarks" / "prepare_data.tsv").is_file()
    models = tmp_path / "results" / "synthetic" / "models"
    assert (models / "diffusion" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (models / "classifier" / "classifier" / "config.json").is_file()
    assert len(pd.read_csv(models / "diffusion" / "train_log.csv")) == 3
    trajectories = tmp_path / "results" / "synthetic" / "trajectories"
    cellflow = pd.read_csv(trajectories / "cellflow" / "manifest.tsv", sep="\t")
    assert len(cellflow) == 2 * 2 * 2  # transitions x sources x frames
    assert len(pd.read_csv(trajectories / "ddib" / "manifest.tsv", sep="\t")) == 2
    assert len(pd.read_csv(trajectories / "adm" / "manifest.tsv", sep="\t")) == 3
    assert (trajectories / "cellflow" / "strips" / "normal-to-hyperplastic.png").is_file()
    summary = pd.read_csv(tmp_path / "results" / "synthetic" / "downstream" / "summary.tsv",
                          sep="\t")
    assert set(summary["strategy"]) == {"none", "cellflow"}
    benchmark = pd.read_csv(tmp_path / "results" / "benchmark.tsv", sep="\t")
    assert len(benchmark) == len(summary)
    checkpoints = tmp_path / "results" / "synthetic" / "checkpoints" / "diffusion"
    assert sorted(p.name for p in checkpoints.glob("*/step-*")) == ["step-0000002", "step-0000003"]
    # a second run has nothing to do
    again = snakemake(tmp_path, "--cores", "2", "--configfile", str(config), "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    # changing a diffusion setting reruns that model only
    override = tmp_path / "faster.yaml"
    override.write_text("diffusion: {train: {learning_rate: 0.002}}\n")
    changed = snakemake(tmp_path, "--cores", "2", "-n", "--configfile", str(config),
                        str(override))
    assert "train_diffusion" in changed.stdout
    assert "train_classifier" not in changed.stdout and "prepare_data" not in changed.stdout


def test_readme_rule_graph_shows_every_rule(tmp_path):
    result = snakemake(tmp_path, "--rulegraph", "mermaid-js", "--configfile",
                       str(REPO / "config" / "config.yaml"))
    rules = {line.split("[", 1)[1].rstrip("]") for line in result.stdout.splitlines()
             if line.strip().startswith("id") and "[" in line}
    readme = (REPO / "README.md").read_text()
    graph = readme.split("```mermaid", 1)[1].split("```", 1)[0]
    missing = sorted(rule for rule in rules if rule not in graph)
    assert not missing, f"README rule graph lacks {missing}"
