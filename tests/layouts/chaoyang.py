"""A small fabricated Chaoyang download: ``train/``, ``test/``, ``train.json`` and ``test.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

CLASSES = ("normal", "serrated", "adenocarcinoma", "adenoma")  # label ids 0-3
# Records of train.json as (label, (label_A, label_B, label_C)): 3 per class; two of them with
# a dissenting pathologist, as 1,312 of the real 4,021 records have
TRAIN = (
    (0, (0, 0, 0)),
    (1, (1, 1, 1)),
    (2, (2, 2, 2)),
    (3, (3, 3, 3)),
    (0, (0, 1, 0)),
    (1, (1, 1, 3)),
    (2, (2, 2, 2)),
    (3, (3, 3, 3)),
    (0, (0, 0, 0)),
    (1, (1, 1, 1)),
    (2, (2, 2, 2)),
    (3, (3, 3, 3)),
)
TEST = (0, 1, 2, 3, 2, 0, 3, 1, 2)  # labels of test.json's records: 2 per class and one more
MISSING_TEST_RECORD = 8  # its JPG is not in test/
UNLISTED = "train/353099_1-IMG099x099-0.JPG"  # in train/, in no record


class ChaoyangImage(NamedTuple):
    label: str
    split: str
    annotators: tuple[str, str, str] | None  # label_A/B/C as class names; test.json has none
    record: int  # index in its JSON file


@dataclass
class ChaoyangLayout:
    root: Path
    images: dict[str, ChaoyangImage]  # listed and on disk, by path relative to the root
    missing: dict[str, ChaoyangImage]  # listed, not on disk
    unlisted: list[Path]  # on disk, in neither file


def patch_name(split: str, index: int, label: int) -> str:
    """A name like the real ``train/353042_4-IMG005x014-1.JPG``: slide, region, tile, label."""
    slide, region = 353042 + index // 4, index % 4 + 1
    return f"{split}/{slide}_{region}-IMG{index:03d}x{2 * index:03d}-{label}.JPG"


def make_chaoyang(root: Path, size: int = 32, seed: int = 0) -> ChaoyangLayout:
    """Write root/{train,test}/*.JPG, train.json (with label_A/B/C) and test.json."""
    rng = np.random.default_rng(seed)
    images: dict[str, ChaoyangImage] = {}
    missing: dict[str, ChaoyangImage] = {}
    train_records = []
    for index, (label, annotators) in enumerate(TRAIN):
        name = patch_name("train", index, label)
        train_records.append(
            {"label": label, "name": name}
            | {f"label_{who}": given for who, given in zip("ABC", annotators, strict=True)}
        )
        images[name] = ChaoyangImage(
            CLASSES[label], "train", tuple(CLASSES[given] for given in annotators), index
        )
    test_records = []
    for index, label in enumerate(TEST):
        name = patch_name("test", len(TRAIN) + index, label)
        test_records.append({"name": name, "label": label})
        entry = ChaoyangImage(CLASSES[label], "test", None, index)
        (missing if index == MISSING_TEST_RECORD else images)[name] = entry
    for name in [*images, UNLISTED]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    (root / "train.json").write_text(json.dumps(train_records))
    (root / "test.json").write_text(json.dumps(test_records))
    return ChaoyangLayout(root, images, missing, [root / UNLISTED])
