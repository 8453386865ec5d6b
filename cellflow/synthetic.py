"""Synthetic H&E-like tiles with exact ground truth, ordered along a continuous disease progression.

This is the demo dataset and the test fixture of the whole pipeline: every tile carries a known
instance mask, nuclei count, nuclear area fraction and progression value, so downstream steps can
be checked against known answers instead of against eyeballed real slides.

Biology: a class is a band of a progression value p in [0, 1] (e.g. normal -> hyperplastic ->
neoplastic). With rising p, nuclei become more numerous, larger, more variable in size and shape,
darker (hyperchromatic), lose their basal alignment in the glands, and the glands lose their lumen.

Physics: per-pixel hematoxylin and eosin concentrations are converted to RGB with the Beer-Lambert
law and the Ruifrok-Johnston stain vectors of ``skimage.color`` (``hed2rgb``), so colour
deconvolution with ``skimage.color.rgb2hed`` recovers the hematoxylin channel.

All lengths are defined for a 256 px tile and scaled to the requested size: a tile always shows the
same field of view, only the resolution changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
from scipy import fft, ndimage
from scipy.special import expit, ndtri
from skimage.color import hed2rgb
from tqdm import tqdm

from cellflow.io import save_png, write_table

__all__ = ["SyntheticTile", "generate_dataset", "progression_band", "render_tile"]

_REFERENCE_SIZE: Final = 256
_MIN_SIZE: Final = 16
# The semi-minor axis never drops below this many rendered pixels, so that tiny nuclei stay visible.
_MIN_SEMI_MINOR_PX: Final = 1.5
# Upper bound on the summed harmonic amplitudes of a nucleus outline (relative to its radius).
_MAX_IRREGULARITY: Final = 0.3
# Minimum centre distance as a fraction of the summed outer radii of two nuclei. With the two
# bounds above it guarantees that the pixel nearest to each centre (<= 0.71 px away) belongs to that
# nucleus: there its normalised radius is <= 0.71 / (1.5 * (1 - 0.3)) < 0.68, while a neighbour's
# is > 0.75, because 0.75 * 1.5 px > 0.71 px (see _rasterise_nuclei).
_SEPARATION: Final = 0.75
_CANDIDATES_PER_NUCLEUS: Final = 48
_TABLE_COLUMNS: Final = (
    "source_path",
    "label_name",
    "progression",
    "nuclei_count",
    "nuclear_area_fraction",
    "mask_path",
)


@dataclass(frozen=True)
class SyntheticTile:
    """One rendered tile with its exact ground truth."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    nuclei_mask: np.ndarray  # (H, W) uint16 instance labels 1..n, 0 = background
    progression: float  # in [0, 1]
    nuclei_count: int  # number of distinct labels > 0 in nuclei_mask
    nuclear_area_fraction: float  # mean(nuclei_mask > 0)


@dataclass(frozen=True)
class _Stage:
    """Tissue parameters at one progression value; lengths are fractions of the tile size."""

    mean_nuclei: float
    stromal_share: float
    radius: float
    radius_cv: float
    irregularity: float
    hematoxylin: float
    hematoxylin_cv: float
    chromatin: float
    polarity: float
    lumen_fraction: float
    epithelium_width: float

    @classmethod
    def at(cls, p: float) -> _Stage:
        def lerp(start: float, end: float) -> float:
            return start + (end - start) * p

        return cls(
            mean_nuclei=lerp(24.0, 60.0),
            stromal_share=lerp(0.35, 0.12),
            radius=lerp(0.023, 0.034),
            radius_cv=lerp(0.08, 0.32),
            irregularity=lerp(0.04, 0.24),
            hematoxylin=lerp(0.085, 0.15),
            hematoxylin_cv=lerp(0.08, 0.22),
            chromatin=lerp(0.12, 0.35),
            polarity=lerp(0.85, 0.0),
            lumen_fraction=lerp(0.14, 0.03),
            epithelium_width=lerp(0.7, 1.5),
        )


@dataclass(frozen=True)
class _Nuclei:
    """Geometry and stain of the nuclei, in rendered pixels, in placement (= label) order."""

    centres: np.ndarray  # (n, 2) row, col
    semi_major: np.ndarray
    semi_minor: np.ndarray
    angle: np.ndarray
    amplitudes: np.ndarray  # (n, 3) outline harmonics k = 2, 3, 4
    phases: np.ndarray  # (n, 3)
    hematoxylin: np.ndarray


