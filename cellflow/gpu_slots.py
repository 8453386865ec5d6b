"""GPU slots for local runs: every job that asks for GPUs gets devices that no other job holds.

Snakemake's ``--resources gpu=N`` only counts GPUs: on a workstation with several, every job
would still open device 0. :func:`acquire` takes ``count`` free device ids from the pool, with
one lock file per device, and sets ``CUDA_VISIBLE_DEVICES`` to them before anything initialises
CUDA, so that the job's ``cuda:0`` is a device of its own.

- The pool is the user's ``CUDA_VISIBLE_DEVICES`` when set (any ids CUDA accepts: ``2,3,5``,
  UUIDs), else every device of the machine. Ids keep their original spelling, so two jobs with
  different pools still agree on which lock belongs to which device.
- Inside a SLURM job nothing changes: the allocation's devices are used as SLURM gives them.
- A process whose parent took the slots (``CELLFLOW_GPU_SLOTS`` set) uses the parent's devices.

``python -m cellflow.gpu_slots N -- COMMAND...`` takes the slots and replaces itself with
COMMAND, which holds them until it exits: the way to pin a launcher that starts one process per
GPU (``accelerate launch``), whose workers could not share one allocation among themselves.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOG = logging.getLogger("cellflow.gpu_slots")  # not __main__ under python -m

LOCKS_ENV = "CELLFLOW_GPU_LOCKS"
# Set, with the ids, for the children of a process holding slots: they use its devices.
HELD_ENV = "CELLFLOW_GPU_SLOTS"
POLL_SECONDS = 0.2


class GpuSlotError(RuntimeError):
    """The GPUs a job asks for cannot be given to it."""


@dataclass
class Slots:
    """The devices one :func:`acquire` locked; held until :meth:`release` or the process ends.

    ``devices`` is empty where nothing was taken (no GPU asked for, a SLURM job, a parent's
    slots). The locks are raw descriptors, not file objects, so that a caller who drops this
    object still holds its devices.
    """

    devices: tuple[str, ...]
    environ: MutableMapping[str, str]
    _fds: list[int] = field(default_factory=list, repr=False)
    _previous: dict[str, str | None] = field(default_factory=dict, repr=False)

    def release(self) -> None:
        """Unlock the devices and give the environment its previous values back."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for name, value in self._previous.items():
            if value is None:
                self.environ.pop(name, None)
            else:
                self.environ[name] = value
        self._previous.clear()

    def pass_on_exec(self) -> None:
        """Let the program this process execs keep the locks (descriptors survive exec)."""
        for fd in self._fds:
            os.set_inheritable(fd, True)

    def __enter__(self) -> Slots:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def acquire(count: int, *, devices: Sequence[str | int] | None = None,
            lock_dir: str | Path | None = None,
            environ: MutableMapping[str, str] = os.environ,
            timeout: float | None = None) -> Slots:
    """Take ``count`` devices that no other process holds and make them the visible ones.

    ``devices`` replaces the pool (``CUDA_VISIBLE_DEVICES``, else every device). Locks live in
    ``lock_dir``, else ``$CELLFLOW_GPU_LOCKS``, else ``/tmp/cellflow-gpu-slots-<uid>/``. Waits
    until enough devices are free, or raises :class:`GpuSlotError` after ``timeout`` seconds.
    """
    if count < 0:
        raise ValueError(f"a GPU count is 0 or more, not {count}")
    if count == 0:
        return Slots((), environ)
    if environ.get("SLURM_JOB_ID"):
        LOG.info("GPUs: SLURM job %s, its devices as given (CUDA_VISIBLE_DEVICES=%s)",
                 environ["SLURM_JOB_ID"], environ.get("CUDA_VISIBLE_DEVICES", "unset"))
        return Slots((), environ)
    if environ.get(HELD_ENV):
        LOG.info("GPUs: %s, held by the process that started this one", environ[HELD_ENV])
        return Slots((), environ)
    if "LOCAL_RANK" in environ:
        # Each worker would lock devices for itself and wait for those its siblings hold.
        raise GpuSlotError(
            "a worker of a distributed launch (LOCAL_RANK set) cannot take GPU slots: start the "
            f"launcher as `python -m cellflow.gpu_slots {count} -- accelerate launch ...`")
    pool = _pool(devices, environ)
    if not pool:
        raise GpuSlotError(f"asks for {count} GPU(s), but the pool is empty (from "
                           f"{_pool_origin(devices, environ)}): set the config's gpus to 0, "
                           "or run on a GPU machine")
    if count > len(pool):
        raise GpuSlotError(f"asks for {count} GPUs, but the pool has {len(pool)} "
                           f"({','.join(pool)}, from {_pool_origin(devices, environ)})")
    folder = Path(lock_dir) if lock_dir is not None else _default_lock_dir(environ)
    folder.mkdir(parents=True, exist_ok=True)
    taken = _wait_for_free(count, pool, folder, timeout)
    previous = {name: environ.get(name) for name in ("CUDA_VISIBLE_DEVICES", HELD_ENV)}
    ids = ",".join(taken)
    environ["CUDA_VISIBLE_DEVICES"] = environ[HELD_ENV] = ids
    LOG.info("GPUs: took %s of %s (locks in %s)", ids, ",".join(pool), folder)
    return Slots(tuple(taken), environ, list(taken.values()), previous)


