"""MHIST (bmirds.github.io/MHIST): ``images/`` and ``annotations.csv``.

``annotations.csv`` gives every image its majority label of seven pathologists (HP or SSA),
how many of them chose SSA, and the official ``Partition`` (train or test; no validation
split, which is carved out of train).
"""

from __future__ import annotations

import logging
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
    missing_image,
    read_csv_with_header,
    require_file,
    require_folder,
    warn_left_out,
)

if TYPE_CHECKING:
    from cellflow.config import DatasetConfig

log = logging.getLogger(__name__)

CLASSES = ("HP", "SSA")
ANNOTATORS = 7
IMAGE = "Image Name"
LABEL = "Majority Vote Label"
SSA_VOTES = "Number of Annotators who Selected SSA (Out of 7)"
PARTITION = "Partition"


def annotation_files(root: Path, options: Mapping[str, Any]) -> list[Path]:
    return [root / "annotations.csv"]


def read(dataset: DatasetConfig, root: Path) -> Listing:
    name = dataset.name
    images_dir = require_folder(root / "images", name, "MHIST image folder")
    sheet = require_file(root / "annotations.csv", name, "MHIST annotation file")
    table = read_csv_with_header(sheet, name, [IMAGE, LABEL, SSA_VOTES, PARTITION])
    min_agreement = dataset.options.get("min_agreement", 4)
    images, absent, disagreeing = [], [], []
    listed: Counter[tuple[str, str]] = Counter()
    seen: dict[str, int] = {}
    for row, (file_name, label, votes, partition) in enumerate(
        table[[IMAGE, LABEL, SSA_VOTES, PARTITION]].itertuples(index=False), start=2
    ):
        where = f"{sheet}, line {row}"
        label, partition, file_name = label.strip(), partition.strip(), file_name.strip()
        if label not in CLASSES:
            raise DataError(
                f"dataset '{name}': {where}: unknown label '{label}' "
                f"(expected {' or '.join(CLASSES)})"
            )
        if partition not in ("train", "test"):
            raise DataError(
                f"dataset '{name}': {where}: unknown Partition '{partition}' "
                "(expected train or test)"
            )
        try:
            ssa = int(votes)
        except ValueError:
            ssa = -1
        if not 0 <= ssa <= ANNOTATORS:
            raise DataError(
                f"dataset '{name}': {where}: '{votes}' annotators chose SSA; "
                f"expected a whole number from 0 to {ANNOTATORS}"
            )
        if file_name in seen:
            raise DataError(
                f"dataset '{name}': {where}: {file_name} is listed again (first on "
                f"line {seen[file_name]})"
            )
        seen[file_name] = row
        listed[(partition, label)] += 1
        path = images_dir / file_name
        if not path.is_file():
            absent.append(missing_image(path, where))
            continue
        agreeing = max(ssa, ANNOTATORS - ssa)
        if agreeing < min_agreement:
            disagreeing.append(
                (
                    path,
                    f"{agreeing} of {ANNOTATORS} annotators agree, under "
                    f"datasets.{name}.options.min_agreement ({min_agreement})",
                )
            )
            continue
        images.append(
            RawImage(
                path,
                f"images/{file_name}",
                label,
                partition,
                extra={"ssa_votes": ssa, "agreement": round(agreeing / ANNOTATORS, 4)},
            )
        )
    unlisted = [
        (path, f"not listed in {sheet}")
        for file_name, path in files_under(images_dir).items()
        if file_name not in seen
    ]
    warn_left_out(
        name,
        [
            (absent, "listed image(s) are not on disk"),
            (unlisted, f"image(s) in {images_dir} are not in {sheet.name}"),
        ],
    )
    if disagreeing:
        log.info(
            "dataset '%s': %d image(s) with fewer than %d of %d annotators agreeing left out",
            name,
            len(disagreeing),
            min_agreement,
            ANNOTATORS,
        )
    notes = [
        f"labels: majority vote of {ANNOTATORS} pathologists (annotations.csv); "
        "ssa_votes and agreement columns carry the vote"
    ]
    if min_agreement > 4:
        notes.append(
            f"only images on which at least {min_agreement} of {ANNOTATORS} "
            "annotators agree are kept"
        )
    return Listing(
        root,
        images,
        ignored_files=absent + unlisted + disagreeing,
        notes=notes,
        listed=listed,
        files_read=[sheet],
    )


KIND = DatasetKind(
    name="mhist",
    summary="MHIST: images/*.png + annotations.csv (majority of 7 pathologists, official "
    "train/test Partition)",
    read=read,
    known_classes=lambda options: CLASSES,
    annotation_files=annotation_files,
    # eva's documentation of the official download; per class unconfirmed
    published={("train", "*"): 2175, ("test", "*"): 977},
)
