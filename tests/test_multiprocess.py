"""Data-parallel training over processes, on the CPU: `accelerate launch` with gloo.

Each test starts `accelerate launch --multi_gpu --num_processes 2 -m tests.test_multiprocess`,
the launcher the workflow uses for ``train.gpus: 2``: on a machine without CUDA it starts two
torchrun workers whose ``Accelerator(cpu=True)`` joins a gloo process group.
(``accelerate launch --cpu --num_processes 2`` starts one process: its CPU launcher only runs
several through mpirun.) This module is also the workers' program (``python -m``): it trains
the tiny UNet of tests/test_training.py and writes the final weights from the main process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from cellflow.checkpoint import CheckpointError
from cellflow.diffusion import NoiseSchedule, UNetArchitecture, build_unet, epsilon_loss
from cellflow.io import atomic_path, write_text
from cellflow.training import TrainConfig, train_model

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = UNetArchitecture((16, 32), 1, (1,), 16)
PROCESSES = 2
STEPS = 6
SEED = 5


def tiny_tiles() -> tuple[torch.Tensor, torch.Tensor]:
    """32 synthetic 16-px tiles of two classes, as uint8 (N, 3, H, W)."""
    from cellflow.synthetic import render_tile

    rng = np.random.default_rng(0)
    images = [render_tile(progression, 16, rng).image.transpose(2, 0, 1)
              for progression in (0.05, 0.95) for _ in range(16)]
    return torch.from_numpy(np.stack(images)), torch.arange(2).repeat_interleave(16)


def tiny_config(grad_accum_steps: int) -> TrainConfig:
    return TrainConfig(steps=STEPS, batch_size=8, grad_accum_steps=grad_accum_steps,
                       learning_rate=1e-3, weight_decay=0.01, warmup_steps=2,
                       lr_schedule="cosine", grad_clip=1.0, ema_decay=0.9,
                       mixed_precision="no", gpus=0, checkpoint_every=2, keep_checkpoints=2,
                       augment=True)


def train_tiny(out: Path, grad_accum_steps: int, die_at_step: int | None = None) -> None:
    """Train the tiny UNet into ``out``: checkpoints, log, final weights and a summary.

    ``die_at_step`` kills the second process (SIGKILL, as the OOM killer would) in the first
    micro-batch of that step, when the main process has saved every checkpoint before it.
    """
    torch.manual_seed(0)
    unet = build_unet(TINY_UNET, 16, 2)
    scheduler = NoiseSchedule().ddpm()
    config = tiny_config(grad_accum_steps)
    calls = 0

    def loss(model, batch, labels, generator):
        nonlocal calls
        calls += 1
        if (die_at_step is not None and int(os.environ.get("RANK", 0)) == 1
                and calls == (die_at_step - 1) * grad_accum_steps + 1):
            os.kill(os.getpid(), signal.SIGKILL)
        return epsilon_loss(model, scheduler, batch, labels, generator)

    images, labels = tiny_tiles()
    result = train_model(unet, loss, images, labels, config, SEED, out / "checkpoints",
                         {"test": "multiprocess"})
    if not result.is_main_process:
        return
    weights = {f"model.{k}": v for k, v in result.model.state_dict().items()}
    weights |= {f"ema.{k}": v for k, v in result.ema.state_dict().items()}
    with atomic_path(out / "weights.safetensors") as temporary:
        save_file({k: v.contiguous() for k, v in weights.items()}, temporary)
    write_text(out / "run.json", json.dumps({
        "processes": torch.distributed.get_world_size() if torch.distributed.is_initialized()
        else 1,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "resumed_from_step": result.resumed_from_step,
        "seconds": result.seconds,
    }))


def launch(out: Path, grad_accum_steps: int, processes: int = PROCESSES,
           die_at_step: int | None = None) -> subprocess.CompletedProcess:
    """Run :func:`train_tiny` in ``processes`` processes, as the workflow's launcher does.

    Every run, the one-process reference too, gets one CPU thread per process and no GPU: the
    sums inside a kernel follow the thread count, and the comparison is of the processes only.
    """
    launcher = ["-m"]
    if processes > 1:
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu",
                    "--num_processes", str(processes), "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", "0",  # a free port: other runs may share the machine
                    "-m"]
    command = [sys.executable, *launcher, "tests.test_multiprocess", str(out),
               str(grad_accum_steps)]
    if die_at_step is not None:
        command += ["--die-at-step", str(die_at_step)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "weights.safetensors")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    finished = launch(out, grad_accum_steps=1)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return out


def test_two_processes_train_the_weights_of_one_with_the_same_global_batch(two_processes,
                                                                           tmp_path):
    summary = json.loads((two_processes / "run.json").read_text())
    assert (summary["processes"], summary["backend"]) == (PROCESSES, "gloo")
    # One process takes the two processes' micro-batches one after the other.
    finished = launch(tmp_path, grad_accum_steps=PROCESSES, processes=1)
    assert finished.returncode == 0, finished.stderr[-3000:]
    # Bit for bit, not within a tolerance: DDP sums the two processes' gradients and halves
    # them, one process halves each micro-batch's loss and adds the two gradients; halving is
    # exact in binary floating point and a sum of two terms does not depend on their order.
    # (Any other order of the sums, e.g. 2 CPU threads instead of 1, moves weights by up to
    # ~7e-4 here: AdamW scales the rounding error of near-zero gradients, such as those of the
    # attention key biases, to steps of about the learning rate.)
    one, two = weights(tmp_path), weights(two_processes)
    assert one.keys() == two.keys()
    for name, value in one.items():
        assert torch.equal(value, two[name]), name
    # The log is the main process's alone: one row per step, the same learning rate and
    # gradient norm; the loss is averaged over the processes in float32, over the micro-batches
    # in float64, hence a tolerance of float32 rounding there.
    log_one = pd.read_csv(tmp_path / "checkpoints" / "train_log.csv")
    log_two = pd.read_csv(two_processes / "checkpoints" / "train_log.csv")
    assert list(log_two["step"]) == list(range(1, STEPS + 1))
    pd.testing.assert_frame_equal(log_two[["step", "lr", "grad_norm"]],
                                  log_one[["step", "lr", "grad_norm"]], check_exact=True)
    np.testing.assert_allclose(log_two["loss"], log_one["loss"], rtol=1e-6)


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_weights(two_processes,
                                                                       tmp_path):
    killed = launch(tmp_path, grad_accum_steps=1, die_at_step=5)
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-0000002", "step-0000004"]
    assert not (tmp_path / "weights.safetensors").exists()
    # The newest checkpoint is damaged as well: both processes must resume from step 2, and
    # only the main process sets step 4 aside (two renaming it would fail one of them).
    ema = checkpoints / "step-0000004" / "ema.safetensors"
    damaged = bytearray(ema.read_bytes())
    damaged[-2000:-1000] = bytes(1000)
    ema.write_bytes(bytes(damaged))

    resumed = launch(tmp_path, grad_accum_steps=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "run.json").read_text())["resumed_from_step"] == 2
    assert (checkpoints / "corrupt-step-0000004").is_dir()
    uninterrupted = weights(two_processes)
    for name, value in weights(tmp_path).items():
        assert torch.equal(value, uninterrupted[name]), name
    columns = ["step", "loss", "lr", "grad_norm"]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "checkpoints" / "train_log.csv")[columns],
        pd.read_csv(two_processes / "checkpoints" / "train_log.csv")[columns], check_exact=True)


def test_a_checkpoint_of_two_processes_is_not_resumed_by_one(two_processes, tmp_path):
    # one process would draw other batches from step 5 on: a run that matches neither
    shutil.copytree(two_processes / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match=r"another configuration \(differs in: processes"):
        train_tiny(tmp_path, grad_accum_steps=PROCESSES)


class JobResources(dict):
    """A job's resources as the SLURM plugins read them: ``.get(key)`` and ``.key``."""

    __getattr__ = dict.__getitem__


