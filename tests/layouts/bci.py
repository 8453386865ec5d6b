"""A small fabricated BCI download: ``HE/{train,test}/`` and their ``IHC/`` partners."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

# HER2 levels of each split's pairs in number order (each split numbers from 00000): 3 train
# and 2 test pairs per level
LEVELS = {
    "train": ("1+", "3+", "0", "2+", "2+", "0", "1+", "3+", "0", "1+", "2+", "3+"),
    "test": ("1+", "2+", "0", "3+", "3+", "0", "2+", "1+"),
}
UNPAIRED = "HE/train/00004_train_2+.png"  # its IHC/train/ partner is missing


class BciImage(NamedTuple):
    label: str  # the slide's HER2 level
    split: str
    pair: int  # the number shared by the H&E and IHC image
    ihc: Path | None  # the partner, None where it is missing


@dataclass
class BciLayout:
    root: Path
    images: dict[str, BciImage]  # the H&E images, by path relative to the root


def make_bci(root: Path, size: int = 32, seed: int = 0) -> BciLayout:
    """Write root/HE/<split>/<number>_<split>_<level>.png and the IHC partners."""
    rng = np.random.default_rng(seed)
    images: dict[str, BciImage] = {}
    for split, levels in LEVELS.items():
        for number, level in enumerate(levels):
            file_name = f"{number:05d}_{split}_{level}.png"
            relative = f"HE/{split}/{file_name}"
            ihc = None if relative == UNPAIRED else root / "IHC" / split / file_name
            for path in filter(None, [root / relative, ihc]):
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)
            images[relative] = BciImage(level, split, number, ihc)
    return BciLayout(root, images)
