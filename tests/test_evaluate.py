"""Evaluation stages on tables whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellflow.evaluate import summarise_trajectories, trajectory_frames
from cellflow.generation import hard_class

# Real training means: normal 10 nuclei, neoplastic 30 (area fraction 0.1 and 0.3).
REAL = pd.DataFrame({
    "id": ["n0", "n1", "p0", "p1", "n_test"],
    "path": ["images/n0.png", "images/n1.png", "images/p0.png", "images/p1.png", "x.png"],
    "label_name": ["normal", "normal", "neoplastic", "neoplastic", "normal"],
    "split": ["train", "train", "train", "train", "test"],
    "nuclei_count": [8.0, 12.0, 28.0, 32.0, 100.0],
    "nuclear_area_fraction": [0.08, 0.12, 0.28, 0.32, 0.9],
    "mean_nuclear_area": [20.0, 20.0, 30.0, 30.0, 10.0],
})


def generated(counts: list[float], source_id: str = "n0") -> pd.DataFrame:
    frames = len(counts)
    return pd.DataFrame({
        "method": "cellflow", "source_id": source_id, "source_class": "normal",
        "target_class": "neoplastic", "source_label": 0, "target_label": 1,
        "frame_index": np.arange(1, frames + 1), "stair": np.arange(1, frames + 1) * 4,
        "timestep": np.arange(1, frames + 1) * 200,
        "soft_label_weight": np.arange(1, frames + 1) / frames,
        "path": [f"frames/{source_id}/{i:02d}.png" for i in range(1, frames + 1)],
        "nuclei_count": counts,
        "nuclear_area_fraction": np.array(counts) / 100,
        "mean_nuclear_area": 25.0,
    })


def test_trajectory_frames_start_with_the_real_source_image():
    frames = trajectory_frames(REAL, generated([14.0, 20.0, 26.0]))
    assert frames["frame_index"].tolist() == [0, 1, 2, 3]
    first = frames.iloc[0]
    assert first["is_source"] and first["path"] == "images/n0.png"
    assert (first["nuclei_count"], first["stair"], first["soft_label_weight"]) == (8.0, 0, 0)
    assert not frames["is_source"].iloc[1:].any()


def test_a_monotone_trajectory_that_reaches_the_target_mean():
    frames = trajectory_frames(REAL, generated([15.0, 20.0, 25.0, 30.0]))
    frames["target_probability"] = [0.1, 0.3, 0.5, 0.7, 0.9]
    row = summarise_trajectories(frames, REAL).iloc[0]
    assert row["frames"] == 4
    assert row["count_spearman"] == pytest.approx(1.0)
    assert row["count_spearman_towards"] == pytest.approx(1.0)
    assert row["towards_target_fraction"] == pytest.approx(1.0)
    # ends at 30 nuclei: exactly the target class's real training mean (test images ignored)
    assert row["landing_count"] == pytest.approx(1.0)
    assert row["landing_area"] == pytest.approx(1.0)
    assert (row["target_probability_first"], row["target_probability_last"]) == (0.1, 0.9)
    assert row["target_probability_spearman"] == pytest.approx(1.0)


def test_a_trajectory_that_moves_away_and_back_is_scored_so():
    frames = trajectory_frames(REAL, generated([4.0, 2.0, 10.0]))  # source n0 has 8
    frames["target_probability"] = 0.5
    row = summarise_trajectories(frames, REAL).iloc[0]
    assert row["towards_target_fraction"] == pytest.approx(1 / 3)
    assert row["landing_count"] == pytest.approx(0.0)  # ends on the source class's mean
    assert np.isnan(row["target_probability_spearman"])  # a constant has no rank order


def test_one_summary_row_per_trajectory():
    table = pd.concat([generated([15.0, 20.0]), generated([9.0, 11.0], source_id="n1")])
    frames = trajectory_frames(REAL, table)
    frames["target_probability"] = 0.5
    summary = summarise_trajectories(frames, REAL)
    assert summary["source_id"].tolist() == ["n0", "n1"]
    assert summary["frames"].tolist() == [2, 2]


def test_generated_images_count_as_the_target_class_from_half_weight():
    table = generated([1.0, 2.0, 3.0, 4.0])  # weights 0.25, 0.5, 0.75, 1
    assert hard_class(table).tolist() == ["normal", "neoplastic", "neoplastic", "neoplastic"]


def test_landing_is_not_reported_when_the_class_means_coincide():
    # Both classes spread 10-50 nuclei around means 29 and 31: a 2-nuclei gap is no direction.
    real = REAL.copy()
    real["nuclei_count"] = [10.0, 48.0, 12.0, 50.0, 0.0]
    frames = trajectory_frames(real, generated([20.0, 40.0]))
    frames["target_probability"] = 0.5
    row = summarise_trajectories(frames, real).iloc[0]
    assert np.isnan(row["landing_count"]) and "landing-count-undefined" in row["flags"]
    assert np.isfinite(row["landing_area"])  # area still separates the classes
    assert "landing-area" not in row["flags"]


def test_separated_classes_get_no_landing_flag():
    frames = trajectory_frames(REAL, generated([15.0, 30.0]))
    frames["target_probability"] = 0.5
    assert summarise_trajectories(frames, REAL).iloc[0]["flags"] == ""