def _pool(devices: Sequence[str | int] | None, environ: MutableMapping[str, str]) -> list[str]:
    if devices is not None:
        return [str(device) for device in devices]
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(index) for index in range(_count_devices(environ))]
    ids = [entry.strip() for entry in visible.split(",") if entry.strip()]
    # CUDA shows only the devices before the first invalid id: "-1" hides them all.
    negative = [index for index, entry in enumerate(ids) if entry.startswith("-")]
    return ids[:negative[0]] if negative else ids


def _pool_origin(devices: Sequence[str | int] | None, environ: MutableMapping[str, str]) -> str:
    if devices is not None:
        return "the devices given"
    if "CUDA_VISIBLE_DEVICES" in environ:
        return f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r}"
    return "the devices PyTorch sees"


def _count_devices(environ: MutableMapping[str, str]) -> int:
    # Counted in a child process: CUDA initialised here would fix this process's devices before
    # CUDA_VISIBLE_DEVICES is set.
    command = [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"]
    probe = subprocess.run(command, capture_output=True, text=True, env=dict(environ),
                           timeout=300)
    if probe.returncode != 0:
        raise GpuSlotError(f"cannot count the GPUs with {sys.executable}: "
                           f"{probe.stderr.strip()[-500:]}")
    return int(probe.stdout.split()[-1])


def _default_lock_dir(environ: MutableMapping[str, str]) -> Path:
    if environ.get(LOCKS_ENV):
        return Path(environ[LOCKS_ENV])
    # /tmp, not TMPDIR: every job on the machine must find the same locks, and TMPDIR can differ
    # per session. Per user, and only trusted if it is ours: another user's folder there could
    # hand out devices or block them.
    folder = Path("/tmp") / f"cellflow-gpu-slots-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise GpuSlotError(f"{folder} is not a folder of yours: set {LOCKS_ENV} to a folder "
                           "for the GPU locks")
    return folder


def _wait_for_free(count: int, pool: list[str], folder: Path, timeout: float | None
                   ) -> dict[str, int]:
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting = False
    while True:
        taken, busy = _take_free(count, pool, folder)
        if taken is not None:
            return taken
        held = ", ".join(f"{device} (pid {_holder(folder, device)})" for device in busy)
        if deadline is not None and time.monotonic() >= deadline:
            raise GpuSlotError(f"no {count} free GPU(s) of {','.join(pool)} after {timeout:g} s; "
                               f"held: {held} (locks in {folder})")
        if not waiting:
            LOG.info("GPUs: waiting for %d free of %s; held: %s", count, ",".join(pool), held)
            waiting = True
        time.sleep(POLL_SECONDS)


def _take_free(count: int, pool: list[str], folder: Path
               ) -> tuple[dict[str, int] | None, list[str]]:
    """All ``count`` devices at once, or none: holding some while waiting for more would let two
    jobs that each hold part of what the other needs wait for ever."""
    taken: dict[str, int] = {}
    busy: list[str] = []
    for device in pool:
        fd = _try_lock(_lock_path(folder, device))
        if fd is None:
            busy.append(device)
            continue
        taken[device] = fd
        if len(taken) == count:
            return taken, busy
    for fd in taken.values():
        os.close(fd)
    return None, busy


def _lock_path(folder: Path, device: str) -> Path:
    return folder / f"gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', device)}.lock"


def _try_lock(path: Path) -> int | None:
    """The locked file's descriptor, or None if another process holds it.

    flock, not marker files: the kernel drops the lock when the holder's last descriptor
    closes, so a killed job (even by SIGKILL or the OOM killer) frees its devices
    and no stale marker ever blocks one.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as err:
        os.close(fd)
        raise GpuSlotError(f"cannot lock {path}: {err}") from err
    # The pid only tells a person who holds the device; the lock alone decides.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(folder: Path, device: str) -> str:
    try:
        return _lock_path(folder, device).read_text().strip() or "?"
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m cellflow.gpu_slots",
        usage="%(prog)s [--timeout SECONDS] COUNT -- COMMAND [ARG ...]",
        description="Take COUNT free GPUs and run COMMAND with CUDA_VISIBLE_DEVICES set to them; "
                    "COMMAND holds them until it exits.")
    parser.add_argument("count", type=int, help="how many GPUs")
    parser.add_argument("--timeout", type=float,
                        help="seconds to wait for them (default: no limit)")
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        parser.error("give the command after --")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        slots = acquire(args.count, timeout=args.timeout)
    except GpuSlotError as err:
        raise SystemExit(f"cellflow.gpu_slots: {err}") from err
    slots.pass_on_exec()
    try:
        os.execvp(command[0], command)
    except OSError as err:
        raise SystemExit(f"cellflow.gpu_slots: cannot run {command[0]}: {err}") from err


if __name__ == "__main__":
    main()
