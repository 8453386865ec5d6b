"""CPIA (zhanglab2021/CPIA_Dataset): an unlabelled pretraining pool of public pathology sets.

CPIA-Mini unzips into scale folders ``L/``, ``M/``, ``S/`` (and ``XL/``) plus ``All/``, a
merged copy of them that is never read while scale folders are present (if it is the only
folder, it is read as the one scale). Each scale folder holds one folder per sub-dataset:
ROI sets flat (``M/Chaoyang/*.jpg``), WSI patch sets flat with the slide in the file name
(``M/TCGA-KIRP-384/<wsi>-384-<i>-<j>.jpg``) or in one folder per slide
(``L/TCGA-BRCA-960/<wsi>/...``). Without scale folders the root holds the sub-datasets.

CPIA has no classes and no splits: an image's label is its sub-dataset folder (a pseudo-label)
and its group the slide it was cut from, so that the data stage keeps a slide's patches in one
split. CPIA holds MHIST, Chaoyang, BreastPathQ, Gleason 2019 and AML whole, and TCGA-KIRP
slides (pRCC's source): ``options.exclude_overlap_with`` leaves those sub-datasets out.

Listing is ``os.scandir`` only, without decoding or a stat per file (about 12 s per million
files on a local disk, so some 40 s for CPIA-Mini), so ``cellflow doctor`` surveys with
:func:`read` itself.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cellflow.datasets.common import (
    IMAGE_EXTENSIONS,
    DataError,
    DatasetKind,
    Listing,
    RawImage,
    require_folder,
)

if TYPE_CHECKING:
    from cellflow.config import DatasetConfig

log = logging.getLogger(__name__)

SCALES = ("XL", "L", "M", "S")
MERGED = "All"
# zips packed on macOS carry resource forks in this folder
ARCHIVE_METADATA = "__MACOSX"
# the sub-dataset folder names (prefixes, compared by folding_key) that hold each kind's images
OVERLAP: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "mhist": ("MHIST",),
        "chaoyang": ("Chaoyang",),
        "bci": (),  # CPIA's tables do not list BCI
        "aml": ("AML_Cytomorphology",),
        "prcc": ("TCGA-KIRP",),  # pRCC's regions were cut from TCGA-KIRP slides
        "breastpathq": ("BreastPathQ",),
        "gleason2019": ("Gleason2019",),
    }
)
# CPIA's WSI patches: <wsi_name>-<patch size>-<i>-<j>.jpg, in its four nested sizes (any
# number would also take ROI names such as BreakHis's SOB_M_DC-14-2523-40-010)
WSI_PATCH = re.compile(r"^(?P<wsi>.+)-(?:3840|960|384|96)-\d+-\d+$")
# CPIA's optional per-slide copies of a WSI patch set: <Dataset>-<size>-patient/<wsi_name>/
PATIENT_COPY = "-patient"
IMAGE_TYPES = ", ".join(sorted(IMAGE_EXTENSIONS))


def folding_key(name: str) -> str:
    """A folder name without case or punctuation: 'Gleason 2019' and 'gleason_2019' agree."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def overlapping_kind(folder: str, kinds: Iterable[str]) -> str | None:
    """The first of ``kinds`` whose images the sub-dataset folder ``folder`` holds, if any."""
    key = folding_key(folder)
    for kind_name in kinds:
        if any(key.startswith(folding_key(prefix)) for prefix in OVERLAP[kind_name]):
            return kind_name
    return None


def guarded_kinds(dataset: str, options: Mapping[str, Any]) -> list[str]:
    """``options.exclude_overlap_with``; absent or None (a hand-built config) guards nothing."""
    kinds = list(options.get("exclude_overlap_with") or ())
    unknown = [kind_name for kind_name in kinds if kind_name not in OVERLAP]
    if unknown:
        raise DataError(
            f"dataset '{dataset}': options.exclude_overlap_with names "
            f"{', '.join(map(repr, unknown))}; the leakage guard knows "
            f"{', '.join(OVERLAP)}"
        )
    return kinds


