"""Plots a person looks at instead of reading tables: training curves, accuracy by noise level."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs on cluster nodes without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from cellflow.io import atomic_path, save_png  # noqa: E402


def _save(figure: plt.Figure, path: Path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, bbox_inches="tight", format=path.suffix.lstrip("."))
    plt.close(figure)


def plot_loss_curve(log: pd.DataFrame, path: Path, title: str) -> None:
    """Per-step loss (faint) with a moving average, on a log scale when it spans decades."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(log["step"], log["loss"], color="tab:blue", alpha=0.25, linewidth=0.8,
              label="per step")
    window = max(1, len(log) // 25)
    axis.plot(log["step"], log["loss"].rolling(window, min_periods=1).mean(), color="tab:blue",
              label=f"mean of {window} steps")
    positive = log["loss"][log["loss"] > 0]
    if len(positive) and positive.max() / positive.min() > 30:
        axis.set_yscale("log")
    axis.set(xlabel="optimizer step", ylabel="loss", title=title)
    axis.legend(frameon=False)
    axis.grid(alpha=0.3)
    _save(figure, path)


def plot_accuracy_by_timestep(table: pd.DataFrame, chance: float, path: Path, title: str) -> None:
    """Validation accuracy per band of diffusion timesteps, against chance."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    centres = (table["t_start"] + table["t_end"]) / 2
    axis.plot(centres, table["accuracy"], marker="o", label="validation accuracy")
    axis.axhline(chance, color="grey", linestyle="--", label=f"chance ({chance:.2f})")
    axis.set(xlabel="diffusion timestep t (noise grows →)", ylabel="accuracy", ylim=(0, 1.02),
             title=title)
    axis.legend(frameon=False)
    axis.grid(alpha=0.3)
    _save(figure, path)


def save_sample_grid(samples: torch.Tensor, rows: int, path: Path) -> None:
    """Images in [-1, 1] laid out ``rows`` x (N / rows), one row per class."""
    grid = make_grid((samples.float().cpu() + 1) / 2, nrow=len(samples) // rows, padding=2,
                     pad_value=1.0)
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    save_png(path, array)


def save_trajectory_strip(sources: list[np.ndarray], frames: list[np.ndarray],
                          stairs: list[list[int]], target_example: np.ndarray, path: Path,
                          title: str) -> None:
    """One row per source: the source, its frames (stair timestep above each), a real target."""
    rows, columns = len(sources), len(frames[0]) + 2
    figure, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.25 * rows + 0.4),
                                squeeze=False)
    for row in range(rows):
        pictures = [sources[row], *frames[row], target_example]
        labels = ["source", *(f"τ={s}" for s in stairs[row]), "real target"]
        for column, (picture, label) in enumerate(zip(pictures, labels, strict=True)):
            axis = axes[row, column]
            axis.imshow(picture, interpolation="nearest")
            axis.set_title(label, fontsize=7)
            axis.set_axis_off()
    figure.suptitle(title, fontsize=9)
    _save(figure, path)
