"""Shared fixtures: small class-folder datasets made on the fly, never downloaded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


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
