"""pRCC (Gao et al., MICCAI 2021, i-ViT): regions of Type 1 and Type 2 papillary RCC slides.

The download unpacks to ``1/<slide>/<x>_<y>_2000.png`` (Type 1) and ``2/<slide>/...``
(Type 2), one folder per TCGA slide. The official, slide-disjoint split is given by the
i-ViT repository's ``dataset/trainset.txt``, ``validset.txt`` and ``testset.txt``, whose lines
read ``../dataset/<1|2>/<slide>/<x>_<y>_2000.png <label>`` (label 0: folder 1, 1: folder 2).
Regions on disk that no list names (``dataset.txt`` has 257 more) are left out.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator, Mapping
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
    require_folder,
    warn_left_out,
)

if TYPE_CHECKING:
    from cellflow.config import DatasetConfig

log = logging.getLogger(__name__)

CLASS_OF_FOLDER = {"1": "type1", "2": "type2"}
FOLDER_OF_LABEL = {"0": "1", "1": "2"}
SPLIT_LISTS = {"train": "trainset.txt", "val": "validset.txt", "test": "testset.txt"}
REGION_NAME = re.compile(r"(\d+)_(\d+)_(\d+)")  # <x>_<y>_<size>
SPLIT_LISTS_KEY = "options.split_lists"


def split_lists_folder(root: Path, options: Mapping[str, Any]) -> Path:
    """Where the split lists are: ``options.split_lists`` (relative to the working directory,
    like every configured path), or the root."""
    configured = options.get("split_lists")
    return Path(configured) if configured else root


def annotation_files(root: Path, options: Mapping[str, Any]) -> list[Path]:
    folder = split_lists_folder(root, options)
    return [folder / file_name for file_name in SPLIT_LISTS.values()]


def read(dataset: DatasetConfig, root: Path) -> Listing:
    name = dataset.name
    for folder in CLASS_OF_FOLDER:
        require_folder(root / folder, name, f"pRCC Type {folder} folder")
    lists_folder = split_lists_folder(root, dataset.options)
    images: list[RawImage] = []
    absent: list[tuple[Path, str]] = []
    listed: Counter[tuple[str, str]] = Counter()
    entries: list[tuple[str, str, str]] = []  # (image, split, where), for one_split_each
    splits_of_slide: dict[str, set[str]] = {}
    for split, file_name in SPLIT_LISTS.items():
        list_path = _require_split_list(lists_folder / file_name, name)
        first_line: dict[str, int] = {}
        for number, relative, folder, slide in _list_entries(list_path, name):
            where = f"{list_path}, line {number}"
            if relative in first_line:
                raise DataError(
                    f"dataset '{name}': {where}: {relative} is listed again (first "
                    f"on line {first_line[relative]})"
                )
            first_line[relative] = number
            entries.append((relative, split, where))
            label_name = CLASS_OF_FOLDER[folder]
            listed[(split, label_name)] += 1
            splits_of_slide.setdefault(slide, set()).add(split)
            path = root / relative
            if not path.is_file():
                absent.append(missing_image(path, where))
                continue
            images.append(
                RawImage(
                    path,
                    relative,
                    label_name,
                    split,
                    group=slide,
                    extra=_region_columns(slide, path.name),
                )
            )
    one_split_each(entries, name)

    listed_paths = {relative for relative, _, _ in entries}
    unlisted = [
        path
        for folder in CLASS_OF_FOLDER
        for slide_folder in sorted(p for p in (root / folder).iterdir() if p.is_dir())
        for path in files_under(slide_folder).values()
        if path.relative_to(root).as_posix() not in listed_paths
    ]
    warn_left_out(
        name,
        [
            (absent, "listed region(s) are not on disk"),
            ([(path, "") for path in unlisted], "region(s) on disk are in no official split list"),
        ],
    )
    shared = sorted(slide for slide, splits in splits_of_slide.items() if len(splits) > 1)
    for slide in shared:
        log.warning(
            "dataset '%s': slide %s is in more than one official split list (%s); the "
            "official splits are kept as listed",
            name,
            slide,
            ", ".join(SPLIT_LISTS[s] for s in SPLIT_LISTS if s in splits_of_slide[slide]),
        )

    notes = [
        "labels: folder 1 is Type 1 papillary RCC (type1), folder 2 Type 2 (type2)",
        "split: the official trainset.txt / validset.txt / testset.txt of the i-ViT repository "
        f"(ZeyuGaoAi/Instance_based_Vision_Transformer, dataset/), read from {lists_folder}; "
        "they are slide-disjoint (103 / 34 / 34 slides); group: the slide folder",
    ]
    if shared:
        notes.append(
            f"slide(s) in more than one official split (kept as listed): {', '.join(shared)}"
        )
    if unlisted:
        notes.append(
            f"{len(unlisted)} region(s) on disk in no official split list are left out "
            "(excluded.tsv)"
        )
    ignored = absent + [(path, "in no official split list") for path in unlisted]
    return Listing(
        root,
        images,
        ignored_files=ignored,
        notes=notes,
        listed=listed,
        files_read=[lists_folder / file_name for file_name in SPLIT_LISTS.values()],
    )


def _require_split_list(path: Path, dataset: str) -> Path:
    if not path.is_file():
        raise DataError(
            f"dataset '{dataset}': official split list {path.name} not found in {path.parent} "
            f"(datasets.{dataset}.{SPLIT_LISTS_KEY} names the folder holding "
            f"{', '.join(SPLIT_LISTS.values())}, the i-ViT repository's dataset/ lists; "
            "default: the data root)"
        )
    return path


def _list_entries(path: Path, dataset: str) -> Iterator[tuple[int, str, str, str]]:
    """(line number, image path from the ``<1|2>/`` folder on, that folder, slide) per line."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        fields = line.rsplit(maxsplit=1)
        parts = PurePosixPath(fields[0].replace("\\", "/")).parts if len(fields) == 2 else ()
        if len(parts) < 3 or parts[-3] not in CLASS_OF_FOLDER:
            raise DataError(
                f"dataset '{dataset}': {where}: cannot read {line.strip()!r}; "
                "expected '<...>/<1|2>/<slide>/<x>_<y>_2000.png <label 0|1>'"
            )
        folder, slide, label = parts[-3], parts[-2], fields[1]
        if label not in FOLDER_OF_LABEL:
            raise DataError(
                f"dataset '{dataset}': {where}: unknown label {label!r} in "
                f"{line.strip()!r} (expected 0 for Type 1 or 1 for Type 2)"
            )
        if FOLDER_OF_LABEL[label] != folder:
            raise DataError(
                f"dataset '{dataset}': {where}: label {label} disagrees with the "
                f"image's folder {folder}/ (label 0 is folder 1, label 1 folder 2)"
            )
        yield number, "/".join(parts[-3:]), folder, slide


def _region_columns(slide: str, file_name: str) -> dict[str, Any]:
    """The slide, and the region's position in it where the name is ``<x>_<y>_<size>``."""
    found = REGION_NAME.fullmatch(PurePosixPath(file_name).stem)
    if found is None:
        return {"slide": slide}
    return {"slide": slide, "x": int(found.group(1)), "y": int(found.group(2))}


KIND = DatasetKind(
    name="prcc",
    summary="pRCC: 1/ (Type 1) and 2/ (Type 2) <slide>/<x>_<y>_2000.png + the official "
    "trainset/validset/testset.txt lists (slide-disjoint)",
    read=read,
    known_classes=lambda options: tuple(CLASS_OF_FOLDER.values()),
    annotation_files=annotation_files,
    # counted in the i-ViT repository's lists (shared/reference/dataset-formats.md)
    published={
        ("train", "type1"): 373,
        ("train", "type2"): 329,
        ("val", "type1"): 120,
        ("val", "type2"): 111,
        ("test", "type1"): 120,
        ("test", "type2"): 109,
    },
)
