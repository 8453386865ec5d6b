"""What a job's log and terminal show: progress as plain lines, one summary line per job, the
settings read from the file the workflow wrote."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellflow import logs
from cellflow.cli import spec_text
from cellflow.resume import BatchStore, Sharding


def test_a_progress_bar_becomes_one_plain_line_per_redraw():
    from tqdm import tqdm

    log = io.StringIO()
    stream = logs._Tee(log)
    stream.write("started\n")
    for _ in tqdm(range(3), file=stream, mininterval=0, desc="batches",
                  bar_format=logs.PLAIN_PROGRESS):
        pass
    stream.write("finished\n")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0] == "started" and lines[-1] == "finished"
    progress = lines[1:-1]
    assert progress[0].startswith("batches: 0/3 (0%)")
    assert any(line.startswith("batches: 3/3 (100%)") for line in progress)
    assert all(line == line.rstrip() and line for line in progress)


def test_a_job_log_shows_tqdm_as_periodic_lines_with_the_time_left(tmp_path):
    log = tmp_path / "job.log"
    code = ("import sys, time; from cellflow.logs import log_to_file; from tqdm import tqdm\n"
            f"log_to_file({str(log)!r})\n"
            "for _ in tqdm(range(4), desc='steps'): time.sleep(0.05)\n")
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={"PATH": "/usr/bin:/bin", "TQDM_MININTERVAL": "0",
                        "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    text = log.read_text()
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("steps:")]
    assert lines[0].startswith("steps: 0/4 (0%)") and "left" in lines[-1]
    assert lines[-1].startswith("steps: 4/4 (100%)")


def test_the_summary_line_names_what_the_job_wrote_its_numbers_and_time(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "_NOTES", {})
    out = tmp_path / "trajectories"
    (out / "frames").mkdir(parents=True)
    (out / "manifest.tsv").write_text("x" * 1500)
    (out / "frames" / "01.png").write_bytes(b"y" * 500)
    logs.note("images", 12)
    logs.note("final loss", 0.0123456)
    line = logs.job_summary("generate cellflow", [out, tmp_path / "absent"], 83.2)
    assert line == (f"done: generate cellflow wrote {out} (2 files, 2.0 KB), images 12, "
                    "final loss 0.01235 in 1 min 23 s")
    assert "\n" not in line


def test_batch_progress_counts_the_batches_this_job_computes(tmp_path, capsys):
    def arrays():
        return {"x": np.zeros(2)}

    store = BatchStore(tmp_path, {"k": 1}, Sharding(index=1, count=3), total=7, desc="b")
    assert store.progress.total == 2  # positions 1 and 4 of 0..6
    for position in range(7):
        store.get_or_compute(f"batch{position}", arrays)
    assert store.progress.n == 2
    whole = BatchStore(tmp_path / "whole", {"k": 1}, total=3, desc="b")
    for position in range(3):
        whole.get_or_compute(f"batch{position}", arrays)
    again = BatchStore(tmp_path / "whole", {"k": 1}, total=3, desc="b")
    for position in range(3):
        again.get_or_compute(f"batch{position}", arrays)
    assert again.progress.n == 3 and again.reused == 3
    assert "3 stored earlier" in capsys.readouterr().err


def test_the_settings_come_from_the_file_the_workflow_wrote(tmp_path):
    settings = {"dataset_name": "mhist", "seed": 3}
    path = tmp_path / "logs" / "mhist" / "specs" / "data-0123.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(settings))
    assert json.loads(spec_text(str(path))) == settings
    assert json.loads(spec_text(json.dumps(settings))) == settings  # typed by hand
    with pytest.raises(argparse.ArgumentTypeError, match="data-missing.json"):
        spec_text(str(path.with_name("data-missing.json")))


def test_an_argument_file_stands_for_its_lines(tmp_path, capsys):
    from cellflow.cli import main

    listed = tmp_path / "inputs.txt"
    listed.write_text("a.tsv\nb.tsv\n")
    with pytest.raises(SystemExit):
        main(["downstream", "benchmark", "--inputs", f"@{listed}", "--out",
              str(tmp_path / "x.tsv"), "--log", str(tmp_path / "x.log"), "--bad"])
    assert "unrecognized arguments: --bad" in capsys.readouterr().err
