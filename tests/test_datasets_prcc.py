"""The pRCC reader against a fabricated copy of the official layout and split lists."""

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
from tests.layouts.prcc import PrccLayout, make_prcc

KIND = KINDS["prcc"]


def config(root: Path, **options) -> DatasetConfig:
    return dataset_config("prcc", root, ("type1", "type2"), options=options)


@pytest.fixture
def layout(tmp_path: Path) -> PrccLayout:
    return make_prcc(tmp_path / "prcc")


def rewrite(path: Path, change) -> None:
    path.write_text("\n".join(change(path.read_text().splitlines())) + "\n")


def test_reader_gives_every_listed_region_its_type_split_slide_and_position(layout):
    listing = KIND.read(config(layout.root), layout.root)
    found = {
        raw.relative_path: (raw.label_name, raw.official_split, raw.group, dict(raw.extra))
        for raw in listing.images
    }
    assert found == {
        relative: (
            region.label,
            region.split,
            region.slide,
            {"slide": region.slide, "x": region.x, "y": region.y},
        )
        for relative, region in layout.regions.items()
    }
    assert all(raw.source_path == layout.root / raw.relative_path for raw in listing.images)
    assert listing.ignored_files == [
        (path, "in no official split list") for path in layout.unlisted
    ]
    assert listing.listed == Counter(
        (region.split, region.label) for region in layout.regions.values()
    )
    lists = [layout.root / name for name in ("trainset.txt", "validset.txt", "testset.txt")]
    assert listing.files_read == lists
    assert KIND.annotation_files(layout.root, {}) == lists
    assert any("slide-disjoint" in note for note in listing.notes)
    assert any("1 region(s) on disk in no official split list" in note for note in listing.notes)


def test_split_lists_from_another_folder_relative_to_the_working_directory(tmp_path, monkeypatch):
    layout = make_prcc(tmp_path / "prcc", lists_folder=tmp_path / "repo" / "dataset")
    monkeypatch.chdir(tmp_path)
    options = {"split_lists": "repo/dataset"}
    listing = KIND.read(config(layout.root, **options), layout.root)
    assert {raw.relative_path for raw in listing.images} == set(layout.regions)
    assert KIND.annotation_files(layout.root, options)[0] == Path("repo/dataset/trainset.txt")
    assert not (layout.root / "trainset.txt").exists()
    with pytest.raises(
        DataError,
        match=r"list trainset\.txt not found in .*prcc \(datasets\.prcc"
        r"\.options\.split_lists names the folder",
    ):
        KIND.read(config(layout.root), layout.root)


@pytest.mark.parametrize("list_name", ["trainset.txt", "validset.txt", "testset.txt"])
def test_a_missing_split_list_names_it_its_folder_and_the_option(layout, list_name):
    (layout.root / list_name).unlink()
    with pytest.raises(DataError) as error:
        KIND.read(config(layout.root), layout.root)
    assert f"official split list {list_name} not found in {layout.root} " in str(error.value)
    assert "datasets.prcc.options.split_lists" in str(error.value)


def test_missing_type_folder_is_an_error(layout):
    (layout.root / "2").rename(layout.root / "type2")
    with pytest.raises(DataError, match=r"pRCC Type 2 folder .*/2 does not exist"):
        KIND.read(config(layout.root), layout.root)


@pytest.mark.parametrize(
    "bad_line",
    [
        "../dataset/1/slide/1_2_2000.png",
        "../dataset/3/slide/1_2_2000.png 0",
        "1_2_2000.png 0",
        "../dataset/1/slide/1_2_2000.png zero",
    ],
)
def test_a_line_that_does_not_parse_names_file_line_and_text(layout, bad_line):
    rewrite(layout.root / "testset.txt", lambda lines: [*lines[:1], bad_line, *lines[1:]])
    with pytest.raises(DataError) as error:
        KIND.read(config(layout.root), layout.root)
    message = str(error.value)
    assert "testset.txt, line 2" in message and repr(bad_line) in message


