"""Memorization and copy check: is a generated image (nearly) a copy of a training image?

A trajectory's early frames can come out as near-copies of their real source image, and a
generator can reproduce training images outright; neither shows in FID or in the classifier.
So every generated image gets its nearest real *training* image, in pixel space (mean squared
error on [0, 1] pixels) and in each given feature space (Euclidean distance), and a flag
saying whether that neighbour is the image's own source.

A distance alone does not say what "close" is for a dataset. The same search for the held-out
real *test* images gives the reference: the ratio ``d / median(d_test)`` is about 1 for an
image as new as an unseen real one, and far below 1 for a copy. An image is flagged when its
ratio is at most the ``quantile`` (5 %) of the real test images' ratios, that is, when it is as
close to the training set as only the closest 5 % of unseen real images are; a generator that
does not copy has about 5 % of its images flagged, one that copies many more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellflow import flags
from cellflow.data import load_images
from cellflow.io import read_table

if TYPE_CHECKING:  # the summary and the figures need no torch: they start faster
    import torch

    from cellflow.metrics import FeatureSpace

PIXEL = "pixel"  # the name of pixel space in column names, beside the feature spaces' names
DEFAULT_QUANTILE = 0.05
GENERATED_COLUMNS = ["method", "source_id", "frame_index", "path"]  # required of a manifest


def nearest_rows(queries: torch.Tensor, references: torch.Tensor, chunk_size: int = 256,
                 device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index of each query row's nearest reference row, and their squared Euclidean distance.

    Rows are compared ``chunk_size`` by ``chunk_size`` in float64 on ``device``, so memory stays
    bounded for 10k x 10k images of 256 px. Pixel rows hold integers (uint8), whose float64
    products and sums are exact: pixel distances are exact and chunking cannot change them.
    The distance of the chosen pair is recomputed directly, so identical rows are at exactly 0
    in any space. Ties go to the lowest reference index, whatever the chunking.
    """
    import torch

    if len(queries) == 0 or len(references) == 0:
        raise ValueError(f"nothing to search: {len(queries)} query and {len(references)} "
                         "reference rows")
    if queries.shape[1] != references.shape[1]:
        raise ValueError(f"query rows have {queries.shape[1]} values and reference rows "
                         f"{references.shape[1]}: not the same space (image size?)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    device = device or torch.device("cpu")
    indices, distances = [], []
    for first in range(0, len(queries), chunk_size):
        query = queries[first:first + chunk_size].to(device, torch.float64)
        query_norms = query.square().sum(1, keepdim=True)
        best = torch.full((len(query),), torch.inf, dtype=torch.float64, device=device)
        best_index = torch.zeros(len(query), dtype=torch.long, device=device)
        for start in range(0, len(references), chunk_size):
            reference = references[start:start + chunk_size].to(device, torch.float64)
            squared = query_norms + reference.square().sum(1) - 2 * query @ reference.T
            value, index = squared.min(dim=1)
            closer = value < best
            best = torch.where(closer, value, best)
            best_index = torch.where(closer, index + start, best_index)
        chosen = references[best_index.cpu()].to(device, torch.float64)
        indices.append(best_index.cpu())
        distances.append((query - chosen).square().sum(1).cpu())
    return torch.cat(indices).numpy(), torch.cat(distances).numpy()


def pixel_rows(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 3, H, W) images as uint8 (N, 3HW) rows; float64 only chunk by chunk."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).flatten(1)


def embed(images: np.ndarray, spaces: Sequence[FeatureSpace], device: torch.device | None
          ) -> dict[str, torch.Tensor]:
    """The rows to search in each space: pixels first, then each feature space's features."""
    clash = [space.name for space in spaces if space.name == PIXEL]
    if clash:
        raise ValueError(f"a feature space may not be called '{PIXEL}': that is pixel space")
    return {PIXEL: pixel_rows(images),
            **{space.name: space.features(images, device=device) for space in spaces}}


def neighbour_table(queries: Mapping[str, torch.Tensor], references: Mapping[str, torch.Tensor],
                    train: pd.DataFrame, chunk_size: int = 256,
                    device: torch.device | None = None) -> pd.DataFrame:
    """Nearest training image of every query row in every space, one group of columns a space.

    ``distance_pixel`` is the mean squared error on [0, 1] pixels (comparable across image
    sizes); ``distance_<feature space>`` is the Euclidean distance of the features.
    """
    columns: dict[str, np.ndarray] = {}
    for space, rows in queries.items():
        index, squared = nearest_rows(rows, references[space], chunk_size, device)
        nearest = train.iloc[index]
        columns[f"nearest_id_{space}"] = nearest["id"].to_numpy()
        columns[f"nearest_path_{space}"] = nearest["path"].to_numpy()
        columns[f"nearest_class_{space}"] = nearest["label_name"].to_numpy()
        columns[f"distance_{space}"] = (squared / (rows.shape[1] * 255.0 ** 2) if space == PIXEL
                                        else np.sqrt(squared))
    return pd.DataFrame(columns)


def table_spaces(table: pd.DataFrame) -> list[str]:
    """The spaces a neighbour table was searched in, from its ``distance_*`` columns."""
    return [column.removeprefix("distance_") for column in table.columns
            if column.startswith("distance_")]


def add_ratios(table: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """``ratio_<space>``: each distance over the median distance of the real test images."""
    ratios = {}
    for space in table_spaces(reference):
        median = float(np.median(reference[f"distance_{space}"]))
        if median == 0:
            raise ValueError(f"half or more of the real test images have an exact copy in the "
                             f"training split ({space} distance 0): no memorization reference")
        ratios[f"ratio_{space}"] = table[f"distance_{space}"].to_numpy() / median
    return table.assign(**ratios)


def source_flags(generated: pd.DataFrame, neighbours: pd.DataFrame, train_ids: set[str]
                 ) -> pd.DataFrame:
    """``has_source`` and, per space, ``nearest_is_source_<space>``.

    An image has a source when its ``source_id`` is a training image's id: Cellflow frames and
    DDIB images do; ADM's source ids name its own samples, and an empty cell names nothing.
    """
    source = generated["source_id"].astype(str).to_numpy()
    has_source = np.isin(source, list(train_ids))
    flags = {"has_source": has_source}
    for space in table_spaces(neighbours):
        flags[f"nearest_is_source_{space}"] = (
            has_source & (neighbours[f"nearest_id_{space}"].astype(str).to_numpy() == source))
    return pd.DataFrame(flags)


def nearest_real_neighbours(data_manifest: Path, generated_dir: Path,
                            spaces: Sequence[FeatureSpace] = (), chunk_size: int = 256,
                            device: torch.device | None = None
                            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Nearest training image of each generated image, and of each real test image.

    Returns the generated images' table (their manifest's columns; per space
    ``nearest_id_``, ``nearest_path_``, ``nearest_class_``, ``distance_``; ``has_source``; per
    space ``nearest_is_source_``; per space ``ratio_``) and the real test images' reference
    table (``method`` 'real', ``id``, ``path``, ``label_name``, the same neighbour and
    ``distance_`` columns, then ``ratio_``). Paths of neighbours are relative to the data
    manifest's folder, generated paths to ``generated_dir``.
    """
    data = read_table(data_manifest).astype({"id": str})
    train = data[data["split"] == "train"].reset_index(drop=True)
    test = data[data["split"] == "test"].reset_index(drop=True)
    generated_manifest = Path(generated_dir) / "manifest.tsv"
    generated = read_table(generated_manifest)
    missing = [column for column in GENERATED_COLUMNS if column not in generated.columns]
    if missing:
        raise ValueError(f"{generated_manifest} lacks column(s) {', '.join(missing)}")
    for name, rows in (("training", train), ("test", test)):
        if rows.empty:
            raise ValueError(f"{data_manifest}: no {name} images to compare with")
    if generated.empty:
        raise ValueError(f"{generated_manifest}: no generated images")
    root = Path(data_manifest).parent
    train_rows = embed(load_images(root, train["path"]), spaces, device)
    reference = neighbour_table(embed(load_images(root, test["path"]), spaces, device),
                                train_rows, train, chunk_size, device)
    labels = test[["id", "path", "label_name"]]
    reference = pd.concat([labels.assign(method="real")[["method", *labels.columns]],
                           reference], axis=1)
    reference = add_ratios(reference, reference)
    found = neighbour_table(embed(load_images(Path(generated_dir), generated["path"]), spaces,
                                  device), train_rows, train, chunk_size, device)
    table = pd.concat([generated.reset_index(drop=True), found,
                       source_flags(generated, found, set(train["id"]))], axis=1)
    return add_ratios(table, reference), reference


def thresholds(reference: pd.DataFrame, quantile: float = DEFAULT_QUANTILE) -> dict[str, float]:
    """Per space, the ``quantile`` of the real test images' ratios: the copy threshold."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be between 0 and 1, got {quantile}")
    return {space: float(np.quantile(reference[f"ratio_{space}"], quantile))
            for space in table_spaces(reference)}


def _summary_row(method: str, frame: object, rows: pd.DataFrame,
                 limits: Mapping[str, float]) -> dict[str, object]:
    with_source = (rows["has_source"].to_numpy(bool) if "has_source" in rows
                   else np.zeros(len(rows), bool))
    row: dict[str, object] = {"method": method, "frame_index": frame, "n_images": len(rows),
                              "n_with_source": int(with_source.sum())}
    for space, limit in limits.items():
        ratio = rows[f"ratio_{space}"].to_numpy(float)
        own = f"nearest_is_source_{space}"
        row.update({
            f"median_distance_{space}": float(np.median(rows[f"distance_{space}"])),
            f"median_ratio_{space}": float(np.median(ratio)),
            f"threshold_ratio_{space}": limit,
            f"share_below_threshold_{space}": float(np.mean(ratio <= limit)),
            f"share_own_source_{space}": (float(np.mean(rows.loc[with_source, own]))
                                          if with_source.any() else float("nan")),
        })
    return row


def memorization_summary(neighbours: pd.DataFrame, reference: pd.DataFrame,
                         quantile: float = DEFAULT_QUANTILE) -> pd.DataFrame:
    """Per method (all frames, then each frame of trajectory methods), after the real test row.

    Columns: ``method``, ``frame_index`` ('all' or the frame), ``n_images``, ``n_with_source``
    and per space ``median_distance_``, ``median_ratio_``, ``threshold_ratio_`` (the
    ``quantile`` of the real test ratios), ``share_below_threshold_`` (ratio at most the
    threshold: about ``quantile`` for the real test row by construction) and
    ``share_own_source_`` (of the images with a source; empty where none has one). Frames are
    summarised one by one because copies happen in a trajectory's first frames.
    """
    limits = thresholds(reference, quantile)
    groups: list[tuple[str, object, pd.DataFrame]] = [("real", "all", reference)]
    for method, rows in neighbours.groupby("method", sort=False):
        groups.append((str(method), "all", rows))
        if rows["frame_index"].nunique() > 1:
            groups += [(str(method), frame, part)
                       for frame, part in rows.groupby("frame_index", sort=True)]
    return pd.DataFrame([_summary_row(method, frame, rows, limits)
                         for method, frame, rows in groups])


def flag_summary(summary: pd.DataFrame, where: str, quantile: float = DEFAULT_QUANTILE
                 ) -> pd.DataFrame:
    """``summary`` with a ``flags`` column: the rows whose images are mostly copies (pixel
    ratio at most the threshold) or nearest to their own source; each flag is logged."""
    found = []
    for _, row in summary.iterrows():
        what = (f"{row['method']} images" if row["frame_index"] == "all"
                else f"{row['method']} frame {row['frame_index']}")
        row_flags = flags.memorization_flags(row.get("share_below_threshold_pixel", np.nan),
                                             row.get("share_own_source_pixel", np.nan),
                                             quantile, what)
        flags.warn(row_flags, where)
        found.append(flags.codes(row_flags))
    return summary.assign(flags=found)
