"""The workflow used as the catalog's workflows are: deployed with snakedeploy, included as a
module, sourced from a git repository with an installed cellflow. Each runs the .test config
in a folder that holds no copy of the package."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def run(command: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=ENV,
                            timeout=900)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """This working tree as a git repository of its own: what a clone of it would hold (the
    tracked files and the untracked ones git does not ignore), committed on `main`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
    root = tmp_path_factory.mktemp("cellflow-src")
    for name in filter(None, listed.stdout.decode().split("\0")):
        path = REPO / name
        if path.is_file() and not path.is_symlink():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, root / name)
        elif path.is_symlink():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).symlink_to(os.readlink(path))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    run([*git, "init", "-q", "-b", "main"], root)
    run([*git, "add", "-A"], root)
    run([*git, "commit", "-q", "-m", "the working tree"], root)
    return root


def module_snakefile(snakefile: str) -> str:
    return (f'configfile: "config/config.yaml"\n\n\nmodule cellflow:\n'
            f'    snakefile:\n        {snakefile}\n    config:\n        config\n\n\n'
            "use rule * from cellflow\n")


@pytest.mark.slow
def test_snakedeploy_deployment_runs_the_test_config(source, tmp_path):
    dest = tmp_path / "deployment"
    run([str(BIN / "snakedeploy"), "deploy-workflow", str(source), str(dest), "--branch",
         "main"], tmp_path)
    snakefile = dest / "workflow" / "Snakefile"
    deployed = snakefile.read_text()
    assert "module " in deployed and "use rule * from" in deployed
    for part in ("config/config.yaml", "config/README.md", "profiles/default/profile.yaml",
                 "LICENSE"):
        assert (dest / part).is_file(), part
    # From a local path snakedeploy writes the module's snakefile relative to the repository
    # ("workflow/Snakefile"), which Snakemake reads relative to the deployed Snakefile; the
    # README says to make it the clone's own path (from a hosting URL it writes github(...)).
    assert '"workflow/Snakefile"' in deployed
    snakefile.write_text(deployed.replace('"workflow/Snakefile"',
                                          f'"{source / "workflow" / "Snakefile"}"'))
    shutil.copy(source / ".test" / "config" / "config.yaml", dest / "config" / "config.yaml")
    result = run([str(BIN / "snakemake"), "--cores", "2"], dest)
    assert not (dest / "cellflow").exists()
    assert (dest / "results" / "benchmarks" / "test" / "front_page.html").is_file()
    summary = (dest / "results" / "synthetic" / "downstream" / "summary.tsv").read_text()
    assert "cellflow" in summary and "none" in summary
    # the jobs imported the package beside the workflow, not the one installed here
    record = dest / "results" / "synthetic" / "models" / "diffusion" / "provenance.json"
    assert f"git checkout {source}" in record.read_text()
    log = result.stdout + result.stderr
    assert "steps (100%) done" in log


@pytest.mark.slow
def test_a_module_with_a_config_of_the_users_own(source, tmp_path):
    (tmp_path / "Snakefile").write_text(
        module_snakefile(f'"{source / "workflow" / "Snakefile"}"'))
    config = yaml.safe_load((source / ".test" / "config" / "config.yaml").read_text())
    config["benchmark"] = "mine"
    config["datasets"] = {"tiles": config["datasets"]["synthetic"]}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    plan = run([str(BIN / "snakemake"), "-n", "--cores", "2"], tmp_path)
    assert "results/tiles/data/manifest.tsv" in plan.stdout
    assert "results/benchmarks/mine/front_page.html" in plan.stdout
    assert "results/synthetic" not in plan.stdout  # the workflow's own config is not merged
    run([str(BIN / "snakemake"), "--cores", "2", "results/tiles/data/manifest.tsv"], tmp_path)
    assert (tmp_path / "results" / "tiles" / "data" / "manifest.tsv").is_file()


def test_a_workflow_sourced_from_git_needs_the_installed_cellflow_of_its_version(
        source, tmp_path):
    """Sourced from a git repository, the workflow has no package on disk: it runs with the
    installed cellflow when the versions match and names both when they do not."""
    import cellflow

    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(source / ".test" / "config" / "config.yaml", config / "config.yaml")
    (tmp_path / "Snakefile").write_text(
        module_snakefile(f'"git+file://{source}/workflow/Snakefile@main"'))
    plan = run([str(BIN / "snakemake"), "-n", "--cores", "2"], tmp_path)
    assert "train_diffusion" in plan.stdout

    newer = tmp_path / "newer"
    run(["git", "clone", "-q", str(source), str(newer)], tmp_path)
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
