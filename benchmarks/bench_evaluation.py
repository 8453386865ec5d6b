"""Evaluation stage: what the paper-size evaluation costs, and how good the cellularity is.

Measures, on synthetic tiles (no download): the cellularity validation the pipeline runs
(generated tiles prepared to 32-256 px, Spearman against their masks); cellularity images/s at
32 and 256 px; feature extraction images/s of the domain network (resnet50 at 256 px) and of
Inception-v3 at 299 px (random weights: the speed does not depend on them); FID + KID time for
paper-size feature sets; and the coherence measures of one trajectory of 11 frames.

Run: python -m benchmarks.bench_evaluation      (appends to benchmarks/results/evaluation.md)
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats
from torchvision.models import inception_v3

from benchmarks.machine import record
from cellflow.cellularity import (
    measure_cellularity,
    measure_images,
    validate_against_ground_truth,
)
from cellflow.config import DatasetConfig, PrepareConfig, SplitConfig, SyntheticConfig
from cellflow.data import prepare_dataset, read_ground_truth
from cellflow.downstream import create_backbone
from cellflow.metrics import (
    DomainFeatures,
    FeatureSpace,
    consecutive_ssim,
    fid_kid,
    second_difference,
    shuffled_control,
)
from cellflow.synthetic import generate_dataset, render_tile


def cellularity_rows(size: int, tiles: int = 60) -> dict[str, str]:
    rng = np.random.default_rng(0)
    rendered = [render_tile(float(p), size, rng) for p in np.linspace(0, 1, tiles)]
    started = time.perf_counter()
    counts = [measure_cellularity(tile.image)["nuclei_count"] for tile in rendered]
    rate = tiles / (time.perf_counter() - started)
    rho = stats.spearmanr(counts, [tile.nuclei_count for tile in rendered]).statistic
    return {"measure": f"cellularity, {size} px tiles rendered at that size",
            "value": f"{rate:.1f} images/s; Spearman vs true count {rho:.3f} (n={tiles})"}


def cellularity_workers_rows(size: int = 256, tiles: int = 40) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index, progression in enumerate(np.linspace(0, 1, tiles)):
            paths.append(Path(folder) / f"{index}.png")
            Image.fromarray(render_tile(float(progression), size, rng).image).save(paths[-1])
        for workers in sorted({1, os.cpu_count() or 1}):
            started = time.perf_counter()
            measure_images(paths, workers=workers)
            rate = tiles / (time.perf_counter() - started)
            rows.append({"measure": f"cellularity of {size} px files, {workers} worker(s)",
                         "value": f"{rate:.1f} images/s"})
    return rows


def validation_rows(per_class: int = 30, seeds: tuple[int, ...] = (0, 1)) -> list[dict]:
    """The pipeline's own check: generated tiles, prepared like a dataset, vs their masks."""
    classes = ("normal", "hyperplastic", "neoplastic")
    rows = []
    for raw_size, resolution in ((64, 32), (64, 64), (128, 128), (256, 256)):
        for seed in seeds:
            with tempfile.TemporaryDirectory() as folder:
                root = Path(folder)
                generate_dataset(root / "raw", classes, per_class, raw_size, seed=seed)
                dataset = DatasetConfig(
                    name="synthetic", kind="synthetic", resolution=resolution, classes=classes,
                    transitions=(), split=SplitConfig(val_fraction=0.15, test_fraction=0.15),
                    synthetic=SyntheticConfig(images_per_class=per_class, image_size=raw_size))
                prepare = PrepareConfig(on_corrupt="error", on_small="error",
                                        on_duplicate="error", contact_sheet_images=1)
                prepare_dataset(dataset, prepare, root / "raw" / "images", root / "data",
                                seed=seed, threads=os.cpu_count() or 1,
                                ground_truth=read_ground_truth(root / "raw" / "ground_truth.tsv"))
                manifest = pd.read_csv(root / "data" / "manifest.tsv", sep="\t")
                _, summary = validate_against_ground_truth(manifest, root / "data")
            rows.append({
                "measure": f"cellularity validation, {raw_size} px tiles prepared to "
                           f"{resolution} px, seed {seed}, {len(manifest)} images",
                "value": f"Spearman count {summary['spearman_count']:.3f}, area fraction "
                         f"{summary['spearman_area_fraction']:.3f}, mean relative count error "
                         f"{summary['mean_relative_count_error']:.3f}"})
    return rows


def feature_rate(name: str, network: torch.nn.Module, size: int, count: int = 32) -> dict:
    images = np.random.default_rng(0).integers(0, 256, (count, 3, size, size), dtype=np.uint8)
    space = FeatureSpace(name, network, name)
    space.features(images[:4])  # warm-up
    started = time.perf_counter()
    space.features(images, batch_size=16)
    rate = count / (time.perf_counter() - started)
    return {"measure": f"{name} features, {size} px", "value": f"{rate:.1f} images/s"}


class InceptionAt299(torch.nn.Module):
    """Inception-v3's cost as FID pays it: input resized to 299 px, pool3 features."""

    def __init__(self) -> None:
        super().__init__()
        self.network = inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
        self.network.fc = torch.nn.Identity()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear",
                                antialias=True)
        return self.network(resized)


def fid_rows(n: int = 2000, d: int = 2048) -> dict[str, str]:
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(n, d, generator=generator, dtype=torch.float64)
    fake = torch.randn(n, d, generator=generator, dtype=torch.float64) + 0.1
    started = time.perf_counter()
    fid_kid(real, fake, kid_subset_size=1000, kid_subsets=100, seed=0)
    return {"measure": f"FID + KID (100 subsets of 1000), {n} vs {n} features of {d}",
            "value": f"{time.perf_counter() - started:.1f} s"}


def coherence_row(size: int = 256, frames: int = 11) -> dict[str, str]:
    rng = np.random.default_rng(0)
    sequence = [render_tile(float(p), size, rng).image for p in np.linspace(0.3, 0.7, frames)]
    features = rng.standard_normal((frames, 2048))
    started = time.perf_counter()
    consecutive_ssim(sequence)
    shuffled_control(sequence, consecutive_ssim, 20, rng)
    second_difference(features)
    shuffled_control(features, second_difference, 20, rng)
    return {"measure": f"coherence of one trajectory ({frames} frames, {size} px, 20 shuffles)",
            "value": f"{time.perf_counter() - started:.2f} s"}


def main() -> None:
    rows = [*validation_rows(), cellularity_rows(32), cellularity_rows(256),
            *cellularity_workers_rows()]
    rows.append(feature_rate("domain resnet50", DomainFeatures(create_backbone("resnet50", 4, 256)),
                             256))
    rows.append(feature_rate("inception-v3 (resized to 299)", InceptionAt299(), 256))
    rows += [fid_rows(), coherence_row()]
    record("evaluation", "Evaluation stage: cellularity, features, FID/KID, coherence (CPU)", rows)


if __name__ == "__main__":
    main()
