"""AML-Cytomorphology_LMU (TCIA): ``AML-Cytomorphology/<class>/*.tiff`` and ``annotations.dat``.

The root is the unpacked ``AML-Cytomorphology_LMU`` folder. Each single-cell image is an RGBA
TIFF with a transparent border, which is cropped away before resizing. The label is the class
folder (one of 15 morphological abbreviations); ``annotations.dat`` (``path annotation
first_reannotation second_reannotation``) confirms it and carries the re-annotations. There
is no official split: the data stage makes a seeded, stratified one.
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
    warn_left_out,
)

if TYPE_CHECKING:
    from cellflow.config import DatasetConfig

log = logging.getLogger(__name__)

CLASSES = (
    "BAS",
    "EBO",
    "EOS",
    "KSC",
    "LYA",
    "LYT",
    "MMZ",
    "MOB",
    "MON",
    "MYB",
    "MYO",
    "NGB",
    "NGS",
    "PMB",
    "PMO",
)
DOWNLOAD = "AML-Cytomorphology_LMU"
IMAGES = "AML-Cytomorphology"
ANNOTATIONS = "annotations.dat"
COLUMNS = ["path", "annotation", "first_reannotation", "second_reannotation"]


def annotation_files(root: Path, options: Mapping[str, Any]) -> list[Path]:
    return [path for path in [root / ANNOTATIONS] if path.is_file()]


def _annotations(path: Path, dataset: str) -> dict[str, tuple[int, list[str]]]:
    """path -> (line, [annotation, first re-annotation, second re-annotation]); 'nan' is ''."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"dataset '{dataset}': {path}: not a text file ({err})") from None
    entries: dict[str, tuple[int, list[str]]] = {}
    for line, text in enumerate(lines, start=1):
        fields = text.split()
        if not fields:
            continue
        if len(fields) != len(COLUMNS):
            raise DataError(
                f"dataset '{dataset}': {path}, line {line}: expected {len(COLUMNS)} "
                f"whitespace-separated fields ({' '.join(COLUMNS)}), found {len(fields)}: "
                f"{text.strip()!r}"
            )
        image, *values = fields
        if image in entries:
            raise DataError(
                f"dataset '{dataset}': {path}, line {line}: {image} is listed again (first "
                f"on line {entries[image][0]})"
            )
        entries[image] = (line, [value if value != "nan" else "" for value in values])
    return entries


def read(dataset: DatasetConfig, root: Path) -> Listing:
    name = dataset.name
    images_root = root / IMAGES
    if not images_root.is_dir():
        hint = f"the root is the unpacked {DOWNLOAD} folder, holding {IMAGES}/ and {ANNOTATIONS}"
        if (root / DOWNLOAD / IMAGES).is_dir():
            hint = f"set the root to {root / DOWNLOAD}"
        raise DataError(
            f"dataset '{name}': AML image folder {images_root} does not exist or is not a "
            f"folder; {hint}"
        )
    sheet = root / ANNOTATIONS
    annotated = _annotations(sheet, name) if sheet.is_file() else None
    images, unlisted = [], []
    listed: Counter[tuple[str, str]] = Counter()
    present = {p.name for p in images_root.iterdir() if p.is_dir()}
    unknown_folders = [
        (images_root / unknown, "not one of the 15 AML class folders")
        for unknown in sorted(present - set(CLASSES))
    ]
    on_disk: set[str] = set()
    for class_name in CLASSES:
        for file_name, path in files_under(images_root / class_name).items():
            relative = f"{class_name}/{file_name}"
            on_disk.add(relative)
            listed[("", class_name)] += 1
            extra = {}
            if annotated is not None:
                if relative not in annotated:
                    unlisted.append((path, f"not listed in {sheet}"))
                    continue
                line, (annotation, first, second) = annotated[relative]
                if annotation != class_name:
                    raise DataError(
                        f"dataset '{name}': {sheet}, line {line}: {relative} is "
                        f"annotated '{annotation}' but lies in folder {class_name}/"
                    )
                extra = {"first_reannotation": first, "second_reannotation": second}
            images.append(RawImage(path, f"{IMAGES}/{relative}", class_name, None, extra=extra))
    absent = [
        missing_image(images_root / relative, f"{sheet}, line {line}")
        for relative, (line, _) in (annotated or {}).items()
        if relative not in on_disk
    ]
    warn_left_out(
        name,
        [
            (unknown_folders, f"folder(s) in {images_root} are not AML classes"),
            (unlisted, f"image(s) are not listed in {sheet.name}"),
            (absent, f"image(s) listed in {sheet.name} are not on disk"),
        ],
    )
    notes = [
        "labels: the class folder (morphological class of the single cell); no official "
        "split, a seeded stratified split is made",
        "each RGBA image is cropped to its opaque part before resizing",
    ]
    if annotated is None:
        log.warning(
            "dataset '%s': %s not found; labels come from the class folders alone, without "
            "the re-annotation columns",
            name,
            sheet,
        )
        notes.append(f"{sheet} not found: labels from the folders alone, no re-annotations")
    return Listing(
        root,
        images,
        ignored_files=unknown_folders + unlisted + absent,
        notes=notes,
        listed=listed,
        crop_transparent_border=True,
        files_read=[sheet] if annotated is not None else [],
    )


KIND = DatasetKind(
    name="aml",
    summary="AML-Cytomorphology_LMU: AML-Cytomorphology/<class>/*.tiff (15 classes, RGBA) + "
    "annotations.dat; no official split",
    read=read,
    known_classes=lambda options: CLASSES,
    annotation_files=annotation_files,
    published={("*", "*"): 18365},  # 18,365 cells of 200 patients (Matek et al. 2019)
)
