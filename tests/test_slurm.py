"""The SLURM profile on a real single-node SLURM cluster (tools/slurm-local.sh, started by
.ci/run). Without a cluster these tests are skipped and say why."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROFILE = REPO / "profiles" / "slurm"

CLUSTER_ANSWERS = Path("/usr/bin/sinfo").exists() and subprocess.run(
    ["sinfo", "-h"], capture_output=True).returncode == 0
needs_cluster = pytest.mark.skipif(
    not CLUSTER_ANSWERS,
    reason="no SLURM cluster answers (start one with tools/slurm-local.sh start DIR)")


# The tests that check the runs below (tests/conftest.py starts those runs when one is chosen).
CLUSTER_TESTS = {"test_data_stage_and_training_run_through_slurm",
                 "test_a_retry_grows_only_what_the_failure_needs_in_the_documented_partition"}


class ClusterRun:
    """`snakemake --profile profiles/slurm` in a folder of its own, started now and waited for
    later: these runs mostly wait on the cluster's clock (a one-minute time limit, status
    polls), so tests/conftest.py starts them with the session and the suite goes on."""

    def __init__(self, workdir: Path, args: list[str], env: dict[str, str] | None = None):
        self.workdir = workdir
        # the controller remembers jobs of earlier runs for a while (MinJobAge)
        self.after = max((int(job[0]) for jobs in slurm_jobs().values() for job in jobs),
                         default=0)
        self.output = workdir / "snakemake.out"
        command = [str(BIN / "snakemake"), *args, "--directory", str(workdir),
                   "--profile", str(PROFILE), "--slurm-init-seconds-before-status-checks", "1"]
        environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                       "PYTHONPATH": str(REPO), **(env or {})}
        with self.output.open("w") as stream:
            self.process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT,
                                            env=environment)

    def wait(self, timeout: float = 900) -> tuple[int, str]:
        """The run's exit status and its output."""
        returncode = self.process.wait(timeout=timeout)
        return returncode, self.output.read_text()

    def stop(self) -> None:
        """End a run that no test waited for (Snakemake cancels its jobs on SIGTERM)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_runs(folder: Callable[[str], Path]) -> dict[str, ClusterRun]:
    """The runs that the cluster tests check, each in a folder that `folder(name)` makes."""
    data_stage = folder("data-stage")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["datasets"]["synthetic"]["synthetic"]["images_per_class"] = 8
    config["diffusion"]["train"].update(steps=3, checkpoint_every=2, batch_size=4)
    (data_stage / "tiny.yaml").write_text(yaml.safe_dump(config))
    retries = folder("retries")
    (retries / "Snakefile").write_text(RETRY_SNAKEFILE.format(
        resources=REPO / "workflow" / "rules" / "resources.smk"))
    return {
        # one thread a job: it runs beside the rest of the suite on the same CPUs
        "data_stage": ClusterRun(data_stage, [
            "results/synthetic/models/diffusion", "-s", str(REPO / "workflow" / "Snakefile"),
            "--set-threads", "prepare_data=1", "train_diffusion=1",
            "--configfile", str(data_stage / "tiny.yaml")]),
        "retries": ClusterRun(retries, [
            "-s", str(retries / "Snakefile"), *RETRY_TARGETS, "--retries", "1", "--jobs", "3",
            "--set-resources", "out_of_time:runtime=1"],
            env={"SBATCH_PARTITION": "gpu"}),
    }


def test_profile_parses_and_requests_declared_resources():
    profile = yaml.safe_load((PROFILE / "profile.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["retries"] >= 1
    assert profile["slurm-status-command"] == "squeue"


def test_profile_slurm_is_this_clones_whatever_another_clone_linked(tmp_path):
    """From the clone, `--profile slurm` is ./slurm (profiles/slurm), not a profile that an
    older set-up (of another clone) linked into ~/.config/snakemake."""
    assert (REPO / "slurm").resolve() == PROFILE.resolve()
    elsewhere = tmp_path / ".config" / "snakemake" / "slurm"
    elsewhere.mkdir(parents=True)
    (elsewhere / "profile.yaml").write_text("no-such-snakemake-option: 1\n")
    (tmp_path / "Snakefile").write_text(
        "rule a:\n    output: 'a.txt'\n    shell: 'touch {output}'\n")
    result = subprocess.run(
        [str(BIN / "snakemake"), "--profile", "slurm", "-n", "-s", str(tmp_path / "Snakefile"),
         "--directory", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / ".config"),
             "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 0, result.stdout + result.stderr


@needs_cluster
def test_data_stage_and_training_run_through_slurm(cluster_runs):
    returncode, output = cluster_runs["data_stage"].wait()
    assert returncode == 0, output
    workdir = cluster_runs["data_stage"].workdir
    assert (workdir / "results/synthetic/models/diffusion/unet/config.json").is_file()
    manifest = pd.read_csv(workdir / "results/synthetic/data/manifest.tsv", sep="\t")
    assert len(manifest) == 24
    # SLURM itself ran the three jobs: the controller knows them
    jobs = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%k|%T"], capture_output=True,
                          text=True).stdout.splitlines()
    for rule in ("synthesize_dataset", "prepare_data", "train_diffusion"):
        assert f"rule_{rule}_wildcards_synthetic|COMPLETED" in jobs, jobs


RETRY_SNAKEFILE = """\
include: "{resources}"


