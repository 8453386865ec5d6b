"""Official-layout readers at the published sizes: how long listing a download takes.

Fabricates each layout at full size without real pixels where the reader never decodes them
(MHIST's 3,152 listed images, a CPIA-Mini-sized pool of 200,000 files as empty files), and
Gleason2019 cores at their real size (about 5,000 px, six maps) because its reader decodes the
maps. Measures ``read`` (what the data stage does before decoding images) and the preflight
``survey`` that ``cellflow doctor`` runs.

Run: python -m benchmarks.bench_datasets   (appends to benchmarks/results/datasets.md)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.machine import record
from cellflow.config import DatasetConfig, SplitConfig, SyntheticConfig
from cellflow.datasets import KINDS

MHIST_HEADER = ("Image Name,Majority Vote Label,"
                "Number of Annotators who Selected SSA (Out of 7),Partition")


def config(kind: str, root: Path, classes: tuple[str, ...], **options) -> DatasetConfig:
    return DatasetConfig(name=kind, kind=kind, resolution=256, classes=classes, transitions=(),
                         split=SplitConfig(0.15, 0.15), synthetic=SyntheticConfig(4, 64),
                         root=root, options=options)


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def mhist(root: Path) -> tuple[float, int]:
    (root / "images").mkdir(parents=True)
    lines = [MHIST_HEADER]
    for index in range(3152):
        name = f"MHIST_{index:04d}.png"
        (root / "images" / name).touch()
        ssa = index % 8
        lines.append(f"{name},{'SSA' if ssa >= 4 else 'HP'},{ssa},"
                     f"{'train' if index < 2175 else 'test'}")
    (root / "annotations.csv").write_text("\n".join(lines) + "\n")
    seconds, listing = timed(KINDS["mhist"].read, config("mhist", root, ("HP", "SSA"),
                                                         min_agreement=4), root)
    return seconds, len(listing.images)


def cpia(root: Path, files: int = 200_000, sub_datasets: int = 20) -> tuple[float, int]:
    for index in range(files):
        folder = root / "M" / f"SUB{index % sub_datasets:02d}-384"
        if index < sub_datasets:
            folder.mkdir(parents=True)
        (folder / f"slide{index % 97}-384-{index}-0.jpg").touch()
    seconds, listing = timed(KINDS["cpia"].read, config("cpia", root, (), exclude=[]), root)
    return seconds, len(listing.images)


def gleason(root: Path, cores: int, side: int = 5000) -> tuple[float, float, int]:
    rng = np.random.default_rng(0)
    (root / "Train Imgs").mkdir(parents=True)
    for index in range(cores):
        core = f"slide001_core{index:03d}"
        Image.new("RGB", (side, side), (200, 120, 180)).save(root / "Train Imgs" / f"{core}.jpg")
        blocks = rng.choice(np.array([0, 1, 3, 4, 5], np.uint8), size=(4, 4))
        for annotator in range(1, 7):
            labels = np.kron(blocks, np.ones((side // 4, side // 4), np.uint8))
            folder = root / f"Maps{annotator}_T"
            folder.mkdir(exist_ok=True)
            Image.fromarray(labels).save(folder / f"{core}_classimg_nonconvex.png")
    dataset = config("gleason2019", root, ("benign", "grade3", "grade4", "grade5"),
                     consensus="majority", min_annotators=1, patch_size=1024, purity=0.9,
                     min_labelled=0.5)
    survey_seconds, _ = timed(KINDS["gleason2019"].survey, dataset, root)
    read_seconds, listing = timed(KINDS["gleason2019"].read, dataset, root)
    return survey_seconds, read_seconds, len(listing.images)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        seconds, images = mhist(Path(tmp) / "mhist")
        rows.append({"layout": "MHIST, 3,152 listed images", "step": "read",
                     "time": f"{seconds:.2f} s", "images": images})
        seconds, images = cpia(Path(tmp) / "cpia")
        rows.append({"layout": "CPIA pool, 200,000 files in 20 sub-datasets", "step": "read",
                     "time": f"{seconds:.2f} s", "images": images})
        cores = 4
        survey_seconds, read_seconds, patches = gleason(Path(tmp) / "gleason", cores)
        rows.append({"layout": f"Gleason2019, {cores} cores of 5,000 px with 6 maps",
                     "step": "survey (doctor)", "time": f"{survey_seconds:.3f} s", "images": ""})
        rows.append({"layout": f"Gleason2019, {cores} cores of 5,000 px with 6 maps",
                     "step": "read (consensus, patches of 1,024 px)",
                     "time": f"{read_seconds:.1f} s ({read_seconds / cores:.1f} s a core; "
                             f"244 cores: ~{244 * read_seconds / cores / 60:.0f} min)",
                     "images": patches})
    record("datasets", "Official-layout readers at published sizes", rows)


if __name__ == "__main__":
    main()
