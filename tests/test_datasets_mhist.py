"""The MHIST reader against a fabricated download (tests/layouts/mhist.py)."""

import json
import logging
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from cellflow.config import DatasetConfig
from cellflow.data import prepare_dataset
from cellflow.datasets.common import DataError
from cellflow.datasets.mhist import read
from tests.layouts import PREPARE, dataset_config, edit_line
from tests.layouts.mhist import ANNOTATORS, HEADER, make_mhist


def mhist_config(root: Path, min_agreement: int = 4) -> DatasetConfig:
    return dataset_config("mhist", root, ("HP", "SSA"),
                          options={"min_agreement": min_agreement})


def test_reads_labels_partition_and_votes(tmp_path, caplog):
    layout = make_mhist(tmp_path)
    with caplog.at_level(logging.WARNING):
        listing = read(mhist_config(layout.root), layout.root)
    found = {raw.relative_path: raw for raw in listing.images}
    assert set(found) == set(layout.images)
    for relative, expected in layout.images.items():
        raw = found[relative]
        assert raw.source_path == layout.root / relative
        assert (raw.label_name, raw.official_split, raw.group) == (expected.label, expected.split,
                                                                  "")
        assert raw.extra == {"ssa_votes": expected.ssa_votes,
                             "agreement": round(expected.agreeing / ANNOTATORS, 4)}
    excluded = dict(listing.ignored_files)
    [(missing, row)] = layout.missing.items()
    assert excluded[layout.root / missing] == (
        f"listed in {layout.sheet}, line {row.line} but not on disk")
    assert excluded[layout.unlisted[0]] == f"not listed in {layout.sheet}"
    assert len(excluded) == 2
    assert "1 listed image(s) are not on disk" in caplog.text
    assert "MHIST_zzz.png" in caplog.text
    # the published counts compare with every row, on disk or not
    every_row = [*layout.images.values(), *layout.missing.values()]
    assert listing.listed_counts() == Counter((row.split, row.label) for row in every_row)
    assert listing.files_read == [layout.sheet]


def test_min_agreement_leaves_out_the_disagreement_cases(tmp_path):
    layout = make_mhist(tmp_path)
    listing = read(mhist_config(layout.root, min_agreement=6), layout.root)
    near_unanimous = {relative for relative, row in layout.images.items() if row.agreeing >= 6}
    disputed = {relative for relative, row in layout.images.items() if row.agreeing < 6}
    assert near_unanimous and disputed
    assert {raw.relative_path for raw in listing.images} == near_unanimous
    excluded = dict(listing.ignored_files)
    for relative in disputed:
        agreeing = layout.images[relative].agreeing
        assert excluded[layout.root / relative] == (
            f"{agreeing} of 7 annotators agree, under datasets.mhist.options.min_agreement (6)")
    assert sum(listing.listed_counts().values()) == len(layout.images) + len(layout.missing)
    assert any("at least 6 of 7" in note for note in listing.notes)


def test_missing_or_renamed_annotation_file_is_an_error(tmp_path):
    layout = make_mhist(tmp_path)
    layout.sheet.unlink()
    with pytest.raises(DataError, match=f"annotation file {layout.sheet} not found"):
        read(mhist_config(layout.root), layout.root)
    (layout.root / "annotations (1).csv").write_text(HEADER + "\n")
    with pytest.raises(DataError, match=r"not found; .* holds: annotations \(1\)\.csv, images"):
        read(mhist_config(layout.root), layout.root)


def test_missing_image_folder_is_an_error(tmp_path):
    layout = make_mhist(tmp_path)
    (layout.root / "images").rename(layout.root / "MHIST images")
    with pytest.raises(DataError, match=f"image folder {layout.root / 'images'} does not exist"):
        read(mhist_config(layout.root), layout.root)


def test_wrong_header_is_an_error(tmp_path):
    layout = make_mhist(tmp_path)
    edit_line(layout.sheet, 1, "Image Name,Label,Number of Annotators who Selected SSA,Partition")
    with pytest.raises(DataError) as error:
        read(mhist_config(layout.root), layout.root)
    message = str(error.value)
    assert str(layout.sheet) in message
    assert "'Majority Vote Label', 'Number of Annotators who Selected SSA (Out of 7)'" in message


@pytest.mark.parametrize(("row", "problem"), [
    ("MHIST_aab.png,XX,7,train", "unknown label 'XX' (expected HP or SSA)"),
    ("MHIST_aab.png,SSA,7,validation", "unknown Partition 'validation'"),
    ("MHIST_aab.png,SSA,8,train", "'8' annotators chose SSA"),
    ("MHIST_aab.png,SSA,six,train", "'six' annotators chose SSA"),
    ("MHIST_aaa.png,HP,0,train", "MHIST_aaa.png is listed again (first on line 2)"),
])
def test_bad_row_is_an_error_naming_its_line(tmp_path, row, problem):
    layout = make_mhist(tmp_path)
    line = layout.images["images/MHIST_aab.png"].line
    edit_line(layout.sheet, line, row)
    with pytest.raises(DataError) as error:
        read(mhist_config(layout.root), layout.root)
    assert f"{layout.sheet}, line {line}: {problem}" in str(error.value)


def test_prepare_keeps_the_official_test_split_and_votes(tmp_path, caplog):
    layout = make_mhist(tmp_path / "raw")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        prepare_dataset(mhist_config(layout.root), PREPARE, layout.root, out, seed=0, threads=2)
    manifest = pd.read_csv(out / "manifest.tsv", sep="\t", keep_default_na=False)
    manifest["relative"] = [Path(p).relative_to(layout.root.resolve()).as_posix()
                            for p in manifest["source_path"]]
    rows = manifest.set_index("relative")
    assert set(rows.index) == set(layout.images)
    for relative, expected in layout.images.items():
        row = rows.loc[relative]
        assert row["label_name"] == expected.label
        assert row["label"] == ("HP", "SSA").index(expected.label)
        assert row["ssa_votes"] == expected.ssa_votes
        assert row["agreement"] == pytest.approx(expected.agreeing / ANNOTATORS, abs=1e-4)
        if expected.split == "test":
            assert row["split"] == "test"
        else:
            assert row["split"] in ("train", "val")
    official_train = manifest[manifest["split"] != "test"]
    assert (pd.crosstab(official_train["label_name"], official_train["split"]) >= 1).all().all()

    excluded = pd.read_csv(out / "excluded.tsv", sep="\t")
    assert set(excluded["source_path"]) == {
        str(layout.root / relative) for relative in layout.missing} | {
        str(path) for path in layout.unlisted}
    source = json.loads((out / "source.json").read_text())
    listed_train = sum(row.split == "train" for row in layout.images.values())
    listed_test = len(layout.images) + len(layout.missing) - listed_train
    mismatches = source["published_count_mismatches"]
    assert len(mismatches) == 2
    for found, split, published in [(listed_train, "train", 2175), (listed_test, "test", 977)]:
        [message] = [m for m in mismatches if f"split '{split}'" in m]
        assert f"list {found} images split '{split}', the published count is {published}" \
            in message
        assert message in caplog.text
    assert source["files_read"] == [str(layout.sheet.resolve())]
    assert source["official_split"] is True