def progression_band(class_index: int, num_classes: int) -> tuple[float, float]:
    """Class i of C covers [i/C, (i+1)/C): equal bands tile the progression axis without gaps."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0 <= class_index < num_classes:
        raise ValueError(f"class_index must be in [0, {num_classes}), got {class_index}")
    return class_index / num_classes, (class_index + 1) / num_classes


def render_tile(progression: float, size: int, rng: np.random.Generator) -> SyntheticTile:
    """Render one square H&E-like tile at a progression value, with its instance mask.

    All randomness comes from ``rng``, so a seeded generator reproduces the tile exactly.
    """
    if not 0.0 <= progression <= 1.0:
        raise ValueError(f"progression must be in [0, 1], got {progression}")
    if size < _MIN_SIZE:
        raise ValueError(f"size must be >= {_MIN_SIZE} px, got {size}")
    stage = _Stage.at(progression)
    scale = size / _REFERENCE_SIZE

    lumen, epithelium, basal = _architecture(stage, size, rng)
    stroma = np.clip(1.0 - lumen - epithelium, 0.0, 1.0)
    fibres, fibre_angle = _fibres(size, scale, rng)
    fine = _smooth_noise(rng, size, max(0.5, 0.8 * scale))

    eosin_level = rng.uniform(0.022, 0.032)  # staining batch variation
    eosin = eosin_level * (
        stroma * (0.5 + 0.75 * fibres) + epithelium * 0.7 * (1.0 + 0.08 * fine) + lumen * 0.05
    )
    hematoxylin = 0.004 + 0.004 * stroma + 0.014 * epithelium

    epithelial_weight = epithelium * ((1.0 - stage.polarity) + stage.polarity * basal)
    nuclei = _sample_nuclei(stage, size, scale, fibre_angle, epithelial_weight, stroma, rng)
    labels, score = _rasterise_nuclei(nuclei, size)
    inside = labels > 0
    # Darker rim (nuclear membrane) and clumped chromatin, stronger with progression.
    chromatin = np.clip(1.0 + stage.chromatin * fine, 0.3, None)
    nuclear_h = nuclei.hematoxylin[labels[inside] - 1] * (0.8 + 0.35 * score[inside] ** 2)
    hematoxylin[inside] = nuclear_h * chromatin[inside]
    eosin[inside] *= 0.4

    # Optical blur, then per-pixel stain and sensor noise.
    stains = np.stack([hematoxylin, eosin, np.zeros_like(eosin)], axis=-1)
    stains[..., :2] = ndimage.gaussian_filter(stains[..., :2], sigma=(0.5, 0.5, 0.0))
    stains[..., :2] *= 1.0 + 0.03 * rng.standard_normal((size, size, 2), dtype=np.float32)
    rgb = hed2rgb(np.clip(stains, 0.0, None))
    rgb += rng.normal(0.0, 1.2 / 255.0, rgb.shape)
    image = np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)

    return SyntheticTile(
        image=image,
        nuclei_mask=labels,
        progression=float(progression),
        nuclei_count=int(np.count_nonzero(np.bincount(labels.ravel())[1:])),
        nuclear_area_fraction=float(inside.mean()),
    )


def generate_dataset(
    out_dir: Path,
    class_names: Sequence[str],
    images_per_class: int,
    size: int,
    seed: int,
) -> pd.DataFrame:
    """Write a class-folder dataset of synthetic tiles, masks and a ground-truth table.

    Layout: ``images/<class>/<class>_<NNNN>.png``, ``masks/<class>_<NNNN>.png`` (uint16 labels) and
    ``ground_truth.tsv``; class i gets progressions drawn uniformly inside ``progression_band``.
    Image j of class i uses its own generator from ``SeedSequence(seed, spawn_key=(i, j))``, so
    changing ``images_per_class`` leaves the earlier images byte-identical.
    """
    if isinstance(class_names, str):
        raise ValueError("class_names must be a sequence of names, not a single string")
    names = list(class_names)
    if len(names) < 2:
        raise ValueError(f"class_names must contain at least 2 classes, got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names}")
    for name in names:
        if not name or name in {".", ".."} or "/" in name or "\\" in name:
            raise ValueError(f"class_names entries must be plain folder names, got {name!r}")
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    if size < _MIN_SIZE:
        raise ValueError(f"size must be >= {_MIN_SIZE} px, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")

    out_dir = Path(out_dir)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    with tqdm(total=len(names) * images_per_class, desc="synthetic tiles", unit="tile") as bar:
        for class_index, name in enumerate(names):
            low, high = progression_band(class_index, len(names))
            (out_dir / "images" / name).mkdir(parents=True, exist_ok=True)
            for image_index in range(images_per_class):
                sequence = np.random.SeedSequence(seed, spawn_key=(class_index, image_index))
                rng = np.random.default_rng(sequence)
                tile = render_tile(low + (high - low) * rng.random(), size, rng)
                stem = f"{name}_{image_index:04d}"
                source_path = f"{name}/{stem}.png"
                mask_path = f"masks/{stem}.png"
                save_png(out_dir / "images" / source_path, tile.image)
                save_png(out_dir / mask_path, tile.nuclei_mask)
                rows.append(
                    {
                        "source_path": source_path,
                        "label_name": name,
                        "progression": tile.progression,
                        "nuclei_count": tile.nuclei_count,
                        "nuclear_area_fraction": tile.nuclear_area_fraction,
                        "mask_path": mask_path,
                    }
                )
                bar.update()

    table = pd.DataFrame(rows, columns=list(_TABLE_COLUMNS))
    write_table(out_dir / "ground_truth.tsv", table)
    return table


def _smooth_noise(
    rng: np.random.Generator, size: int, sigma: float | tuple[float, float]
) -> np.ndarray:
    """Gaussian-smoothed white noise, rescaled to zero mean and unit variance.

    Smoothing happens in Fourier space, so the cost does not grow with sigma (which scales with the
    tile size) and the field is periodic: it can be sampled with wrap-around without seams.
    """
    noise = rng.standard_normal((size, size), dtype=np.float32)
    spectrum = ndimage.fourier_gaussian(fft.rfft2(noise), sigma, n=size)
    field = fft.irfft2(spectrum, s=(size, size))
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _architecture(
    stage: _Stage, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft lumen, epithelium and basal-layer maps from one smooth random field.

    Thresholding the field gives gland-like lumens ringed by epithelium; the basal map peaks at the
    epithelium's outer (stromal) border, where normal nuclei line up.
    """
    field = _smooth_noise(rng, size, 0.09 * size)
    lumen_edge = float(ndtri(1.0 - stage.lumen_fraction))
    basal_edge = lumen_edge - stage.epithelium_width
    lumen = expit((field - lumen_edge) / 0.06)
    epithelium = expit((field - basal_edge) / 0.06) * (1.0 - lumen)
    basal = np.exp(-(((field - basal_edge) / (0.3 * stage.epithelium_width)) ** 2))
    return lumen, epithelium, basal


