"""A small fabricated AML-Cytomorphology_LMU download: RGBA TIFFs in 15 class folders and
``annotations.dat``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

FOLDER = "AML-Cytomorphology_LMU"  # what the download unpacks as: the dataset root
IMAGES = "AML-Cytomorphology"
ABBREVIATIONS = {
    "BAS": "Basophil",
    "EBO": "Erythroblast",
    "EOS": "Eosinophil",
    "KSC": "Smudge cell",
    "LYA": "Lymphocyte (atypical)",
    "LYT": "Lymphocyte (typical)",
    "MMZ": "Metamyelocyte",
    "MOB": "Monoblast",
    "MON": "Monocyte",
    "MYB": "Myelocyte",
    "MYO": "Myeloblast",
    "NGB": "Neutrophil (band)",
    "NGS": "Neutrophil (segmented)",
    "PMB": "Promyelocyte (bilobled)",
    "PMO": "Promyelocyte",
}
COMMON = {"LYT": 4, "MYO": 4, "NGS": 4}  # images per class; the other 12 classes have 1 each
# (first, second) re-annotation of some images ('' is written as nan, as on every other line)
REANNOTATED = {
    "MYO/MYO_0002.tiff": ("MYB", ""),
    "MYO/MYO_0003.tiff": ("MYO", "MYB"),
    "NGS/NGS_0001.tiff": ("NGB", "NGS"),
}
UNLISTED = "LYT/LYT_0005.tiff"  # in its class folder, not in annotations.dat
MISSING = "MON/MON_0002.tiff"  # in annotations.dat, not on disk


class AmlImage(NamedTuple):
    label: str
    first_reannotation: str  # '' where annotations.dat says nan
    second_reannotation: str
    colour: tuple[int, int, int]  # of the opaque part; the border is transparent
    line: int  # of annotations.dat


@dataclass
class AmlLayout:
    root: Path  # the AML-Cytomorphology_LMU folder
    images: dict[str, AmlImage]  # listed and on disk, by path relative to the root
    unlisted: list[Path]
    missing: list[Path]
    border: int  # transparent pixels around each image's opaque part

    @property
    def sheet(self) -> Path:
        return self.root / "annotations.dat"


def make_aml(root: Path, size: int = 36, border: int = 6) -> AmlLayout:
    """Write root/AML-Cytomorphology_LMU/: AML-Cytomorphology/<class>/<class>_<nnnn>.tiff,
    annotations.dat and abbreviations.txt.

    Each TIFF is RGBA: a solid colour (distinct, far from white) inside a ``border`` of fully
    transparent white pixels, so that an uncropped border shows up white after conversion.
    """
    dataset = root / FOLDER

    def write_cell(relative: str, colour: tuple[int, int, int]) -> None:
        pixels = np.full((size, size, 4), (255, 255, 255, 0), dtype=np.uint8)
        pixels[border:-border, border:-border] = (*colour, 255)
        path = dataset / IMAGES / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "RGBA").save(path, format="TIFF")

    images: dict[str, AmlImage] = {}
    lines = []
    for class_name in ABBREVIATIONS:
        for number in range(1, COMMON.get(class_name, 1) + 1):
            relative = f"{class_name}/{class_name}_{number:04d}.tiff"
            first, second = REANNOTATED.get(relative, ("", ""))
            lines.append(f"{relative} {class_name} {first or 'nan'} {second or 'nan'}")
            colour = (20 + 4 * len(images), 180 - 3 * len(images), 120)
            write_cell(relative, colour)
            images[f"{IMAGES}/{relative}"] = AmlImage(
                class_name, first, second, colour, line=len(lines)
            )
    lines.append(f"{MISSING} MON nan nan")
    write_cell(UNLISTED, (200, 40, 40))
    (dataset / "annotations.dat").write_text("\n".join(lines) + "\n")
    (dataset / "abbreviations.txt").write_text(
        "".join(f"{short} {meaning}\n" for short, meaning in ABBREVIATIONS.items())
    )
    return AmlLayout(
        dataset, images, [dataset / IMAGES / UNLISTED], [dataset / IMAGES / MISSING], border
    )
