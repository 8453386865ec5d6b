"""Shared fixtures: small class-folder datasets made on the fly, never downloaded; the .test
config run once through a deployment of the workflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]


def run_command(command: list[str], cwd: Path, check: bool = True
                ) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def workflow_copy(tmp_path_factory) -> Path:
    """This working tree as a git repository of its own: what a clone of it would hold (the
    tracked files and the untracked ones git does not ignore), committed on `main`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
    root = tmp_path_factory.mktemp("cellflow-src")
    for name in filter(None, listed.stdout.decode().split("\0")):
        path, copy = REPO / name, root / name
        if not (path.is_file() or path.is_symlink()):
            continue  # deleted in the working tree
        copy.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            copy.symlink_to(os.readlink(path))
        else:
            shutil.copy2(path, copy)
    run_command([*GIT, "init", "-q", "-b", "main"], root)
    run_command([*GIT, "add", "-A"], root)
    run_command([*GIT, "commit", "-q", "-m", "the working tree"], root)
    return root


@dataclass
class Deployment:
    folder: Path
    config: Path
    deployed_snakefile: str  # as snakedeploy wrote it
    log: str  # what the run printed


@pytest.fixture(scope="session")
def deployed_test_run(workflow_copy, tmp_path_factory) -> Deployment:
    """The .test config run once, whole, as a user of the catalog runs a workflow: a
    snakedeploy deployment of the workflow copy, `snakemake --cores 2` in it. The folder
    holds no copy of the package."""
    folder = tmp_path_factory.mktemp("deployment") / "tiny"
    run_command([str(BIN / "snakedeploy"), "deploy-workflow", str(workflow_copy), str(folder),
                 "--branch", "main"], folder.parent)
    snakefile = folder / "workflow" / "Snakefile"
    deployed = snakefile.read_text()
    # From a local path snakedeploy writes the module's snakefile relative to the repository,
    # which Snakemake reads relative to the deployed Snakefile; the README says to make it
    # the clone's own path (from a hosting URL it writes github(...)).
    snakefile.write_text(deployed.replace('"workflow/Snakefile"',
                                          f'"{workflow_copy / "workflow" / "Snakefile"}"'))
    shutil.copy(workflow_copy / ".test" / "config" / "config.yaml",
                folder / "config" / "config.yaml")
    shutil.copytree(workflow_copy / ".test" / "data", folder / "data")
    result = run_command([str(BIN / "snakemake"), "--cores", "2"], folder)
    return Deployment(folder, folder / "config" / "config.yaml", deployed,
                      result.stdout + result.stderr)


@pytest.fixture(scope="session", autouse=True)
def cluster_runs(request, tmp_path_factory):
    """The SLURM runs that tests/test_slurm.py checks, started with the session when those
    tests are collected and a cluster answers: they mostly wait on the cluster's clock."""
    from tests import test_slurm

    collected = any(item.path.name == "test_slurm.py" and item.originalname in
                    test_slurm.CLUSTER_TESTS for item in request.session.items)
    if not (collected and test_slurm.CLUSTER_ANSWERS):
        yield {}
        return
    runs = test_slurm.start_runs(lambda name: tmp_path_factory.mktemp(name))
    yield runs
    for run in runs.values():
        run.stop()


def random_rgb(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


@pytest.fixture
def make_folder_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Write root/<class>/<class>_<i>.png with distinct random images; returns the root."""

    def make(counts: dict[str, int], size: int = 48, seed: int = 0, root: Path | None = None
             ) -> Path:
        root = root or tmp_path / "raw"
        rng = np.random.default_rng(seed)
        for class_name, count in counts.items():
            (root / class_name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(random_rgb(rng, size)).save(
                    root / class_name / f"{class_name}_{index:03d}.png")
        return root

    return make
