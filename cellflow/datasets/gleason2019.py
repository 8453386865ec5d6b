"""Gleason2019 (gleason2019.grand-challenge.org): prostate TMA cores with pathologists' maps.

Layout: ``Train Imgs/<core>.jpg`` (244 cores such as ``slide001_core003``, about 5000 px a
side) and one folder per pathologist, ``Maps1_T/`` … ``Maps6_T/``, holding
``<core>_classimg_nonconvex.png``, a single-channel map of the core's size. Not every
pathologist annotated every core. Map values: 0 unlabelled (background), 1 benign, 3/4/5
Gleason patterns 3/4/5; 6 is read as benign (Foucart: values above 5 are mistakes for 1). Only
the training set has public maps, so there is no official split.

The maps label pixels and Cellflow classifies patches, and no canonical patch protocol exists.
This reader merges each core's maps into one consensus map (``options.consensus``), tiles the
core (``patch_size``, ``stride``) and keeps each patch that is labelled enough
(``min_labelled``) and pure enough (``purity``) under its majority class. A patch's group is
its core, so all patches of a core land in one split.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cellflow.datasets.common import DataError, DatasetKind, Listing, RawImage, require_folder

if TYPE_CHECKING:
    from cellflow.config import DatasetConfig

log = logging.getLogger(__name__)

CLASSES = ("benign", "grade3", "grade4", "grade5")
IMAGES = "Train Imgs"
MAP_FOLDERS = tuple(f"Maps{k}_T" for k in range(1, 7))
MAP_SUFFIX = "_classimg_nonconvex.png"
CORE_EXTENSIONS = (".jpg", ".jpeg")
PUBLISHED_CORES = 244  # the training set (Foucart et al. 2021; dataset-formats.md section 7)

# map value -> class index: 0 unlabelled, i + 1 for CLASSES[i]
CLASS_INDEX_OF_VALUE = {0: 0, 1: 1, 3: 2, 4: 3, 5: 4, 6: 1}
_CLASS_INDEX = np.zeros(256, dtype=np.uint8)
_CLASS_INDEX[list(CLASS_INDEX_OF_VALUE)] = list(CLASS_INDEX_OF_VALUE.values())
VALUES = "0 unlabelled, 1 benign, 3/4/5 Gleason patterns, 6 read as benign"


@dataclass(frozen=True)
class PatchRule:
    """The reader's options (``gleason2019_options``), with the schema's defaults."""

    consensus: str = "majority"
    min_annotators: int = 1
    patch_size: int = 1024
    stride: int = 1024
    purity: float = 0.9
    min_labelled: float = 0.5

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> PatchRule:
        patch_size = options.get("patch_size", cls.patch_size)
        return cls(
            consensus=options.get("consensus", cls.consensus),
            min_annotators=options.get("min_annotators", cls.min_annotators),
            patch_size=patch_size,
            stride=options.get("stride", patch_size),
            purity=options.get("purity", cls.purity),
            min_labelled=options.get("min_labelled", cls.min_labelled),
        )

    def describe(self) -> str:
        return (
            f"consensus={self.consensus}, min_annotators={self.min_annotators}, "
            f"patch_size={self.patch_size}, stride={self.stride}, purity={self.purity}, "
            f"min_labelled={self.min_labelled}"
        )


@dataclass(frozen=True)
class Core:
    name: str
    image: Path
    maps: tuple[Path, ...]


@dataclass(frozen=True)
class Survey:
    """The cores that can be tiled, and what was left out before any map is decoded."""

    cores: list[Core]
    ignored: list[tuple[Path, str]]
    notes: list[str]


def annotation_files(root: Path, options: Mapping[str, Any]) -> list[Path]:
    """The map folders, not their files: a folder's time changes when maps are added to it,
    and the thousands of maps would swamp the workflow's inputs."""
    return [root / folder for folder in MAP_FOLDERS if (root / folder).is_dir()]


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) read from the file's header; nothing is decoded."""
    with Image.open(path) as opened:
        return opened.size


