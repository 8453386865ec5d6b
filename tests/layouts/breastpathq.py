"""A small fabricated BreastPathQ download: both archives as they unpack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

# Scores by slide; every slide has a patch in each default bin {0}, (0,0.3], (0.3,0.7],
# (0.7,1], and the edges 0.3 and 0.7 themselves appear, so that a grouped split can put
# whole slides anywhere.
TRAIN_SCORES = {
    "99788": ("0", "0.3", "0.7", "1"),
    "99789": ("0.0", "0.15", "0.5", "0.85"),
    "99790": ("0", "0.3", "0.31", "0.71"),
    "99791": ("0", "0.05", "0.6", "0.9"),
}
VAL_SCORES = {
    "101100": ("0", "0.2", "0.4", "0.8"),
    "101101": ("0", "0.3", "0.7", "0.95"),
}
DEFAULT_CLASSES = ("none", "low", "medium", "high")
TEST_PATCHES = ("102200_1", "102200_2")  # no labels


class BreastPathQPatch(NamedTuple):
    score: float
    bin: int  # under the default edges (0, 0.3, 0.7)
    split: str
    slide: str
    rid: str


@dataclass
class BreastPathQLayout:
    root: Path
    patches: dict[str, BreastPathQPatch]  # by path relative to the root
    train_labels: Path
    val_labels: Path | None


def _default_bin(score: float) -> int:
    return 0 if score == 0 else 1 if score <= 0.3 else 2 if score <= 0.7 else 3


def make_breastpathq(
    root: Path, with_val: bool = True, size: int = 32, seed: int = 0
) -> BreastPathQLayout:
    """Write breastpathq/datasets/{train,validation}/<slide>_<rid>.tif, train_labels.csv and,
    with ``with_val``, breastpathq-test/val_labels.csv, plus unlabelled test_patches/."""
    rng = np.random.default_rng(seed)
    datasets = root / "breastpathq" / "datasets"
    test_release = root / "breastpathq-test"
    patches: dict[str, BreastPathQPatch] = {}

    def write_patch(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)

    def write_split(
        scores: dict[str, tuple[str, ...]], split: str, folder: Path, sheet: Path
    ) -> None:
        rows = ["slide,rid,y"]
        for slide, values in scores.items():
            for rid, value in enumerate(values, start=1):
                path = folder / f"{slide}_{rid}.tif"
                write_patch(path)
                patches[path.relative_to(root).as_posix()] = BreastPathQPatch(
                    float(value), _default_bin(float(value)), split, slide, str(rid)
                )
                rows.append(f"{slide},{rid},{value}")
        sheet.parent.mkdir(parents=True, exist_ok=True)
        sheet.write_text("\n".join(rows) + "\n")

    train_labels = datasets / "train_labels.csv"
    write_split(TRAIN_SCORES, "train", datasets / "train", train_labels)
    val_labels = test_release / "val_labels.csv"
    if with_val:
        write_split(VAL_SCORES, "val", datasets / "validation", val_labels)
    for name in TEST_PATCHES:
        write_patch(test_release / "test_patches" / f"{name}.tif")
    return BreastPathQLayout(root, patches, train_labels, val_labels if with_val else None)
