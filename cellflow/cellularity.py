"""Cellularity of H&E tiles from a classical nuclei segmentation.

Nuclei are where hematoxylin is. Colour deconvolution (``skimage.color.rgb2hed``, with the
Ruifrok-Johnston stain vectors the synthetic generator renders with) separates the hematoxylin
optical density from eosin, so the pink of cytoplasm and stroma does not count as nuclear.
The hematoxylin channel is lightly smoothed against sensor and chromatin noise and thresholded at
Otsu's level, but never below an absolute optical-density floor: Otsu always splits a histogram in
two, so on a tile without nuclei it would cut the background noise into a flood of false nuclei,
while the floor keeps such a tile empty. Specks are removed and holes (pale nuclear centres)
filled. Touching nuclei form one connected blob; a watershed on the distance transform, seeded at
its maxima, cuts a blob at its waists, which are where two convex nuclei meet. The distance
transform is quantised to whole pixels, so on a nucleus two or three pixels wide (the demo
resolution) it is flat; a hematoxylin term worth at most ``stain_tiebreak`` px decides there where
the centres are, and is negligible beside the distances of larger nuclei. This relief is smoothed
before seeding, so that the ridge of an elongated nucleus gives one seed rather than a row of them.

A tile always shows the same field of view whatever its resolution, so every length and area of
``CellularityConfig`` (except ``stain_tiebreak``) is given for a ``reference_size`` px tile (256,
as in ``cellflow.synthetic``) and scaled to the image: the same defaults serve 32 px and 256 px.

Per image this gives the nuclei count, the nuclear area fraction (nuclear pixels / all pixels)
and the mean nuclear area in pixels. ``validate_against_ground_truth`` compares them with the
instance masks of a prepared synthetic dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage, stats
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.morphology import area_closing, area_opening
from skimage.segmentation import watershed
from tqdm import tqdm

from cellflow.data import to_rgb

__all__ = [
    "MEASURES",
    "CellularityConfig",
    "measure_cellularity",
    "measure_images",
    "segment_nuclei",
    "validate_against_ground_truth",
]

MEASURES = ("nuclei_count", "nuclear_area_fraction", "mean_nuclear_area")
_GROUND_TRUTH_COLUMNS = ("path", "nuclei_count", "nuclear_area_fraction", "mask_path")
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class CellularityConfig:
    """Segmentation parameters.

    Lengths (px) and areas (px²) are those of a ``reference_size`` px tile and scale with the
    image: ``smoothing_sigma`` (of the hematoxylin channel), ``min_nucleus_area`` (smaller specks
    are dropped), ``max_hole_area`` (smaller holes are filled), ``distance_sigma`` (of the
    relief that seeds the watershed) and ``peak_min_distance`` (between two seeds).
    """

    reference_size: int = 256
    smoothing_sigma: float = 1.0
    # Hematoxylin optical density in rgb2hed units. The synthetic tiles' cytoplasm and stroma
    # stay near 0.02 or below, their nuclei lie at about 0.06 to 0.2.
    threshold_floor: float = 0.04
    min_nucleus_area: float = 20.0
    max_hole_area: float = 30.0
    distance_sigma: float = 2.0
    peak_min_distance: float = 4.0
    # In pixels of the image itself, not of the reference tile: up to one pixel, the step of the
    # distance transform at any resolution, the stain term breaks its ties but cannot overrule it.
    stain_tiebreak: float = 1.0

    def __post_init__(self) -> None:
        if self.reference_size < 1:
            raise ValueError(f"reference_size must be >= 1, got {self.reference_size}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, Real) or value < 0:
                raise ValueError(f"{field.name} must be a number >= 0, got {value!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CellularityConfig:
        """Build from a mapping of field names; an unknown key is an error, not ignored."""
        known = [field.name for field in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                raise ValueError(
                    f"unknown cellularity parameter '{key}' (known: {', '.join(known)})")
        return cls(**d)


def segment_nuclei(
    image: np.ndarray, config: CellularityConfig = CellularityConfig()
) -> np.ndarray:
    """Instance labels (int32, 0 = background, 1..n = nuclei) of a uint8 RGB (H, W, 3) H&E image."""
    _check_rgb(image)
    scale = math.sqrt(image.shape[0] * image.shape[1]) / config.reference_size
    hematoxylin = rgb2hed(image)[..., 0]
    if config.smoothing_sigma > 0:
        hematoxylin = gaussian(hematoxylin, sigma=config.smoothing_sigma * scale)
    nuclear = hematoxylin > max(config.threshold_floor, float(threshold_otsu(hematoxylin)))
    # area_opening / area_closing rather than remove_small_objects / remove_small_holes: their
    # size argument means the same in every scikit-image release the project allows.
    nuclear = area_opening(nuclear, area_threshold=math.ceil(config.min_nucleus_area * scale**2))
    nuclear = area_closing(nuclear, area_threshold=math.ceil(config.max_hole_area * scale**2))
    if not nuclear.any():
        return np.zeros(nuclear.shape, dtype=np.int32)

    relief = (ndimage.distance_transform_edt(nuclear)
              + config.stain_tiebreak * hematoxylin / hematoxylin.max())
    if config.distance_sigma > 0:
        relief = gaussian(relief, sigma=config.distance_sigma * scale)
    blobs, _ = ndimage.label(nuclear)
    # Seeds are sought per blob, so that a blob too small for min_distance still gets one; and
    # nuclei cut by the tile edge are nuclei too, hence no border exclusion.
    peaks = peak_local_max(
        relief,
        min_distance=max(1, round(config.peak_min_distance * scale)),
        labels=blobs,
        exclude_border=False,
    )
    markers = np.zeros(nuclear.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return watershed(-relief, markers, mask=nuclear).astype(np.int32)


def measure_cellularity(
    image: np.ndarray, config: CellularityConfig = CellularityConfig()
) -> dict[str, float]:
    """Nuclei count, nuclear area fraction and mean nuclear area (px; 0 without nuclei)."""
    labels = segment_nuclei(image, config)
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    return {
        "nuclei_count": float(len(areas)),
        "nuclear_area_fraction": float(np.count_nonzero(labels) / labels.size),
        "mean_nuclear_area": float(areas.mean()) if len(areas) else 0.0,
    }


def _measure_file(path: Path, config: CellularityConfig) -> dict[str, Any]:
    return {"path": str(path), **measure_cellularity(_read_rgb(Path(path)), config)}


def measure_images(
    paths: Sequence[Path],
    config: CellularityConfig = CellularityConfig(),
    progress_desc: str | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """One row per image file, in the order given: ``path`` and the measures.

    ``workers`` > 1 spreads the images over that many processes (the segmentation is
    single-threaded Python and NumPy). ``progress_desc`` labels a progress bar; without it none
    is shown. The bar's refresh interval comes from tqdm's ``TQDM_MININTERVAL`` variable, which
    ``cellflow.logs`` sets for jobs that log to a file.
    """
    bar = {"total": len(paths), "desc": progress_desc, "unit": "img",
           "disable": progress_desc is None}
    measure = functools.partial(_measure_file, config=config)
    if workers > 1 and len(paths) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            chunk = max(1, len(paths) // (8 * workers))
            rows = list(tqdm(pool.map(measure, paths, chunksize=chunk), **bar))
    else:
        rows = [measure(path) for path in tqdm(paths, **bar)]
    return pd.DataFrame(rows, columns=["path", *MEASURES])


def validate_against_ground_truth(
    manifest: pd.DataFrame, data_dir: Path, config: CellularityConfig = CellularityConfig(),
    workers: int = 1,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Compare the measures with the instance masks of a prepared synthetic dataset.

    ``manifest`` is a prepared manifest with ground truth, its paths relative to ``data_dir``.
    ``true_nuclei_count`` counts the labels left in the mask at the prepared resolution, where a
    nucleus smaller than a pixel can vanish; ``true_nuclei_count_raw`` is the generator's count
    at its own resolution. The summary holds Spearman and Pearson correlations of estimated and
    true values and the mean absolute and relative (to the true count) count errors.
    """
    missing = [column for column in _GROUND_TRUTH_COLUMNS if column not in manifest.columns]
    if missing:
        raise ValueError(
            f"manifest lacks the ground-truth column(s) {', '.join(missing)}; only a synthetic "
            "dataset prepared with its generator's ground truth can be validated")
    if manifest.empty:
        raise ValueError("manifest has no images to validate")
    data_dir = Path(data_dir)
    measured = measure_images([data_dir / path for path in manifest["path"]], config,
                              progress_desc="cellularity validation", workers=workers)
    context = [column for column in ("label_name", "split") if column in manifest.columns]
    table = manifest[["path", *context]].reset_index(drop=True).assign(
        nuclei_count=measured["nuclei_count"].to_numpy(),
        true_nuclei_count=[_count_labels(data_dir / mask) for mask in manifest["mask_path"]],
        true_nuclei_count_raw=manifest["nuclei_count"].to_numpy(),
        nuclear_area_fraction=measured["nuclear_area_fraction"].to_numpy(),
        true_nuclear_area_fraction=manifest["nuclear_area_fraction"].to_numpy(),
        mean_nuclear_area=measured["mean_nuclear_area"].to_numpy(),
    )
    count, true_count = table["nuclei_count"], table["true_nuclei_count"]
    fraction, true_fraction = table["nuclear_area_fraction"], table["true_nuclear_area_fraction"]
    error = (count - true_count).abs()
    has_nuclei = true_count > 0
    summary = {
        "images": len(table),
        "spearman_count": float(stats.spearmanr(count, true_count).statistic),
        "spearman_count_raw": float(
            stats.spearmanr(count, table["true_nuclei_count_raw"]).statistic),
        "spearman_area_fraction": float(stats.spearmanr(fraction, true_fraction).statistic),
        "pearson_count": float(stats.pearsonr(count, true_count).statistic),
        "pearson_area_fraction": float(stats.pearsonr(fraction, true_fraction).statistic),
        "mean_absolute_count_error": float(error.mean()),
        "mean_relative_count_error": (
            float((error[has_nuclei] / true_count[has_nuclei]).mean())
            if has_nuclei.any() else math.nan),
    }
    return table, summary