rule out_of_time:
    output:
        "out_of_time.txt",
    threads: 3
    resources:
        **cluster_limits(mem_mb=300, runtime=5),
    shell:
        "if [ ! -e out_of_time.tried ]; then touch out_of_time.tried; sleep 600; fi;"
        " touch {{output}}"


rule out_of_memory:
    output:
        "out_of_memory.txt",
    resources:
        **cluster_limits(mem_mb=300, runtime=5),
    shell:
        "if [ ! -e out_of_memory.tried ]; then touch out_of_memory.tried;"
        " python -c 'raise MemoryError'; fi; touch {{output}}"


rule broken_once:
    output:
        "broken_once.txt",
    resources:
        **cluster_limits(mem_mb=300, runtime=5),
    shell:
        "if [ ! -e broken_once.tried ]; then touch broken_once.tried; exit 3; fi; touch {{output}}"
"""
RETRY_TARGETS = ["out_of_time.txt", "out_of_memory.txt", "broken_once.txt"]


def slurm_jobs(after: int = 0) -> dict[str, list[tuple[str, ...]]]:
    """The jobs the controller remembers with an id above `after`, per rule, in submission
    order: (job id, state, partition, CPUs, time limit, memory)."""
    lines = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%k|%T|%P|%C|%l|%m"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    jobs: dict[str, list] = {}
    for line in sorted(lines, key=lambda line: int(line.split("|")[0])):
        job_id, comment, *fields = line.split("|")
        if int(job_id) > after:
            jobs.setdefault(comment.removeprefix("rule_"), []).append((job_id, *fields))
    return jobs


@needs_cluster
def test_a_retry_grows_only_what_the_failure_needs_in_the_documented_partition(cluster_runs):
    """Time after a time-out (from a limit given with --set-resources), memory after running
    out of it, nothing after a failing command; the partition from SBATCH_PARTITION, the rule's
    threads as the job's CPUs. The node says it
    has more CPUs than this machine that submits (tools/slurm-local.sh)."""
    returncode, output = cluster_runs["retries"].wait()
    assert returncode == 0, output
    submitted = slurm_jobs(after=cluster_runs["retries"].after)
    jobs = {rule: submitted[rule] for rule in submitted if f"{rule}.txt" in RETRY_TARGETS}
    # (state, partition, CPUs, time limit, memory) of each attempt
    attempts = {rule: [job[1:] for job in rule_jobs] for rule, rule_jobs in jobs.items()}
    assert attempts["out_of_time"] == [("TIMEOUT", "gpu", "3", "1:00", "300M"),
                                       ("COMPLETED", "gpu", "3", "2:00", "300M")]
    assert attempts["out_of_memory"] == [("FAILED", "gpu", "1", "5:00", "300M"),
                                         ("COMPLETED", "gpu", "1", "5:00", "600M")]
    assert attempts["broken_once"] == [("FAILED", "gpu", "1", "5:00", "300M"),
                                       ("COMPLETED", "gpu", "1", "5:00", "300M")]
    # every attempt kept its own SLURM log, the successful ones too (the profile says so)
    logs = cluster_runs["retries"].workdir / ".snakemake" / "slurm_logs"
    for rule, rule_jobs in jobs.items():
        assert sorted(path.stem for path in (logs / f"rule_{rule}").glob("*.log")) == sorted(
            job[0] for job in rule_jobs)
    assert "DUE TO TIME LIMIT" in (logs / "rule_out_of_time" / f"{jobs['out_of_time'][0][0]}.log"
                                   ).read_text()


def test_paper_jobs_request_gpus_only_where_networks_run(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-s", str(REPO / "workflow" / "Snakefile"), "--directory",
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
        [str(BIN / "snakemake"), "-n", "-p", "-s", str(REPO / "workflow" / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(path), "--config",
         "only_datasets=[mhist]", "--until", "train_diffusion"],
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
