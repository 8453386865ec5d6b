"""Evaluation stages: fidelity, cellularity, trajectory analysis and temporal coherence.

Each function reads the pipeline's tables and images (data manifest, generation manifests) and
returns a table; the CLI writes it. A trajectory is the real source image (frame 0) followed by
its generated frames 1..N, identified by (source_id, target_class).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

from cellflow import flags
from cellflow.cellularity import CellularityConfig, measure_images
from cellflow.data import load_images
from cellflow.generation import hard_class
from cellflow.io import read_table

if TYPE_CHECKING:  # the cellularity jobs need neither torch nor the models: they start faster
    import torch

    from cellflow.classifier import NoiseAwareClassifier
    from cellflow.metrics import FeatureSpace

log = logging.getLogger(__name__)

MEASURES = ["nuclei_count", "nuclear_area_fraction", "mean_nuclear_area"]
TRAJECTORY_KEYS = ["source_id", "source_class", "target_class"]


def fidelity_sets(method: str, data_manifest: Path, generated_dir: Path | None
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """The two tables FID/KID compares: the real training images, and the held-out real test
    images (``method == "real"``) or the method's; with the latter's class of each image."""
    manifest = read_table(data_manifest)
    real = manifest[manifest["split"] == "train"]
    if method == "real":
        other = manifest[manifest["split"] == "test"]
        return real, other, other["label_name"]
    other = read_table(generated_dir / "manifest.tsv")
    return real, other, hard_class(other)


def fidelity_images(method: str, data_manifest: Path, generated_dir: Path | None,
                    real: pd.DataFrame, other: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    other_root = data_manifest.parent if method == "real" else generated_dir
    return load_images(data_manifest.parent, real["path"]), load_images(other_root, other["path"])


def fidelity(dataset: str, method: str, data_manifest: Path, generated_dir: Path | None,
             classes: Sequence[str], spaces: Sequence[FeatureSpace], kid_subset_size: int,
             kid_subsets: int, seed: int, device: torch.device) -> pd.DataFrame:
    """FID/KID of a method's images against the real training images, overall and per class.

    ``method == "real"`` compares the held-out real test images instead: the value a perfect
    generator would reach with this many images, the floor to read the others against. The
    ``flags`` column names a set that is mostly noise or constant (see :mod:`cellflow.flags`),
    which FID alone does not show; ``lag1_autocorrelation`` is the statistic behind it.
    """
    from cellflow.metrics import fid_kid

    real, other, other_classes = fidelity_sets(method, data_manifest, generated_dir)
    real_images, other_images = fidelity_images(method, data_manifest, generated_dir, real, other)
    correlations = flags.lag1_autocorrelation(other_images)
    found = [] if method == "real" else flags.image_set_flags(other_images, real_images, method,
                                                              correlations)
    flags.warn(found, f"{dataset}: {method}")
    correlation = (float(np.nanmedian(correlations)) if np.isfinite(correlations).any()
                   else float("nan"))
    features = {}
    for space in spaces:
        log.info("%s: %s features of %d real and %d %s images", dataset, space.name, len(real),
                 len(other), method)
        features[space.name] = (space.features(real_images, device=device),
                                space.features(other_images, device=device))
    rows = []
    for name in ["all", *classes]:
        real_mask = np.ones(len(real), bool) if name == "all" else (real["label_name"] == name)
        other_mask = (np.ones(len(other), bool) if name == "all"
                      else (other_classes == name).to_numpy())
        row = {"dataset": dataset, "method": method, "class": name,
               "feature_network": "; ".join(space.description for space in spaces),
               "lag1_autocorrelation": correlation,
               # a property of the whole set: on its 'all' row only, not repeated per class
               "flags": flags.codes(found) if name == "all" else ""}
        for space in spaces:
            real_features, other_features = features[space.name]
            scores = fid_kid(real_features[np.array(real_mask, dtype=bool)],
                             other_features[np.array(other_mask, dtype=bool)], kid_subset_size,
                             kid_subsets, seed)
            row.update(n_real=scores["n_real"], n_generated=scores["n_generated"],
                       kid_subset_size=scores["kid_subset_size"])
            row.update({f"fid_{space.name}": scores["fid"],
                        f"kid_{space.name}_mean": scores["kid_mean"],
                        f"kid_{space.name}_std": scores["kid_std"]})
        rows.append(row)
    return pd.DataFrame(rows)


def cellularity(source: str, data_manifest: Path, generated_dir: Path | None,
                config: CellularityConfig, workers: int = 1) -> pd.DataFrame:
    """Nuclei count, area fraction and mean area of every real (or one method's) image."""
    root, table = cellularity_images(source, data_manifest, generated_dir)
    return measure_rows(source, root, table, config, workers)


def cellularity_images(source: str, data_manifest: Path, generated_dir: Path | None
                       ) -> tuple[Path, pd.DataFrame]:
    """The folder and the table of the images whose cellularity is measured."""
    if source == "real":
        table = read_table(data_manifest)[["id", "path", "label_name", "split"]]
        return data_manifest.parent, table.reset_index(drop=True)
    return generated_dir, read_table(generated_dir / "manifest.tsv").reset_index(drop=True)


def measure_rows(source: str, root: Path, table: pd.DataFrame, config: CellularityConfig,
                 workers: int = 1) -> pd.DataFrame:
    measured = measure_images([root / path for path in table["path"]], config,
                              progress_desc=f"cellularity of {source} images", workers=workers)
    return pd.concat([table.reset_index(drop=True),
                      measured[MEASURES].reset_index(drop=True)], axis=1)


def clean_class_probabilities(classifier: NoiseAwareClassifier, images: np.ndarray,
                              device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Softmax of the noise-aware classifier at t = 0 (noise-free images)."""
    import torch

    from cellflow.classifier import clean_logits
    from cellflow.training import to_model_range

    logits = clean_logits(classifier.to(device).eval(), to_model_range(torch.from_numpy(images)),
                          batch_size)
    return torch.softmax(logits, dim=-1).float().numpy()


def trajectory_frames(real_cellularity: pd.DataFrame, generated_cellularity: pd.DataFrame
                      ) -> pd.DataFrame:
    """One row per frame, the real source image first (frame 0, stair 0)."""
    generated = generated_cellularity.copy()
    sources = real_cellularity.set_index("id").loc[generated["source_id"].unique()]
    starts = (generated.drop_duplicates(["source_id", "target_class"])
              .drop(columns=[*MEASURES, "path"]).copy())
    starts[MEASURES] = sources.loc[starts["source_id"], MEASURES].to_numpy()
    starts["path"] = sources.loc[starts["source_id"], "path"].to_numpy()
    starts[["frame_index", "stair", "timestep", "soft_label_weight"]] = 0
    starts["is_source"] = True
    generated["is_source"] = False
    frames = pd.concat([starts, generated], ignore_index=True)
    return frames.sort_values([*TRAJECTORY_KEYS, "frame_index"], ignore_index=True)


def _towards_fraction(values: np.ndarray, target_mean: float) -> float:
    distance = np.abs(values - target_mean)
    return float(np.mean(distance[1:] < distance[:-1]))


def _landing(value: float, source_mean: float, target_mean: float) -> float:
    span = target_mean - source_mean
    return float((value - source_mean) / span) if span else float("nan")


def _spearman(values: np.ndarray) -> float:
    if np.ptp(values) == 0:
        return float("nan")  # a constant measure has no rank correlation
    return float(stats.spearmanr(np.arange(len(values)), values).statistic)


def summarise_trajectories(frames: pd.DataFrame, real_cellularity: pd.DataFrame
                           ) -> pd.DataFrame:
    """Per trajectory: monotonicity and direction of cellularity, where it ends, target belief.

    ``landing_*`` places the last frame on the line from the source class's real training mean
    (0) to the target class's (1); ``towards_target_fraction`` is the share of steps that bring
    the nuclei count closer to the target class's real mean; ``count_spearman_towards`` is the
    Spearman of nuclei count with the frame index, signed so that +1 is a monotone path towards
    the target class's mean whichever way the count has to go. Landing is NaN, and ``flags``
    says why, when the two classes' means are closer than their spread.
    """
    train = real_cellularity[real_cellularity["split"] == "train"]
    means = train.groupby("label_name")[MEASURES].mean()
    # Per transition and landing measure, why landing cannot be placed (empty: it can).
    landing_flags: dict[tuple[str, str], dict[str, list[flags.Flag]]] = {}
    for source_class, target_class in frames[["source_class", "target_class"]].drop_duplicates(
            ).itertuples(index=False):
        found = {short: flags.landing_flags(
                     train.loc[train["label_name"] == source_class, measure].to_numpy(),
                     train.loc[train["label_name"] == target_class, measure].to_numpy(), short)
                 for measure, short in (("nuclei_count", "count"),
                                        ("nuclear_area_fraction", "area"))}
        for measure_flags in found.values():
            flags.warn(measure_flags, f"{source_class}→{target_class}")
        landing_flags[source_class, target_class] = found
    rows = []
    for (source_id, source_class, target_class), path in frames.groupby(TRAJECTORY_KEYS,
                                                                         sort=True):
        path = path.sort_values("frame_index")
        undefined = landing_flags[source_class, target_class]
        count, area = path["nuclei_count"].to_numpy(float), \
            path["nuclear_area_fraction"].to_numpy(float)
        probability = path["target_probability"].to_numpy(float)
        rows.append({
            "source_id": source_id, "source_class": source_class, "target_class": target_class,
            "frames": len(path) - 1,
            "count_spearman": _spearman(count), "area_spearman": _spearman(area),
            "count_spearman_towards": _spearman(count) * np.sign(
                means.at[target_class, "nuclei_count"] - means.at[source_class, "nuclei_count"]),
            "towards_target_fraction": _towards_fraction(
                count, means.at[target_class, "nuclei_count"]),
            "towards_target_fraction_area": _towards_fraction(
                area, means.at[target_class, "nuclear_area_fraction"]),
            "landing_count": float("nan") if undefined["count"] else _landing(
                count[-1], means.at[source_class, "nuclei_count"],
                means.at[target_class, "nuclei_count"]),
            "landing_area": float("nan") if undefined["area"] else _landing(
                area[-1], means.at[source_class, "nuclear_area_fraction"],
                means.at[target_class, "nuclear_area_fraction"]),
            "target_probability_first": float(probability[0]),
            "target_probability_last": float(probability[-1]),
            "target_probability_spearman": _spearman(probability),
            "flags": flags.codes(flag for measure_flags in undefined.values()
                                 for flag in measure_flags),
        })
    return pd.DataFrame(rows)


def analyse_trajectories(data_manifest: Path, real_cellularity: pd.DataFrame,
                         generated_cellularity: pd.DataFrame, trajectories_dir: Path,
                         classifier: NoiseAwareClassifier, classes: Sequence[str],
                         device: torch.device) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-frame table (cellularity, classifier target probability) and its summary."""
    frames = trajectory_frames(real_cellularity, generated_cellularity)
    roots = np.where(frames["is_source"], str(data_manifest.parent), str(trajectories_dir))
    images = np.stack([load_images(Path(root), [path])[0]
                       for root, path in zip(roots, frames["path"], strict=True)])
    probabilities = clean_class_probabilities(classifier, images, device)
    target = frames["target_class"].map({name: index for index, name in enumerate(classes)})
    frames["target_probability"] = probabilities[np.arange(len(frames)), target.to_numpy()]
    return frames, summarise_trajectories(frames, real_cellularity)


def temporal_coherence(data_manifest: Path, trajectories_dir: Path, space: FeatureSpace,
                       shuffles: int, seed: int, device: torch.device) -> pd.DataFrame:
    """Frame-to-frame SSIM and feature-space second differences, against shuffled frames.

    The control reorders the same frames at random: a trajectory that changes gradually has
    higher consecutive SSIM and smaller second differences than its shuffled copies.
    """
    from cellflow.metrics import consecutive_ssim, second_difference, shuffled_control

    sources = read_table(data_manifest).set_index("id")["path"]
    generated = read_table(trajectories_dir / "manifest.tsv")
    rng = np.random.default_rng(seed)
    rows = []
    groups = generated.groupby(TRAJECTORY_KEYS, sort=True)
    for (source_id, source_class, target_class), path in tqdm(
            groups, desc="temporal coherence", unit="trajectory"):
        path = path.sort_values("frame_index")
        images = np.concatenate([load_images(data_manifest.parent, [sources[source_id]]),
                                 load_images(trajectories_dir, path["path"])])
        pictures = list(images.transpose(0, 2, 3, 1))
        features = space.features(images, device=device).numpy()
        rows.append({
            "source_id": source_id, "source_class": source_class, "target_class": target_class,
            "frames": len(path),
            "ssim": consecutive_ssim(pictures),
            "ssim_shuffled": shuffled_control(pictures, consecutive_ssim, shuffles, rng),
            "second_difference": second_difference(features),
            "second_difference_shuffled": shuffled_control(features, second_difference,
                                                           shuffles, rng),
        })
    return pd.DataFrame(rows)
