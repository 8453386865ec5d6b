"""BCI (bupt-ai-cz/BCI), the H&E half: ``HE/{train,test}/<number>_<split>_<HER2>.png``.

The HER2 level (0, 1+, 2+, 3+) in the file name is the level of the whole slide a patch was
cut from, not a score of the patch itself (the dataset's README says so); every patch of a
slide carries it. The paired IHC image of the same name is kept as a column.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellflow.datasets.common import (
    DataError,
    DatasetKind,
    Listing,
    RawImage,
    files_under,
    require_folder,
)

if TYPE_CHECKING:
    from cellflow.config import DatasetConfig

log = logging.getLogger(__name__)

CLASSES = ("0", "1+", "2+", "3+")
SPLITS = ("train", "test")
NAME = re.compile(r"^(\d+)_(train|test)_(0|1\+|2\+|3\+)\.png$")


def read(dataset: DatasetConfig, root: Path) -> Listing:
    name = dataset.name
    images, ignored = [], []
    listed: Counter[tuple[str, str]] = Counter()
    unpaired = []
    for split in SPLITS:
        folder = require_folder(root / "HE" / split, name, "BCI H&E folder")
        for file_name, path in files_under(folder).items():
            found = NAME.match(file_name)
            if found is None:
                ignored.append((path, "not named <number>_<split>_<HER2 level>.png"))
                continue
            number, named_split, level = found.groups()
            if named_split != split:
                raise DataError(
                    f"dataset '{name}': {path} is named for split '{named_split}' "
                    f"but lies in HE/{split}/"
                )
            listed[(split, level)] += 1
            ihc = root / "IHC" / split / file_name
            if not ihc.is_file():
                unpaired.append(ihc)
            images.append(
                RawImage(
                    path,
                    f"HE/{split}/{file_name}",
                    level,
                    split,
                    # absolute, like the manifest's source_path: the root may be relative
                    extra={
                        "pair": int(number),
                        "ihc_path": str(ihc.resolve()) if ihc.is_file() else "",
                    },
                )
            )
    if ignored:
        log.warning(
            "dataset '%s': %d file(s) under HE/ are not named <number>_<split>_<HER2 level>.png; "
            "left out (excluded.tsv), e.g. %s",
            name,
            len(ignored),
            ignored[0][0],
        )
    if unpaired:
        log.warning(
            "dataset '%s': %d H&E image(s) have no IHC partner (their ihc_path is empty), "
            "e.g. no %s",
            name,
            len(unpaired),
            unpaired[0],
        )
    notes = [
        "labels: the HER2 level in the file name is slide-level (the level of the whole "
        "slide the patch comes from), not a score of the patch",
        "ihc_path: the registered IHC image of each H&E patch",
        "a validation split carved out of train is not slide-disjoint: the file names do not "
        "say which slide a patch comes from",
    ]
    if unpaired:
        notes.append(f"{len(unpaired)} H&E image(s) have no IHC partner under IHC/")
    return Listing(root, images, ignored_files=ignored, notes=notes, listed=listed)


def annotation_files(root: Path, options: Mapping[str, Any]) -> list[Path]:
    # the labels are in the file names: the folders' listings are the annotation
    return [root / "HE" / split for split in SPLITS]


KIND = DatasetKind(
    name="bci",
    summary="BCI: HE/{train,test}/<n>_<split>_<HER2>.png (slide-level HER2 level 0/1+/2+/3+, "
    "paired IHC kept as a column)",
    read=read,
    known_classes=lambda options: CLASSES,
    annotation_files=annotation_files,
    # the dataset README: 3,896 train and 977 test pairs
    published={("train", "*"): 3896, ("test", "*"): 977},
)
