"""Synthetic tiles: exact ground truth, determinism, and the biology the benchmark relies on."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.color import rgb2hed

from cellflow.synthetic import SyntheticTile, generate_dataset, progression_band, render_tile

CLASSES = ("normal", "hyperplastic", "neoplastic")
COLUMNS = [
    "source_path",
    "label_name",
    "progression",
    "nuclei_count",
    "nuclear_area_fraction",
    "mask_path",
]


def dataset_files(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def tiles_in_band(class_index: int, count: int, size: int, seed: int) -> list[SyntheticTile]:
    low, high = progression_band(class_index, len(CLASSES))
    rng = np.random.default_rng([seed, class_index])
    return [render_tile(rng.uniform(low, high), size, rng) for _ in range(count)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("synthetic")
    table = generate_dataset(root, CLASSES, images_per_class=4, size=48, seed=11)
    return root, table


def test_progression_band_splits_the_axis_into_equal_half_open_bands() -> None:
    assert progression_band(0, 3) == (0.0, 1 / 3)
    assert progression_band(2, 3) == (2 / 3, 1.0)
    assert progression_band(0, 1) == (0.0, 1.0)
    for bad_index in (-1, 3):
        with pytest.raises(ValueError, match="class_index"):
            progression_band(bad_index, 3)
    with pytest.raises(ValueError, match="num_classes"):
        progression_band(0, 0)


@pytest.mark.parametrize("size", [16, 32, 64, 97, 256])
def test_render_tile_shapes_dtypes_and_ranges(size: int) -> None:
    tile = render_tile(0.6, size, np.random.default_rng(size))
    assert tile.image.shape == (size, size, 3) and tile.image.dtype == np.uint8
    assert tile.nuclei_mask.shape == (size, size) and tile.nuclei_mask.dtype == np.uint16
    assert tile.progression == 0.6
    assert tile.nuclei_count >= 1
    assert 0.0 < tile.nuclear_area_fraction < 1.0
    # Stained tissue: neither blank glass nor saturated, and both stains present.
    assert 100 < tile.image.mean() < 240
    assert tile.image.min() < 120 and tile.image.max() > 200


@pytest.mark.parametrize("size", [16, 32, 64])
def test_every_placed_nucleus_keeps_pixels_even_in_small_crowded_tiles(size: int) -> None:
    rng = np.random.default_rng(size)
    for progression in np.linspace(0.0, 1.0, 25):
        tile = render_tile(float(progression), size, rng)
        labels = np.unique(tile.nuclei_mask)
        # Labels are assigned 1..n in placement order: a nucleus without pixels leaves a gap.
        assert labels.tolist() == list(range(tile.nuclei_count + 1))
        assert tile.nuclear_area_fraction == np.mean(tile.nuclei_mask > 0)


def test_render_tile_is_reproducible_from_the_generator() -> None:
    first = render_tile(0.3, 64, np.random.default_rng(5))
    again = render_tile(0.3, 64, np.random.default_rng(5))
    other = render_tile(0.3, 64, np.random.default_rng(6))
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.nuclei_mask, again.nuclei_mask)
    assert not np.array_equal(first.image, other.image)


def test_nuclei_count_and_area_rise_with_progression() -> None:
    bands = [tiles_in_band(index, count=20, size=64, seed=1) for index in range(len(CLASSES))]
    counts = [np.mean([tile.nuclei_count for tile in band]) for band in bands]
    areas = [np.mean([tile.nuclear_area_fraction for tile in band]) for band in bands]
    assert counts[0] < counts[1] < counts[2], counts
    assert areas[0] < areas[1] < areas[2], areas
    assert areas[2] > 2 * areas[0], areas


def test_colour_deconvolution_recovers_dark_hyperchromatic_nuclei() -> None:
    nuclear_h = []
    for index in (0, len(CLASSES) - 1):
        inside, outside = [], []
        for tile in tiles_in_band(index, count=10, size=64, seed=2):
            hematoxylin = rgb2hed(tile.image)[..., 0]
            mask = tile.nuclei_mask > 0
            inside.append(hematoxylin[mask].mean())
            outside.append(hematoxylin[~mask].mean())
        assert np.mean(inside) > 2 * np.mean(outside), (inside, outside)
        nuclear_h.append(np.mean(inside))
    assert nuclear_h[1] > nuclear_h[0], nuclear_h


def test_dataset_files_columns_and_progression_bands(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, table = dataset
    assert list(table.columns) == COLUMNS
    assert len(table) == len(CLASSES) * 4
    on_disk = pd.read_csv(root / "ground_truth.tsv", sep="\t")
    pd.testing.assert_frame_equal(on_disk, table, check_exact=False, rtol=1e-12)
    for class_index, name in enumerate(CLASSES):
        rows = table[table["label_name"] == name]
        assert rows["source_path"].tolist() == [f"{name}/{name}_{i:04d}.png" for i in range(4)]
        assert rows["mask_path"].tolist() == [f"masks/{name}_{i:04d}.png" for i in range(4)]
        low, high = progression_band(class_index, len(CLASSES))
        assert ((rows["progression"] >= low) & (rows["progression"] < high)).all()
    for row in table.itertuples():
        with Image.open(root / "images" / row.source_path) as image:
            assert image.mode == "RGB" and image.size == (48, 48)
    # Atomic writes leave no temporary files behind.
    assert not [path for path in root.rglob("*") if path.name.startswith(".")]


def test_ground_truth_matches_masks_and_masks_round_trip(
    dataset: tuple[Path, pd.DataFrame],
) -> None:
    root, table = dataset
    for row in table.itertuples():
        with Image.open(root / row.mask_path) as image:
            mask = np.asarray(image)
        assert mask.dtype == np.uint16
        assert row.nuclei_count == len(np.unique(mask[mask > 0]))
        assert row.nuclear_area_fraction == pytest.approx(np.mean(mask > 0), rel=1e-12)

    # The documented seeding scheme reproduces a tile exactly, mask and image.
    class_index, image_index = 2, 3
    rng = np.random.default_rng(np.random.SeedSequence(11, spawn_key=(class_index, image_index)))
    low, high = progression_band(class_index, len(CLASSES))
    tile = render_tile(low + (high - low) * rng.random(), 48, rng)
    row = table.iloc[class_index * 4 + image_index]
    with Image.open(root / row["mask_path"]) as image:
        np.testing.assert_array_equal(np.asarray(image), tile.nuclei_mask)
    with Image.open(root / "images" / row["source_path"]) as image:
        np.testing.assert_array_equal(np.asarray(image), tile.image)


def test_dataset_is_deterministic_and_stable_when_growing(
    tmp_path: Path, dataset: tuple[Path, pd.DataFrame]
) -> None:
    root, table = dataset
    again = generate_dataset(tmp_path / "again", CLASSES, images_per_class=4, size=48, seed=11)
    pd.testing.assert_frame_equal(again, table, check_exact=True)
    assert dataset_files(tmp_path / "again") == dataset_files(root)

    fewer = generate_dataset(tmp_path / "fewer", CLASSES, images_per_class=2, size=48, seed=11)
    assert fewer["source_path"].isin(table["source_path"]).all()
    reference = dataset_files(root)
    for path, content in dataset_files(tmp_path / "fewer").items():
        if path != "ground_truth.tsv":
            assert content == reference[path], path
    kept = table.set_index("source_path").loc[fewer["source_path"]].reset_index()
    pd.testing.assert_frame_equal(fewer, kept[COLUMNS], check_exact=True)

    other = generate_dataset(tmp_path / "other", CLASSES, images_per_class=4, size=48, seed=12)
    for path in table["source_path"]:
        with (
            Image.open(root / "images" / path) as a,
            Image.open(tmp_path / "other/images" / path) as b,
        ):
            assert not np.array_equal(np.asarray(a), np.asarray(b)), path
    assert not other["progression"].equals(table["progression"])


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"class_names": ["only"]}, "class_names"),
        ({"class_names": ["a", "b", "a"]}, "class_names"),
        ({"class_names": "ab"}, "class_names"),
        ({"class_names": ["a", "b/c"]}, "class_names"),
        ({"images_per_class": 0}, "images_per_class"),
        ({"size": 15}, "size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_generate_dataset_rejects_bad_arguments(
    tmp_path: Path, overrides: dict[str, object], argument: str
) -> None:
    arguments: dict[str, object] = {
        "class_names": ["a", "b"],
        "images_per_class": 1,
        "size": 32,
        "seed": 0,
    }
    arguments.update(overrides)
    with pytest.raises(ValueError, match=argument):
        generate_dataset(tmp_path / "out", **arguments)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("progression", "size", "argument"),
    [
        (-0.1, 32, "progression"),
        (1.5, 32, "progression"),
        (math.nan, 32, "progression"),
        (0.5, 8, "size"),
    ],
)
def test_render_tile_rejects_bad_arguments(progression: float, size: int, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        render_tile(progression, size, np.random.default_rng(0))
