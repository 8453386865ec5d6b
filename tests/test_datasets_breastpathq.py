"""The BreastPathQ reader against a fabricated copy of the two official archives."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from cellflow.config import DatasetConfig
from cellflow.data import prepare_dataset
from cellflow.datasets import KINDS, DataError
from tests.layouts import PREPARE, dataset_config
from tests.layouts.breastpathq import DEFAULT_CLASSES, BreastPathQLayout, make_breastpathq

KIND = KINDS["breastpathq"]


def config(root: Path, classes=DEFAULT_CLASSES, **options) -> DatasetConfig:
    return dataset_config("breastpathq", root, classes, name="bpq", test_fraction=0.25,
                          options={"bin_edges": [0.0, 0.3, 0.7], **options})


@pytest.fixture
def layout(tmp_path: Path) -> BreastPathQLayout:
    return make_breastpathq(tmp_path / "breastpathq_download")


def add_row(sheet: Path, row: str, at: int | None = None) -> None:
    """Insert ``row`` as line ``at`` (1 is the header; default: append)."""
    lines = sheet.read_text().splitlines()
    lines.insert(len(lines) if at is None else at - 1, row)
    sheet.write_text("\n".join(lines) + "\n")


def test_reader_bins_every_score_and_keeps_split_slide_and_score(layout):
    listing = KIND.read(config(layout.root), layout.root)
    found = {
        raw.relative_path: (raw.label_name, raw.official_split, raw.group, dict(raw.extra))
        for raw in listing.images
    }
    assert found == {
        relative: (
            DEFAULT_CLASSES[patch.bin],
            patch.split,
            patch.slide,
            {"cellularity": patch.score, "slide": patch.slide, "rid": patch.rid},
        )
        for relative, patch in layout.patches.items()
    }
    assert all(raw.source_path == layout.root / raw.relative_path for raw in listing.images)
    # the edges themselves fall in the bin below them
    label_of = {(raw.group, raw.extra["rid"]): raw.label_name for raw in listing.images}
    assert label_of[("99788", "1")] == "none" and label_of[("99788", "2")] == "low"
    assert label_of[("99788", "3")] == "medium" and label_of[("99788", "4")] == "high"
    assert not any("test_patches" in raw.relative_path for raw in listing.images)
    assert listing.ignored_files == []
    assert listing.listed == Counter(
        (p.split, DEFAULT_CLASSES[p.bin]) for p in layout.patches.values()
    )
    assert listing.files_read == [layout.train_labels, layout.val_labels]
    assert KIND.annotation_files(layout.root, {}) == [layout.train_labels, layout.val_labels]
    notes = " ".join(listing.notes)
    assert "none = {0}, low = (0, 0.3], medium = (0.3, 0.7], high = (0.7, 1]" in notes
    assert "not an official protocol" in notes and "concordance" in notes
    assert "cellularity column" in notes and "test_patches is left out" in notes


def test_bin_edges_option_sets_the_bins(layout):
    listing = KIND.read(
        config(layout.root, classes=("lower", "upper"), bin_edges=[0.5]), layout.root
    )
    for raw in listing.images:
        assert raw.label_name == ("lower" if raw.extra["cellularity"] <= 0.5 else "upper")
    assert any("lower = [0, 0.5], upper = (0.5, 1]" in note for note in listing.notes)


def test_check_hook_names_the_keys_and_numbers():
    def problems(classes, edges):
        return list(
            KIND.config_problems("bpq", {"classes": classes, "options": {"bin_edges": edges}})
        )

    assert problems(["a", "b", "c", "d"], [0.0, 0.3, 0.7]) == []
    assert problems(["a", "b", "c", "d"], [0.0, 0.7, 0.3]) == [
        "datasets.bpq.options.bin_edges: [0.0, 0.7, 0.3] are not strictly increasing"
    ]
    assert problems(["a", "b", "c"], [0.3, 0.3]) == [
        "datasets.bpq.options.bin_edges: [0.3, 0.3] are not strictly increasing"
    ]
    assert problems(["a", "b"], [0.0, 0.3, 0.7]) == [
        "datasets.bpq.classes: 2 class(es) for 3 bin edge(s) (datasets.bpq.options.bin_edges); "
        "the bins need 4 classes, one per bin in order"
    ]
    assert problems(["a", "b"], [1.0]) == [
        "datasets.bpq.options.bin_edges: the last edge is 1.0, which leaves the last bin "
        "(scores above it) empty; scores are at most 1"
    ]
    # the schema's default edges when the options leave them out
    assert list(KIND.config_problems("bpq", {"classes": ["a", "b", "c", "d"]})) == []


def test_reader_refuses_classes_that_do_not_fit_the_edges(layout):
    with pytest.raises(DataError, match=r"datasets\.bpq\.classes: 3 class\(es\) for 3 bin edge"):
        KIND.read(config(layout.root, classes=("a", "b", "c")), layout.root)


@pytest.mark.parametrize("header", ["slide,rid,score", "slide_id,rid,y", "image,y"])
def test_a_different_header_names_the_file_and_both_headers(layout, header):
    lines = layout.val_labels.read_text().splitlines()
    layout.val_labels.write_text("\n".join([header, *lines[1:]]) + "\n")
    with pytest.raises(DataError) as error:
        KIND.read(config(layout.root), layout.root)
    message = str(error.value)
    assert str(layout.val_labels) in message
    assert "expected the columns slide, rid, y; found " + header.replace(",", ", ") in message


@pytest.mark.parametrize("score", ["1.5", "-0.1", "high", "", "nan"])
def test_a_score_outside_0_1_names_file_and_line(layout, score):
    add_row(layout.train_labels, f"99788,9,{score}", at=4)
    with pytest.raises(
        DataError,
        match=rf"train_labels\.csv, line 4: cellularity y "
        rf"'{score}' is not a number from 0 to 1",
    ):
        KIND.read(config(layout.root), layout.root)


@pytest.mark.parametrize("row", ["99788,,0.4", ",7,0.4"])
def test_a_row_without_slide_or_rid_names_file_and_line(layout, row):
    add_row(layout.val_labels, row, at=2)
    with pytest.raises(DataError, match=r"val_labels\.csv, line 2: empty slide or rid"):
        KIND.read(config(layout.root), layout.root)


def test_line_numbers_count_blank_lines(layout):
    add_row(layout.train_labels, "", at=3)
    add_row(layout.train_labels, "99788,9,2", at=5)
    with pytest.raises(DataError, match=r"train_labels\.csv, line 5: "):
        KIND.read(config(layout.root), layout.root)


def test_a_duplicate_row_names_both_lines(layout):
    add_row(layout.val_labels, "101101,2,0.3")
    with pytest.raises(
        DataError,
        match=r"val_labels\.csv, line 10: slide 101101 rid 2 is "
        r"listed again \(first on line 7\)",
    ):
        KIND.read(config(layout.root), layout.root)


def test_a_row_without_its_image_is_excluded_with_file_and_line(layout, caplog):
    add_row(layout.train_labels, "99791,5,0.4")
    with caplog.at_level(logging.WARNING):
        listing = KIND.read(config(layout.root), layout.root)
    missing = layout.root / "breastpathq/datasets/train/99791_5.tif"
    assert listing.ignored_files == [
        (missing, f"listed in {layout.train_labels}, line 18 but not on disk")
    ]
    assert len(listing.images) == len(layout.patches)
    assert listing.listed[("train", "medium")] == 5  # counted as listed all the same
    assert "1 listed patch(es) are not on disk" in caplog.text


def test_without_the_validation_labels_only_train_is_read_with_a_warning(tmp_path, caplog):
    layout = make_breastpathq(tmp_path / "download", with_val=False)
    with caplog.at_level(logging.WARNING):
        listing = KIND.read(config(layout.root), layout.root)
    assert {raw.official_split for raw in listing.images} == {"train"}
    assert len(listing.images) == len(layout.patches)
    assert "breastpathq-test/val_labels.csv" in caplog.text and "carved out" in caplog.text
    assert any("validation split is carved out" in note for note in listing.notes)
    assert listing.files_read == KIND.annotation_files(layout.root, {}) == [layout.train_labels]


def test_missing_training_labels_or_folders_are_errors(layout):
    (layout.root / "breastpathq/datasets/validation").rename(layout.root / "validation")
    with pytest.raises(
        DataError,
        match=r"validation image folder .*datasets/validation does "
        r"not exist",
    ):
        KIND.read(config(layout.root), layout.root)
    layout.train_labels.unlink()
    with pytest.raises(DataError, match=r"training labels .*train_labels\.csv not found"):
        KIND.read(config(layout.root), layout.root)


def test_prepare_keeps_train_and_val_and_carves_test_out_of_whole_train_slides(layout, tmp_path):
    out = tmp_path / "prepared"
    prepare_dataset(config(layout.root), PREPARE, layout.root, out, seed=0)
    manifest = pd.read_csv(out / "manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    by_source = {
        Path(source).relative_to(layout.root.resolve()).as_posix(): row
        for source, row in zip(manifest["source_path"], manifest.itertuples(), strict=True)
    }
    assert set(by_source) == set(layout.patches)
    for relative, patch in layout.patches.items():
        row = by_source[relative]
        assert row.label_name == DEFAULT_CLASSES[patch.bin]
        assert float(row.cellularity) == patch.score
        assert (row.slide, row.rid, row.group) == (patch.slide, patch.rid, patch.slide)
        if patch.split == "val":
            assert row.split == "val"
        else:
            assert row.split in ("train", "test")
    splits_of_slide = manifest.groupby("slide")["split"].agg(set)
    assert all(len(splits) == 1 for splits in splits_of_slide)
    test_slides = {slide for slide, splits in splits_of_slide.items() if splits == {"test"}}
    train_slides = {slide for slide, splits in splits_of_slide.items() if splits == {"train"}}
    assert test_slides and train_slides
    assert test_slides | train_slides == {
        p.slide for p in layout.patches.values() if p.split == "train"
    }
    source = json.loads((out / "source.json").read_text())
    assert source["official_split"] is True and source["grouped_by"] == "the reader"
    assert any("not an official protocol" in note for note in source["notes"])