def exclusion(folder: str, kinds: Sequence[str], exclude: Iterable[str]) -> str | None:
    """Why the options leave the sub-dataset ``folder`` out (None: they do not)."""
    holds = overlapping_kind(folder, kinds)
    if holds is not None:
        return f"holds {holds}'s images (leakage guard, options.exclude_overlap_with)"
    if folder in exclude:
        return "named in options.exclude"
    return None


@dataclass(frozen=True)
class SubDataset:
    scale: str  # '' where the root holds the sub-datasets
    name: str
    path: Path
    relative: str  # to the root, '/'-separated
    siblings: frozenset[str]  # the folders of its scale

    def left_out(self, kinds: Sequence[str], exclude: Iterable[str]) -> str | None:
        """Why this sub-dataset is not read (None: it is)."""
        reason = exclusion(self.name, kinds, exclude)
        original = self.name.removesuffix(PATIENT_COPY)
        if reason is None and original != self.name and original in self.siblings:
            reason = (
                f"a per-slide copy of {original} (CPIA's {PATIENT_COPY} folders), which is read"
            )
        return reason


def sorted_entries(folder: Path | str) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def folder_names(entries: Iterable[os.DirEntry[str]]) -> frozenset[str]:
    return frozenset(
        entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")
    )


def scale_folders(
    dataset: DatasetConfig, root: Path, ignored: list[tuple[Path, str]], notes: list[str]
) -> list[tuple[str, Path]]:
    """(scale, folder) of every scale read; the scale is '' where the root holds the
    sub-datasets. Everything else in the root is listed in ``ignored`` once, with the reason.
    """
    name, requested = dataset.name, dataset.options.get("scales")
    key = f"datasets.{name}.options.scales"
    if requested is not None and not requested:
        raise DataError(
            f"dataset '{name}': {key} is empty; name the scales to read "
            f"({', '.join(SCALES)}) or leave it out to read every scale folder"
        )
    entries = sorted_entries(root)
    present = folder_names(entries)
    found = [scale for scale in SCALES if scale in present]
    if found:
        read = [scale for scale in SCALES if scale in (requested or found)]
        missing = [scale for scale in read if scale not in found]
        if missing:
            raise DataError(
                f"dataset '{name}': scale folder(s) "
                f"{', '.join(str(root / scale) for scale in missing)} ({key}) not "
                f"found; {root} holds scale folders {', '.join(found)}"
            )
        notes.append(
            f"scales read: {', '.join(read)}"
            + (f"; {MERGED}/ merges the scale folders and is not read" if MERGED in present else "")
        )
    elif MERGED in present:
        if requested:
            raise DataError(
                f"dataset '{name}': {key}: {root} has no scale folders "
                f"({', '.join(SCALES)}), only {MERGED}/, which merges them and "
                "cannot be read by scale (leave the option out)"
            )
        read = [MERGED]
        notes.append(
            f"{root} holds no scale folder, only the merged {MERGED}/: read as one "
            f"scale (column scale: {MERGED})"
        )
    else:
        if requested:
            raise DataError(
                f"dataset '{name}': {key}: {root} has no scale folders "
                f"({', '.join(SCALES)}); it holds the sub-dataset folders itself "
                "(leave the option out)"
            )
        return [("", root)]
    for entry in entries:
        path = Path(entry.path)
        if entry.name in read:
            continue
        if entry.name.startswith("."):
            ignored.append((path, "hidden file or folder"))
        elif not entry.is_dir():
            ignored.append((path, "not in a sub-dataset folder"))
        elif entry.name == MERGED:
            ignored.append(
                (
                    path,
                    "merged copy of the scale folders; not read, so that no image is listed twice",
                )
            )
        elif entry.name in SCALES:
            ignored.append((path, f"scale not in {key}"))
        else:
            ignored.append((path, f"not a scale folder ({', '.join(SCALES)}) of CPIA; not read"))
    return [(scale, root / scale) for scale in read]


def sub_datasets(
    scales: Sequence[tuple[str, Path]], ignored: list[tuple[Path, str]]
) -> list[SubDataset]:
    """The sub-dataset folders of every scale read; loose files go to ``ignored``."""
    found = []
    for scale, folder in scales:
        entries = sorted_entries(folder)
        folders = folder_names(entries)
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                ignored.append((path, "hidden file or folder"))
            elif not entry.is_dir():
                ignored.append((path, "not in a sub-dataset folder"))
            elif entry.name == ARCHIVE_METADATA:
                ignored.append((path, "archive metadata (macOS resource forks); not read"))
            else:
                found.append(
                    SubDataset(
                        scale,
                        entry.name,
                        path,
                        f"{scale}/{entry.name}" if scale else entry.name,
                        folders,
                    )
                )
    return found


