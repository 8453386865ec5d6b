"""Local jobs asking for GPUs get devices of their own, and a dead holder frees its devices."""

from __future__ import annotations

import gc
import os
import select
import subprocess
import sys
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cellflow.gpu_slots import HELD_ENV, LOCKS_ENV, GpuSlotError, acquire

REPO = Path(__file__).resolve().parents[1]

# A job under the launcher wrapper: it asks for its GPU itself, as `_job_setup` does in the
# workers of `accelerate launch`, reports what it sees, and runs until its stdin closes.
JOB = ("import os, sys\n"
       "from cellflow.gpu_slots import acquire\n"
       "acquire(1)\n"
       "print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
       "sys.stdin.read()\n")


@pytest.fixture
def start_job(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen]]:
    """Start `python -m cellflow.gpu_slots 1 -- python -c JOB` over the pool "0,1"."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("SLURM_JOB_ID", HELD_ENV, "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="0,1", **{LOCKS_ENV: str(tmp_path)})
    jobs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        job = subprocess.Popen(
            [sys.executable, "-m", "cellflow.gpu_slots", "1", "--", sys.executable, "-c", JOB],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=env)
        jobs.append(job)
        return job

    yield start
    for job in jobs:
        job.kill()
        job.wait()


def devices_of(job: subprocess.Popen, wait: float) -> str | None:
    """The job's CUDA_VISIBLE_DEVICES, or None if it has not got its GPU within `wait` s."""
    ready, _, _ = select.select([job.stdout], [], [], wait)
    return job.stdout.readline().strip() if ready else None


def test_two_local_jobs_asking_for_one_gpu_each_get_different_device_ids(start_job, tmp_path):
    first, second = start_job(), start_job()
    first_ids, second_ids = devices_of(first, 10), devices_of(second, 10)
    assert {first_ids, second_ids} == {"0", "1"}
    # exec keeps the pid: the lock file names the job itself
    assert (tmp_path / f"gpu-{second_ids}.lock").read_text() == f"{second.pid}\n"
    third = start_job()
    assert devices_of(third, 1.0) is None  # both devices are taken: it waits
    first.stdin.close()  # the first job ends
    first.wait(10)
    assert devices_of(third, 10) == first_ids


def test_a_killed_job_frees_its_device(start_job):
    first, second = start_job(), start_job()
    first_ids, _ = devices_of(first, 10), devices_of(second, 10)
    waiting = start_job()
    assert devices_of(waiting, 1.0) is None
    first.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
    first.wait(10)
    assert devices_of(waiting, 10) == first_ids


def test_the_users_visible_devices_are_the_pool(tmp_path):
    environs = [{"CUDA_VISIBLE_DEVICES": "3,5"} for _ in range(3)]
    first = acquire(1, lock_dir=tmp_path, environ=environs[0])
    second = acquire(1, lock_dir=tmp_path, environ=environs[1])
    assert (first.devices, second.devices) == (("3",), ("5",))
    assert [environ["CUDA_VISIBLE_DEVICES"] for environ in environs[:2]] == ["3", "5"]
    with pytest.raises(GpuSlotError, match=r"no 1 free GPU\(s\) of 3,5 after 0.3 s; held: 3 "):
        acquire(1, lock_dir=tmp_path, environ=environs[2], timeout=0.3)
    first.release()
    assert environs[0] == {"CUDA_VISIBLE_DEVICES": "3,5"}  # the environment as it was
    with acquire(1, lock_dir=tmp_path, environ=environs[2], timeout=0) as third:
        assert third.devices == ("3",)
    second.release()


def test_devices_are_taken_all_at_once_or_not_at_all(tmp_path):
    holder = acquire(1, devices=[0, 1], lock_dir=tmp_path, environ={})
    assert holder.devices == ("0",)
    with pytest.raises(GpuSlotError, match="no 2 free"):
        acquire(2, devices=[0, 1], lock_dir=tmp_path, environ={}, timeout=0.3)
    # the failed request did not keep device 1 locked
    environ: dict[str, str] = {}
    with acquire(1, devices=[0, 1], lock_dir=tmp_path, environ=environ, timeout=0):
        assert environ == {"CUDA_VISIBLE_DEVICES": "1", HELD_ENV: "1"}
    holder.release()


def test_the_devices_stay_held_when_the_caller_drops_the_slots(tmp_path):
    dropped = weakref.ref(acquire(1, devices=[0], lock_dir=tmp_path, environ={}))
    gc.collect()
    assert dropped() is None  # as `_job_setup` does: the lock lives as long as the process
    with pytest.raises(GpuSlotError, match="held: 0 "):
        acquire(1, devices=[0], lock_dir=tmp_path, environ={}, timeout=0)


@pytest.mark.parametrize("visible, count, message", [
    (None, 3, r"asks for 3 GPUs, but the pool has 2 \(0,1, from the devices given\)"),
    ("", 1, r"pool is empty \(from CUDA_VISIBLE_DEVICES=''\)"),
    ("-1", 1, r"pool is empty \(from CUDA_VISIBLE_DEVICES='-1'\)"),
])
def test_more_gpus_than_the_pool_is_an_error(tmp_path, visible, count, message):
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    devices = [0, 1] if visible is None else None
    with pytest.raises(GpuSlotError, match=message):
        acquire(count, devices=devices, lock_dir=tmp_path, environ=environ, timeout=0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("count, environ", [
    (1, {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "0"}),  # the allocation's devices
    (2, {"SLURM_JOB_ID": "42"}),
    (1, {HELD_ENV: "1", "CUDA_VISIBLE_DEVICES": "1", "LOCAL_RANK": "0"}),  # a launcher's worker
    (0, {"CUDA_VISIBLE_DEVICES": "0,1"}),
])
def test_nothing_changes_where_the_devices_are_already_given(tmp_path, count, environ):
    before = dict(environ)
    slots = acquire(count, devices=[0, 1], lock_dir=tmp_path, environ=environ, timeout=0)
    assert slots.devices == () and environ == before
    assert not list(tmp_path.iterdir())


def test_a_distributed_worker_without_the_launchers_slots_is_refused(tmp_path):
    with pytest.raises(GpuSlotError, match=r"python -m cellflow.gpu_slots 2 -- accelerate"):
        acquire(2, devices=[0, 1], lock_dir=tmp_path, environ={"LOCAL_RANK": "0"}, timeout=0)
