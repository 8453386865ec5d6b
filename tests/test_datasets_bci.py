"""The BCI reader against a fabricated download (tests/layouts/bci.py)."""

import json
import logging
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from cellflow.config import DatasetConfig
from cellflow.data import prepare_dataset
from cellflow.datasets.bci import read
from cellflow.datasets.common import DataError
from tests.layouts import PREPARE, dataset_config
from tests.layouts.bci import UNPAIRED, make_bci

LEVELS = ("0", "1+", "2+", "3+")


def bci_config(root: Path) -> DatasetConfig:
    return dataset_config("bci", root, LEVELS)


def test_reads_levels_splits_and_ihc_partners(tmp_path, caplog):
    layout = make_bci(tmp_path)
    with caplog.at_level(logging.WARNING):
        listing = read(bci_config(layout.root), layout.root)
    found = {raw.relative_path: raw for raw in listing.images}
    assert set(found) == set(layout.images)
    for relative, expected in layout.images.items():
        raw = found[relative]
        assert raw.source_path == layout.root / relative
        assert (raw.label_name, raw.official_split, raw.group) == (expected.label, expected.split,
                                                                  "")
        ihc_path = str(expected.ihc.resolve()) if expected.ihc else ""
        assert raw.extra == {"pair": expected.pair, "ihc_path": ihc_path}
    assert found[UNPAIRED].extra["ihc_path"] == ""
    assert "1 H&E image(s) have no IHC partner under IHC/" in listing.notes
    assert "1 H&E image(s) have no IHC partner" in caplog.text
    assert listing.ignored_files == []
    assert listing.listed_counts() == Counter(
        (image.split, image.label) for image in layout.images.values())


def test_ihc_path_is_absolute_under_a_relative_root(tmp_path, monkeypatch):
    layout = make_bci(tmp_path / "BCI_dataset")
    monkeypatch.chdir(tmp_path)
    listing = read(bci_config(Path("BCI_dataset")), Path("BCI_dataset"))
    paired = next(raw for raw in listing.images if raw.relative_path != UNPAIRED)
    assert Path(paired.extra["ihc_path"]).is_absolute()
    assert Path(paired.extra["ihc_path"]) == layout.images[paired.relative_path].ihc.resolve()


def test_misnamed_file_is_left_out(tmp_path, caplog):
    layout = make_bci(tmp_path)
    stray = layout.root / "HE" / "test" / "00099_test.png"
    (layout.root / "HE" / "test" / "00000_test_1+.png").rename(stray)
    with caplog.at_level(logging.WARNING):
        listing = read(bci_config(layout.root), layout.root)
    assert listing.ignored_files == [(stray, "not named <number>_<split>_<HER2 level>.png")]
    assert str(stray) in caplog.text
    assert "HE/test/00000_test_1+.png" not in {raw.relative_path for raw in listing.images}


def test_file_in_the_other_split_folder_is_an_error(tmp_path):
    layout = make_bci(tmp_path)
    moved = layout.root / "HE" / "train" / "00003_test_3+.png"
    (layout.root / "HE" / "test" / "00003_test_3+.png").rename(moved)
    with pytest.raises(DataError) as error:
        read(bci_config(layout.root), layout.root)
    assert f"{moved} is named for split 'test' but lies in HE/train/" in str(error.value)


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_or_renamed_split_folder_is_an_error(tmp_path, split):
    layout = make_bci(tmp_path)
    folder = layout.root / "HE" / split
    folder.rename(layout.root / "HE" / split.capitalize())
    with pytest.raises(DataError, match=f"H&E folder {folder} does not exist"):
        read(bci_config(layout.root), layout.root)


def test_prepare_keeps_the_official_test_split_and_pairs(tmp_path, caplog):
    layout = make_bci(tmp_path / "raw")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        prepare_dataset(bci_config(layout.root), PREPARE, layout.root, out, seed=0, threads=2)
    manifest = pd.read_csv(out / "manifest.tsv", sep="\t", keep_default_na=False)
    manifest["relative"] = [Path(p).relative_to(layout.root.resolve()).as_posix()
                            for p in manifest["source_path"]]
    rows = manifest.set_index("relative")
    assert set(rows.index) == set(layout.images)
    for relative, expected in layout.images.items():
        row = rows.loc[relative]
        assert (row["label_name"], row["label"]) == (expected.label, LEVELS.index(expected.label))
        assert row["pair"] == expected.pair
        assert row["ihc_path"] == (str(expected.ihc.resolve()) if expected.ihc else "")
        if expected.split == "test":
            assert row["split"] == "test"
        else:
            assert row["split"] in ("train", "val")
    official_train = manifest[manifest["split"] != "test"]
    per_split = pd.crosstab(official_train["label_name"], official_train["split"])
    assert set(per_split.index) == set(LEVELS) and (per_split >= 1).all().all()

    source = json.loads((out / "source.json").read_text())
    assert "1 H&E image(s) have no IHC partner under IHC/" in source["notes"]
    listed_train = sum(image.split == "train" for image in layout.images.values())
    listed_test = len(layout.images) - listed_train
    mismatches = source["published_count_mismatches"]
    assert len(mismatches) == 2
    for found, split, published in [(listed_train, "train", 3896), (listed_test, "test", 977)]:
        [message] = [m for m in mismatches if f"split '{split}'" in m]
        assert f"list {found} images split '{split}', the published count is {published}" \
            in message
        assert message in caplog.text
