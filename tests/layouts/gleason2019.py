"""A fabricated Gleason2019 download: ``Train Imgs/<core>.jpg`` and ``Maps<k>_T/`` label maps.

Every map is painted in 32 px tiles, so with ``OPTIONS`` (patch_size 32, stride 32; the
default consensus majority, purity 0.9 and min_labelled 0.5) each tile of the grid is one
candidate patch whose label is known. The cores:

- slide001_core001 (96x96, maps 1, 2, 3): agreement, a 2-of-3 majority, value 6 (benign), a
  three-way tie, a patch that fails purity and one that fails min_labelled;
- slide001_core002 (96x96, maps 1, 4): two-way ties (3 against 4, 1 against unlabelled);
- slide002_core001 (96 wide, 64 high, map 2 only);
- slide002_core002 (96x96): its Maps3_T map is 64x64, so the core is left out;
- slide003_core001 (96x96): no map at all, left out.

``Maps2_T`` also holds a map of a core without an image and ``Maps1_T`` a stray text file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

OPTIONS = {"patch_size": 32}

CORE_SIZES = {  # (width, height)
    "slide001_core001": (96, 96),
    "slide001_core002": (96, 96),
    "slide002_core001": (96, 64),
    "slide002_core002": (96, 96),
    "slide003_core001": (96, 96),
}

# core -> map folder -> painted rectangles (left, top, width, height, value); the rest is 0
MAPS: dict[str, dict[str, list[tuple[int, int, int, int, int]]]] = {
    "slide001_core001": {
        "Maps1_T": [(0, 0, 32, 32, 1), (32, 0, 32, 32, 3), (64, 0, 32, 32, 6), (0, 32, 32, 32, 3)],
        "Maps2_T": [(0, 0, 32, 32, 1), (32, 0, 32, 32, 3), (64, 0, 32, 32, 1), (0, 32, 32, 32, 4)],
        "Maps3_T": [(0, 0, 32, 32, 1), (32, 0, 32, 32, 4), (64, 0, 32, 32, 6), (0, 32, 32, 32, 5)],
    },
    "slide001_core002": {
        "Maps1_T": [
            (0, 0, 32, 32, 1),
            (32, 0, 32, 32, 3),
            (64, 0, 32, 32, 3),
            (0, 32, 32, 32, 1),
            (32, 32, 32, 32, 1),
            (64, 64, 32, 32, 4),
        ],
        "Maps4_T": [
            (0, 0, 32, 32, 1),
            (32, 0, 32, 32, 4),
            (64, 0, 32, 32, 3),
            (32, 32, 32, 32, 1),
            (64, 64, 32, 32, 4),
        ],
    },
    "slide002_core001": {
        "Maps2_T": [(0, 0, 32, 32, 3), (32, 0, 32, 32, 1), (32, 32, 64, 32, 5)],
    },
    "slide002_core002": {
        "Maps1_T": [(0, 0, 96, 96, 1)],
        "Maps3_T": [(0, 0, 64, 64, 1)],  # painted on a 64x64 map: the wrong size
    },
}
# on all three maps of slide001_core001
SHARED = [
    (64, 32, 24, 32, 4),
    (88, 32, 8, 32, 5),  # tile (64, 32): grade4 on 75%: fails purity 0.9
    (0, 64, 32, 12, 5),  # tile (0, 64): grade5 on 12 of 32 rows: fails min_labelled 0.5
    (32, 64, 32, 32, 5),  # tile (32, 64): grade5
    (64, 68, 30, 28, 4),
    (94, 68, 2, 28, 3),  # tile (64, 64): 28 of 32 rows, grade4 on 30/32
]
WRONG_SIZE = {("slide002_core002", "Maps3_T"): (64, 64)}
ORPHAN_MAP = Path("Maps2_T/slide009_core009_classimg_nonconvex.png")
STRAY_FILE = Path("Maps1_T/readme.txt")

# (core, left, top) -> label of every patch the default options keep
PATCHES = {
    ("slide001_core001", 0, 0): "benign",  # 1, 1, 1
    ("slide001_core001", 32, 0): "grade3",  # 3, 3, 4: majority only
    ("slide001_core001", 64, 0): "benign",  # 6, 1, 6
    ("slide001_core001", 32, 64): "grade5",
    ("slide001_core001", 64, 64): "grade4",  # labelled 0.875, purity 0.9375
    ("slide001_core002", 0, 0): "benign",
    ("slide001_core002", 64, 0): "grade3",
    ("slide001_core002", 32, 32): "benign",
    ("slide001_core002", 64, 64): "grade4",
    ("slide002_core001", 0, 0): "grade3",
    ("slide002_core001", 32, 0): "benign",
    ("slide002_core001", 32, 32): "grade5",
    ("slide002_core001", 64, 32): "grade5",
}
# kept only under majority: where unanimity is required, its pixels are unlabelled
MAJORITY_ONLY = {("slide001_core001", 32, 0)}
ANNOTATORS = {"slide001_core001": 3, "slide001_core002": 2, "slide002_core001": 1}


def patch_path(core: str, left: int, top: int) -> str:
    return f"Train Imgs/{core}/x{left:05d}_y{top:05d}.jpg"


def paint(size: tuple[int, int], rectangles: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    width, height = size
    values = np.zeros((height, width), dtype=np.uint8)
    for left, top, rect_width, rect_height, value in rectangles:
        values[top : top + rect_height, left : left + rect_width] = value
    return values


def make_gleason2019(root: Path, seed: int = 0) -> dict[str, str]:
    """Write the download under ``root``; returns {relative_path: label} of the patches that
    ``OPTIONS`` (majority consensus) keeps."""
    rng = np.random.default_rng(seed)
    (root / "Train Imgs").mkdir(parents=True)
    for core, (width, height) in CORE_SIZES.items():
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "Train Imgs" / f"{core}.jpg", quality=90)
    for core, maps in MAPS.items():
        for folder, rectangles in maps.items():
            size = WRONG_SIZE.get((core, folder), CORE_SIZES[core])
            if core == "slide001_core001":
                rectangles = rectangles + SHARED
            (root / folder).mkdir(exist_ok=True)
            Image.fromarray(paint(size, rectangles)).save(
                root / folder / f"{core}_classimg_nonconvex.png"
            )
    Image.fromarray(paint((96, 96), [(0, 0, 96, 96, 1)])).save(root / ORPHAN_MAP)
    (root / STRAY_FILE).write_text("maps of pathologist 1\n")
    return {patch_path(*key): label for key, label in PATCHES.items()}