def survey_cores(dataset: DatasetConfig, root: Path, rule: PatchRule) -> Survey:
    """Pair every core image with its maps and check their sizes from the headers.

    Left out, each with its reason: a core without any map, with fewer maps than
    ``min_annotators``, smaller than a patch, with an unreadable header, or with a map of
    another size; a map without a core image; a file that is neither.
    """
    name = dataset.name
    images_dir = require_folder(root / IMAGES, name, "Gleason2019 core image folder")
    folders = annotation_files(root, dataset.options)
    if not folders:
        held = sorted(p.name for p in root.iterdir())[:10]
        raise DataError(
            f"dataset '{name}': no pathologist's map folder ({', '.join(MAP_FOLDERS)})"
            f" in {root}; it holds: {', '.join(held) or 'nothing'}"
        )
    ignored: list[tuple[Path, str]] = []
    images: dict[str, Path] = {}
    for path in _visible_files(images_dir):
        if path.suffix.lower() in CORE_EXTENSIONS:
            images[path.stem] = path
        else:
            ignored.append((path, "not a JPEG core image"))
    maps: dict[str, list[Path]] = {}
    for folder in folders:
        found = [path for path in _visible_files(folder) if path.name.endswith(MAP_SUFFIX)]
        if not found:
            held = sorted(p.name for p in folder.iterdir())[:10]
            raise DataError(
                f"dataset '{name}': map folder {folder} holds no "
                f"<core>{MAP_SUFFIX} file; it holds: {', '.join(held) or 'nothing'}"
            )
        ignored += [
            (path, f"not a <core>{MAP_SUFFIX} map")
            for path in _visible_files(folder)
            if not path.name.endswith(MAP_SUFFIX)
        ]
        for path in found:
            core = path.name[: -len(MAP_SUFFIX)]
            if core in images:
                maps.setdefault(core, []).append(path)
            else:
                ignored.append((path, f"map of core {core}, which has no image in {images_dir}"))
    for path, reason in ignored:
        log.warning("dataset '%s': %s: %s; ignored", name, path, reason)

    cores = []
    for core, image in images.items():
        checked = _checked_core(image, maps.get(core, []), rule, name)
        if isinstance(checked, Core):
            cores.append(checked)
        else:
            ignored.append((image, checked))
    notes = [
        f"{len(cores)} of the {len(images)} cores in {images_dir} have usable maps from "
        f"{len(folders)} pathologists' folders ({', '.join(f.name for f in folders)})"
    ]
    if len(images) != PUBLISHED_CORES:
        notes.append(
            f"{images_dir} holds {len(images)} core images; the published training set "
            f"has {PUBLISHED_CORES}: check that the download is complete"
        )
        log.warning("dataset '%s': %s", name, notes[-1])
    return Survey(cores, ignored, notes)


def _visible_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]


def _checked_core(image: Path, maps: Sequence[Path], rule: PatchRule, dataset: str) -> Core | str:
    """The core, if it can be tiled; otherwise why not (from its and its maps' headers)."""
    if maps and len(maps) < rule.min_annotators:
        reason = (
            f"{len(maps)} pathologist map(s), under datasets.{dataset}.options."
            f"min_annotators ({rule.min_annotators})"
        )
        log.info("dataset '%s': %s: %s; left out", dataset, image, reason)
        return reason
    checked = _sized_core(image, maps, rule)
    if isinstance(checked, str):
        log.warning("dataset '%s': %s: %s; left out", dataset, image, checked)
    return checked


def _sized_core(image: Path, maps: Sequence[Path], rule: PatchRule) -> Core | str:
    if not maps:
        return f"no pathologist's map (no {image.stem}{MAP_SUFFIX} in any Maps<k>_T folder)"
    try:
        width, height = header_size(image)
    except OSError as err:
        return f"unreadable core image: {err}"
    if min(width, height) < rule.patch_size:
        return (
            f"the core is {width}x{height}, smaller than a patch (options.patch_size "
            f"{rule.patch_size})"
        )
    for path in maps:
        try:
            map_width, map_height = header_size(path)
        except OSError as err:
            return f"unreadable map {path}: {err}"
        if (map_width, map_height) != (width, height):
            return (
                f"map {path} is {map_width}x{map_height}, but the core {image} is {width}x{height}"
            )
    return Core(image.stem, image, tuple(maps))


