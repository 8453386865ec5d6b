"""The Chaoyang reader against a fabricated download (tests/layouts/chaoyang.py)."""

import json
import logging
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from cellflow.config import DatasetConfig
from cellflow.data import prepare_dataset
from cellflow.datasets.chaoyang import KIND, read
from cellflow.datasets.common import DataError
from tests.layouts import PREPARE, dataset_config
from tests.layouts.chaoyang import CLASSES, make_chaoyang

ANNOTATOR_COLUMNS = ("label_a", "label_b", "label_c")


def chaoyang_config(root: Path, classes=CLASSES) -> DatasetConfig:
    return dataset_config("chaoyang", root, classes)


def records(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def write_records(path: Path, entries: list[dict]) -> None:
    path.write_text(json.dumps(entries))


def test_reads_labels_splits_and_each_pathologists_label(tmp_path, caplog):
    layout = make_chaoyang(tmp_path)
    with caplog.at_level(logging.WARNING):
        listing = read(chaoyang_config(layout.root), layout.root)
    found = {raw.relative_path: raw for raw in listing.images}
    assert set(found) == set(layout.images)
    for relative, expected in layout.images.items():
        raw = found[relative]
        assert raw.source_path == layout.root / relative
        assert (raw.label_name, raw.official_split, raw.group) == (expected.label, expected.split,
                                                                  "")
        if expected.split == "train":
            assert raw.extra == dict(zip(ANNOTATOR_COLUMNS, expected.annotators, strict=True))
        else:
            assert raw.extra == {}
    assert any(raw.extra and len(set(raw.extra.values())) > 1 for raw in listing.images)

    excluded = dict(listing.ignored_files)
    [(missing, record)] = layout.missing.items()
    assert excluded[layout.root / missing] == (
        f"listed in {layout.root / 'test.json'}, record {record.record} but not on disk")
    assert excluded[layout.unlisted[0]] == "in neither train.json nor test.json"
    assert len(excluded) == 2
    assert "1 listed image(s) are not on disk" in caplog.text
    assert "1 image(s) on disk are in no label file" in caplog.text
    every_record = [*layout.images.values(), *layout.missing.values()]
    assert listing.listed_counts() == Counter((entry.split, entry.label) for entry in every_record)
    assert listing.files_read == [layout.root / "train.json", layout.root / "test.json"]
    assert KIND.annotation_files(layout.root, {}) == listing.files_read


@pytest.mark.parametrize("label_file", ["train.json", "test.json"])
def test_missing_or_renamed_label_file_is_an_error(tmp_path, label_file):
    layout = make_chaoyang(tmp_path)
    expected = layout.root / label_file
    # the HSA-NRL repository ships its copy of the training labels as train_label.json
    expected.rename(layout.root / label_file.replace(".json", "_label.json"))
    with pytest.raises(DataError) as error:
        read(chaoyang_config(layout.root), layout.root)
    message = str(error.value)
    assert f"label file {expected} not found" in message
    assert label_file.replace(".json", "_label.json") in message


@pytest.mark.parametrize(("label_file", "index", "key", "value"), [
    ("test.json", 2, "label", 7),
    ("train.json", 5, "label", "1"),
    ("train.json", 3, "label_B", 4),
])
def test_unknown_label_id_is_an_error_naming_its_record(tmp_path, label_file, index, key,
                                                        value):
    layout = make_chaoyang(tmp_path)
    path = layout.root / label_file
    entries = records(path)
    entries[index][key] = value
    write_records(path, entries)
    with pytest.raises(DataError) as error:
        read(chaoyang_config(layout.root), layout.root)
    assert f"{path}, record {index}: unknown {key} {value!r}" in str(error.value)


def test_image_in_both_label_files_is_an_error(tmp_path):
    layout = make_chaoyang(tmp_path)
    train, test = records(layout.root / "train.json"), records(layout.root / "test.json")
    write_records(layout.root / "test.json", [*test, train[4]])
    with pytest.raises(DataError) as error:
        read(chaoyang_config(layout.root), layout.root)
    assert (f"{train[4]['name']} is in two official splits: 'train' "
            f"({layout.root / 'train.json'}, record 4) and 'test' "
            f"({layout.root / 'test.json'}, record {len(test)})") in str(error.value)


def test_image_listed_twice_in_one_file_is_an_error(tmp_path):
    layout = make_chaoyang(tmp_path)
    path = layout.root / "train.json"
    entries = records(path)
    write_records(path, [*entries, entries[1]])
    with pytest.raises(DataError) as error:
        read(chaoyang_config(layout.root), layout.root)
    assert (f"{path}, record {len(entries)}: {entries[1]['name']} is listed again "
            f"(first in {path}, record 1)") in str(error.value)


@pytest.mark.parametrize(("text", "problem"), [
    ('[{"name": "train/a.JPG", "label": 0},', "not valid JSON"),
    ('{"train/a.JPG": 0}', "expected a list of records"),
    ('[{"name": "train/a.JPG", "class": 0}]', "record 0: a record needs 'name' and 'label'"),
])
def test_malformed_label_file_is_an_error(tmp_path, text, problem):
    layout = make_chaoyang(tmp_path)
    (layout.root / "test.json").write_text(text)
    with pytest.raises(DataError) as error:
        read(chaoyang_config(layout.root), layout.root)
    assert f"{layout.root / 'test.json'}" in str(error.value)
    assert problem in str(error.value)


def test_prepare_keeps_the_official_test_split_and_annotator_columns(tmp_path, caplog):
    layout = make_chaoyang(tmp_path / "raw")
    out = tmp_path / "out"
    classes = ("adenoma", "normal", "serrated", "adenocarcinoma")  # label order is the config's
    with caplog.at_level(logging.WARNING):
        prepare_dataset(chaoyang_config(layout.root, classes), PREPARE, layout.root, out, seed=0,
                        threads=2)
    manifest = pd.read_csv(out / "manifest.tsv", sep="\t", keep_default_na=False)
    manifest["relative"] = [Path(p).relative_to(layout.root.resolve()).as_posix()
                            for p in manifest["source_path"]]
    rows = manifest.set_index("relative")
    assert set(rows.index) == set(layout.images)
    for relative, expected in layout.images.items():
        row = rows.loc[relative]
        assert (row["label_name"], row["label"]) == (expected.label,
                                                     classes.index(expected.label))
        annotators = tuple(row[column] for column in ANNOTATOR_COLUMNS)
        if expected.split == "test":
            assert row["split"] == "test"
            assert annotators == ("", "", "")
        else:
            assert row["split"] in ("train", "val")
            assert annotators == expected.annotators
    official_train = manifest[manifest["split"] != "test"]
    per_split = pd.crosstab(official_train["label_name"], official_train["split"])
    assert set(per_split.index) == set(classes) and (per_split >= 1).all().all()

    excluded = pd.read_csv(out / "excluded.tsv", sep="\t")
    assert set(excluded["source_path"]) == {
        str(layout.root / relative) for relative in layout.missing} | {
        str(path) for path in layout.unlisted}
    source = json.loads((out / "source.json").read_text())
    mismatches = source["published_count_mismatches"]
    assert len(mismatches) == 8  # every (split, class) the README publishes
    listed = Counter((entry.split, entry.label)
                     for entry in [*layout.images.values(), *layout.missing.values()])
    message = ("the official files list {} images split 'test' class 'adenocarcinoma', the "
               "published count is 840").format(listed[("test", "adenocarcinoma")])
    assert any(message in m for m in mismatches)
    assert message in caplog.text
