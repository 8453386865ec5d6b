"""What every dataset reader yields, and the checks the official layouts share.

A reader turns a download, exactly as it unpacks, into a :class:`Listing`: one
:class:`RawImage` per image (or patch) with its class, official split, group (patient, slide,
core) and any extra columns the official files carry. The data stage then reads, checks,
resizes and splits every dataset the same way, whatever its layout.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from cellflow.config import DatasetConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Raw data that cannot be prepared; the message names the dataset and the file or class."""


@dataclass(frozen=True)
class RawImage:
    """One image of a raw dataset, as its official files describe it.

    ``region`` (left, top, right, bottom, in source pixels) makes it a patch of a larger
    image; ``relative_path`` is then a virtual path that names the patch.
    """

    source_path: Path
    relative_path: str  # to the dataset root, '/'-separated: the stable identity of the image
    label_name: str
    official_split: str | None
    group: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    region: tuple[int, int, int, int] | None = None


@dataclass
class Listing:
    """A reader's answer: the images, and what it left out and why.

    ``listed`` counts the images the official files list per (split, class) before any
    configured filter (class selection, agreement, exclusions), to compare with the
    published numbers. ``notes`` are statements a user of the prepared data must know (what
    a label means, what was excluded); they go into ``source.json`` beside the manifest.
    """

    root: Path
    images: list[RawImage]
    ignored_files: list[tuple[Path, str]] = field(default_factory=list)  # with the reason
    notes: list[str] = field(default_factory=list)
    listed: Counter[tuple[str, str]] | None = None
    crop_transparent_border: bool = False
    files_read: list[Path] = field(default_factory=list)

    @property
    def has_official_split(self) -> bool:
        return any(raw.official_split is not None for raw in self.images)

    def listed_counts(self) -> Counter[tuple[str, str]]:
        if self.listed is not None:
            return self.listed
        return Counter((raw.official_split or "", raw.label_name) for raw in self.images)


@dataclass(frozen=True)
class DatasetKind:
    name: str
    summary: str
    # (dataset, root) -> every image with its class, official split, group and extra columns
    read: Callable[[DatasetConfig, Path], Listing]
    # the class names the layout defines, given the dataset's options; None: the config's own
    known_classes: Callable[[Mapping[str, Any]], tuple[str, ...]] | None = None
    # (root, options) -> the annotation files the reader needs (inputs of the data stage, so
    # that a changed label file prepares the dataset again)
    annotation_files: Callable[[Path, Mapping[str, Any]], list[Path]] = lambda root, _: []
    # published image counts by (split or '*', class or '*'), compared with the listing
    published: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # False: an unlabelled pool (pretraining, generator fitting), not a benchmark dataset
    labelled: bool = True
    # the manifest carries a pathologist's cellularity score (column `cellularity`), which the
    # cellularity validation measures against, as the synthetic kind's masks are
    cellularity_scores: bool = False
    # a cheaper listing for `cellflow doctor` where reading is slow (default: ``read``)
    survey: Callable[[DatasetConfig, Path], Listing] | None = None
    # (dataset name, its validated config entry) -> problems beyond the schema's, each
    # naming its key (default: configured classes the layout does not define)
    check: Callable[[str, Mapping[str, Any]], Iterator[str]] | None = None

    def config_problems(self, name: str, entry: Mapping[str, Any]) -> Iterator[str]:
        if self.check is not None:
            yield from self.check(name, entry)
        elif self.known_classes is not None:
            known = self.known_classes(entry.get("options", {}))
            for index, class_name in enumerate(entry.get("classes", [])):
                if class_name not in known:
                    yield (
                        f"datasets.{name}.classes[{index}]: '{class_name}' is not a class of "
                        f"kind {self.name} (its classes: {', '.join(known)})"
                    )

    def quick_listing(self, dataset: DatasetConfig, root: Path) -> Listing:
        return (self.survey or self.read)(dataset, root)


def require_file(path: Path, dataset: str, what: str) -> Path:
    """``path`` if it is a file; otherwise an error naming it and what it should hold."""
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            near = sorted(p.name for p in path.parent.iterdir())[:8]
            hint = f"; {path.parent} holds: {', '.join(near) or 'nothing'}"
        raise DataError(f"dataset '{dataset}': {what} {path} not found{hint}")
    return path


def require_folder(path: Path, dataset: str, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"dataset '{dataset}': {what} {path} does not exist or is not a folder")
    return path


def read_csv_with_header(
    path: Path, dataset: str, columns: Sequence[str], **options: Any
) -> pd.DataFrame:
    """A CSV whose header must hold ``columns``; a wrong header is an error naming them."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"dataset '{dataset}': {path}: cannot read it as CSV ({err})") from None
    table.columns = [str(column).strip() for column in table.columns]
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise DataError(
            f"dataset '{dataset}': {path}: header lacks column(s) "
            f"{', '.join(repr(c) for c in missing)}; it has {', '.join(map(repr, table.columns))}"
        )
    return table


def relative_to(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def missing_image(path: Path, where: str) -> tuple[Path, str]:
    """An exclusion for an annotation row whose image is not on disk."""
    return path, f"listed in {where} but not on disk"


def warn_left_out(dataset: str, kinds: Iterable[tuple[Sequence[tuple[Path, str]], str]]) -> None:
    """One warning per kind of exclusion, with its count and an example, instead of a line
    per file (a 100,000-image download may miss thousands)."""
    for excluded, what in kinds:
        if excluded:
            log.warning("dataset '%s': %d %s; left out (excluded.tsv), e.g. %s", dataset,
                        len(excluded), what, excluded[0][0])


def one_split_each(entries: Iterable[tuple[str, str, str]], dataset: str) -> None:
    """Refuse an image that two official splits list: ``entries`` are (image, split, where)."""
    first: dict[str, tuple[str, str]] = {}
    for image, split, where in entries:
        seen = first.setdefault(image, (split, where))
        if seen[0] != split:
            raise DataError(
                f"dataset '{dataset}': {image} is in two official splits: '{seen[0]}' "
                f"({seen[1]}) and '{split}' ({where})"
            )


def compare_with_published(
    listed: Counter[tuple[str, str]],
    published: Mapping[tuple[str, str], int],
    dataset: str,
    kind: str,
) -> list[str]:
    """Warnings for every published count (split, class or '*') the listing does not match."""
    warnings = []
    for (split, class_name), expected in published.items():
        found = sum(
            n
            for (s, c), n in listed.items()
            if (split == "*" or s == split) and (class_name == "*" or c == class_name)
        )
        if found != expected:
            where = (
                " ".join(
                    filter(
                        None,
                        [
                            f"split '{split}'" if split != "*" else "",
                            f"class '{class_name}'" if class_name != "*" else "",
                        ],
                    )
                )
                or "in total"
            )
            warnings.append(
                f"dataset '{dataset}' ({kind}): the official files list {found} images {where}, "
                f"the published count is {expected}; check that the download is complete"
            )
    for message in warnings:
        log.warning("%s", message)
    return warnings


def files_under(folder: Path, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """Image files directly in ``folder`` by name (hidden files left out)."""
    if not folder.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
    }
