"""Chaoyang (bupt-ai-cz/HSA-NRL): ``train.json`` and ``test.json`` beside the image folders.

Each JSON file is a list of records ``{"name": "train/<file>.JPG", "label": 0-3}``; the
training records also carry ``label_A``, ``label_B``, ``label_C``, the three pathologists'
own labels, whose majority ``label`` is. The official split is which file lists an image.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from cellflow.datasets.common import (
    DataError,
    DatasetKind,
    Listing,
    RawImage,
    files_under,
    missing_image,
    one_split_each,
    require_file,
    warn_left_out,
)

if TYPE_CHECKING:
    from cellflow.config import DatasetConfig

log = logging.getLogger(__name__)

# the HSA-NRL README's label ids (it spells class 2 "adenocarinoma")
CLASSES = ("normal", "serrated", "adenocarcinoma", "adenoma")
ANNOTATOR_KEYS = ("label_A", "label_B", "label_C")
SPLIT_FILES = {"train": "train.json", "test": "test.json"}


def annotation_files(root: Path, options: Mapping[str, Any]) -> list[Path]:
    return [root / file_name for file_name in SPLIT_FILES.values()]


def _class_of(value: Any, where: str, key: str, dataset: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(CLASSES):
        raise DataError(
            f"dataset '{dataset}': {where}: unknown {key} {value!r} (Chaoyang's "
            f"label ids are 0-3: {', '.join(CLASSES)})"
        )
    return CLASSES[value]


def _records(path: Path, dataset: str) -> list[dict[str, Any]]:
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"dataset '{dataset}': {path}: not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise DataError(
            f"dataset '{dataset}': {path}: expected a list of records "
            f'{{"name", "label"}}, found a {type(records).__name__}'
        )
    return records


def read(dataset: DatasetConfig, root: Path) -> Listing:
    name = dataset.name
    images, ignored, files_read, placements = [], [], [], []
    listed: Counter[tuple[str, str]] = Counter()
    first_record: dict[str, tuple[str, str]] = {}  # image -> (split, record) first listing it
    with_annotators = 0
    for split, file_name in SPLIT_FILES.items():
        path = require_file(root / file_name, name, f"Chaoyang {split} label file")
        files_read.append(path)
        for index, record in enumerate(_records(path, name)):
            where = f"{path}, record {index}"
            if not isinstance(record, dict) or "name" not in record or "label" not in record:
                raise DataError(
                    f"dataset '{name}': {where}: a record needs 'name' and 'label', "
                    f"found {record!r}"
                )
            relative = PurePosixPath(str(record["name"])).as_posix()
            label = _class_of(record["label"], where, "label", name)
            if relative in first_record and first_record[relative][0] == split:
                raise DataError(
                    f"dataset '{name}': {where}: {relative} is listed again (first in "
                    f"{first_record[relative][1]})"
                )
            first_record.setdefault(relative, (split, where))
            placements.append((relative, split, where))
            listed[(split, label)] += 1
            extra = {}
            if all(key in record for key in ANNOTATOR_KEYS):
                with_annotators += 1
                extra = {
                    key.lower(): _class_of(record[key], where, key, name) for key in ANNOTATOR_KEYS
                }
            image = root / relative
            if not image.is_file():
                ignored.append(missing_image(image, where))
                continue
            images.append(RawImage(image, relative, label, split, extra=extra))
    one_split_each(placements, name)
    listed_files = {root / relative for relative in first_record}
    unlisted = [
        (image, f"in neither {' nor '.join(SPLIT_FILES.values())}")
        for folder in sorted({path.parent for path in listed_files})
        for image in files_under(folder).values()
        if image not in listed_files
    ]
    warn_left_out(
        name,
        [
            (ignored, "listed image(s) are not on disk"),
            (unlisted, "image(s) on disk are in no label file"),
        ],
    )
    notes = [
        "labels: the 'label' of train.json / test.json (the majority of three "
        "pathologists); label_a, label_b, label_c columns carry each one's label where "
        f"the file gives them ({with_annotators} records)"
    ]
    return Listing(
        root,
        images,
        ignored_files=ignored + unlisted,
        notes=notes,
        listed=listed,
        files_read=files_read,
    )


KIND = DatasetKind(
    name="chaoyang",
    summary="Chaoyang: train.json / test.json records (majority label of 3 pathologists, "
    "official train/test)",
    read=read,
    known_classes=lambda options: CLASSES,
    annotation_files=annotation_files,
    # the HSA-NRL README's per-class counts
    published={
        ("train", "normal"): 1111,
        ("train", "serrated"): 842,
        ("train", "adenocarcinoma"): 1404,
        ("train", "adenoma"): 664,
        ("test", "normal"): 705,
        ("test", "serrated"): 321,
        ("test", "adenocarcinoma"): 840,
        ("test", "adenoma"): 273,
    },
)