def test_a_label_that_disagrees_with_its_folder_names_file_and_line(layout):
    rewrite(
        layout.root / "validset.txt",
        lambda lines: [line[:-1] + "1" if line.endswith(" 0") else line for line in lines],
    )
    with pytest.raises(
        DataError,
        match=r"validset\.txt, line 1: label 1 disagrees with the "
        r"image's folder 1/",
    ):
        KIND.read(config(layout.root), layout.root)


def test_an_image_in_two_lists_names_both(layout):
    train_line = (layout.root / "trainset.txt").read_text().splitlines()[0]
    rewrite(layout.root / "testset.txt", lambda lines: [*lines, train_line])
    with pytest.raises(
        DataError,
        match=r"two official splits: 'train' \(.*trainset\.txt, line 1"
        r"\) and 'test' \(.*testset\.txt, line 5\)",
    ):
        KIND.read(config(layout.root), layout.root)


def test_an_image_listed_twice_in_one_list_names_both_lines(layout):
    rewrite(layout.root / "trainset.txt", lambda lines: [*lines, lines[2]])
    with pytest.raises(
        DataError,
        match=r"trainset\.txt, line 9: 1/.*png is listed again \(first "
        r"on line 3\)",
    ):
        KIND.read(config(layout.root), layout.root)


def test_a_listed_region_not_on_disk_is_excluded_with_its_line(layout, caplog):
    relative = next(r for r, region in layout.regions.items() if region.split == "val")
    (layout.root / relative).unlink()
    with caplog.at_level(logging.WARNING):
        listing = KIND.read(config(layout.root), layout.root)
    assert relative not in {raw.relative_path for raw in listing.images}
    assert (
        layout.root / relative,
        f"listed in {layout.root / 'validset.txt'}, line 1 but not on disk",
    ) in listing.ignored_files
    assert listing.listed[("val", "type1")] == 2  # still counted as listed
    assert "1 listed region(s) are not on disk" in caplog.text


def test_a_slide_in_two_lists_is_kept_with_a_warning_naming_it(layout, caplog):
    unlisted = layout.unlisted[0].relative_to(layout.root).as_posix()
    rewrite(layout.root / "testset.txt", lambda lines: [*lines, f"../dataset/{unlisted} 0"])
    with caplog.at_level(logging.WARNING):
        listing = KIND.read(config(layout.root), layout.root)
    slide = unlisted.split("/")[1]
    assert (
        f"slide {slide} is in more than one official split list (trainset.txt, testset.txt)"
        in caplog.text
    )
    assert {raw.official_split for raw in listing.images if raw.group == slide} == {"train", "test"}
    assert listing.ignored_files == []


def test_only_the_two_types_are_known_classes():
    problems = list(KIND.config_problems("prcc", {"classes": ["type1", "type3"]}))
    assert problems == [
        "datasets.prcc.classes[1]: 'type3' is not a class of kind prcc (its classes: type1, type2)"
    ]


def test_prepare_keeps_the_official_splits_and_the_region_columns(layout, tmp_path):
    out = tmp_path / "prepared"
    prepare_dataset(config(layout.root), PREPARE, layout.root, out, seed=0)
    manifest = pd.read_csv(out / "manifest.tsv", sep="\t", keep_default_na=False)
    by_source = {
        Path(source).relative_to(layout.root.resolve()).as_posix(): row
        for source, row in zip(manifest["source_path"], manifest.itertuples(), strict=True)
    }
    assert set(by_source) == set(layout.regions)
    for relative, region in layout.regions.items():
        row = by_source[relative]
        assert (row.label_name, row.split, row.group, row.slide, row.x, row.y) == (
            region.label,
            region.split,
            region.slide,
            region.slide,
            region.x,
            region.y,
        )
    excluded = pd.read_csv(out / "excluded.tsv", sep="\t")
    assert excluded.to_dict("records") == [
        {"source_path": str(layout.unlisted[0]), "reason": "in no official split list"}
    ]
    source = json.loads((out / "source.json").read_text())
    assert source["official_split"] is True and source["published_count_mismatches"]
