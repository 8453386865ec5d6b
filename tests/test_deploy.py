"""The workflow used as the catalog's workflows are: deployed with snakedeploy, included as a
module, sourced from a git repository with an installed cellflow. Each runs the .test config
in a folder that holds no copy of the package."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_command as run

BIN = Path(sys.executable).parent


def users_config(folder: Path, dataset: str = "synthetic") -> None:
    """A config of the user's own in `folder`/config: the .test one's dataset under the
    name `dataset`, with the workflow's own methods only (no imported images)."""
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / ".test" / "config" /
                             "config.yaml").read_text())
    config["benchmark"] = "mine"
    config["datasets"] = {dataset: config["datasets"]["synthetic"]}
    config["generation"] = {"methods": ["cellflow"]}
    config["downstream"]["strategies"] = {"none": {}, "cellflow": {}}
    (folder / "config").mkdir()
    (folder / "config" / "config.yaml").write_text(yaml.safe_dump(config))


def module_snakefile(snakefile: str) -> str:
    return (f'configfile: "config/config.yaml"\n\n\nmodule cellflow:\n'
            f'    snakefile:\n        {snakefile}\n    config:\n        config\n\n\n'
            "use rule * from cellflow\n")


@pytest.mark.slow
def test_snakedeploy_deployment_runs_the_test_config(deployed_test_run, workflow_copy):
    folder = deployed_test_run.folder
    assert "module " in deployed_test_run.deployed_snakefile
    assert "use rule * from" in deployed_test_run.deployed_snakefile
    for part in ("config/config.yaml", "config/README.md", "profiles/default/profile.yaml",
                 "LICENSE"):
        assert (folder / part).is_file(), part
    assert not (folder / "cellflow").exists()
    assert "steps (100%) done" in deployed_test_run.log
    assert (folder / "results" / "benchmarks" / "tiny" / "front_page.html").is_file()
    summary = (folder / "results" / "synthetic" / "downstream" / "summary.tsv").read_text()
    assert "cellflow" in summary and "none" in summary
    # the jobs imported the package beside the workflow, not the one installed here
    record = folder / "results" / "synthetic" / "models" / "diffusion" / "provenance.json"
    assert f"git checkout {workflow_copy}" in record.read_text()
    # each job printed one short command and ended with its summary line
    commands = [line for line in deployed_test_run.log.splitlines() if "cellflow.cli" in line]
    assert commands and max(map(len, commands)) < 600
    assert "done: train diffusion wrote results/synthetic/models/diffusion (" in (
        deployed_test_run.log)
    log = (folder / "logs" / "synthetic" / "train_diffusion.log").read_text()
    assert "\r" not in log
    assert log.rstrip().splitlines()[-1].split(" INFO cellflow: ", 1)[1].startswith(
        "done: train diffusion wrote results/synthetic/models/diffusion (")
    assert "steps 3, final loss" in log


@pytest.mark.slow
def test_a_module_with_a_config_of_the_users_own(workflow_copy, tmp_path):
    (tmp_path / "Snakefile").write_text(
        module_snakefile(f'"{workflow_copy / "workflow" / "Snakefile"}"'))
    users_config(tmp_path, "tiles")
    plan = run([str(BIN / "snakemake"), "-n", "--cores", "2"], tmp_path)
    assert "results/tiles/data/manifest.tsv" in plan.stdout
    assert "results/benchmarks/mine/front_page.html" in plan.stdout
    assert "results/synthetic" not in plan.stdout  # the workflow's own config is not merged
    run([str(BIN / "snakemake"), "--cores", "2", "results/tiles/data/manifest.tsv"], tmp_path)
    assert (tmp_path / "results" / "tiles" / "data" / "manifest.tsv").is_file()


def test_a_workflow_sourced_from_git_needs_the_installed_cellflow_of_its_version(
        workflow_copy, tmp_path):
    """Sourced from a git repository, the workflow has no package on disk: it runs with the
    installed cellflow when the versions match and names both when they do not."""
    import cellflow

    users_config(tmp_path)
    (tmp_path / "Snakefile").write_text(
        module_snakefile(f'"git+file://{workflow_copy}/workflow/Snakefile@main"'))
    plan = run([str(BIN / "snakemake"), "-n", "--cores", "2"], tmp_path)
    assert "train_diffusion" in plan.stdout

    newer = tmp_path / "newer"
    run(["git", "clone", "-q", str(workflow_copy), str(newer)], tmp_path)
    init = newer / "cellflow" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]+"', '__version__ = "99.0.0"', init.read_text()))
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.org", "commit", "-q",
         "-am", "a newer version"], newer)
    (tmp_path / "Snakefile").write_text(
        module_snakefile(f'"git+file://{newer}/workflow/Snakefile@main"'))
    refused = run([str(BIN / "snakemake"), "-n", "--cores", "2"], tmp_path, check=False)
    assert refused.returncode != 0
    assert (f"this workflow is cellflow 99.0.0 but the installed cellflow is "
            f"{cellflow.__version__}") in refused.stdout + refused.stderr