def count_images(folder: str) -> int:
    """Image files anywhere under ``folder``, by name only (nothing is opened)."""
    count = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                count += count_images(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                count += 1
    return count


def wsi_of(stem: str) -> str:
    """The slide a flat WSI patch was cut from, by its file name's stem ('' for an ROI)."""
    found = WSI_PATCH.match(stem)
    return found.group("wsi") if found else ""


def list_images(
    sub: SubDataset,
    folder: Path,
    relative: str,
    slide: str,
    images: list[RawImage],
    ignored: list[tuple[Path, str]],
) -> None:
    """Every image under ``folder`` of ``sub``; ``slide``: the per-slide folder it lies in."""
    extra = MappingProxyType({"sub_dataset": sub.name, "scale": sub.scale})
    for entry in sorted_entries(folder):
        # joining one name is cheaper than parsing entry.path again, over millions of files
        name, path = entry.name, folder / entry.name
        stem, extension = os.path.splitext(name)
        if entry.is_dir(follow_symlinks=False):
            if name.startswith("."):
                ignored.append((path, "hidden folder; not read"))
            else:
                # the first folder below the sub-dataset is the slide; deeper ones are its parts
                list_images(sub, path, f"{relative}/{name}", slide or name, images, ignored)
        elif name.startswith("."):
            ignored.append((path, "hidden file"))
        elif not entry.is_file():
            ignored.append(
                (
                    path,
                    "symbolic link to a folder; not followed"
                    if entry.is_dir()
                    else "broken symbolic link",
                )
            )
        elif extension.lower() not in IMAGE_EXTENSIONS:
            ignored.append((path, f"not an image file ({IMAGE_TYPES})"))
        else:
            images.append(
                RawImage(
                    path,
                    f"{relative}/{name}",
                    sub.name,
                    None,
                    group=slide or wsi_of(stem),
                    extra=extra,
                )
            )


def pooled(
    dataset: DatasetConfig, kept: Sequence[SubDataset], left_out: Mapping[str, str]
) -> set[str]:
    """The sub-datasets ``dataset.classes`` pools (all kept ones when it is empty)."""
    if not dataset.classes:
        return {sub.name for sub in kept}
    key = f"datasets.{dataset.name}.classes"
    present = sorted({sub.name for sub in kept})
    for class_name in dataset.classes:
        if class_name in left_out:
            raise DataError(
                f"dataset '{dataset.name}': {key} names sub-dataset "
                f"'{class_name}', which is left out: {left_out[class_name]}"
            )
        if class_name not in present:
            shown = ", ".join(present[:12]) + (" ..." if len(present) > 12 else "")
            raise DataError(
                f"dataset '{dataset.name}': {key} names sub-dataset "
                f"'{class_name}', which is not in the scales read (its sub-datasets "
                f"there: {shown or 'none'})"
            )
    return set(dataset.classes)


def check_exclude(dataset: DatasetConfig, root: Path, exclude: Sequence[str]) -> None:
    """A name in options.exclude that no folder has is a typo that would leak data."""
    if not exclude:
        return
    scales = [root / name for name in (*SCALES, MERGED) if (root / name).is_dir()] or [root]
    names = {name for folder in scales for name in folder_names(sorted_entries(folder))}
    unknown = [name for name in exclude if name not in names]
    if unknown:
        raise DataError(
            f"dataset '{dataset.name}': datasets.{dataset.name}.options.exclude "
            f"names {', '.join(map(repr, unknown))}, which is no sub-dataset folder "
            f"of {', '.join(map(str, scales))}"
        )


def read(dataset: DatasetConfig, root: Path) -> Listing:
    name = dataset.name
    require_folder(root, name, "CPIA root")
    kinds = guarded_kinds(name, dataset.options)
    exclude = list(dataset.options.get("exclude") or ())
    check_exclude(dataset, root, exclude)
    ignored: list[tuple[Path, str]] = []
    notes = [
        "labels: CPIA has no classes; label_name is the sub-dataset folder an image comes "
        "from (a pseudo-label naming its source dataset, not a diagnosis); the columns "
        "sub_dataset and scale give that folder and its scale folder"
    ]
    found = sub_datasets(scale_folders(dataset, root, ignored, notes), ignored)

    left_out: dict[str, str] = {}
    folders_left_out: list[tuple[Path, str]] = []
    kept = []
    for sub in found:
        reason = sub.left_out(kinds, exclude)
        if reason is None:
            kept.append(sub)
            continue
        left_out[sub.name] = reason
        folders_left_out.append((sub.path, f"sub-dataset left out: {reason}"))
        held = count_images(str(sub.path))
        notes.append(f"sub-dataset {sub.relative} left out ({held} images): {reason}")
        log.info(
            "dataset '%s': sub-dataset %s (%d images) left out: %s",
            name,
            sub.relative,
            held,
            reason,
        )
    notes.extend(guard_notes(kinds, found))

    wanted = pooled(dataset, kept, left_out)
    images: list[RawImage] = []
    for sub in kept:
        if sub.name not in wanted:
            folders_left_out.append((sub.path, f"sub-dataset not in datasets.{name}.classes"))
            continue
        before = len(images)
        list_images(sub, sub.path, sub.relative, "", images, ignored)
        if len(images) == before:
            log.warning("dataset '%s': sub-dataset %s holds no image", name, sub.path)
    if dataset.classes:
        notes.append(
            f"sub-datasets pooled (datasets.{name}.classes): "
            f"{', '.join(dataset.classes)}; the others are listed in excluded.tsv"
        )
    notes.append(
        "group: the slide a WSI patch was cut from (its per-slide folder, or the "
        "<wsi>-<size>-<i>-<j> file name), shared by its patches of every size; '' for "
        "ROI images"
    )
    if ignored:
        shown = "; ".join(f"{path}: {reason}" for path, reason in ignored[:5])
        log.warning(
            "dataset '%s': %d file(s) or folder(s) not read (excluded.tsv lists them): %s%s",
            name,
            len(ignored),
            shown,
            " ..." if len(ignored) > 5 else "",
        )
    return Listing(root, images, ignored_files=folders_left_out + ignored, notes=notes)


def guard_notes(kinds: Sequence[str], found: Sequence[SubDataset]) -> Iterator[str]:
    """What the leakage guard did not find, kind by kind (what it left out is noted already)."""
    if not kinds:
        yield (
            "leakage guard off (options.exclude_overlap_with is empty): CPIA holds MHIST, "
            "Chaoyang, BreastPathQ, Gleason 2019 and AML whole, and TCGA-KIRP slides "
            "(pRCC's source); do not evaluate on those after pretraining on this pool"
        )
        return
    for kind_name in kinds:
        if not OVERLAP[kind_name]:
            yield (
                f"leakage guard: no CPIA sub-dataset is known to hold {kind_name}'s images "
                "(CPIA's tables do not list it); nothing left out for it"
            )
        elif not any(overlapping_kind(sub.name, [kind_name]) for sub in found):
            yield (
                f"leakage guard: no sub-dataset folder of the scales read holds "
                f"{kind_name}'s images (none is named {' or '.join(OVERLAP[kind_name])}...)"
            )


def check(name: str, entry: Mapping[str, Any]) -> Iterator[str]:
    """Configured sub-datasets that the options leave out, known before any file is read."""
    options = entry.get("options", {})
    kinds = [
        kind_name for kind_name in options.get("exclude_overlap_with") or () if kind_name in OVERLAP
    ]
    for index, class_name in enumerate(entry.get("classes", [])):
        reason = exclusion(class_name, kinds, options.get("exclude") or ())
        if reason is not None:
            yield (
                f"datasets.{name}.classes[{index}]: sub-dataset '{class_name}' is left out: "
                f"{reason}"
            )


KIND = DatasetKind(
    name="cpia",
    summary="CPIA: [<scale>/]<sub-dataset>/... images, no labels (label_name: the sub-dataset, "
    "group: the slide); an unlabelled pretraining pool",
    read=read,
    known_classes=None,
    labelled=False,
    check=check,
)
