"""Nuclei segmentation and cellularity: checked against the synthetic generator's ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage
from skimage.color import hed2rgb
from skimage.draw import disk, ellipse

from cellflow.cellularity import (
    MEASURES,
    CellularityConfig,
    measure_cellularity,
    measure_images,
    segment_nuclei,
    validate_against_ground_truth,
)
from cellflow.config import DatasetConfig, PrepareConfig, SplitConfig, SyntheticConfig
from cellflow.data import prepare_dataset, read_ground_truth
from cellflow.synthetic import generate_dataset, render_tile

CLASSES = ("normal", "hyperplastic", "neoplastic")
# Of the tile size, like the synthetic generator's nuclei.
NUCLEUS_RADIUS = 0.035
STROMAL_RADIUS = 0.025


def prepared_synthetic(root: Path, raw_size: int, resolution: int, per_class: int) -> Path:
    """Generate synthetic tiles and prepare them as the pipeline does; returns the data folder."""
    generate_dataset(root / "raw", CLASSES, per_class, raw_size, seed=5)
    dataset = DatasetConfig(
        name="synthetic", kind="synthetic", resolution=resolution, classes=CLASSES,
        transitions=(), split=SplitConfig(val_fraction=0.15, test_fraction=0.15),
        synthetic=SyntheticConfig(images_per_class=per_class, image_size=raw_size),
    )
    prepare = PrepareConfig(on_corrupt="error", on_small="error", on_duplicate="error",
                            contact_sheet_images=4)
    prepare_dataset(dataset, prepare, root / "raw" / "images", root / "data", seed=0, threads=2,
                    ground_truth=read_ground_truth(root / "raw" / "ground_truth.tsv"))
    return root / "data"


@pytest.fixture(scope="module", params=[(64, 32, 16), (128, 128, 8)],
                ids=["64px-prepared-to-32px", "128px"])
def validation(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[pd.DataFrame, dict[str, float], int]:
    raw_size, resolution, per_class = request.param
    data_dir = prepared_synthetic(tmp_path_factory.mktemp("synthetic"), raw_size, resolution,
                                  per_class)
    manifest = pd.read_csv(data_dir / "manifest.tsv", sep="\t")
    table, summary = validate_against_ground_truth(manifest, data_dir)
    return table, summary, resolution


def stained(hematoxylin: np.ndarray, eosin: float = 0.03, seed: int = 0) -> np.ndarray:
    """A uint8 RGB tile from stain concentrations, with the generator's sensor noise."""
    stains = np.stack([hematoxylin, np.full_like(hematoxylin, eosin),
                       np.zeros_like(hematoxylin)], axis=-1)
    rgb = hed2rgb(stains) + np.random.default_rng(seed).normal(0.0, 1.2 / 255, stains.shape)
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def discs(size: int, centres: list[tuple[float, float]], radius: float) -> np.ndarray:
    """A stained tile with a hematoxylin disc (a nucleus) at each centre."""
    hematoxylin = np.full((size, size), 0.01)
    for centre in centres:
        hematoxylin[disk(centre, radius, shape=(size, size))] = 0.12
    return stained(hematoxylin)


def test_counts_and_area_follow_the_ground_truth(validation) -> None:
    table, summary, resolution = validation
    assert summary["images"] == len(table) == 3 * (16 if resolution == 32 else 8)
    assert summary["spearman_count"] >= 0.9, summary
    assert summary["spearman_count_raw"] >= 0.9, summary
    assert summary["spearman_area_fraction"] >= 0.9, summary
    assert summary["pearson_count"] >= 0.9, summary
    # Rank agreement alone would accept counts off by a constant factor.
    assert summary["mean_relative_count_error"] < (0.25 if resolution == 32 else 0.1), summary
    assert set(table["label_name"]) == set(CLASSES)
    assert (table["true_nuclei_count"] <= table["true_nuclei_count_raw"]).all()
    assert table["nuclear_area_fraction"].between(0.0, 1.0).all()
    assert (table["mean_nuclear_area"] > 0).all()


def test_a_tile_without_nuclei_stays_empty() -> None:
    eosin_only = stained(np.zeros((64, 64)))
    assert measure_cellularity(eosin_only) == {
        "nuclei_count": 0.0, "nuclear_area_fraction": 0.0, "mean_nuclear_area": 0.0}
    # The floor is what keeps it empty: Otsu alone splits the background noise into "nuclei".
    assert measure_cellularity(eosin_only, CellularityConfig(threshold_floor=0.0))[
        "nuclei_count"] > 20
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert measure_cellularity(blank)["nuclei_count"] == 0


@pytest.mark.parametrize("size", [64, 128, 256])
def test_touching_nuclei_are_split_and_an_elongated_one_is_not(size: int) -> None:
    radius = NUCLEUS_RADIUS * size
    middle = size / 2
    touching = discs(size, [(middle, middle - 0.8 * radius), (middle, middle + 0.8 * radius)],
                     radius)
    labels = segment_nuclei(touching)
    assert ndimage.label(labels > 0)[1] == 1, "the two discs form one blob"
    assert len(np.unique(labels[labels > 0])) == 2

    # A spindle (stromal) nucleus, a little larger and longer than the generator's largest.
    spindle = STROMAL_RADIUS * size
    hematoxylin = np.full((size, size), 0.01)
    hematoxylin[ellipse(middle, middle, spindle / 2, spindle * 2, shape=(size, size),
                        rotation=0.5)] = 0.12
    elongated = segment_nuclei(stained(hematoxylin))
    assert len(np.unique(elongated[elongated > 0])) == 1


