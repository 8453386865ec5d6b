"""The demo through a SLURM cluster with the project's profile: unsharded and with generation
sharded over 4 jobs (same frames?), and a generation shard killed at its time limit whose
retry resumes from the batches it had stored.

Needs a cluster that answers (`tools/slurm-local.sh start DIR`, then export the SLURM_CONF it
prints). Each run happens in a scratch folder with a small demo config (trained for a few
steps: a measure of the workflow on a cluster, not of the science).

Run: python -m benchmarks.bench_slurm [demo] [retry]   (appends to benchmarks/results/slurm.md)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.machine import record

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def demo_config(shards: int, sources: int = 2, inversion_steps: int = 10) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["benchmark"] = "slurm"
    config["datasets"]["synthetic"]["synthetic"]["images_per_class"] = 8
    for model in ("diffusion", "classifier"):
        config[model]["train"].update(steps=3, checkpoint_every=2, batch_size=4)
    config["diffusion"]["samples"] = {"per_class": 1, "ddim_steps": 2}
    config["classifier"]["eval"] = {"bands": 2, "noise_draws": 1}
    config["bridge"].update(inversion_steps=inversion_steps, frames=2, batch_size=1,
                            sources_per_transition=sources)
    config["generation"] = {"methods": ["cellflow"], "shards": shards}
    config["downstream"].update(strategies={"none": {}, "cellflow": {}}, seeds=[0])
    config["downstream"]["train"].update(epochs=1, batch_size=8)
    return config


def slurm_job_ids() -> set[str]:
    lines = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%k"], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    return set(lines)


def run(workdir: Path, config: dict, *args: str) -> tuple[float, list[str]]:
    """Seconds of one `snakemake --profile slurm` run and the SLURM jobs it submitted
    (`id|state|rule_...`)."""
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    before = slurm_job_ids()
    started = time.perf_counter()
    result = subprocess.run(
        [str(SNAKEMAKE), "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
         "--profile", str(REPO / "profiles" / "slurm"), *args, "--configfile", str(path)],
        capture_output=True, text=True,
        env={**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ['PATH']}"})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"snakemake failed in {workdir}:\n{result.stdout}\n{result.stderr}")
    return seconds, sorted(slurm_job_ids() - before, key=lambda line: int(line.split("|")[0]))


def frames_digest(workdir: Path) -> str:
    """One digest of every trajectory frame's bytes, in path order."""
    digest = hashlib.sha256()
    folder = workdir / "results" / "synthetic" / "trajectories" / "cellflow"
    for path in sorted(folder.rglob("*.png")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def demo_with_and_without_shards() -> None:
    rows = []
    digests = {}
    for shards in (1, 4):
        with tempfile.TemporaryDirectory() as scratch:
            seconds, jobs = run(Path(scratch), demo_config(shards))
            digests[shards] = frames_digest(Path(scratch))
        rows.append({"run": f"demo, generation.shards {shards}", "SLURM jobs": len(jobs),
                     "generation jobs": sum("rule_generate" in job for job in jobs),
                     "wall time": f"{seconds:.0f} s", "frames digest": digests[shards]})
    rows.append({"run": "same frames", "SLURM jobs": "", "generation jobs": "",
                 "wall time": "", "frames digest": str(digests[1] == digests[4])})
    record("slurm", "The demo on a SLURM cluster (tools/slurm-local.sh, one node), with "
                    "generation unsharded and over 4 shards", rows)


def shard_killed_at_its_time_limit() -> None:
    """Two shards that each need longer than their one-minute limit: killed, then resumed."""
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        seconds, jobs = run(workdir, demo_config(2, sources=12, inversion_steps=50),
                            "results/synthetic/trajectories/cellflow",
                            "--set-resources", "generate_shard:runtime=1")
        attempts = sorted((workdir / "logs").rglob("attempts/generate_*-shard*/*.log"))
        rows = []
        for job in jobs:
            job_id, state, comment = job.split("|")
            if "rule_generate_shard" not in comment:
                continue
            log = next((path for path in attempts if f"-slurm{job_id}-" in path.name), None)
            said = [line.split(": ", 1)[-1] for line in (log.read_text().splitlines()
                                                         if log else [])
                    if "stored by an earlier attempt" in line]
            rows.append({"SLURM job": job_id, "shard": comment.rsplit("_", 2)[-2] + " of 2",
                         "state": state, "log": said[0] if said else "(ended before its record)"})
        rows.append({"SLURM job": "", "shard": "", "state": f"run: {seconds:.0f} s",
                     "log": f"{len(jobs)} SLURM jobs"})
    record("slurm", "A generation shard killed at its time limit (--set-resources "
                    "generate_shard:runtime=1), resumed by its retry", rows)


if __name__ == "__main__":
    parts = {"demo": demo_with_and_without_shards, "retry": shard_killed_at_its_time_limit}
    for name in sys.argv[1:] or parts:
        parts[name]()
