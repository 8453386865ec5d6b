"""A small fabricated CPIA-Mini: scale folders L/ and M/, their merged copy All/, and loose files.

Every sub-dataset has at least three split units (ROI images, or slides for WSI patches), so
that a grouped train/val/test split of any of them succeeds.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image

# scale -> sub-dataset folder -> (path inside it, the slide the image was cut from or '')
SCALES: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "L": {
        "MHIST": (("MHIST_aaa.jpg", ""), ("MHIST_aab.jpg", ""), ("MHIST_aac.jpg", "")),
        "Gleason 2019": (
            ("slide001_core003.jpg", ""),
            ("slide002_core010.jpg", ""),
            ("slide005_core051.jpg", ""),
        ),
        # one folder per slide
        "TCGA-BRCA-960": (
            ("TCGA-A1-A0SB-01Z/TCGA-A1-A0SB-01Z-960-0-0.jpg", "TCGA-A1-A0SB-01Z"),
            ("TCGA-A1-A0SB-01Z/TCGA-A1-A0SB-01Z-960-0-1.jpg", "TCGA-A1-A0SB-01Z"),
            ("TCGA-A2-A04P-01Z/TCGA-A2-A04P-01Z-960-2-1.jpg", "TCGA-A2-A04P-01Z"),
            # the folder, not the file name, names the slide
            ("TCGA-B6-A0RE-01Z/TCGA-B6-A0RE-01Z-01-TS1-960-0-3.jpg", "TCGA-B6-A0RE-01Z"),
        ),
        # ROIs named with their class (CPIA's Add_class); the numbers are no patch grid
        "BreakHis": (
            ("benign_SOB_B_A-14-22549AB-40-001.jpg", ""),
            ("malignant_SOB_M_DC-14-2523-40-010.jpg", ""),
            ("malignant_SOB_M_LC-14-12204-100-004.png", ""),
        ),
    },
    "M": {
        "Chaoyang": (("535.jpg", ""), ("1017.jpg", ""), ("2040.jpg", "")),
        # flat patches: the slide is in the file name
        "TCGA-KIRP-384": (
            ("TCGA-2K-A9WE-01Z-384-0-1.jpg", "TCGA-2K-A9WE-01Z"),
            ("TCGA-2K-A9WE-01Z-384-0-2.jpg", "TCGA-2K-A9WE-01Z"),
            ("TCGA-5P-A9JU-01Z-384-3-1.jpg", "TCGA-5P-A9JU-01Z"),
            ("TCGA-B9-4113-01Z-384-0-0.jpeg", "TCGA-B9-4113-01Z"),
        ),
        # the slides of L/TCGA-BRCA-960 at the next patch size
        "TCGA-BRCA-384": (
            ("TCGA-A1-A0SB-01Z-384-0-0.jpg", "TCGA-A1-A0SB-01Z"),
            ("TCGA-A2-A04P-01Z-384-5-2.jpg", "TCGA-A2-A04P-01Z"),
            ("TCGA-B6-A0RE-01Z-384-0-9.jpg", "TCGA-B6-A0RE-01Z"),
        ),
    },
}
SUB_DATASETS = tuple(name for folders in SCALES.values() for name in folders)


class CpiaImage(NamedTuple):
    sub_dataset: str
    scale: str
    group: str


@dataclass
class CpiaLayout:
    root: Path
    images: dict[str, CpiaImage]  # every image the reader lists by default, by relative path
    counts: dict[str, int]  # images per sub-dataset folder, by its path relative to the root
    not_images: list[str]  # files that are no image, relative to the root
    hidden: list[str]


def make_cpia(
    root: Path,
    layout: Literal["scales", "merged", "plain"] = "scales",
    size: int = 24,
    seed: int = 0,
) -> CpiaLayout:
    """Write a CPIA-Mini copy under ``root``.

    ``scales``: ``L/`` and ``M/`` as CPIA-Mini unzips, plus their merged copy ``All/``;
    ``merged``: ``All/`` alone; ``plain``: the sub-dataset folders in the root itself.
    """
    rng = np.random.default_rng(seed)
    images: dict[str, CpiaImage] = {}
    counts: dict[str, int] = {}
    for scale, folders in SCALES.items():
        prefix = {"scales": f"{scale}/", "merged": "All/", "plain": ""}[layout]
        scale_column = {"scales": scale, "merged": "All", "plain": ""}[layout]
        for sub_dataset, files in folders.items():
            for inside, group in files:
                relative = f"{prefix}{sub_dataset}/{inside}"
                path = root / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)
                images[relative] = CpiaImage(sub_dataset, scale_column, group)
            counts[f"{prefix}{sub_dataset}"] = len(files)
    breakhis = {"scales": "L/", "merged": "All/", "plain": ""}[layout] + "BreakHis"
    not_images = [f"{breakhis}/labels.csv"]
    (root / not_images[0]).write_text("image,class\n")
    hidden = [f"{breakhis}/.DS_Store"]
    (root / hidden[0]).write_bytes(b"\0")
    if layout == "scales":
        not_images.append("L/ReadMe.md")
        (root / "L" / "ReadMe.md").write_text("CPIA-Mini, scale L\n")
        for scale in SCALES:
            shutil.copytree(root / scale, root / "All", dirs_exist_ok=True)
        (root / "All" / "ReadMe.md").unlink()
    return CpiaLayout(root, images, counts, not_images, hidden)