def slurm_request(resources: dict, threads: int) -> tuple[list[str], list[str]]:
    """The sbatch options and the job step's srun options (after its fixed ``srun -n1``) that
    snakemake-executor-plugin-slurm and -slurm-jobstep make of a job's resources."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm_jobstep import (
        get_cpu_setting,
        get_gpu_setting,
        get_node_setting,
    )

    job = SimpleNamespace(resources=JobResources(resources), threads=threads)
    params = {"run_uuid": "job", "slurm_logfile": "slurm.log", "comment_str": "rule",
              "account": "", "partition": "", "workdir": None}
    sbatch = get_submit_command(job, params) + set_gres_string(job)
    step = [get_cpu_setting(job, bool(resources.get("gpu"))), get_gpu_setting(job),
            get_node_setting(job)]
    return sbatch.split(), " ".join(step).split()


def test_slurm_gives_a_two_gpu_training_one_task_with_both_gpus_on_one_node():
    # `accelerate launch` starts the processes itself, inside the one task of the job step.
    sbatch, step = slurm_request({"gpu": 2, "nodes": 1, "mem_mb": 16000, "runtime": 60},
                                 threads=8)
    assert {"--gpus=2", "--nodes=1", "--cpus-per-task=8"} <= set(sbatch)
    assert not [option for option in sbatch if option.startswith("--ntasks")]  # one task
    assert step == ["--cpus-per-task=8", "--gpus=2", "--nodes=1"]
    # `tasks` on a GPU job means tasks per GPU: 2 would reserve 4 tasks of 8 CPUs each
    sbatch, _ = slurm_request({"gpu": 2, "tasks": 2, "mem_mb": 16000, "runtime": 60}, threads=8)
    assert "--ntasks-per-gpu=2" in sbatch
    # without `nodes`, --gpus=2 may be one GPU on each of two nodes; the step asks for one node
    sbatch, _ = slurm_request({"gpu": 2, "mem_mb": 16000, "runtime": 60}, threads=8)
    assert not [option for option in sbatch if option.startswith("--nodes")]


def main() -> None:
    parser = argparse.ArgumentParser(description=train_tiny.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("grad_accum_steps", type=int)
    parser.add_argument("--die-at-step", type=int)
    args = parser.parse_args()
    train_tiny(args.out, args.grad_accum_steps, args.die_at_step)


if __name__ == "__main__":
    main()
