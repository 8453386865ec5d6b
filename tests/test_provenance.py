"""Every output gets a complete provenance record where provenance_path says, only on success."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

import cellflow
from cellflow import provenance
from tests.conftest import REPO

SLURM_ENVIRON = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2",
                 "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_PARTITION": "gpu"}


def git(checkout: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(checkout), "-c", "user.name=test",
                           "-c", "user.email=test@example.org", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def record(**overrides) -> dict:
    started = datetime.now(timezone.utc) - timedelta(seconds=90)
    return {**provenance.collect(started, config_hash="c0ffee", environ={}), **overrides}


def test_a_record_has_every_key_with_its_type():
    started = datetime.now(timezone.utc) - timedelta(seconds=90)
    digest = provenance.config_digest({"lr": 1e-4})
    made = provenance.collect(started, config_hash=digest, shard="2 of 8", rule="generate",
                              environ=SLURM_ENVIRON)
    assert list(made) == list(provenance.RECORD_KEYS)
    assert (made["rule"], made["shard"], made["config_hash"]) == ("generate", "2 of 8", digest)
    assert set(made["code"]) == {"source", "commit", "dirty"}
    assert made["versions"]["python"].count(".") == 2
    assert made["versions"]["numpy"] == importlib.metadata.version("numpy")
    assert set(made["versions"]) == {"python", *provenance.VERSIONED_PACKAGES}
    host = made["host"]
    assert isinstance(host["name"], str) and host["name"]
    assert isinstance(host["cpu_count"], int) and 1 <= host["cpus_usable"] <= host["cpu_count"]
    assert host["gpus"] == []  # this process has not initialised CUDA
    assert datetime.fromisoformat(made["started"]) == started.replace(
        microsecond=started.microsecond // 1000 * 1000)
    ended = datetime.fromisoformat(made["ended"])
    assert ended.utcoffset() == timedelta(0) and ended >= datetime.fromisoformat(made["started"])
    assert 90 <= made["duration_s"] < 120
    assert made["command"] == sys.argv
    json.dumps(made)  # nothing but JSON values


def test_a_missing_package_has_no_version(monkeypatch):
    monkeypatch.setattr(provenance, "VERSIONED_PACKAGES", ("numpy", "cellflow-no-such-package"))
    versions = provenance.package_versions()
    assert versions["cellflow-no-such-package"] is None
    assert versions["numpy"] == importlib.metadata.version("numpy")


def test_the_commit_is_that_of_the_checkout_the_package_is_imported_from():
    code = provenance.collect(datetime.now(timezone.utc), config_hash=None)["code"]
    assert Path(cellflow.__file__).resolve().parents[1] == REPO.resolve()
    if (REPO / ".git").exists():
        assert code["commit"] == git(REPO, "rev-parse", "HEAD")
        assert code["source"] == f"git checkout {REPO.resolve()}"
        assert isinstance(code["dirty"], bool)
    else:  # a copy of the working tree without its history
        assert code == {"source": f"installed package cellflow {cellflow.__version__}",
                        "commit": None, "dirty": None}


def test_the_dirty_flag_follows_a_modified_tracked_file(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    git(checkout, "init", "-q")
    (checkout / "train.py").write_text("lr = 1e-4\n")
    git(checkout, "add", "train.py")
    git(checkout, "commit", "-q", "-m", "first")
    clean = provenance.code_state(checkout)
    assert clean == {"source": f"git checkout {checkout.resolve()}",
                     "commit": git(checkout, "rev-parse", "HEAD"), "dirty": False}
    (checkout / "results.tsv").write_text("untracked outputs do not count\n")
    assert provenance.code_state(checkout)["dirty"] is False
    (checkout / "train.py").write_text("lr = 3e-4\n")
    assert provenance.code_state(checkout) == {**clean, "dirty": True}


def test_reading_the_state_leaves_the_checkouts_index_as_it_was(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text("lr = 1e-4\n")
    git(tmp_path, "add", "train.py")
    git(tmp_path, "commit", "-q", "-m", "first")
    # the same content, touched: a plain `git status` would rewrite the index's file times
    os.utime(tmp_path / "train.py", (time.time() + 100, time.time() + 100))
    index = (tmp_path / ".git" / "index").read_bytes()
    assert provenance.code_state(tmp_path)["dirty"] is False
    assert (tmp_path / ".git" / "index").read_bytes() == index


def test_code_outside_a_checkout_of_its_own_has_no_commit(tmp_path):
    installed = {"source": f"installed package cellflow {cellflow.__version__}", "commit": None,
                 "dirty": None}
    assert provenance.code_state(tmp_path) == installed
    # a virtual environment inside a repository: the repository's commit is not the package's
    git(tmp_path, "init", "-q")
    site_packages = tmp_path / ".venv" / "lib" / "site-packages"
    site_packages.mkdir(parents=True)
    assert provenance.code_state(site_packages) == installed


def test_slurm_variables_come_from_the_given_environment():
    assert provenance.slurm_job(SLURM_ENVIRON) == {
        "job_id": "4242", "array_job_id": "4240", "array_task_id": "2",
        "node_list": "gpu[017-018]", "partition": "gpu"}
    assert provenance.slurm_job({"SLURM_JOBID": "7", "SLURM_NODELIST": "node1"}) == {
        "job_id": "7", "array_job_id": None, "array_task_id": None, "node_list": "node1",
        "partition": None}
    assert set(provenance.slurm_job({}).values()) == {None}


def test_gpus_are_named_only_once_the_job_has_initialised_cuda(monkeypatch):
    def fake_torch(initialised: bool) -> SimpleNamespace:
        def name(index: int) -> str:
            if not initialised:
                raise AssertionError("provenance initialised CUDA")
            return ["NVIDIA H200", "NVIDIA H200"][index]

        return SimpleNamespace(cuda=SimpleNamespace(
            is_initialized=lambda: initialised, device_count=lambda: 2, get_device_name=name))

    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialised=False))
    assert record()["host"]["gpus"] == []
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialised=True))
    assert record()["host"]["gpus"] == ["NVIDIA H200", "NVIDIA H200"]


def test_collecting_does_not_import_torch():
    script = ("import sys; from datetime import datetime, timezone; "
              "from cellflow import provenance; "
              "provenance.collect(datetime.now(timezone.utc), config_hash=None); "
              "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, cwd=REPO)
    assert result.stdout.strip() == "False"


def test_folder_and_file_outputs_get_their_record_where_provenance_path_says(tmp_path):
    folder, table = tmp_path / "models" / "diffusion", tmp_path / "evaluation" / "fidelity.tsv"
    folder.mkdir(parents=True)
    table.parent.mkdir()
    table.write_text("metric\tvalue\n")
    assert provenance.provenance_path(folder) == folder / "provenance.json"
    assert provenance.provenance_path(table) == table.parent / ".provenance" / "fidelity.tsv.json"
    missing = tmp_path / "evaluation" / "never_written.tsv"
    made = record(rule="fidelity")
    written = provenance.write([folder, table, missing], made)
    assert written == [folder / "provenance.json",
                       table.parent / ".provenance" / "fidelity.tsv.json"]
    assert sorted(p.name for p in table.parent.iterdir()) == [".provenance", "fidelity.tsv"]
    for output, path in zip([folder, table], written, strict=True):
        assert provenance.read_provenance(path) == {**made, "output": str(output)}
    rows = provenance.provenance_table(written)
    assert rows["run_id"].nunique() == 1 and len(rows.drop_duplicates("run_id")) == 1
    assert record()["run_id"] != made["run_id"]  # another job
    assert not provenance.provenance_path(missing).exists()


def test_a_block_that_succeeds_is_recorded_and_a_failing_one_writes_nothing(tmp_path):
    done, failed = tmp_path / "done.tsv", tmp_path / "failed.tsv"
    with provenance.recorded([done], config_hash="abc", shard="0 of 2", rule="generate",
                             environ=SLURM_ENVIRON):
        done.write_text("x\n")
    written = provenance.read_provenance(provenance.provenance_path(done))
    assert (written["rule"], written["shard"], written["config_hash"]) == ("generate", "0 of 2",
                                                                         "abc")
    assert written["slurm"]["job_id"] == "4242" and written["duration_s"] >= 0
    with pytest.raises(RuntimeError, match="out of memory"), provenance.recorded([failed]):
        failed.write_text("half\n")
        raise RuntimeError("out of memory")
    assert not provenance.provenance_path(failed).exists()


def test_only_the_main_process_of_a_distributed_launch_writes(tmp_path):
    output = tmp_path / "model"
    output.mkdir()
    with provenance.recorded([output], environ={"RANK": "1", "WORLD_SIZE": "2"}):
        pass
    assert not provenance.provenance_path(output).exists()
    with provenance.recorded([output], environ={"RANK": "0", "WORLD_SIZE": "2"}):
        pass
    assert provenance.provenance_path(output).exists()


def test_the_config_digest_is_stable_under_key_order_and_follows_values():
    one = provenance.config_digest({"train": {"lr": 1e-4, "steps": 10}, "seed": 0})
    assert one == provenance.config_digest({"seed": 0, "train": {"steps": 10, "lr": 1e-4}})
    assert one != provenance.config_digest({"seed": 0, "train": {"steps": 11, "lr": 1e-4}})
    assert len(one) == 64 and set(one) <= set("0123456789abcdef")
    assert provenance.config_digest("seed: 0\n") != provenance.config_digest("seed: 1\n")
    assert provenance.config_digest({"root": Path("data/raw")}) == provenance.config_digest(
        {"root": "data/raw"})
    with pytest.raises(TypeError, match="object"):
        provenance.config_digest({"model": object()})


def test_the_table_reads_several_records_for_grouping_by_node_and_gpu_model(tmp_path):
    jobs = [("gpu017", ["NVIDIA H200", "NVIDIA H200"], 100.0), ("gpu017", ["NVIDIA H200"], 50.0),
            ("gpu018", ["NVIDIA A100-SXM4-80GB"], 80.0), ("cpu001", [], 10.0)]
    paths = []
    for index, (host, gpus, duration) in enumerate(jobs):
        made = record(rule="train_diffusion", duration_s=duration,
                      host={"name": host, "cpu_count": 64, "cpus_usable": 8, "gpus": gpus})
        output = tmp_path / f"d{index}"
        output.mkdir()
        paths += provenance.write([output], made)
    table = provenance.provenance_table(paths)
    assert list(table.columns) == provenance.TABLE_COLUMNS
    assert table["output"].tolist() == [str(tmp_path / f"d{index}") for index in range(4)]
    assert table["gpu_model"].tolist() == ["NVIDIA H200", "NVIDIA H200", "NVIDIA A100-SXM4-80GB",
                                           "no GPU"]
    assert table["gpu_count"].tolist() == [2, 1, 1, 0]
    assert str(table["started"].dt.tz) == "UTC"
    assert (table["ended"] > table["started"]).all()
    per_node = table.groupby(["host", "gpu_model"])["duration_s"].sum()
    assert per_node[("gpu017", "NVIDIA H200")] == 150.0 and per_node[("cpu001", "no GPU")] == 10.0
    assert provenance.provenance_table([]).columns.tolist() == provenance.TABLE_COLUMNS


def test_a_file_that_is_not_a_record_is_named(tmp_path):
    broken, partial = tmp_path / "broken.json", tmp_path / "partial.json"
    broken.write_text("{")
    partial.write_text(json.dumps({"rule": "x"}))
    with pytest.raises(provenance.ProvenanceError, match="broken.json: not valid JSON"):
        provenance.read_provenance(broken)
    with pytest.raises(provenance.ProvenanceError, match="partial.json: no run_id, shard,"):
        provenance.read_provenance(partial)


@pytest.mark.parametrize("failure, source", [
    (subprocess.CalledProcessError(128, "git", stderr="fatal: detected dubious ownership in "
                                   "repository at '/shared/cellflow'\nhint: ...\n"),
     "git failed (fatal: detected dubious ownership in repository at '/shared/cellflow')"),
    (subprocess.TimeoutExpired("git", provenance.GIT_TIMEOUT_S), "git took over 10 s")])
def test_a_checkout_git_cannot_read_says_why(tmp_path, monkeypatch, failure, source):
    def failing_git(checkout, *args):
        raise failure

    monkeypatch.setattr(provenance, "_git", failing_git)
    assert provenance.code_state(tmp_path) == {"source": f"{tmp_path}: {source}", "commit": None,
                                               "dirty": None}
