"""BreastPathQ (SPIE-AAPM-NCI challenge): tumour cellularity of breast cancer patches.

The root holds the two archives as they unpack::

    breastpathq/datasets/train/<slide>_<rid>.tif        breastpathq/datasets/train_labels.csv
    breastpathq/datasets/validation/<slide>_<rid>.tif   breastpathq-test/val_labels.csv
    breastpathq-test/test_patches/                      (labels withheld: not read)

Both CSVs have the header ``slide,rid,y``, ``y`` being the cellularity score in [0, 1]. The
challenge is a regression; for the class-conditional stages the score is binned at
``options.bin_edges`` into the dataset's classes (not an official protocol), and the score
itself is kept in the manifest's ``cellularity`` column.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellflow.datasets.common import (
    DataError,
    DatasetKind,
    Listing,
    RawImage,
    missing_image,
    read_csv_with_header,
    require_file,
    require_folder,
)

if TYPE_CHECKING:
    from cellflow.config import DatasetConfig

log = logging.getLogger(__name__)

COLUMNS = ("slide", "rid", "y")
DEFAULT_BIN_EDGES = (0.0, 0.3, 0.7)
TRAIN_LABELS = "breastpathq/datasets/train_labels.csv"
TRAIN_IMAGES = "breastpathq/datasets/train"
VAL_LABELS = "breastpathq-test/val_labels.csv"
VAL_IMAGES = "breastpathq/datasets/validation"


def annotation_files(root: Path, options: Mapping[str, Any]) -> list[Path]:
    return [path for path in (root / TRAIN_LABELS, root / VAL_LABELS) if path.is_file()]


def bin_edges(options: Mapping[str, Any]) -> tuple[float, ...]:
    return tuple(float(edge) for edge in options.get("bin_edges", DEFAULT_BIN_EDGES))


def bin_problems(name: str, classes: Sequence[str], edges: Sequence[float]) -> Iterator[str]:
    """What makes ``edges`` unable to bin the scores into ``classes``, each naming its key."""
    key = f"datasets.{name}.options.bin_edges"
    if any(upper <= lower for lower, upper in pairwise(edges)):
        yield f"{key}: {list(edges)} are not strictly increasing"
    elif edges and edges[-1] >= 1:
        yield (
            f"{key}: the last edge is {edges[-1]}, which leaves the last bin (scores above it) "
            "empty; scores are at most 1"
        )
    if len(classes) != len(edges) + 1:
        yield (
            f"datasets.{name}.classes: {len(classes)} class(es) for {len(edges)} bin edge(s) "
            f"({key}); the bins need {len(edges) + 1} classes, one per bin in order"
        )


def check(name: str, entry: Mapping[str, Any]) -> Iterator[str]:
    yield from bin_problems(name, entry.get("classes", []), bin_edges(entry.get("options", {})))


def bin_index(score: float, edges: Sequence[float]) -> int:
    """The first bin whose upper edge is at or above ``score``; past all edges, the last."""
    return bisect.bisect_left(edges, score)


def describe_bins(classes: Sequence[str], edges: Sequence[float]) -> str:
    """'none = {0}, low = (0, 0.3], ...': what every class holds."""
    ranges = []
    for index, upper in enumerate(edges):
        if index == 0:
            ranges.append(f"{{{upper:g}}}" if upper == 0 else f"[0, {upper:g}]")
        else:
            ranges.append(f"({edges[index - 1]:g}, {upper:g}]")
    ranges.append(f"({edges[-1]:g}, 1]")
    return ", ".join(
        f"{class_name} = {bin_range}" for class_name, bin_range in zip(classes, ranges, strict=True)
    )


def read(dataset: DatasetConfig, root: Path) -> Listing:
    name = dataset.name
    edges = bin_edges(dataset.options)
    problems = list(bin_problems(name, dataset.classes, edges))
    if problems:
        raise DataError(f"dataset '{name}': " + "; ".join(problems))
    sources = [
        (
            "train",
            require_file(root / TRAIN_LABELS, name, "BreastPathQ training labels"),
            require_folder(root / TRAIN_IMAGES, name, "BreastPathQ training image folder"),
        )
    ]
    notes = [
        f"labels: the cellularity score y binned as {describe_bins(dataset.classes, edges)} "
        f"(datasets.{name}.options.bin_edges {list(edges)}); not an official protocol: the "
        "challenge is a regression, scored by prediction-probability concordance (PK); the "
        "cellularity column carries the score as ground truth",
        "breastpathq-test/test_patches is left out: its labels are withheld; the test split is "
        "carved out of the training slides",
    ]
    val_labels = root / VAL_LABELS
    if val_labels.is_file():
        sources.append(
            (
                "val",
                val_labels,
                require_folder(root / VAL_IMAGES, name, "BreastPathQ validation image folder"),
            )
        )
    else:
        log.warning(
            "dataset '%s': %s (the second release, breastpathq-test) not found; reading "
            "the training patches only, the validation split is carved out of them",
            name,
            val_labels,
        )
        notes.append(
            f"{VAL_LABELS} was not found: the validation split is carved out of the "
            "training slides, not the official one"
        )

    images: list[RawImage] = []
    ignored: list[tuple[Path, str]] = []
    listed: Counter[tuple[str, str]] = Counter()
    for split, sheet, image_folder in sources:
        for where, slide, rid, score in _scores(sheet, name):
            label_name = dataset.classes[bin_index(score, edges)]
            listed[(split, label_name)] += 1
            path = image_folder / f"{slide}_{rid}.tif"
            if not path.is_file():
                ignored.append(missing_image(path, where))
                continue
            images.append(
                RawImage(
                    path,
                    path.relative_to(root).as_posix(),
                    label_name,
                    split,
                    group=slide,
                    extra={"cellularity": score, "slide": slide, "rid": rid},
                )
            )
    if ignored:
        log.warning(
            "dataset '%s': %d listed patch(es) are not on disk (excluded.tsv), e.g. %s",
            name,
            len(ignored),
            ignored[0][0],
        )
    return Listing(
        root,
        images,
        ignored_files=ignored,
        notes=notes,
        listed=listed,
        files_read=[sheet for _, sheet, _ in sources],
    )


def _scores(sheet: Path, dataset: str) -> Iterator[tuple[str, str, str, float]]:
    """(where, slide, rid, score) of every row of a label CSV."""
    # blank lines are kept as rows so that row numbers stay line numbers
    table = read_csv_with_header(sheet, dataset, (), encoding="utf-8-sig", skip_blank_lines=False)
    missing = [column for column in COLUMNS if column not in table.columns]
    if missing:
        raise DataError(
            f"dataset '{dataset}': {sheet}: expected the columns "
            f"{', '.join(COLUMNS)}; found {', '.join(map(str, table.columns))}"
        )
    first_line: dict[tuple[str, str], int] = {}
    for line, (slide, rid, value) in enumerate(
        table[list(COLUMNS)].itertuples(index=False), start=2
    ):
        slide, rid, value = slide.strip(), rid.strip(), value.strip()
        if not (slide or rid or value):
            continue
        where = f"{sheet}, line {line}"
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not 0 <= score <= 1:
            raise DataError(
                f"dataset '{dataset}': {where}: cellularity y {value!r} is not a number from 0 to 1"
            )
        if not (slide and rid):
            raise DataError(f"dataset '{dataset}': {where}: empty slide or rid")
        if (slide, rid) in first_line:
            raise DataError(
                f"dataset '{dataset}': {where}: slide {slide} rid {rid} is listed "
                f"again (first on line {first_line[(slide, rid)]})"
            )
        first_line[(slide, rid)] = line
        yield where, slide, rid, score


KIND = DatasetKind(
    name="breastpathq",
    summary="BreastPathQ: breastpathq/datasets/{train,validation}/<slide>_<rid>.tif + "
    "train_labels.csv / breastpathq-test/val_labels.csv (cellularity y, binned into "
    "the classes at options.bin_edges)",
    read=read,
    known_classes=None,
    annotation_files=annotation_files,
    # challenge paper (Petrick et al., JMI 2021); test labels withheld
    published={("train", "*"): 2394, ("val", "*"): 185},
    check=check,
    cellularity_scores=True,
)