SCORE_COLUMN = "cellularity"


def validate_against_scores(
    manifest: pd.DataFrame, data_dir: Path, config: CellularityConfig = CellularityConfig(),
    workers: int = 1,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Compare the measures with a pathologist's cellularity score (BreastPathQ's ``y``, the
    share of the patch that is tumour cells), the real-data counterpart of the synthetic
    validation. The score counts tumour cellularity only, so a rank correlation is the fair
    summary: the measures count every nucleus, lymphocytes and stroma included.
    """
    if SCORE_COLUMN not in manifest.columns:
        raise ValueError(f"manifest lacks the '{SCORE_COLUMN}' score column (BreastPathQ's)")
    scored = manifest[pd.to_numeric(manifest[SCORE_COLUMN], errors="coerce").notna()]
    if scored.empty:
        raise ValueError("manifest has no image with a cellularity score")
    data_dir = Path(data_dir)
    measured = measure_images([data_dir / path for path in scored["path"]], config,
                              progress_desc="cellularity vs score", workers=workers)
    score = pd.to_numeric(scored[SCORE_COLUMN]).to_numpy()
    table = scored[["path", "label_name", "split"]].reset_index(drop=True).assign(
        score=score,
        nuclei_count=measured["nuclei_count"].to_numpy(),
        nuclear_area_fraction=measured["nuclear_area_fraction"].to_numpy(),
    )
    summary = {"images": len(table)}
    for measure in ("nuclei_count", "nuclear_area_fraction"):
        summary[f"spearman_{measure}_vs_score"] = float(
            stats.spearmanr(table[measure], score).statistic)
        summary[f"pearson_{measure}_vs_score"] = float(
            stats.pearsonr(table[measure], score).statistic)
    return table, summary


def _check_rgb(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected an RGB H&E image as a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[-1] != 3:
        hint = " (grayscale has no stain colours to separate)" if image.ndim == 2 else ""
        raise ValueError(
            f"expected an RGB H&E image of shape (H, W, 3), got shape {image.shape}{hint}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected an RGB H&E image of dtype uint8, got dtype {image.dtype}")


def _read_rgb(path: Path) -> np.ndarray:
    image = _load(path, "image")
    # Prepared data is always RGB, so a grayscale file here did not come from the data stage;
    # converting it would measure an image without stain colours as if it had them.
    if Image.getmodebase(image.mode) == "L":
        raise ValueError(f"{path}: expected an RGB H&E image, got a grayscale ({image.mode}) one")
    return np.asarray(to_rgb(image)[0])


def _count_labels(mask_path: Path) -> int:
    return int(np.count_nonzero(np.unique(np.asarray(_load(mask_path, "nuclei mask")))))


def _load(path: Path, what: str) -> Image.Image:
    """Open and decode an image file, or raise a ValueError that names it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except _UNREADABLE as err:
        raise ValueError(f"{path}: cannot read the {what}: {err}") from err