def _fibres(size: int, scale: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Wavy collagen streaks in [0, 1] at a random orientation, and that orientation (radians).

    Periodic noise smoothed much more along one axis gives streaks; sampling it with wrap-around
    on a rotated, smoothly displaced grid orients them and makes them wave.
    """
    streaks = _smooth_noise(rng, size, (max(0.5, 1.2 * scale), 12.0 * scale))
    angle = float(rng.uniform(0.0, math.pi))
    wave = 6.0 * scale * _smooth_noise(rng, size, 0.12 * size)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2.0
    cos, sin = math.cos(angle), math.sin(angle)
    along = cols * cos + rows * sin
    across = -cols * sin + rows * cos + wave
    sampled = ndimage.map_coordinates(streaks, [across, along], order=1, mode="grid-wrap")
    return 0.5 + 0.5 * np.tanh(1.2 * sampled), angle


def _sample_nuclei(
    stage: _Stage,
    size: int,
    scale: float,
    fibre_angle: float,
    epithelial_weight: np.ndarray,
    stromal_weight: np.ndarray,
    rng: np.random.Generator,
) -> _Nuclei:
    """Draw epithelial and stromal (spindle) nuclei and place them without heavy overlap."""
    count = int(rng.poisson(stage.mean_nuclei))
    stromal = rng.random(count) < stage.stromal_share

    radius = (
        np.where(
            stromal,
            0.018 * rng.lognormal(0.0, 0.1, count),
            stage.radius * rng.lognormal(0.0, stage.radius_cv, count),
        )
        * size
    )
    aspect = np.where(
        stromal, rng.uniform(2.2, 3.5, count), 1.0 + np.abs(rng.normal(0.0, 0.25, count))
    )
    semi_minor = np.maximum(radius / np.sqrt(aspect), _MIN_SEMI_MINOR_PX)
    semi_major = np.maximum(radius * np.sqrt(aspect), semi_minor)
    angle = np.where(
        stromal, fibre_angle + rng.normal(0.0, 0.25, count), rng.uniform(0.0, math.pi, count)
    )
    irregularity = np.minimum(
        np.where(stromal, 0.05, stage.irregularity) * rng.gamma(4.0, 0.25, count),
        _MAX_IRREGULARITY,
    )
    amplitudes = irregularity[:, None] * rng.dirichlet([2.0, 1.5, 1.0], count)
    phases = rng.uniform(0.0, 2.0 * math.pi, (count, 3))
    hematoxylin = np.where(
        stromal,
        0.11 * rng.lognormal(0.0, 0.08, count),
        stage.hematoxylin * rng.lognormal(0.0, stage.hematoxylin_cv, count),
    )

    outer_radius = semi_major * (1.0 + amplitudes.sum(axis=1))
    weights = np.stack([epithelial_weight, stromal_weight])
    order, centres = _place(outer_radius, weights, stromal.astype(np.intp), size, rng)
    return _Nuclei(
        centres=centres,
        semi_major=semi_major[order],
        semi_minor=semi_minor[order],
        angle=angle[order],
        amplitudes=amplitudes[order],
        phases=phases[order],
        hematoxylin=hematoxylin[order],
    )


def _place(
    outer_radius: np.ndarray,
    weights: np.ndarray,
    kind: np.ndarray,
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Rejection sampling of centres, largest nuclei first; nuclei that find no room are dropped.

    A candidate is kept with probability ``weights[kind]`` at its pixel (so nuclei follow the
    tissue architecture) and only if it is at least ``_SEPARATION`` times the summed outer radii
    away from every placed centre. Centres lie inside the tile, so each keeps its centre pixel.
    Returns the indices of the placed nuclei in placement order and their (row, col) centres.
    """
    count = len(outer_radius)
    by_size = np.argsort(-outer_radius, kind="stable")
    candidates = rng.random((count, _CANDIDATES_PER_NUCLEUS, 2)) * (size - 1)
    pixels = np.rint(candidates).astype(np.intp)
    fits_tissue = (
        rng.random((count, _CANDIDATES_PER_NUCLEUS))
        < weights[kind[by_size, None], pixels[..., 0], pixels[..., 1]]
    )
    placed = np.empty(count, dtype=np.intp)
    centres = np.empty((count, 2))
    radii = np.empty(count)
    placed_count = 0
    for index, options, fits in zip(by_size, candidates, fits_tissue, strict=True):
        options = options[fits]
        gap = options[:, None, :] - centres[None, :placed_count, :]
        minimum = _SEPARATION * (outer_radius[index] + radii[:placed_count])
        free = np.flatnonzero(((gap**2).sum(axis=-1) >= minimum**2).all(axis=1))
        if free.size:
            placed[placed_count] = index
            centres[placed_count] = options[free[0]]
            radii[placed_count] = outer_radius[index]
            placed_count += 1
    return placed[:placed_count], centres[:placed_count]


def _rasterise_nuclei(nuclei: _Nuclei, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels (1..n in placement order) and normalised radius of irregular ellipses.

    All nuclei are evaluated at once on equal square windows around their centres. A pixel claimed
    by several nuclei goes to the one in whose outline it lies deepest (smallest normalised radius).
    """
    labels = np.zeros((size, size), dtype=np.uint16)
    score = np.zeros((size, size), dtype=np.float32)
    count = len(nuclei.centres)
    if count == 0:
        return labels, score
    outer = nuclei.semi_major * (1.0 + nuclei.amplitudes.sum(axis=1))
    half = math.ceil(float(outer.max()))
    offsets = np.arange(-half, half + 1)
    rows = np.rint(nuclei.centres[:, 0]).astype(np.intp)[:, None] + offsets  # (n, w)
    cols = np.rint(nuclei.centres[:, 1]).astype(np.intp)[:, None] + offsets
    dy = (rows - nuclei.centres[:, :1])[:, :, None]  # (n, w, 1)
    dx = (cols - nuclei.centres[:, 1:])[:, None, :]  # (n, 1, w)
    cos = np.cos(nuclei.angle)[:, None, None]
    sin = np.sin(nuclei.angle)[:, None, None]
    u = (dx * cos + dy * sin) / nuclei.semi_major[:, None, None]
    v = (dy * cos - dx * sin) / nuclei.semi_minor[:, None, None]
    polar = np.arctan2(v, u)
    outline = np.ones_like(polar)
    for harmonic in range(3):
        outline += nuclei.amplitudes[:, harmonic, None, None] * np.cos(
            (harmonic + 2) * polar + nuclei.phases[:, harmonic, None, None]
        )
    depth = np.hypot(u, v) / outline
    valid = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    inside = (depth < 1.0) & valid

    pixel = (rows[:, :, None] * size + cols[:, None, :])[inside]
    depth = depth[inside]
    label = np.broadcast_to(np.arange(1, count + 1)[:, None, None], inside.shape)[inside]
    order = np.lexsort((depth, pixel))
    pixel, depth, label = pixel[order], depth[order], label[order]
    first = np.ones(pixel.shape, dtype=bool)
    first[1:] = pixel[1:] != pixel[:-1]
    labels.ravel()[pixel[first]] = label[first]
    score.ravel()[pixel[first]] = depth[first]
    return labels, score
