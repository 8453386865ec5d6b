"""A small fabricated pRCC download: ``1/`` and ``2/`` slide folders and the official lists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

# (type folder, slide, split list, regions as (x, y)); each split holds both types
SLIDES = (
    ("1", "TCGA-2Z-A9J6-01Z-00-DX1.EBF72BB6", "trainset.txt", ((15503, 16966), (9911, 402))),
    ("1", "TCGA-2Z-A9JE-01Z-00-DX1.B2538A85", "trainset.txt", ((48041, 30755), (52568, 31426))),
    ("1", "TCGA-5P-A9JZ-01Z-00-DX1.882DD175", "validset.txt", ((28660, 45667), (28567, 65054))),
    ("1", "TCGA-A4-7732-01Z-00-DX1.e5038a3e", "testset.txt", ((4986, 26745), (7257, 26262))),
    ("2", "TCGA-2K-A9WE-01Z-00-DX1.ED8ADE3B", "trainset.txt", ((81988, 64702), (109428, 29881))),
    ("2", "TCGA-4A-A93X-01Z-00-DX2.45011BF1", "trainset.txt", ((84567, 51632), (56628, 47600))),
    ("2", "TCGA-B1-7332-01Z-00-DX1.a04eb9f5", "validset.txt", ((12681, 61042), (37060, 45934))),
    ("2", "TCGA-BQ-5877-01Z-00-DX1.3060d47f", "testset.txt", ((36127, 20008), (57623, 9575))),
)
UNLISTED = ("1", "TCGA-2Z-A9J6-01Z-00-DX1.EBF72BB6", (70000, 70000))  # as in dataset.txt only
SPLIT_OF_LIST = {"trainset.txt": "train", "validset.txt": "val", "testset.txt": "test"}
CLASS_OF_FOLDER = {"1": "type1", "2": "type2"}


class PrccRegion(NamedTuple):
    label: str
    split: str
    slide: str
    x: int
    y: int


@dataclass
class PrccLayout:
    root: Path
    lists_folder: Path
    regions: dict[str, PrccRegion]  # by path relative to the root
    unlisted: list[Path]  # on disk, in no list


def make_prcc(
    root: Path, lists_folder: Path | None = None, size: int = 32, seed: int = 0
) -> PrccLayout:
    """Write root/<1|2>/<slide>/<x>_<y>_2000.png and trainset/validset/testset.txt (into
    ``lists_folder``, default the root) with the i-ViT repository's ``../dataset/`` prefix."""
    lists_folder = lists_folder or root
    rng = np.random.default_rng(seed)
    regions: dict[str, PrccRegion] = {}
    lines: dict[str, list[str]] = {file_name: [] for file_name in SPLIT_OF_LIST}

    def write_region(folder: str, slide: str, x: int, y: int) -> Path:
        path = root / folder / slide / f"{x}_{y}_2000.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        return path

    for folder, slide, list_name, positions in SLIDES:
        for x, y in positions:
            path = write_region(folder, slide, x, y)
            relative = path.relative_to(root).as_posix()
            regions[relative] = PrccRegion(
                CLASS_OF_FOLDER[folder], SPLIT_OF_LIST[list_name], slide, x, y
            )
            lines[list_name].append(f"../dataset/{relative} {int(folder) - 1}")
    folder, slide, (x, y) = UNLISTED
    unlisted = [write_region(folder, slide, x, y)]
    lists_folder.mkdir(parents=True, exist_ok=True)
    for list_name, entries in lines.items():
        (lists_folder / list_name).write_text("\n".join(entries) + "\n")
    return PrccLayout(root, lists_folder, regions, unlisted)
