"""Where and from what code each job's outputs were computed: a small JSON beside every output.

A folder output holds its record as ``<folder>/provenance.json``; a file output's record is
``<parent>/.provenance/<file name>.json``, hidden so that a results folder lists only what the
workflow declares. A record names the code (git commit and whether tracked files were modified),
the digest of the job's settings, the package versions, the machine and GPUs, the SLURM job
(id, array task, nodes, partition), the shard, and when the job started and ended;
:func:`provenance_table` reads records back into one table, for runtimes per node and GPU model.

Nothing here initialises CUDA or imports torch: GPUs are named only when the job has already
initialised CUDA, so a CPU job or a process that forks data-loader workers is left as it was.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import pandas as pd

import cellflow
from cellflow.io import write_text

FOLDER_RECORD = "provenance.json"
FILE_RECORDS = ".provenance"
VERSIONED_PACKAGES = ("torch", "diffusers", "accelerate", "timm", "snakemake", "numpy")
GIT_TIMEOUT_S = 10.0
RECORD_KEYS = ("run_id", "rule", "shard", "config_hash", "code", "versions", "host", "slurm",
               "started", "ended", "duration_s", "command")
NO_GPU = "no GPU"
TABLE_COLUMNS = ["run_id", "output", "rule", "shard", "host", "gpu_model", "gpu_count",
                 "slurm_job_id", "node_list", "started", "ended", "duration_s", "commit", "dirty",
                 "config_hash"]
# The record's name for each SLURM variable; node list and job id are read under their older
# names too (SLURM_NODELIST, SLURM_JOBID) for sites on old releases.
SLURM_VARIABLES = {
    "job_id": ("SLURM_JOB_ID", "SLURM_JOBID"),
    "array_job_id": ("SLURM_ARRAY_JOB_ID",),
    "array_task_id": ("SLURM_ARRAY_TASK_ID",),
    "node_list": ("SLURM_JOB_NODELIST", "SLURM_NODELIST"),
    "partition": ("SLURM_JOB_PARTITION",),
}


class ProvenanceError(ValueError):
    """A provenance record that cannot be read: not JSON, or a key missing."""


def collect(started: datetime, *, config_hash: str | None, shard: str | None = None,
            rule: str | None = None, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The record of a job that started at ``started`` and ends now.

    ``config_hash`` is :func:`config_digest` of the job's settings; ``shard`` names the job's
    part of a sharded method (``"2 of 8"``); a naive ``started`` is read as local time.
    ``run_id`` is new for every call: the records of one job's outputs share it.
    """
    ended = datetime.now(timezone.utc)
    started = started.astimezone(timezone.utc)
    return {
        "run_id": uuid.uuid4().hex,
        "rule": rule,
        "shard": shard,
        "config_hash": config_hash,
        "code": code_state(Path(cellflow.__file__).resolve().parent.parent),
        "versions": package_versions(),
        "host": {"name": socket.gethostname(), "cpu_count": os.cpu_count(),
                 "cpus_usable": _usable_cpus(), "gpus": _initialised_gpus()},
        "slurm": slurm_job(environ),
        "started": started.isoformat(timespec="milliseconds"),
        "ended": ended.isoformat(timespec="milliseconds"),
        "duration_s": round((ended - started).total_seconds(), 3),
        "command": list(sys.argv),
    }


def code_state(checkout: Path) -> dict[str, Any]:
    """Source, commit and dirty flag of the code in ``checkout`` (the folder above the package).

    ``dirty`` is whether a tracked file differs from the commit; untracked files (results, logs)
    do not count. Code that is not a checkout of its own, such as a package installed into a
    virtual environment that lies inside some repository, has no commit.
    """
    installed = {"source": f"installed package cellflow {cellflow.__version__}", "commit": None,
                 "dirty": None}
    try:
        top = _git(checkout, "rev-parse", "--show-toplevel")
    except FileNotFoundError:  # no git on this machine
        return installed
    except subprocess.CalledProcessError as err:
        if "not a git repository" in err.stderr:
            return installed
        return {**installed, "source": f"{checkout}: git failed ({_first_line(err.stderr)})"}
    except subprocess.TimeoutExpired:
        return {**installed, "source": f"{checkout}: git took over {GIT_TIMEOUT_S:.0f} s"}
    if Path(top).resolve() != checkout.resolve():
        return installed
    return {"source": f"git checkout {top}",
            "commit": _git_or_none(checkout, "rev-parse", "HEAD"),
            "dirty": _dirty(checkout)}


def package_versions() -> dict[str, str | None]:
    """Python's version and each of VERSIONED_PACKAGES' (None where it is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def slurm_job(environ: Mapping[str, str]) -> dict[str, str | None]:
    """The SLURM job this process runs in, from its environment; all None outside SLURM."""
    return {key: next((environ[name] for name in names if environ.get(name)), None)
            for key, names in SLURM_VARIABLES.items()}


def config_digest(config: str | Mapping[str, Any]) -> str:
    """SHA-256 of a job's settings: of the text as given, or of a mapping as sorted-key JSON."""
    text = config if isinstance(config, str) else json.dumps(
        config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_value)
    return hashlib.sha256(text.encode()).hexdigest()