def read_map(path: Path, dataset: str) -> np.ndarray:
    """One pathologist's map as class indices (0 unlabelled, i + 1 for ``CLASSES[i]``).

    A file that cannot be decoded raises ``OSError`` naming it.
    """
    with Image.open(path) as opened:
        if len(opened.getbands()) != 1:
            raise DataError(
                f"dataset '{dataset}': {path}: mode {opened.mode}, "
                f"{len(opened.getbands())} channels; a Gleason2019 map has one "
                f"({VALUES})"
            )
        try:
            values = np.asarray(opened)
        except OSError as err:
            raise OSError(f"map {path} is unreadable: {err}") from None
    if values.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(values.ravel(), minlength=256))
    else:  # 16-bit or bilevel PNG: rare, so the slower exact count is fine
        present = np.unique(values)
    unknown = sorted(set(present.tolist()) - set(CLASS_INDEX_OF_VALUE))
    if unknown:
        raise DataError(
            f"dataset '{dataset}': {path}: pixel value(s) "
            f"{', '.join(map(str, unknown[:10]))} are not Gleason2019 map values "
            f"({VALUES})"
        )
    return _CLASS_INDEX[values.astype(np.uint8, copy=False)]


def consensus_map(maps: Sequence[np.ndarray], rule: str) -> np.ndarray:
    """One class index per pixel from several maps of class indices.

    ``majority``: the index most maps give (an unlabelled map is a vote for 0), 0 where two
    or more indices tie for the most votes; ``unanimous``: the index where every map agrees,
    else 0.
    """
    first = maps[0]
    disputed = np.zeros(first.shape, dtype=bool)
    for other in maps[1:]:
        disputed |= other != first
    merged = first.copy()
    if rule == "unanimous":
        merged[disputed] = 0
        return merged
    # votes are counted only where the maps differ; elsewhere every map gives the answer
    ballots = np.stack([one[disputed] for one in maps])
    votes = np.stack(
        [np.count_nonzero(ballots == index, axis=0) for index in range(len(CLASSES) + 1)]
    )
    winner = votes.argmax(axis=0).astype(np.uint8)
    winner[np.count_nonzero(votes == votes.max(axis=0), axis=0) > 1] = 0
    merged[disputed] = winner
    return merged


@dataclass(frozen=True)
class Patch:
    left: int
    top: int
    class_index: int  # into CLASSES
    purity: float  # share of the labelled pixels that have the class
    labelled: float  # share of the pixels that are labelled


def patches(consensus: np.ndarray, rule: PatchRule) -> Iterator[Patch]:
    """The patches that lie wholly inside the core and pass ``min_labelled`` and ``purity``,
    row by row."""
    height, width = consensus.shape
    size = rule.patch_size
    tops = np.arange(0, height - size + 1, rule.stride)
    lefts = np.arange(0, width - size + 1, rule.stride)
    if not len(tops) or not len(lefts):
        return
    per_class = np.stack(
        [window_counts(consensus == index + 1, tops, lefts, size) for index in range(len(CLASSES))]
    )
    labelled = per_class.sum(axis=0)
    largest = per_class.max(axis=0)
    majority = per_class.argmax(axis=0)
    for row, column in zip(*np.nonzero(labelled), strict=True):
        share = labelled[row, column] / size**2
        purity = largest[row, column] / labelled[row, column]
        if share >= rule.min_labelled and purity >= rule.purity:
            yield Patch(
                int(lefts[column]),
                int(tops[row]),
                int(majority[row, column]),
                float(purity),
                float(share),
            )


def window_counts(mask: np.ndarray, tops: np.ndarray, lefts: np.ndarray, size: int) -> np.ndarray:
    """The set pixels of ``mask`` in the ``size``-pixel square at every (top, left).

    The mask is summed once, in blocks between consecutive window edges, and each window is
    read from the blocks' cumulative sums, so overlapping windows cost nothing more.
    """
    rows = _edges(tops, size, mask.shape[0])
    columns = _edges(lefts, size, mask.shape[1])
    # within each row first: summing contiguous memory is several times faster
    blocks = np.add.reduceat(np.add.reduceat(mask, columns, axis=1, dtype=np.int64), rows, axis=0)
    # before[i, j]: set pixels above row rows[i] and left of column columns[j]; the last row
    # and column of ``before`` stand for the bottom and right borders
    before = np.zeros((len(rows) + 1, len(columns) + 1), dtype=np.int64)
    before[1:, 1:] = blocks.cumsum(axis=0).cumsum(axis=1)
    top, bottom = np.searchsorted(rows, tops), np.searchsorted(rows, tops + size)
    left, right = np.searchsorted(columns, lefts), np.searchsorted(columns, lefts + size)
    return (
        before[np.ix_(bottom, right)]
        - before[np.ix_(top, right)]
        - before[np.ix_(bottom, left)]
        + before[np.ix_(top, left)]
    )


