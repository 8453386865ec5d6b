"""Memorization check on tiny written datasets whose copies are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cellflow import figures
from cellflow.io import save_png, write_table
from cellflow.memorization import (
    memorization_summary,
    nearest_real_neighbours,
    nearest_rows,
    pixel_rows,
    thresholds,
)
from cellflow.metrics import FeatureSpace

SIZE = 8


class ChannelMeans(nn.Module):
    """A stand-in feature network: the mean of each colour channel and of its square."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        values = images.double() / 255
        return torch.cat([values.mean((2, 3)), values.square().mean((2, 3))], dim=1)


SPACE = FeatureSpace("domain", ChannelMeans(), "channel means (test)")


def smooth_images(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, H, W, 3) uint8 images that differ from each other by moderate amounts."""
    base = rng.integers(60, 190, size=(1, SIZE, SIZE, 3))
    return np.clip(base + rng.integers(-25, 26, size=(count, SIZE, SIZE, 3)), 0, 255
                   ).astype(np.uint8)


def write_data(root: Path, train: np.ndarray, test: np.ndarray) -> Path:
    rows = []
    for split, images in (("train", train), ("test", test)):
        for index, image in enumerate(images):
            label = "AB"[index % 2]
            path = f"images/{split}_{index:02d}.png"
            save_png(root / path, image)
            rows.append({"id": f"{label}__{split}_{index:02d}", "path": path, "label": "AB".index(
                label), "label_name": label, "split": split})
    write_table(root / "manifest.tsv", pd.DataFrame(rows))
    return root / "manifest.tsv"


def write_generated(folder: Path, method: str, images: np.ndarray, source_ids: list[str],
                    frames: list[int]) -> Path:
    rows = []
    for index, (image, source_id, frame) in enumerate(zip(images, source_ids, frames,
                                                          strict=True)):
        path = f"frames/{index:03d}.png"
        save_png(folder / path, image)
        rows.append({"method": method, "source_id": source_id, "source_class": "A",
                     "target_class": "B", "frame_index": frame, "stair": frame,
                     "soft_label_weight": frame / 4, "path": path})
    write_table(folder / "manifest.tsv", pd.DataFrame(rows))
    return folder


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = smooth_images(rng, 52)  # one base: test images are as near the training set
    train, test = images[:12], images[12:]  # as new images of the same tissue would be
    return write_data(tmp_path / "data", train, test), train, test


def train_ids(manifest: Path) -> list[str]:
    table = pd.read_csv(manifest, sep="\t")
    return table.loc[table["split"] == "train", "id"].tolist()


def test_a_training_image_is_its_own_nearest_neighbour_at_distance_zero(dataset, tmp_path):
    manifest, train, _ = dataset
    ids = train_ids(manifest)
    folder = write_generated(tmp_path / "train_as_generated", "cellflow", train, ids,
                             [1] * len(train))
    table, _ = nearest_real_neighbours(manifest, folder, [SPACE], chunk_size=5)
    assert table["nearest_id_pixel"].tolist() == ids
    assert table["nearest_id_domain"].tolist() == ids
    assert (table["distance_pixel"] == 0).all()
    assert table["distance_domain"].max() < 1e-12
    assert table["nearest_is_source_pixel"].all()


def test_copies_are_flagged_and_noise_is_not(dataset, tmp_path):
    manifest, train, _ = dataset
    ids = train_ids(manifest)
    noise = np.random.default_rng(1).integers(0, 256, size=(6, SIZE, SIZE, 3), dtype=np.uint8)
    # frames 1-2: exact copies of the source (the failure seen on real data); frame 3: a copy
    # of a different training image; frame 4: noise, with and without a source
    images = np.concatenate([train[[0, 1, 2, 3]], train[[5]], noise])
    sources = [ids[0], ids[1], ids[2], ids[3], ids[4], *ids[6:9], "adm_A_0000", "", "x"]
    frames = [1, 2, 1, 2, 3, 4, 4, 4, 4, 4, 4]
    folder = write_generated(tmp_path / "cellflow", "cellflow", images, sources, frames)
    table, reference = nearest_real_neighbours(manifest, folder, [SPACE], chunk_size=4)

    assert np.median(reference["ratio_pixel"]) == pytest.approx(1.0)
    copies, other_copy, noisy = table.iloc[:4], table.iloc[4], table.iloc[5:]
    assert (copies["ratio_pixel"] == 0).all()
    assert copies["nearest_is_source_pixel"].all()
    assert other_copy["ratio_pixel"] == 0 and not other_copy["nearest_is_source_pixel"]
    assert noisy["ratio_pixel"].min() > 2  # noise is further from the data than real images
    assert not noisy["nearest_is_source_pixel"].any()
    assert table["has_source"].tolist() == [True] * 8 + [False] * 3

    limits = thresholds(reference)
    assert 0 < limits["pixel"] < 1
    summary = memorization_summary(table, reference).set_index(["method", "frame_index"])
    real, overall = summary.loc[("real", "all")], summary.loc[("cellflow", "all")]
    assert real["share_below_threshold_pixel"] <= 0.1
    assert np.isnan(real["share_own_source_pixel"]) and real["n_with_source"] == 0
    assert overall["n_images"] == 11 and overall["n_with_source"] == 8
    assert overall["share_below_threshold_pixel"] == pytest.approx(5 / 11)
    assert overall["share_own_source_pixel"] == pytest.approx(4 / 8)
    assert summary.loc[("cellflow", 1), "share_own_source_pixel"] == 1.0
    assert summary.loc[("cellflow", 2), "share_below_threshold_pixel"] == 1.0
    assert summary.loc[("cellflow", 3), "share_own_source_pixel"] == 0.0
    assert summary.loc[("cellflow", 4), "share_below_threshold_pixel"] == 0.0
    assert summary.loc[("cellflow", 4), "n_with_source"] == 3
    assert {"median_ratio_domain", "share_below_threshold_domain"} <= set(summary.columns)


def test_a_one_frame_method_gets_no_per_frame_rows(dataset, tmp_path):
    manifest, train, _ = dataset
    folder = write_generated(tmp_path / "adm", "adm", train[:3], ["adm_A_0", "adm_A_1", ""],
                             [1, 1, 1])
    table, reference = nearest_real_neighbours(manifest, folder)
    summary = memorization_summary(table, reference)
    assert summary[["method", "frame_index"]].values.tolist() == [["real", "all"],
                                                                  ["adm", "all"]]
    assert np.isnan(summary.loc[1, "share_own_source_pixel"])
    assert summary.loc[1, "share_below_threshold_pixel"] == 1.0
    assert [c for c in table.columns if c.endswith("_domain")] == []


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_chunked_search_agrees_with_one_block(chunk_size):
    rng = np.random.default_rng(2)
    references = pixel_rows(rng.integers(0, 256, size=(23, 3, 4, 4), dtype=np.uint8))
    queries = pixel_rows(rng.integers(0, 256, size=(17, 3, 4, 4), dtype=np.uint8))
    queries[5] = references[11]
    whole = nearest_rows(queries, references, chunk_size=1000)
    chunked = nearest_rows(queries, references, chunk_size=chunk_size)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])
    brute = ((queries[:, None].double() - references[None].double()) ** 2).sum(-1)
    np.testing.assert_array_equal(whole[0], brute.argmin(1).numpy())
    np.testing.assert_array_equal(whole[1], brute.min(1).values.numpy())
    assert whole[0][5] == 11 and whole[1][5] == 0


def test_images_of_another_size_are_refused():
    with pytest.raises(ValueError, match="not the same space"):
        nearest_rows(pixel_rows(np.zeros((2, 3, 4, 4), np.uint8)),
                     pixel_rows(np.zeros((2, 3, 8, 8), np.uint8)))


def test_memorization_figures_write_png_and_pdf(dataset, tmp_path):
    manifest, train, _ = dataset
    ids = train_ids(manifest)
    noise = np.random.default_rng(3).integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)
    folder = write_generated(tmp_path / "gen", "cellflow", np.concatenate([train[:3], noise]),
                             ids[:6], [1, 1, 2, 2, 3, 3])
    table, reference = nearest_real_neighbours(manifest, folder, [SPACE])
    summary = memorization_summary(table, reference)
    paths = [*figures.closest_pairs_figure(table, folder, manifest.parent, tmp_path / "pairs",
                                           "test", n=4),
             *figures.memorization_ratios(table, reference, tmp_path / "ratios", "test"),
             *figures.memorization_table(summary, tmp_path / "summary")]
    assert sorted(path.name for path in paths) == ["pairs.pdf", "pairs.png", "ratios.pdf",
                                                   "ratios.png", "summary.md", "summary.tsv"]
    assert all(path.stat().st_size > 0 for path in paths)
    assert "cellflow" in (tmp_path / "summary.md").read_text()


def test_the_summary_flags_copies_and_own_source_rows_only():
    import pandas as pd

    from cellflow.memorization import flag_summary

    summary = pd.DataFrame({"method": ["real", "cellflow", "cellflow"],
                            "frame_index": ["all", "all", 1],
                            "share_below_threshold_pixel": [0.05, 0.3, 0.9],
                            "share_own_source_pixel": [float("nan"), 0.2, 1.0]})
    assert flag_summary(summary, "colon")["flags"].tolist() == [
        "", "", "copies;nearest-is-source"]