def provenance_path(output: Path) -> Path:
    """Where the record of ``output`` lies: inside a folder, hidden beside a file."""
    output = Path(output)
    if output.is_dir():
        return output / FOLDER_RECORD
    return output.parent / FILE_RECORDS / f"{output.name}.json"


def write(outputs: Sequence[Path], record: Mapping[str, Any]) -> list[Path]:
    """Write ``record`` for every output that exists (a failed job's missing ones get none)."""
    written = []
    for output in map(Path, outputs):
        if not output.exists():
            continue
        path = provenance_path(output)
        write_text(path, json.dumps({**record, "output": str(output)}, indent=2) + "\n")
        written.append(path)
    return written


@contextmanager
def recorded(outputs: Sequence[Path], *, config_hash: str | None = None,
             shard: str | None = None, rule: str | None = None,
             environ: Mapping[str, str] = os.environ) -> Iterator[None]:
    """Write the provenance of ``outputs`` once the block succeeds; a failing block writes none.

    Under ``accelerate launch`` every process runs the block; only the main one (RANK 0, or no
    RANK) writes, so that the record is one process's and not whichever finished last.
    """
    started = datetime.now(timezone.utc)
    yield
    if environ.get("RANK", "0") == "0":
        write(outputs, collect(started, config_hash=config_hash, shard=shard, rule=rule,
                               environ=environ))


def read_provenance(path: Path) -> dict[str, Any]:
    """One record as :func:`write` wrote it; ProvenanceError naming the file otherwise."""
    try:
        record = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ProvenanceError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise ProvenanceError(f"{path}: not a provenance record (a JSON object)")
    missing = [key for key in (*RECORD_KEYS, "output") if key not in record]
    if missing:
        raise ProvenanceError(f"{path}: no {', '.join(missing)} (not a provenance record)")
    return record


def records_under(folders: Iterable[Path]) -> list[Path]:
    """Every provenance record in these output trees (folder and file records alike)."""
    found: set[Path] = set()
    for folder in map(Path, folders):
        found.update(folder.rglob(FOLDER_RECORD))
        found.update(folder.rglob(f"{FILE_RECORDS}/*.json"))
    return sorted(found)


def provenance_table(paths: Iterable[Path]) -> pd.DataFrame:
    """One row per record: what it computed, where (host, GPU model), when, from which commit.

    ``gpu_model`` lists the distinct models of the job's GPUs (``"no GPU"`` for a CPU job) and
    ``gpu_count`` their number, so that rows group by model; times are UTC timestamps. A job
    of several outputs has a row for each: ``drop_duplicates("run_id")`` counts it once.
    """
    rows = []
    for path in paths:
        record = read_provenance(path)
        gpus = record["host"]["gpus"]
        rows.append({
            "run_id": record["run_id"], "output": record["output"], "rule": record["rule"],
            "shard": record["shard"], "host": record["host"]["name"],
            "gpu_model": ", ".join(sorted(set(gpus))) or NO_GPU,
            "gpu_count": len(gpus), "slurm_job_id": record["slurm"]["job_id"],
            "node_list": record["slurm"]["node_list"], "started": record["started"],
            "ended": record["ended"], "duration_s": record["duration_s"],
            "commit": record["code"]["commit"], "dirty": record["code"]["dirty"],
            "config_hash": record["config_hash"]})
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    for column in ("started", "ended"):
        table[column] = pd.to_datetime(table[column], utc=True, format="ISO8601")
    return table


def _git(checkout: Path, *args: str) -> str:
    # GIT_OPTIONAL_LOCKS=0: `git status` would otherwise refresh and rewrite the checkout's
    # index, racing with the user's git and with every other job of the run that does the same.
    result = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                            timeout=GIT_TIMEOUT_S, check=True,
                            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"})
    return result.stdout.strip()


def _git_or_none(checkout: Path, *args: str) -> str | None:
    try:
        return _git(checkout, *args)
    except (OSError, subprocess.SubprocessError):  # a checkout without commits; a slow disk
        return None


def _dirty(checkout: Path) -> bool | None:
    changes = _git_or_none(checkout, "status", "--porcelain", "--untracked-files=no")
    return None if changes is None else bool(changes)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no message"


def _usable_cpus() -> int | None:
    """The CPUs this process may run on: a SLURM job's allocation, not the node's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity
        return None


def _initialised_gpus() -> list[str]:
    torch = sys.modules.get("torch")
    # Naming the GPUs of an uninitialised CUDA would initialise it: seconds, memory on every
    # visible GPU, and forked workers that can no longer use CUDA.
    if torch is None or not torch.cuda.is_initialized():
        return []
    return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]


def _json_value(value: Any) -> str:
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"a {type(value).__name__} in the settings has no JSON form: {value!r}")
