"""Data preparation: read a raw dataset, check every image, resize, split, and write a manifest.

Every later stage reads only ``results/{dataset}/data/manifest.tsv`` and the images it lists, so
all the ways raw data goes wrong are dealt with here, once, with messages that name the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import ExifTags, Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

from cellflow.config import DatasetConfig, GroupRule, PrepareConfig, SplitConfig
from cellflow.datasets import kind as dataset_kind
from cellflow.datasets.common import (
    IMAGE_EXTENSIONS,
    SPLITS,
    DataError,
    Listing,
    RawImage,
    compare_with_published,
)
from cellflow.io import save_png, staged_directory, write_table, write_text

__all__ = ["IMAGE_EXTENSIONS", "SPLITS", "DataError", "RawImage", "load_images", "load_split",
           "prepare_dataset", "read_ground_truth", "to_rgb"]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["id", "path", "label", "label_name", "split", "source_path", "note",
                    "group"]
GROUND_TRUTH_COLUMNS = ["progression", "nuclei_count", "nuclear_area_fraction", "mask_path"]


def image_id(relative_path: str) -> str:
    """A file-name-safe id that is stable as long as the raw file keeps its path.

    Letters and digits of any script are kept (``患者1.png`` and ``病例1.png`` stay apart);
    separators and punctuation become ``_``.
    """
    stem = relative_path.rsplit(".", 1)[0]
    return re.sub(r"[^\w.-]", "_", stem.replace("/", "__"))


def assign_ids(images: Sequence[RawImage], dataset: str) -> list[str]:
    """:func:`image_id` of every image; ids that several files share get a short hash of
    each file's path (``x.png`` and ``x.jpg``, ``a b.png`` and ``a_b.png``), with a warning."""
    ids = [image_id(raw.relative_path) for raw in images]
    sharing: dict[str, list[int]] = {}
    for index, identifier in enumerate(ids):
        sharing.setdefault(identifier, []).append(index)
    for identifier, indices in sharing.items():
        if len(indices) < 2:
            continue
        log.warning("dataset '%s': %s map to the same id '%s'; each gets a hash of its path",
                    dataset, ", ".join(str(images[i].source_path) for i in indices), identifier)
        for i in indices:
            digest = hashlib.sha1(images[i].relative_path.encode()).hexdigest()[:8]
            ids[i] = f"{identifier}-{digest}"
    return ids


