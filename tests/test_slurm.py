"""The SLURM profile on a real single-node SLURM cluster (tools/slurm-local.sh, started by
.ci/run). Without a cluster these tests are skipped and say why."""

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
PROFILE = REPO / "profiles" / "slurm"

needs_cluster = pytest.mark.skipif(
    subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0
    if Path("/usr/bin/sinfo").exists() else True,
    reason="no SLURM cluster answers (start one with tools/slurm-local.sh start DIR)")


def run(args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "snakemake"), *args, "--directory", str(workdir),
                           "--profile", str(PROFILE),
                           "--slurm-init-seconds-before-status-checks", "1"],
                          capture_output=True, text=True, env=env, timeout=900)


def test_profile_parses_and_requests_declared_resources():
    profile = yaml.safe_load((PROFILE / "profile.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["retries"] >= 1
    assert profile["slurm-status-command"] == "squeue"


@needs_cluster
def test_data_stage_and_training_run_through_slurm(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["datasets"]["synthetic"]["synthetic"]["images_per_class"] = 8
    config["diffusion"]["train"].update(steps=3, checkpoint_every=2, batch_size=4)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    result = run(["results/synthetic/models/diffusion", "-s", str(REPO / "Snakefile"),
                  "--configfile", str(tmp_path / "tiny.yaml")], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "results/synthetic/models/diffusion/unet/config.json").is_file()
    manifest = pd.read_csv(tmp_path / "results/synthetic/data/manifest.tsv", sep="\t")
    assert len(manifest) == 24
    # SLURM itself ran the three jobs: the controller knows them
    jobs = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%k|%T"], capture_output=True,
                          text=True).stdout.splitlines()
    for rule in ("synthesize_dataset", "prepare_data", "train_diffusion"):
        assert f"rule_{rule}_wildcards_synthetic|COMPLETED" in jobs, jobs


@needs_cluster
def test_failed_job_is_retried_with_more_memory(tmp_path):
    """A job that needs more memory than its first attempt gets succeeds on a retry."""
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(
        "rule needs_memory:\n"
        "    output: 'done.txt'\n"
        "    resources: mem_mb=lambda wildcards, attempt: 400 * attempt\n"
        "    shell: 'test {resources.mem_mb} -ge 800 && echo {resources.mem_mb} > {output}'\n")
    result = run(["-s", str(snakefile), "done.txt"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "done.txt").read_text().strip() == "800"
    states = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%k|%T"], capture_output=True,
                            text=True).stdout.splitlines()
    assert "rule_needs_memory|FAILED" in states and "rule_needs_memory|COMPLETED" in states


def test_paper_jobs_request_gpus_only_where_networks_run(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-s", str(REPO / "Snakefile"), "--directory",
         str(tmp_path), "--configfile", str(REPO / "config" / "paper.yaml"),
         "--config", "only_datasets=[mhist]"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    resources: dict[str, set[str]] = {}
    rule = None
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
            # `all` is a local rule without a command: it never reaches the cluster
            rule = None if rule == "all" else rule
        elif line.startswith("resources:") and rule:
            resources.setdefault(rule, set()).add(line)
    gpu_rules = {"train_diffusion", "train_classifier", "train_autoencoder", "train_latent",
                 "generate", "train_downstream", "fidelity", "analyse_trajectories",
                 "temporal_coherence", "memorization"}
    for name, lines in resources.items():
        wants_gpu = any("gpu=1" in line for line in lines)
        assert wants_gpu == (name in gpu_rules), (name, lines)
        assert all("mem_mb=" in line and "runtime=" in line for line in lines), (name, lines)


def test_a_two_gpu_training_asks_for_one_node_two_gpus_and_one_launch(tmp_path):
    from tests.test_multiprocess import slurm_request

    config = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    config["diffusion"]["train"]["gpus"] = 2
    path = tmp_path / "two-gpus.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-p", "-s", str(REPO / "Snakefile"), "--directory",
         str(tmp_path), "--configfile", str(path), "--config", "only_datasets=[mhist]",
         "--until", "train_diffusion"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    block = result.stdout.split("rule train_diffusion:", 1)[1].split("\n\n", 1)[0]
    resources = dict(item.split("=", 1) for item in
                     block.split("resources:", 1)[1].splitlines()[0].strip().split(", "))
    assert resources["gpu"] == "2" and resources["nodes"] == "1" and "tasks" not in resources
    assert "gpu_slots 2 -- accelerate launch --multi_gpu --num_processes 2" in block
    sbatch, _ = slurm_request({"gpu": 2, "nodes": 1, "mem_mb": int(resources["mem_mb"]),
                               "runtime": int(resources["runtime"])}, threads=4)
    assert {"--gpus=2", "--nodes=1"} <= set(sbatch)
    assert not [option for option in sbatch if option.startswith("--ntasks")]
