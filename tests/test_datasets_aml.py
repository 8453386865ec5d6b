"""The AML-Cytomorphology_LMU reader against a fabricated download (tests/layouts/aml.py)."""

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellflow.config import DatasetConfig
from cellflow.data import prepare_dataset
from cellflow.datasets.aml import KIND, read
from cellflow.datasets.common import DataError
from tests.layouts import PREPARE, dataset_config, edit_line
from tests.layouts.aml import COMMON, make_aml

SELECTED = ("MYO", "NGS", "LYT")
ALL_CLASSES = KIND.known_classes({})


def aml_config(root: Path, classes=ALL_CLASSES) -> DatasetConfig:
    return dataset_config("aml", root, classes)


def test_reads_class_folders_and_reannotations(tmp_path, caplog):
    layout = make_aml(tmp_path)
    with caplog.at_level(logging.WARNING):
        listing = read(aml_config(layout.root), layout.root)
    found = {raw.relative_path: raw for raw in listing.images}
    assert set(found) == set(layout.images)
    for relative, expected in layout.images.items():
        raw = found[relative]
        assert raw.source_path == layout.root / relative
        assert (raw.label_name, raw.official_split, raw.group) == (expected.label, None, "")
        assert raw.extra == {"first_reannotation": expected.first_reannotation,
                             "second_reannotation": expected.second_reannotation}
    assert found["AML-Cytomorphology/MYO/MYO_0002.tiff"].extra == {
        "first_reannotation": "MYB", "second_reannotation": ""}
    assert listing.crop_transparent_border
    assert not listing.has_official_split
    assert listing.files_read == [layout.sheet]
    assert KIND.annotation_files(layout.root, {}) == [layout.sheet]

    excluded = dict(listing.ignored_files)
    [unlisted], [missing] = layout.unlisted, layout.missing
    assert excluded[unlisted] == f"not listed in {layout.sheet}"
    missing_line = len(layout.sheet.read_text().splitlines())
    assert excluded[missing] == f"listed in {layout.sheet}, line {missing_line} but not on disk"
    assert len(excluded) == 2
    assert "1 image(s) are not listed in annotations.dat" in caplog.text
    assert "1 image(s) listed in annotations.dat are not on disk" in caplog.text
    # the published count is of the images on disk, listed in annotations.dat or not
    on_disk = Counter(("", image.label) for image in layout.images.values())
    on_disk[("", "LYT")] += 1
    assert listing.listed_counts() == on_disk


def test_annotation_that_disagrees_with_its_folder_is_an_error(tmp_path):
    layout = make_aml(tmp_path)
    line = layout.images["AML-Cytomorphology/NGS/NGS_0002.tiff"].line
    edit_line(layout.sheet, line, "NGS/NGS_0002.tiff NGB nan nan")
    with pytest.raises(DataError) as error:
        read(aml_config(layout.root), layout.root)
    assert (f"{layout.sheet}, line {line}: NGS/NGS_0002.tiff is annotated 'NGB' but lies in "
            "folder NGS/") in str(error.value)


@pytest.mark.parametrize(("text", "problem"), [
    ("NGS/NGS_0002.tiff NGS nan", "expected 4 whitespace-separated fields"),
    ("NGS/NGS_0002.tiff NGS nan nan extra", "found 5"),
    ("MYO/MYO_0001.tiff MYO nan nan", "MYO/MYO_0001.tiff is listed again (first on line "),
])
def test_malformed_annotation_line_is_an_error_naming_it(tmp_path, text, problem):
    layout = make_aml(tmp_path)
    line = layout.images["AML-Cytomorphology/NGS/NGS_0002.tiff"].line
    edit_line(layout.sheet, line, text)
    with pytest.raises(DataError) as error:
        read(aml_config(layout.root), layout.root)
    assert f"{layout.sheet}, line {line}: " in str(error.value)
    assert problem in str(error.value)


def test_blank_lines_do_not_shift_line_numbers(tmp_path):
    layout = make_aml(tmp_path)
    layout.sheet.write_text("\n" + layout.sheet.read_text())
    listing = read(aml_config(layout.root), layout.root)
    [missing] = layout.missing
    lines = len(layout.sheet.read_text().splitlines())
    assert dict(listing.ignored_files)[missing] == (
        f"listed in {layout.sheet}, line {lines} but not on disk")