def to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """Convert any PIL mode to RGB; transparent pixels become white (slide background).

    Returns the image and a note saying what was converted ('' if it already was RGB).
    """
    if image.mode == "RGB":
        return image, ""
    note = f"converted from {image.mode}"
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), note
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scaled = np.clip(array / max(array.max(), 1.0) * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled).convert("RGB"), note
    return image.convert("RGB"), note


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` and take the centre square.

    Same recipe as guided-diffusion's ``center_crop_arr``: halve with a box filter while the
    short side is at least twice the target (fast and alias-free), then bicubic to size.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(
        tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC
    )
    left = (image.size[0] - resolution) // 2
    top = (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


@dataclass(frozen=True)
class ProcessedImage:
    raw: RawImage
    id: str
    path: str | None  # relative to the output folder; None when unreadable
    pixel_hash: str | None
    note: str
    error: str | None = None


def crop_to_opaque(image: Image.Image) -> Image.Image:
    """The fully opaque part of an image with a transparent border (AML's cell crops)."""
    if image.mode not in ("RGBA", "LA", "PA"):
        return image
    box = image.getchannel("A").point(lambda alpha: 255 if alpha == 255 else 0).getbbox()
    return image.crop(box) if box else image


def _open_rgb(path: Path, max_pixels: int, crop_transparent: bool
              ) -> tuple[Image.Image | None, str, str | None]:
    """(RGB image, note on what was converted, error) of one raw file."""
    try:
        with Image.open(path) as opened:
            width, height = opened.size  # from the header: nothing is decoded yet
            if width * height > max_pixels:
                return None, "", (f"too large: {width}x{height} = {width * height:,} pixels, "
                                  f"over prepare.max_image_pixels ({max_pixels:,})")
            opened.load()
            orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
            image = ImageOps.exif_transpose(opened) if orientation != 1 else opened
            if crop_transparent:
                image = crop_to_opaque(image)
            image, note = to_rgb(image)
            if orientation != 1:
                note = "; ".join(filter(None, [f"turned upright (EXIF orientation {orientation})",
                                               note]))
    except (OSError, SyntaxError, ValueError) as err:
        return None, "", f"unreadable: {err}"
    if note:
        log.warning("%s: %s to RGB", path, note)
    return image, note, None


def _process_source(raws: Sequence[tuple[RawImage, str]], resolution: int, on_small: str,
                    max_pixels: int, crop_transparent: bool, staging: Path
                    ) -> list[ProcessedImage]:
    """Every image (or patch) of one raw file, which is decoded once."""
    image, opened_note, error = _open_rgb(raws[0][0].source_path, max_pixels, crop_transparent)
    if error:
        return [ProcessedImage(raw, identifier, None, None, "", error=error)
                for raw, identifier in raws]
    processed = []
    for raw, identifier in raws:
        part, note = image, opened_note
        if raw.region is not None:
            left, top, right, bottom = raw.region
            if right > image.size[0] or bottom > image.size[1]:
                processed.append(ProcessedImage(
                    raw, identifier, None, None, "",
                    error=f"patch {raw.region} lies outside the {image.size[0]}x"
                          f"{image.size[1]} image"))
                continue
            part = image.crop(raw.region)
        if min(part.size) < resolution:
            message = f"{part.size[0]}x{part.size[1]} is smaller than the resolution {resolution}"
            if on_small == "error":
                raise DataError(
                    f"{raw.source_path}: {message} (set prepare.on_small: upscale to allow)")
            note = "; ".join(filter(None, [note, f"upscaled from {part.size[0]}x{part.size[1]}"]))
        pixel_hash = hashlib.sha1(part.tobytes() + repr(part.size).encode()).hexdigest()
        relative = f"images/{raw.label_name}/{identifier}.png"
        save_png(staging / relative, center_crop_resize(part, resolution))
        processed.append(ProcessedImage(raw, identifier, relative, pixel_hash, note))
    return processed


def stratified_split(
    labels: Sequence[str],
    split: SplitConfig,
    seed: int,
    fixed: Sequence[str | None] | None = None,
) -> list[str]:
    """Assign train/val/test per class with exact per-class proportions.

    Entries of ``fixed`` that are not None keep their (official) split; when an official split
    exists, the splits it lacks (validation for MHIST, test for BreastPathQ, whose test labels
    are withheld) are carved out of its training images.
    """
    rng = np.random.default_rng(seed)
    fixed = list(fixed) if fixed is not None else [None] * len(labels)
    assigned: list[str | None] = list(fixed)
    official = any(value is not None for value in fixed)
    for class_name in sorted(set(labels)):
        if official:
            pool = [i for i, (label, given) in enumerate(zip(labels, fixed, strict=True))
                    if label == class_name and given == "train"]
            n_test = 0 if "test" in fixed else max(1, round(len(pool) * split.test_fraction))
            n_val = 0 if "val" in fixed else max(1, round(len(pool) * split.val_fraction))
        else:
            pool = [i for i, lab in enumerate(labels) if lab == class_name]
            n_test = max(1, round(len(pool) * split.test_fraction))
            n_val = max(1, round(len(pool) * split.val_fraction))
        if len(pool) - n_test - n_val < 1:
            raise DataError(
                f"class '{class_name}' has {len(pool)} image(s) to split; at least "
                f"{n_test + n_val + 1} are needed for train/val/test"
            )
        order = rng.permutation(len(pool))
        for rank, position in enumerate(order):
            index = pool[position]
            if rank < n_test:
                assigned[index] = "test"
            elif rank < n_test + n_val:
                assigned[index] = "val"
            else:
                assigned[index] = "train"
    return [value if value is not None else "train" for value in assigned]


def _listing(items: Sequence[str], limit: int = 5) -> str:
    """The first few of ``items``, so that an error about thousands of files stays readable."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def image_groups(paths: Sequence[str], rule: GroupRule | None, dataset: str) -> list[str]:
    """The patient or slide of every image (by its path relative to the root); '' without a rule.

    Read once for all discovered images, before any is decoded, so that a rule that misses
    files stops the stage at once instead of after the resizing.
    """
    if rule is None:
        return [""] * len(paths)
    if rule.pattern is not None:
        return _groups_from_pattern(paths, rule.pattern, dataset)
    return _groups_from_sheet(paths, rule, dataset)


def _groups_from_pattern(paths: Sequence[str], pattern: str, dataset: str) -> list[str]:
    key = f"datasets.{dataset}.split.group.pattern"
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise DataError(f"dataset '{dataset}': {key}: {pattern!r} is not a valid regex ({err})"
                        ) from None
    groups = []
    for path in paths:
        found = regex.search(path)
        # an optional capture group that took no part in the match gives None: no group either
        groups.append((found.group(1 if regex.groups else 0) or "") if found else "")
    unmatched = [path for path, group in zip(paths, groups, strict=True) if not group]
    if unmatched:
        raise DataError(
            f"dataset '{dataset}': {key} {pattern!r} gives no group for {len(unmatched)} "
            f"image(s) (paths relative to the data root): {_listing(unmatched)}")
    return groups


def _groups_from_sheet(paths: Sequence[str], rule: GroupRule, dataset: str) -> list[str]:
    key = f"datasets.{dataset}.split.group"
    sheet = rule.sheet
    if sheet is None or not sheet.is_file():
        raise DataError(f"dataset '{dataset}': sample sheet {sheet} ({key}.sheet) not found")
    try:
        table = pd.read_csv(sheet, sep="," if sheet.suffix.lower() == ".csv" else "\t",
                            dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{sheet}: cannot read the sample sheet of {key}.sheet ({err})") from None
    for column, setting in ((rule.path_column, "path_column"), (rule.column, "column")):
        if column not in table.columns:
            raise DataError(f"{sheet}: no column '{column}' ({key}.{setting}); the sheet has: "
                            f"{', '.join(map(str, table.columns))}")
    group_of: dict[str, str] = {}
    for path, group in zip(table[rule.path_column].str.strip(), table[rule.column].str.strip(),
                           strict=True):
        path = PurePosixPath(path).as_posix()  # './a/x.png' and 'a/x.png' are one image
        if group_of.setdefault(path, group) != group:
            raise DataError(f"{sheet}: {path} is listed with groups '{group_of[path]}' and "
                            f"'{group}' (column '{rule.column}')")
    absent = [path for path in paths if not group_of.get(path)]
    if absent:
        raise DataError(
            f"{sheet}: no group in column '{rule.column}' for {len(absent)} image(s) of dataset "
            f"'{dataset}' (column '{rule.path_column}' must hold each path relative to the data "
            f"root): {_listing(absent)}")
    return [group_of[path] for path in paths]


def grouped_split(
    labels: Sequence[str],
    groups: Sequence[str],
    split: SplitConfig,
    seed: int,
    fixed: Sequence[str | None] | None = None,
) -> list[str]:
    """Like :func:`stratified_split`, but every group (patient, slide) lands in one split.

    Tiles of one slide share stain, scanner and patient, so a slide in train and test would
    measure memorisation. Whole groups are placed with per-class proportions as close to the
    fractions as the group sizes allow, and every split gets at least one group of each class.
    With an official split, its assignment is kept and only the splits carved out of official
    train are grouped.
    """
    fixed = list(fixed) if fixed is not None else [None] * len(labels)
    official = any(value is not None for value in fixed)
    if official:
        pool = [i for i, given in enumerate(fixed) if given == "train"]
        fractions = {name: fraction for name, fraction in (("test", split.test_fraction),
                                                             ("val", split.val_fraction))
                     if name not in fixed}
    else:
        pool = list(range(len(labels)))
        fractions = {"test": split.test_fraction, "val": split.val_fraction}
    fractions["train"] = 1.0 - sum(fractions.values())
    class_names = sorted(set(labels))
    names = sorted({groups[i] for i in pool})
    row = {name: index for index, name in enumerate(names)}
    column = {name: index for index, name in enumerate(class_names)}
    counts = np.zeros((len(names), len(class_names)))
    for i in pool:
        counts[row[groups[i]], column[labels[i]]] += 1
    placed = _place_groups(counts, fractions, np.random.default_rng(seed), class_names)
    assigned = list(fixed)
    for i in pool:
        assigned[i] = placed[row[groups[i]]]
    return [value if value is not None else "train" for value in assigned]


def _place_groups(counts: np.ndarray, fractions: Mapping[str, float], rng: np.random.Generator,
                  class_names: Sequence[str]) -> list[str]:
    """The split of every group, given its images per class (one row of ``counts`` a group).

    First each class, scarcest first, gets its smallest free groups into the splits that lack
    it (so that small splits are not filled by one large slide); then the remaining groups,
    largest first, each go where they bring the per-class proportions closest to the
    fractions. Ties follow a seeded shuffle.
    """
    splits = list(fractions)
    target = np.array([fractions[s] for s in splits])[:, None] * counts.sum(axis=0)
    placed = np.zeros_like(target)
    where = [""] * len(counts)
    rank = np.empty(len(counts), dtype=np.int64)
    rank[rng.permutation(len(counts))] = np.arange(len(counts))
    sizes = counts.sum(axis=1)

    def place(group: int, split: int) -> None:
        where[group] = splits[split]
        placed[split] += counts[group]

    holding = (counts > 0).sum(axis=0)
    for c in np.argsort(holding, kind="stable"):
        for s in range(len(splits)):
            if placed[s, c] > 0:
                continue
            free = [g for g in range(len(counts)) if not where[g] and counts[g, c] > 0]
            if not free:
                raise DataError(
                    f"class '{class_names[c]}' is in {holding[c]} group(s), too few to give "
                    f"each of {', '.join(splits)} at least one of them (grouped split; "
                    "lower the fractions, or group more finely)")
            place(min(free, key=lambda g: (sizes[g], rank[g])), s)
    totals = counts.sum(axis=0)
    rest = sorted((g for g in range(len(counts)) if not where[g]),
                  key=lambda g: (-sizes[g], rank[g]))
    for g in rest:
        before = ((placed - target) / totals) ** 2
        after = ((placed + counts[g] - target) / totals) ** 2
        place(g, int(np.argmin((after - before).sum(axis=1))))
    return where


def _warn_groups_across_official_splits(groups: Sequence[str], fixed: Sequence[str | None],
                                        dataset: str) -> None:
    """An official split is kept even where it puts one patient in two splits; say so."""
    splits_of: dict[str, set[str | None]] = {}
    for group, given in zip(groups, fixed, strict=True):
        splits_of.setdefault(group, set()).add(given)
    across = sorted(group for group, found in splits_of.items() if len(found) > 1)
    if across:
        log.warning("dataset '%s': %d group(s) are in more than one official split (kept as "
                    "given): %s", dataset, len(across), _listing(across))


def contact_sheet(paths: Sequence[Path], title: str, tile: int, gap: int = 2) -> Image.Image:
    """A grid of thumbnails under a title line, for looking at a class at a glance."""
    columns = max(1, math.ceil(math.sqrt(len(paths))))
    rows = max(1, math.ceil(len(paths) / columns))
    header = max(18, tile // 5)
    pitch = tile + gap
    sheet = Image.new("RGB", (columns * pitch - gap, rows * pitch - gap + header), "white")
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            thumb = image.convert("RGB").resize((tile, tile), Image.NEAREST)
        sheet.paste(thumb, ((index % columns) * pitch, header + (index // columns) * pitch))
    font = ImageFont.load_default(size=max(10, header - 6))
    ImageDraw.Draw(sheet).text((4, 2), title, fill="black", font=font)
    return sheet


def _dedupe(processed: list[ProcessedImage], on_duplicate: str, dataset: str
            ) -> tuple[list[ProcessedImage], list[tuple[ProcessedImage, str]]]:
    """Keep one image per pixel hash, preferring the official test split, then path order."""
    priority = {"test": 0, "val": 1, "train": 2, None: 3}
    groups: dict[str, list[ProcessedImage]] = {}
    for item in processed:
        groups.setdefault(item.pixel_hash, []).append(item)
    kept: list[ProcessedImage] = []
    dropped: list[tuple[ProcessedImage, str]] = []
    for group in groups.values():
        group.sort(key=lambda it: (priority[it.raw.official_split], it.raw.relative_path))
        kept.append(group[0])
        for duplicate in group[1:]:
            message = (f"duplicate of {group[0].raw.source_path}"
                       f" (class {group[0].raw.label_name})")
            if duplicate.raw.label_name != group[0].raw.label_name:
                # One image under two labels: the kept label is a guess the user must check.
                message = (f"label conflict: filed under class {duplicate.raw.label_name}, "
                           f"but a {message} is kept")
            if on_duplicate == "error":
                raise DataError(f"dataset '{dataset}': {duplicate.raw.source_path} is a {message}"
                                " (set prepare.on_duplicate: drop to keep one copy)")
            log.warning("%s: %s; dropped", duplicate.raw.source_path, message)
            dropped.append((duplicate, message))
    kept.sort(key=lambda it: it.raw.relative_path)
    return kept, dropped


def prepare_dataset(
    dataset: DatasetConfig,
    prepare: PrepareConfig,
    raw_root: Path,
    out_dir: Path,
    seed: int,
    threads: int = 1,
    ground_truth: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Prepare one dataset into ``out_dir`` and return its manifest.

    The dataset's kind (:mod:`cellflow.datasets`) lists its images from the official files;
    then every kind is checked, resized and split alike. Writes ``manifest.tsv`` (with the
    kind's extra columns), ``class_counts.tsv``, ``group_counts.tsv``, ``excluded.tsv``,
    ``source.json`` (files read, notes, published-count checks), ``images/`` and
    ``contact_sheets/`` (and ``masks/`` when ``ground_truth`` is given). The folder is built
    beside ``out_dir`` and replaces it at the end, so a failed run leaves the previous
    preparation untouched.
    """
    reader = dataset_kind(dataset.kind)
    listing = reader.read(dataset, raw_root)
    count_warnings = compare_with_published(listing.listed_counts(), reader.published,
                                            dataset.name, reader.name)
    dataset, listing = select_classes(dataset, listing, known=reader.known_classes is not None)
    if dataset.split.group is not None:
        groups = image_groups([raw.relative_path for raw in listing.images],
                              dataset.split.group, dataset.name)
        listing.images = [replace(raw, group=group)
                          for raw, group in zip(listing.images, groups, strict=True)]
    with staged_directory(out_dir) as staging:
        manifest = _prepare_into(dataset, prepare, listing, staging, seed, threads, ground_truth)
        write_text(staging / "source.json", json.dumps({
            "kind": reader.name, "summary": reader.summary, "root": str(listing.root.resolve()),
            "classes": list(dataset.classes),
            "files_read": [str(path.resolve()) for path in listing.files_read],
            "notes": listing.notes,
            "published_count_mismatches": count_warnings,
            "official_split": listing.has_official_split,
            "grouped_by": (f"datasets.{dataset.name}.split.group"
                           if dataset.split.group is not None
                           else "the reader" if any(manifest["group"] != "") else None),
        }, indent=2) + "\n")
    return manifest


def select_classes(dataset: DatasetConfig, listing: Listing, known: bool
                   ) -> tuple[DatasetConfig, Listing]:
    """Keep the configured classes of a layout that defines its own (listing the others as
    excluded); a dataset without configured classes (an unlabelled pool) takes all found."""
    if not dataset.classes:
        found = tuple(sorted({raw.label_name for raw in listing.images}))
        if not found:
            raise DataError(f"dataset '{dataset.name}': no images under {listing.root}")
        return replace(dataset, classes=found), listing
    if not known:
        return dataset, listing
    wanted = set(dataset.classes)
    kept = [raw for raw in listing.images if raw.label_name in wanted]
    left_out = Counter(raw.label_name for raw in listing.images if raw.label_name not in wanted)
    for class_name, count in sorted(left_out.items()):
        log.info("dataset '%s': %d image(s) of class '%s' left out (not in "
                 "datasets.%s.classes)", dataset.name, count, class_name, dataset.name)
    # a patch is named by its virtual path (core and position), not by the image it is cut from
    ignored = listing.ignored_files + [
        (listing.root / raw.relative_path if raw.region else raw.source_path,
         f"class '{raw.label_name}' is not in datasets.{dataset.name}.classes")
        for raw in listing.images if raw.label_name not in wanted]
    return dataset, replace(listing, images=kept, ignored_files=ignored)


def _prepare_into(dataset: DatasetConfig, prepare: PrepareConfig, listing: Listing,
                  staging: Path, seed: int, threads: int,
                  ground_truth: pd.DataFrame | None) -> pd.DataFrame:
    name = dataset.name
    ids = assign_ids(listing.images, name)
    by_source: dict[Path, list[tuple[RawImage, str]]] = {}
    for raw, identifier in zip(listing.images, ids, strict=True):
        by_source.setdefault(raw.source_path, []).append((raw, identifier))
    # The size limit is prepare.max_image_pixels, checked per file before decoding; PIL's own
    # decompression-bomb limit (89 M pixels) would refuse whole cores and large tiles.
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            jobs = pool.map(lambda raws: _process_source(
                raws, dataset.resolution, prepare.on_small, prepare.max_image_pixels,
                listing.crop_transparent_border, staging), by_source.values())
            processed = [item for batch in tqdm(jobs, total=len(by_source),
                                                desc=f"prepare {name}", unit="file")
                         for item in batch]
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit

    unreadable = [item for item in processed if item.error]
    if unreadable and prepare.on_corrupt == "error":
        lines = "\n".join(f"  {item.raw.source_path}: {item.error}" for item in unreadable)
        raise DataError(f"dataset '{name}': {len(unreadable)} unreadable image(s) "
                        f"(set prepare.on_corrupt: exclude to skip them):\n{lines}")
    for item in unreadable:
        log.warning("%s: %s; excluded", item.raw.source_path, item.error)
    readable = [item for item in processed if not item.error]
    kept, duplicates = _dedupe(readable, prepare.on_duplicate, name)
    for item, _ in duplicates:
        (staging / item.path).unlink()

    counts = pd.Series([item.raw.label_name for item in kept]).value_counts()
    empty = [c for c in dataset.classes if counts.get(c, 0) == 0]
    if empty:
        raise DataError(f"dataset '{name}': class(es) {', '.join(empty)} have no readable image "
                        f"under {listing.root}")

    labels = [item.raw.label_name for item in kept]
    groups = [item.raw.group for item in kept]
    fixed = [item.raw.official_split for item in kept] if listing.has_official_split else None
    try:
        if not any(groups):
            splits = stratified_split(labels, dataset.split, seed, fixed)
        else:
            # an image without a group (a pool's ungrouped part) is a group of its own
            units = [item.raw.group or f"image:{item.raw.relative_path}" for item in kept]
            if fixed is not None:
                _warn_groups_across_official_splits(units, fixed, name)
            splits = grouped_split(labels, units, dataset.split, seed, fixed)
    except DataError as err:
        raise DataError(f"dataset '{name}' ({listing.root}): {err}") from None
    label_of = {class_name: index for index, class_name in enumerate(dataset.classes)}
    manifest = pd.DataFrame({
        "id": [item.id for item in kept],
        "path": [item.path for item in kept],
        "label": [label_of[item.raw.label_name] for item in kept],
        "label_name": [item.raw.label_name for item in kept],
        "split": splits,
        "source_path": [str(item.raw.source_path.resolve()) for item in kept],
        "note": [item.note for item in kept],
        "group": groups,
    })[MANIFEST_COLUMNS]
    manifest = _with_extra_columns(manifest, kept, name)
    if ground_truth is not None:
        manifest = _attach_ground_truth(manifest, kept, ground_truth, staging, dataset)

    excluded = pd.DataFrame(
        [(str(item.raw.source_path), item.error) for item in unreadable]
        + [(str(item.raw.source_path), why) for item, why in duplicates]
        + [(str(path), reason) for path, reason in listing.ignored_files],
        columns=["source_path", "reason"],
    )
    write_table(staging / "manifest.tsv", manifest)
    write_table(staging / "class_counts.tsv", class_counts(manifest, dataset.classes))
    write_table(staging / "excluded.tsv", excluded)
    counted = group_counts(manifest)
    write_table(staging / "group_counts.tsv", counted)
    for split_name, groups_in, images_in in counted.itertuples(index=False):
        log.info("dataset '%s' %s: %d groups, %d images", name, split_name, groups_in, images_in)
    _write_contact_sheets(manifest, staging, dataset, prepare.contact_sheet_images)
    log.info("dataset '%s': %d images prepared, %d excluded", name, len(manifest), len(excluded))
    return manifest


def _with_extra_columns(manifest: pd.DataFrame, kept: Sequence[ProcessedImage], dataset: str
                        ) -> pd.DataFrame:
    """The reader's extra columns (annotator votes, scores, paired paths), in first-seen order;
    an image without a value gets an empty cell."""
    columns: dict[str, None] = {}
    for item in kept:
        columns.update(dict.fromkeys(item.raw.extra))
    clashing = [c for c in columns if c in MANIFEST_COLUMNS or c in GROUND_TRUTH_COLUMNS]
    if clashing:
        raise DataError(f"dataset '{dataset}': the reader's extra column(s) {clashing} clash "
                        "with the manifest's own")
    extra = pd.DataFrame([{c: item.raw.extra.get(c, "") for c in columns} for item in kept],
                         columns=list(columns), index=manifest.index)
    return pd.concat([manifest, extra], axis=1)


def _attach_ground_truth(manifest: pd.DataFrame, kept: list[ProcessedImage],
                         ground_truth: pd.DataFrame, staging: Path,
                         dataset: DatasetConfig) -> pd.DataFrame:
    """Carry generator ground truth through the resize: masks get the same geometry.

    ``ground_truth`` is indexed by the image path relative to the raw root, and its
    ``mask_path`` column holds paths that can be opened as they are.
    """
    rows = ground_truth.set_index("source_path").loc[[item.raw.relative_path for item in kept]]
    mask_paths, fractions = [], []
    for item, mask_path in zip(kept, rows["mask_path"], strict=True):
        with Image.open(mask_path) as mask:
            resized = _resize_mask(np.asarray(mask), dataset.resolution)
        relative = f"masks/{item.id}.png"
        save_png(staging / relative, Image.fromarray(resized))
        mask_paths.append(relative)
        fractions.append(float((resized > 0).mean()))
    manifest = manifest.copy()
    manifest["progression"] = rows["progression"].to_numpy()
    manifest["nuclei_count"] = rows["nuclei_count"].to_numpy()
    manifest["nuclear_area_fraction"] = fractions
    manifest["mask_path"] = mask_paths
    return manifest


def _resize_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    image = Image.fromarray(mask.astype(np.uint16))
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), Image.NEAREST)
    left = (image.size[0] - resolution) // 2
    top = (image.size[1] - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.uint16)


def class_counts(manifest: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Images per class and split, with totals; every class and split appears, even at 0."""
    table = (manifest.groupby(["label_name", "split"]).size().unstack(fill_value=0)
             .reindex(index=list(classes), columns=list(SPLITS), fill_value=0))
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    return table.rename_axis("class").reset_index()


def group_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Groups and images per split, with totals, to check a grouped split at a glance.

    Without a group rule every image is its own group (it is the unit that was split), so
    groups equals images. The total counts distinct groups: a group in two official splits
    counts once.
    """
    unit = manifest["group"].where(manifest["group"] != "", manifest["id"])
    rows = [(split, unit[manifest["split"] == split].nunique(),
             int((manifest["split"] == split).sum())) for split in SPLITS]
    rows.append(("total", unit.nunique(), len(manifest)))
    return pd.DataFrame(rows, columns=["split", "groups", "images"])


def _write_contact_sheets(manifest: pd.DataFrame, staging: Path, dataset: DatasetConfig,
                          per_class: int) -> None:
    tile = max(dataset.resolution, 64)
    for class_name in dataset.classes:
        rows = manifest[manifest["label_name"] == class_name].head(per_class)
        title = f"{dataset.name} / {class_name}: {len(rows)} of " \
                f"{(manifest['label_name'] == class_name).sum()} images"
        sheet = contact_sheet([staging / p for p in rows["path"]], title, tile)
        save_png(staging / "contact_sheets" / f"{class_name}.png", sheet)


def read_ground_truth(path: str | Path) -> pd.DataFrame:
    """Read a generator's ``ground_truth.tsv`` with mask paths made openable from anywhere."""
    path = Path(path)
    table = pd.read_csv(path, sep="\t")
    missing = [c for c in ["source_path", *GROUND_TRUTH_COLUMNS] if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    table["mask_path"] = [str(path.parent / mask) for mask in table["mask_path"]]
    return table


def load_images(root: Path, paths: Sequence[str]) -> np.ndarray:
    """Images under ``root`` as one uint8 (N, 3, H, W) array; an unreadable file is named."""
    arrays = []
    for relative in paths:
        path = root / relative
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB")).transpose(2, 0, 1))
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot read image ({err})") from None
    if not arrays:
        return np.zeros((0, 3, 1, 1), np.uint8)
    return np.stack(arrays)


def load_split(manifest_path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images of one split as uint8 (N, 3, H, W) and their integer labels.

    Prepared datasets are small enough to hold in memory as uint8 (MHIST at 256 px: 0.4 GB),
    which keeps training free of loader processes and its sampling exactly reproducible.
    """
    manifest_path = Path(manifest_path)
    manifest = pd.read_csv(manifest_path, sep="\t", keep_default_na=False)
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise DataError(f"{manifest_path}: no images in split '{split}'")
    images = load_images(manifest_path.parent, rows["path"])
    return images, rows["label"].to_numpy(dtype=np.int64, copy=True)