def _edges(starts: np.ndarray, size: int, length: int) -> np.ndarray:
    """Where windows start or end, short of the border (reduceat takes no index there)."""
    edges = np.union1d(starts, starts + size)
    return edges[edges < length]


def read(dataset: DatasetConfig, root: Path) -> Listing:
    """One :class:`RawImage` per kept patch of every usable core, a core at a time."""
    rule = PatchRule.from_options(dataset.options)
    found = survey_cores(dataset, root, rule)
    ignored = list(found.ignored)
    images: list[RawImage] = []
    listed: Counter[tuple[str, str]] = Counter()
    files_read: list[Path] = []
    for core in found.cores:
        try:
            maps = [read_map(path, dataset.name) for path in core.maps]
        except OSError as err:
            reason = str(err)
            log.warning("dataset '%s': %s: %s; left out", dataset.name, core.image, reason)
            ignored.append((core.image, reason))
            continue
        files_read += core.maps
        consensus = consensus_map(maps, rule.consensus)
        del maps  # freed before the patch tables are built: one core's arrays at a time
        for patch in patches(consensus, rule):
            label = CLASSES[patch.class_index]
            listed[("", label)] += 1
            images.append(
                RawImage(
                    core.image,
                    f"{IMAGES}/{core.name}/x{patch.left:05d}_y{patch.top:05d}.jpg",
                    label,
                    None,
                    group=core.name,
                    extra={
                        "core": core.name,
                        "x": patch.left,
                        "y": patch.top,
                        "purity": round(patch.purity, 4),
                        "labelled": round(patch.labelled, 4),
                        "annotators": len(core.maps),
                    },
                    region=(
                        patch.left,
                        patch.top,
                        patch.left + rule.patch_size,
                        patch.top + rule.patch_size,
                    ),
                )
            )
    log.info(
        "dataset '%s': %d patches from %d cores (%s)",
        dataset.name,
        len(images),
        len(found.cores),
        ", ".join(f"{c} {listed[('', c)]}" for c in CLASSES),
    )
    consensus_rule = (
        "the value most of a core's available maps give, unlabelled where values tie"
        if rule.consensus == "majority"
        else "the value where all of a core's available maps agree, unlabelled elsewhere"
    )
    notes = [
        *found.notes,
        f"pixel labels: {consensus_rule} (options.consensus {rule.consensus}); map values "
        f"{VALUES} (Foucart: values above 5 are mistakes for benign)",
        f"patches (not a canonical protocol: Gleason2019 publishes none): {rule.patch_size} px "
        f"squares every {rule.stride} px, wholly inside the core, kept where at least "
        f"{rule.min_labelled} of the pixels are labelled and at least {rule.purity} of those "
        f"have the patch's label; columns purity, labelled and annotators give each patch's "
        f"values ({rule.describe()})",
        "only the training set is labelled: no official split; every patch's group is its "
        "core, so a core's patches share one split",
    ]
    return Listing(
        root, images, ignored_files=ignored, notes=notes, listed=listed, files_read=files_read
    )


def survey(dataset: DatasetConfig, root: Path) -> Listing:
    """What ``read`` would tile, in seconds: cores, maps and sizes from the file headers.

    Patches exist only once the maps are decoded, so the listing has no images; ``listed``
    counts the usable cores under ``('', 'cores')`` (not a class), and ``ignored_files``
    holds every exclusion that the headers show. Bad map values are found by ``read``.
    """
    rule = PatchRule.from_options(dataset.options)
    found = survey_cores(dataset, root, rule)
    notes = [
        *found.notes,
        "patches are counted when the data stage runs (they depend on the maps' pixels)",
    ]
    return Listing(
        root,
        [],
        ignored_files=found.ignored,
        notes=notes,
        listed=Counter({("", "cores"): len(found.cores)}),
    )


KIND = DatasetKind(
    name="gleason2019",
    summary=(
        "Gleason2019: Train Imgs/<core>.jpg + Maps1_T..Maps6_T/<core>_classimg_nonconvex.png "
        "(pixel maps of up to 6 pathologists), tiled into patches labelled by consensus; "
        "no official split"
    ),
    read=read,
    known_classes=lambda options: CLASSES,
    annotation_files=annotation_files,
    survey=survey,
)