def test_without_annotations_dat_labels_come_from_the_folders(tmp_path, caplog):
    layout = make_aml(tmp_path)
    layout.sheet.rename(layout.root / "annotations.txt")
    with caplog.at_level(logging.WARNING):
        listing = read(aml_config(layout.root), layout.root)
    assert {raw.relative_path: raw.label_name for raw in listing.images} == {
        **{relative: image.label for relative, image in layout.images.items()},
        f"AML-Cytomorphology/{layout.unlisted[0].relative_to(layout.root / 'AML-Cytomorphology')}":
            "LYT",
    }
    assert all(raw.extra == {} for raw in listing.images)
    assert f"{layout.sheet} not found" in caplog.text
    assert f"{layout.sheet} not found: labels from the folders alone, no re-annotations" \
        in listing.notes
    assert listing.files_read == [] and KIND.annotation_files(layout.root, {}) == []


def test_unknown_class_folder_is_left_out(tmp_path):
    layout = make_aml(tmp_path)
    stray = layout.root / "AML-Cytomorphology" / "UNK"
    stray.mkdir()
    (layout.root / "AML-Cytomorphology" / "BAS" / "BAS_0001.tiff").rename(stray / "UNK_0001.tiff")
    listing = read(aml_config(layout.root), layout.root)
    assert dict(listing.ignored_files)[stray] == "not one of the 15 AML class folders"
    assert not any("UNK" in raw.relative_path for raw in listing.images)


def test_root_above_the_download_folder_is_an_error_naming_the_right_one(tmp_path):
    layout = make_aml(tmp_path)
    with pytest.raises(DataError) as error:
        read(aml_config(tmp_path), tmp_path)
    assert (f"AML image folder {tmp_path / 'AML-Cytomorphology'} does not exist or is not a "
            f"folder; set the root to {layout.root}") in str(error.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="the root is the unpacked AML-Cytomorphology_LMU folder, "
                                        "holding AML-Cytomorphology/ and annotations.dat"):
        read(aml_config(empty), empty)


def test_prepare_selects_classes_splits_by_seed_and_crops_the_border(tmp_path, caplog):
    layout = make_aml(tmp_path / "raw")
    config = aml_config(layout.root, SELECTED)
    with caplog.at_level(logging.WARNING):
        first = prepare_dataset(config, PREPARE, layout.root, tmp_path / "a", seed=3, threads=2)
    again = prepare_dataset(config, PREPARE, layout.root, tmp_path / "b", seed=3, threads=2)
    pd.testing.assert_frame_equal(first, again)

    manifest = pd.read_csv(tmp_path / "a" / "manifest.tsv", sep="\t", keep_default_na=False)
    manifest["relative"] = [Path(p).relative_to(layout.root.resolve()).as_posix()
                            for p in manifest["source_path"]]
    rows = manifest.set_index("relative")
    selected = {relative: image for relative, image in layout.images.items()
                if image.label in SELECTED}
    assert set(rows.index) == set(selected)
    per_split = pd.crosstab(manifest["label_name"], manifest["split"])
    assert per_split.loc[list(SELECTED), ["train", "val", "test"]].to_numpy().tolist() == [
        [COMMON[name] - 2, 1, 1] for name in SELECTED]
    for relative, expected in selected.items():
        row = rows.loc[relative]
        assert (row["label_name"], row["label"]) == (expected.label,
                                                     SELECTED.index(expected.label))
        assert (row["first_reannotation"], row["second_reannotation"]) == (
            expected.first_reannotation, expected.second_reannotation)
        with Image.open(tmp_path / "a" / row["path"]) as prepared:
            pixels = np.asarray(prepared.convert("RGB"), dtype=int)
        assert pixels.shape == (16, 16, 3)
        corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert np.abs(corners - expected.colour).max() <= 2, relative

    excluded = pd.read_csv(tmp_path / "a" / "excluded.tsv", sep="\t")
    reasons = dict(zip(excluded["source_path"], excluded["reason"], strict=True))
    for relative, image in layout.images.items():
        if image.label not in SELECTED:
            assert reasons[str(layout.root / relative)] == (
                f"class '{image.label}' is not in datasets.aml.classes")
    assert {str(layout.unlisted[0]), str(layout.missing[0])} <= set(reasons)
    assert len(reasons) == len(layout.images) - len(selected) + 2

    source = json.loads((tmp_path / "a" / "source.json").read_text())
    [mismatch] = source["published_count_mismatches"]
    on_disk = len(layout.images) + len(layout.unlisted)
    assert f"list {on_disk} images in total, the published count is 18365" in mismatch
    assert mismatch in caplog.text
    assert source["official_split"] is False
