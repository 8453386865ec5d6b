"""What a retried cluster job asks for (cellflow.retries) and the log every attempt keeps
(cellflow.logs). The same rules on a real SLURM cluster: tests/test_slurm.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellflow import retries
from cellflow.retries import (
    OTHER,
    OUT_OF_MEMORY,
    TIME_LIMIT,
    failure_reason,
    partition_limits,
    previous_failures,
    retried_limit,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("text", "reason"), [
    ("slurmstepd: error: *** JOB 7 ON gpu01 CANCELLED AT 2026-12-01T20:49:18 DUE TO TIME "
     "LIMIT ***", TIME_LIMIT),
    ("slurmstepd: error: Detected 1 oom_kill event in StepId=7.batch. Some of the step tasks "
     "have been OOM Killed.", OUT_OF_MEMORY),
    ('Traceback (most recent call last):\n  File "x.py", line 1\nMemoryError', OUT_OF_MEMORY),
    # more host memory does not help a GPU that is full
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", OTHER),
    ("ValueError: datasets.mhist.root: no such folder", OTHER),
    ("", OTHER),
])
def test_the_failure_reason_is_read_from_the_log(text, reason):
    assert failure_reason(text) == reason


def write_log(folder: Path, name: str, text: str, age_s: float) -> None:
    path = folder / name
    path.write_text(text)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def test_previous_failures_are_the_newest_logs_oldest_first(tmp_path):
    write_log(tmp_path, "10.log", "JOB 10 ON n1 CANCELLED AT 2026-11-30T09:00:00 DUE TO TIME LIMIT",
              age_s=300)  # an earlier run's attempt
    write_log(tmp_path, "11.log", "exit 3", age_s=200)
    write_log(tmp_path, "12.log", "CANCELLED AT 2026-12-01T20:00:00 DUE TO TIME LIMIT", 100)
    write_log(tmp_path, "13.log", "", age_s=0)  # the attempt that is running
    assert previous_failures(tmp_path, 2, exclude="13.log") == [OTHER, TIME_LIMIT]
    assert previous_failures(tmp_path, 9, exclude="13.log") == [TIME_LIMIT, OTHER, TIME_LIMIT]
    assert previous_failures(tmp_path, 0) == []
    assert previous_failures(tmp_path / "run locally", 2) == []


def test_only_the_resource_that_failed_grows_up_to_the_partition():
    timed_out = [TIME_LIMIT]
    assert retried_limit("runtime", 60, timed_out) == 120
    assert retried_limit("mem_mb", 8000, timed_out) == 8000
    assert retried_limit("mem_mb", 8000, [OUT_OF_MEMORY, OUT_OF_MEMORY]) == 24000
    assert retried_limit("runtime", 60, [OTHER, OTHER]) == 60
    assert retried_limit("mem_mb", 16000, [OUT_OF_MEMORY], cap=23081) == 23081
    # a first request above the cap is the user's: SLURM refuses it by name
    assert retried_limit("mem_mb", 30000, [OUT_OF_MEMORY], cap=23081) == 30000


@pytest.mark.parametrize(("text", "minutes"), [
    ("30:00", 30), ("2:00:00", 120), ("1-00:00:00", 1440), ("1-02:03:04", 1564), ("45", 45),
    ("infinite", None), ("UNLIMITED", None)])
def test_slurm_time_limits_read_as_minutes(text, minutes):
    assert retries._minutes(text) == minutes


def test_partition_limits_come_from_sinfo(tmp_path, monkeypatch):
    fake = tmp_path / "sinfo"
    fake.write_text("#!/bin/sh\ncat <<'EOF'\ncpu*|1-00:00:00|191000\ncpu*|1-00:00:00|"
                    "380000+\ngpu|2:00:00|500000\nEOF\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    partition_limits.cache_clear()
    try:
        assert partition_limits() == {"runtime": 1440, "mem_mb": 380000}  # the default one
        assert partition_limits("gpu")["runtime"] == 120
    finally:
        partition_limits.cache_clear()


def test_every_attempt_keeps_its_own_log(tmp_path):
    """Snakemake deletes a rule's log before each attempt; the attempt's copy stays."""
    log = tmp_path / "logs" / "synthetic" / "train_diffusion.log"
    code = ("import logging, sys; from cellflow.logs import log_to_file; "
            f"log_to_file({str(log)!r}); logging.getLogger('cellflow').info(sys.argv[1])")
    for attempt in ("first attempt", "second attempt"):
        subprocess.run([sys.executable, "-c", code, attempt], check=True, cwd=REPO,
                       env={**os.environ, "SLURM_JOB_ID": attempt.split()[0]})
    assert "second attempt" in log.read_text() and "first attempt" not in log.read_text()
    copies = sorted((log.parent / "attempts" / "train_diffusion").glob("*.log"),
                    key=lambda path: path.stat().st_mtime)
    assert [path.name.split("-")[1] for path in copies] == ["slurmfirst", "slurmsecond"]
    assert "first attempt" in copies[0].read_text()
    assert "second attempt" in copies[1].read_text()
