"""A small fabricated MHIST download: ``images/MHIST_<aaa>.png`` and ``annotations.csv``."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice, product
from pathlib import Path
from string import ascii_lowercase
from typing import NamedTuple

import numpy as np
from PIL import Image

HEADER = "Image Name,Majority Vote Label,Number of Annotators who Selected SSA (Out of 7),Partition"
ANNOTATORS = 7
# (label, partition, annotators who chose SSA) of each row of annotations.csv, in order: every
# class has 4 train and 2 test images; 3 and 4 votes are the 4/7 high-disagreement cases
ROWS = (
    ("HP", "train", 0),
    ("SSA", "train", 7),
    ("HP", "train", 1),
    ("SSA", "train", 6),
    ("HP", "train", 3),
    ("SSA", "train", 4),
    ("HP", "train", 2),
    ("SSA", "train", 5),
    ("HP", "test", 0),
    ("SSA", "test", 7),
    ("HP", "test", 3),
    ("SSA", "test", 5),
    ("SSA", "test", 6),  # listed, but its PNG is not in images/
)
MISSING_ROWS = frozenset({12})  # indices into ROWS
UNLISTED = ("MHIST_zzz.png",)  # in images/, in no row


class MhistImage(NamedTuple):
    label: str
    split: str
    ssa_votes: int
    line: int  # of annotations.csv (the header is line 1)

    @property
    def agreeing(self) -> int:
        """How many of the 7 annotators chose the majority label."""
        return max(self.ssa_votes, ANNOTATORS - self.ssa_votes)


@dataclass
class MhistLayout:
    root: Path
    images: dict[str, MhistImage]  # listed and on disk, by path relative to the root
    missing: dict[str, MhistImage]  # listed in annotations.csv, not on disk
    unlisted: list[Path]  # in images/, not in annotations.csv

    @property
    def sheet(self) -> Path:
        return self.root / "annotations.csv"


def image_names(count: int) -> list[str]:
    """The first ``count`` of MHIST's file names: MHIST_aaa.png, MHIST_aab.png, ..."""
    letters = islice(product(ascii_lowercase, repeat=3), count)
    return [f"MHIST_{''.join(three)}.png" for three in letters]


def make_mhist(root: Path, size: int = 24, seed: int = 0) -> MhistLayout:
    """Write root/images/MHIST_*.png and root/annotations.csv as the download unpacks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    images: dict[str, MhistImage] = {}
    missing: dict[str, MhistImage] = {}
    names = image_names(len(ROWS))
    for index, (file_name, (label, partition, votes)) in enumerate(zip(names, ROWS, strict=True)):
        lines.append(f"{file_name},{label},{votes},{partition}")
        entry = MhistImage(label, partition, votes, line=len(lines))
        if index in MISSING_ROWS:
            missing[f"images/{file_name}"] = entry
            continue
        write_rgb(root / "images" / file_name, rng, size)
        images[f"images/{file_name}"] = entry
    unlisted = [root / "images" / file_name for file_name in UNLISTED]
    for path in unlisted:
        write_rgb(path, rng, size)
    (root / "annotations.csv").write_text("\n".join(lines) + "\n")
    return MhistLayout(root, images, missing, unlisted)


def write_rgb(path: Path, rng: np.random.Generator, size: int) -> None:
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
