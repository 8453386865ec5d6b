"""The preflight check: counts from the official files, weights, disk, SLURM and GPUs."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import yaml

from cellflow.cli import main
from cellflow.doctor import run_doctor
from tests.layouts.breastpathq import make_breastpathq
from tests.layouts.prcc import make_prcc
from tests.test_workflow import snakemake

REPO = Path(__file__).resolve().parents[1]


def config_file(tmp_path: Path, edit=None) -> Path:
    """The demo config with two official layouts, one dataset whose download is missing, and
    a backbone weights file that is not there."""
    prcc = make_prcc(tmp_path / "prcc")
    breastpathq = make_breastpathq(tmp_path / "bpq")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["datasets"] = {
        "prcc": {"kind": "prcc", "root": str(prcc.root), "resolution": 16,
                 "classes": ["type1", "type2"]},
        "breastpathq": {"kind": "breastpathq", "root": str(breastpathq.root), "resolution": 16,
                        "classes": ["none", "low", "medium", "high"]},
        "mhist": {"kind": "mhist", "root": str(tmp_path / "not-downloaded"), "resolution": 16,
                  "classes": ["HP", "SSA"]},
    }
    config["downstream"]["strategies"] = {"none": {}}
    config["downstream"]["pretrained"] = {"resnet18": str(tmp_path / "resnet18.pth")}
    config["generation"] = {"methods": ["adm"]}
    if edit:
        edit(config)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, prcc


def by_subject(findings):
    return {finding.subject: finding for finding in findings}


def test_counts_come_from_the_official_files_and_each_problem_names_its_key(tmp_path):
    path, prcc = config_file(tmp_path)
    findings = by_subject(run_doctor([path], results=tmp_path / "results"))
    expected = Counter((region.split, region.label) for region in prcc.regions.values())
    counted = findings["datasets.prcc"]
    assert counted.severity == "ok"
    for (split, label), n in expected.items():
        assert f"{label} {n}" in counted.message.split(f"{split} ", 1)[1]
    assert f"{len(prcc.unlisted)} excluded" in counted.message
    # the fixture is not the published dataset: warned, with both numbers
    warnings = [f for f in run_doctor([path], results=tmp_path / "r")
                if f.severity == "warning" and f.subject == "datasets.prcc"]
    assert any("published count is 373" in f.message for f in warnings)
    assert any("region(s) on disk are in no official split list" in f.message
               for f in warnings)  # what the reader warns of reaches the preflight
    assert findings["datasets.mhist.root"].severity == "problem"
    assert "not-downloaded does not exist" in findings["datasets.mhist.root"].message
    assert findings["downstream.pretrained.resnet18"].severity == "problem"
    assert findings["GPUs"].message == "none requested"


def test_the_command_prints_one_line_per_problem_and_fails(tmp_path, capsys):
    path, _ = config_file(tmp_path)
    assert main(["doctor", "--configfile", str(path), "--results", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    problems = [line for line in lines if line.startswith("PROBLEM")]
    assert len(problems) == 2 and lines[-1] == "2 problem(s)"
    (tmp_path / "resnet18.pth").write_bytes(b"weights")
    shutil.copytree(tmp_path / "prcc", tmp_path / "not-downloaded")  # not an MHIST layout
    assert main(["doctor", "--configfile", str(path), "--results", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM  datasets.mhist: dataset 'mhist': MHIST image folder" in out


def test_a_bad_config_is_reported_by_key_without_a_traceback(tmp_path):
    path, _ = config_file(tmp_path, lambda c: c["datasets"]["prcc"].update(clases=["x"]))
    findings = run_doctor([path], results=tmp_path)
    assert [f.severity for f in findings] == ["problem"]
    assert "datasets.prcc.clases: unknown key" in findings[0].message


def test_disk_gpus_and_the_slurm_set_up(tmp_path, monkeypatch):
    path, _ = config_file(tmp_path, lambda c: c["diffusion"]["train"].update(gpus=2))
    bare = {"PATH": str(tmp_path / "empty-bin")}
    findings = by_subject(run_doctor([path], results=tmp_path / "results", environ=bare))
    assert findings["diffusion.train.gpus"].severity == "problem"  # local run, no GPU here
    assert "about" in findings[str(tmp_path / "results")].message
    findings = by_subject(run_doctor([path], profile="slurm", results=tmp_path / "results",
                                     workflow_dir=REPO, environ=bare))
    assert findings["GPUs"].message.startswith("requested from SLURM per rule: "
                                               "diffusion.train.gpus 2")
    assert "not on PATH" in findings["sbatch"].message
    assert findings["SBATCH_ACCOUNT"].severity == "warning"
    on_node = {**bare, "CUDA_VISIBLE_DEVICES": "0"}
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    findings = by_subject(run_doctor([path], results=tmp_path / "results", environ=on_node))
    assert "this node's PyTorch sees 0" in findings["diffusion.train.gpus"].message

    class Full:
        free = 1000

    monkeypatch.setattr("shutil.disk_usage", lambda _: Full)
    findings = by_subject(run_doctor([path], results=tmp_path / "results", environ=bare))
    assert findings[str(tmp_path / "results")].severity == "problem"
    assert findings[str(tmp_path / "results")].message.startswith("1.0 KB free, the run writes")


def test_snakemake_doctor_runs_the_check(tmp_path):
    path, _ = config_file(tmp_path)
    result = snakemake(tmp_path, "doctor", "--cores", "1", "--configfile", str(path),
                       check=False)
    assert result.returncode != 0
    log = (tmp_path / "logs" / "doctor.log").read_text()
    assert "PROBLEM  datasets.mhist.root" in log and "OK       datasets.prcc" in log