@pytest.mark.parametrize("size", [64, 128])
def test_count_rises_with_the_number_of_nuclei(size: int) -> None:
    grid = [(size * (row + 0.5) / 5, size * (col + 0.5) / 5)
            for row in range(5) for col in range(5)]
    counts = [measure_cellularity(discs(size, grid[:drawn], NUCLEUS_RADIUS * size))
              for drawn in (0, 1, 3, 6, 12, 25)]
    assert [c["nuclei_count"] for c in counts] == [0, 1, 3, 6, 12, 25]
    fractions = [c["nuclear_area_fraction"] for c in counts]
    assert fractions == sorted(fractions) and fractions[-1] < 0.25


def test_nuclei_cut_by_the_tile_edge_count() -> None:
    size = 128
    cut = [(0, size / 2), (size / 2, 0), (size - 1, size / 3), (size / 3, size - 1), (0, 0)]
    assert measure_cellularity(discs(size, cut, NUCLEUS_RADIUS * size))["nuclei_count"] == 5


def test_measures_are_consistent_with_the_labels() -> None:
    tile = render_tile(0.8, 96, np.random.default_rng(3))
    labels = segment_nuclei(tile.image)
    assert labels.dtype == np.int32 and labels.shape == (96, 96)
    measures = measure_cellularity(tile.image)
    count = len(np.unique(labels)) - 1
    assert measures["nuclei_count"] == count > 0
    assert 0.0 < measures["nuclear_area_fraction"] < 1.0
    assert measures["mean_nuclear_area"] * count == pytest.approx(np.count_nonzero(labels))


@pytest.mark.parametrize(("image", "problem"), [
    (np.zeros((32, 32), np.uint8), r"RGB H&E image of shape \(H, W, 3\), got shape \(32, 32\)"
                                   r" \(grayscale"),
    (np.zeros((32, 32, 4), np.uint8), r"shape \(32, 32, 4\)"),
    (np.zeros((32, 32, 3), np.float64), "dtype uint8, got dtype float64"),
])
def test_wrong_arrays_are_refused(image: np.ndarray, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        segment_nuclei(image)


def test_files_are_measured_or_refused_by_name(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(render_tile(0.5, 48, np.random.default_rng(0)).image).save(good)
    table = measure_images([good, good])
    assert list(table.columns) == ["path", *MEASURES]
    assert table["path"].tolist() == [str(good)] * 2

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((48, 48), 128, np.uint8)).save(gray)
    for path, problem in [(corrupt, "cannot read"), (gray, r"grayscale \(L\)"),
                          (tmp_path / "missing.png", "cannot read")]:
        with pytest.raises(ValueError, match=rf"{path.name}: .*{problem}"):
            measure_images([good, path])


def test_worker_processes_give_the_same_table_in_the_same_order(tmp_path: Path) -> None:
    paths = []
    for index, progression in enumerate(np.linspace(0, 1, 6)):
        path = tmp_path / f"tile{index}.png"
        Image.fromarray(render_tile(float(progression), 48, np.random.default_rng(index)).image
                        ).save(path)
        paths.append(path)
    alone = measure_images(paths)
    pd.testing.assert_frame_equal(measure_images(paths, workers=2), alone)
    assert alone["nuclei_count"].iloc[-1] > alone["nuclei_count"].iloc[0]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="corrupt.png: cannot read"):
        measure_images([*paths, corrupt], workers=2)


def test_config_from_dict_takes_known_keys_and_names_an_unknown_one() -> None:
    config = CellularityConfig.from_dict({"threshold_floor": 0.05, "min_nucleus_area": 12})
    assert config.threshold_floor == 0.05 and config.min_nucleus_area == 12
    assert CellularityConfig.from_dict({}) == CellularityConfig()
    with pytest.raises(ValueError, match="unknown cellularity parameter 'treshold_floor'"):
        CellularityConfig.from_dict({"treshold_floor": 0.05})
    with pytest.raises(ValueError, match="peak_min_distance must be a number >= 0, got -1"):
        CellularityConfig(peak_min_distance=-1)
    with pytest.raises(ValueError, match="threshold_floor must be a number >= 0, got 'high'"):
        CellularityConfig.from_dict({"threshold_floor": "high"})


def test_validation_needs_ground_truth(tmp_path: Path) -> None:
    real = pd.DataFrame({"path": ["images/a/x.png"], "label_name": ["a"], "split": ["train"]})
    with pytest.raises(ValueError, match="nuclei_count, nuclear_area_fraction, mask_path"):
        validate_against_ground_truth(real, tmp_path)


def test_measures_rank_with_a_pathologists_cellularity_score(tmp_path):
    from cellflow.cellularity import validate_against_scores

    rng = np.random.default_rng(3)
    rows = []
    for index, progression in enumerate(np.linspace(0.0, 1.0, 8)):
        tile = render_tile(float(progression), 64, rng)
        Image.fromarray(tile.image).save(tmp_path / f"{index}.png")
        rows.append({"path": f"{index}.png", "label_name": "x", "split": "train",
                     "cellularity": progression})
    rows.append({"path": "unscored.png", "label_name": "x", "split": "train",
                 "cellularity": ""})  # a row without a score is left out, not measured
    table, summary = validate_against_scores(pd.DataFrame(rows), tmp_path)
    assert summary["images"] == 8 and len(table) == 8
    assert summary["spearman_nuclear_area_fraction_vs_score"] > 0.7
    with pytest.raises(ValueError, match="lacks the 'cellularity' score column"):
        validate_against_scores(pd.DataFrame(rows).drop(columns="cellularity"), tmp_path)
