import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellflow.config import DatasetConfig, PrepareConfig
from cellflow.data import prepare_dataset
from cellflow.datasets import KINDS
from cellflow.datasets.common import DataError
from cellflow.datasets.gleason2019 import KIND, consensus_map, read, survey, window_counts
from tests.layouts import dataset_config
from tests.layouts.gleason2019 import (
    ANNOTATORS,
    CORE_SIZES,
    MAJORITY_ONLY,
    OPTIONS,
    ORPHAN_MAP,
    PATCHES,
    STRAY_FILE,
    make_gleason2019,
    paint,
    patch_path,
)


def dataset(
    root: Path, classes=("benign", "grade3", "grade4", "grade5"), **options
) -> DatasetConfig:
    return dataset_config("gleason2019", root, classes, name="gleason",
                          options={**OPTIONS, **options})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_gleason2019(tmp_path / "Gleason2019")
    return tmp_path / "Gleason2019"


def labels(listing) -> dict[str, str]:
    return {raw.relative_path: raw.label_name for raw in listing.images}


def reasons(listing, root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): reason for path, reason in listing.ignored_files}


def test_patches_get_consensus_labels_core_groups_and_extra_columns(tmp_path):
    root = tmp_path / "Gleason2019"
    expected = make_gleason2019(root)
    listing = read(dataset(root), root)
    assert (
        labels(listing) == expected == {patch_path(*key): label for key, label in PATCHES.items()}
    )
    by_path = {raw.relative_path: raw for raw in listing.images}
    for core, left, top in PATCHES:
        raw = by_path[patch_path(core, left, top)]
        assert raw.source_path == root / "Train Imgs" / f"{core}.jpg"
        assert raw.region == (left, top, left + 32, top + 32)
        assert raw.official_split is None and raw.group == core
        assert raw.extra["core"] == core and (raw.extra["x"], raw.extra["y"]) == (left, top)
        assert raw.extra["annotators"] == ANNOTATORS[core]
    assert by_path[patch_path("slide001_core001", 64, 64)].extra == {
        "core": "slide001_core001",
        "x": 64,
        "y": 64,
        "purity": 0.9375,
        "labelled": 0.875,
        "annotators": 3,
    }
    assert by_path[patch_path("slide001_core001", 32, 0)].extra["purity"] == 1.0
    assert not listing.has_official_split
    assert listing.listed == {
        ("", "benign"): 5,
        ("", "grade3"): 3,
        ("", "grade4"): 2,
        ("", "grade5"): 3,
    }
    assert sorted(p.relative_to(root).as_posix() for p in listing.files_read) == sorted(
        f"{folder}/{core}_classimg_nonconvex.png"
        for core, folder in [
            ("slide001_core001", "Maps1_T"),
            ("slide001_core001", "Maps2_T"),
            ("slide001_core001", "Maps3_T"),
            ("slide001_core002", "Maps1_T"),
            ("slide001_core002", "Maps4_T"),
            ("slide002_core001", "Maps2_T"),
        ]
    )
    notes = " ".join(listing.notes)
    assert "not a canonical protocol" in notes and "6 read as benign" in notes
    assert "patch_size=32, stride=32, purity=0.9, min_labelled=0.5" in notes


def test_wrong_size_map_missing_maps_and_stray_files_are_listed(root, caplog):
    with caplog.at_level(logging.WARNING):
        listing = read(dataset(root), root)
    listed = reasons(listing, root)
    wrong = listed["Train Imgs/slide002_core002.jpg"]
    assert f"map {root / 'Maps3_T/slide002_core002_classimg_nonconvex.png'} is 64x64" in wrong
    assert f"the core {root / 'Train Imgs/slide002_core002.jpg'} is 96x96" in wrong
    assert "no pathologist's map" in listed["Train Imgs/slide003_core001.jpg"]
    assert "has no image" in listed[ORPHAN_MAP.as_posix()]
    assert "not a <core>_classimg_nonconvex.png map" in listed[STRAY_FILE.as_posix()]
    assert len(listed) == 4
    assert "is 64x64, but the core" in caplog.text
    assert not any(raw.group == "slide002_core002" for raw in listing.images)


def test_unanimous_consensus_keeps_only_agreement(root):
    listing = read(dataset(root, consensus="unanimous"), root)
    assert labels(listing) == {
        patch_path(*key): label for key, label in PATCHES.items() if key not in MAJORITY_ONLY
    }
    assert "all of a core's available maps agree" in " ".join(listing.notes)


def test_consensus_counts_unlabelled_votes_and_ties_leave_pixels_unlabelled():
    # class indices: 0 unlabelled, 1 benign, 2..4 grade3..grade5
    maps = [np.array([[1, 2, 2, 0, 1]]), np.array([[1, 2, 3, 1, 0]]), np.array([[1, 3, 4, 0, 0]])]
    assert consensus_map(maps, "majority").tolist() == [[1, 2, 0, 0, 0]]
    assert consensus_map(maps[:2], "majority").tolist() == [[1, 2, 0, 0, 0]]
    assert consensus_map(maps, "unanimous").tolist() == [[1, 0, 0, 0, 0]]
    assert consensus_map(maps[:1], "majority").tolist() == maps[0].tolist()


def test_window_counts_match_a_direct_count_for_any_stride_up_to_the_border():
    mask = np.random.default_rng(1).random((37, 53)) < 0.3
    for size, stride in [(8, 3), (8, 8), (8, 11), (37, 5)]:
        tops = np.arange(0, 37 - size + 1, stride)
        lefts = np.arange(0, 53 - size + 1, stride)
        direct = [
            [mask[top : top + size, left : left + size].sum() for left in lefts] for top in tops
        ]
        assert window_counts(mask, tops, lefts, size).tolist() == direct


def test_purity_and_min_labelled_options_admit_the_borderline_patches(root):
    impure = patch_path("slide001_core001", 64, 32)
    sparse = patch_path("slide001_core001", 0, 64)
    assert impure not in labels(read(dataset(root), root))
    loose = read(dataset(root, purity=0.7, min_labelled=0.3), root)
    assert labels(loose)[impure] == "grade4" and labels(loose)[sparse] == "grade5"
    extra = {raw.relative_path: raw.extra for raw in loose.images}
    assert (extra[impure]["purity"], extra[impure]["labelled"]) == (0.75, 1.0)
    assert (extra[sparse]["purity"], extra[sparse]["labelled"]) == (1.0, 0.375)


def test_min_annotators_leaves_out_cores_with_fewer_maps(root):
    listing = read(dataset(root, min_annotators=2), root)
    assert {raw.group for raw in listing.images} == {"slide001_core001", "slide001_core002"}
    assert reasons(listing, root)["Train Imgs/slide002_core001.jpg"] == (
        "1 pathologist map(s), under datasets.gleason.options.min_annotators (2)"
    )
    only_three = read(dataset(root, min_annotators=3), root)
    assert {raw.group for raw in only_three.images} == {"slide001_core001"}


def test_a_stride_under_the_patch_size_gives_overlapping_patches_inside_the_core(root):
    listing = read(dataset(root, stride=16, min_labelled=0.6), root)
    on_wide_core = {
        (raw.extra["x"], raw.extra["y"]): raw.label_name
        for raw in listing.images
        if raw.group == "slide002_core001"
    }
    # (48, 32) straddles the two grade5 tiles; the other overlapping windows fail purity or
    # min_labelled
    assert on_wide_core == {
        (0, 0): "grade3",
        (32, 0): "benign",
        (32, 32): "grade5",
        (48, 32): "grade5",
        (64, 32): "grade5",
    }
    assert len(listing.images) > len(PATCHES)
    for raw in listing.images:
        width, height = CORE_SIZES[raw.group]
        assert raw.region[2] <= width and raw.region[3] <= height


def test_an_unknown_map_value_is_an_error_naming_the_map_and_value(root):
    bad = root / "Maps2_T" / "slide002_core001_classimg_nonconvex.png"
    Image.fromarray(paint((96, 64), [(0, 0, 32, 32, 2)])).save(bad)
    with pytest.raises(DataError, match=rf"{bad}: pixel value\(s\) 2 are not Gleason2019"):
        read(dataset(root), root)


def test_a_colour_map_is_an_error(root):
    bad = root / "Maps4_T" / "slide001_core002_classimg_nonconvex.png"
    Image.new("RGB", (96, 96)).save(bad)
    with pytest.raises(DataError, match=rf"{bad}: mode RGB, 3 channels; a Gleason2019 map"):
        read(dataset(root), root)


def test_an_unreadable_core_image_is_listed(root):
    broken = root / "Train Imgs" / "slide001_core002.jpg"
    broken.write_bytes(b"not a jpeg")
    listing = read(dataset(root), root)
    assert "unreadable core image" in reasons(listing, root)["Train Imgs/slide001_core002.jpg"]
    assert "slide001_core002" not in {raw.group for raw in listing.images}


def test_an_undecodable_map_leaves_its_core_out(root):
    broken = root / "Maps4_T" / "slide001_core002_classimg_nonconvex.png"
    broken.write_bytes(broken.read_bytes()[:-60])  # the size is in the header, the pixels cut
    listing = read(dataset(root), root)
    reason = reasons(listing, root)["Train Imgs/slide001_core002.jpg"]
    assert reason.startswith(f"map {broken} is unreadable")
    assert "slide001_core002" not in {raw.group for raw in listing.images}


@pytest.mark.parametrize(
    "broken, message",
    [
        ("Train Imgs", r"Gleason2019 core image folder .*Train Imgs does not exist"),
        (
            "maps",
            r"no pathologist's map folder \(Maps1_T, .*Maps6_T\) in .*; it holds: "
            r"Maps1_T.unpacked, ",
        ),
        (
            "Maps4_T",
            r"map folder .*Maps4_T holds no <core>_classimg_nonconvex.png file; it "
            r"holds: Maps4_T",
        ),
    ],
)
def test_missing_folders_are_errors(root, broken, message):
    if broken == "Train Imgs":
        (root / "Train Imgs").rename(root / "Train Images")
    elif broken == "maps":
        for folder in root.glob("Maps*_T"):
            folder.rename(root / f"{folder.name}.unpacked")
    else:  # the zip unpacked into a folder of the same name
        nested = root / "Maps4_T" / "Maps4_T"
        nested.mkdir()
        for path in (root / "Maps4_T").glob("*.png"):
            path.rename(nested / path.name)
    with pytest.raises(DataError, match=message):
        read(dataset(root), root)


def test_a_core_count_other_than_the_published_one_is_noted(root, caplog):
    with caplog.at_level(logging.WARNING):
        listing = read(dataset(root), root)
    message = "holds 5 core images; the published training set has 244"
    assert message in caplog.text and message in " ".join(listing.notes)


def test_survey_reads_headers_only_and_counts_cores(root):
    bad = root / "Maps2_T" / "slide002_core001_classimg_nonconvex.png"
    Image.fromarray(paint((96, 64), [(0, 0, 32, 32, 2)])).save(bad)  # read would refuse it
    found = survey(dataset(root), root)
    assert found.images == [] and found.listed == {("", "cores"): 3}
    assert set(reasons(found, root)) == {
        "Train Imgs/slide002_core002.jpg",
        "Train Imgs/slide003_core001.jpg",
        ORPHAN_MAP.as_posix(),
        STRAY_FILE.as_posix(),
    }
    assert "patches are counted when the data stage runs" in " ".join(found.notes)
    assert "3 of the 5 cores" in " ".join(found.notes)
    assert KIND.quick_listing(dataset(root), root).listed == found.listed


def test_registry_entry_and_annotation_folders(root):
    assert KINDS["gleason2019"] is KIND
    assert KIND.known_classes({}) == ("benign", "grade3", "grade4", "grade5")
    assert KIND.annotation_files(root, {}) == [root / f"Maps{k}_T" for k in range(1, 5)]
    assert not KIND.published
    problems = list(KIND.config_problems("g", {"classes": ["benign", "grade6"]}))
    assert len(problems) == 1 and "'grade6' is not a class" in problems[0]


def test_prepare_keeps_each_core_in_one_split_with_the_extra_columns(root, tmp_path):
    out = tmp_path / "prepared"
    prepare = PrepareConfig(
        on_corrupt="error", on_small="error", on_duplicate="error", contact_sheet_images=4
    )
    manifest = prepare_dataset(
        dataset(root, classes=("benign", "grade3")), prepare, root, out, seed=0
    )
    on_disk = pd.read_csv(out / "manifest.tsv", sep="\t", keep_default_na=False)
    assert len(on_disk) == len(manifest) == 8
    patches = zip(on_disk["core"], on_disk["x"], on_disk["y"], strict=True)
    assert dict(zip(patches, on_disk["label_name"], strict=True)) == {
        key: label for key, label in PATCHES.items() if label in ("benign", "grade3")
    }
    assert {"core", "x", "y", "purity", "labelled", "annotators"} <= set(on_disk.columns)
    assert (on_disk["group"] == on_disk["core"]).all()
    assert on_disk.groupby("core")["split"].nunique().max() == 1
    assert set(on_disk["split"]) == {"train", "val", "test"}
    for path in on_disk["path"]:
        with Image.open(out / path) as image:
            assert image.size == (16, 16)
    excluded = pd.read_csv(out / "excluded.tsv", sep="\t")
    assert any(excluded["source_path"].str.endswith("slide002_core002.jpg"))
    source = json.loads((out / "source.json").read_text())
    assert source["grouped_by"] == "the reader" and not source["official_split"]
    assert any("not a canonical protocol" in note for note in source["notes"])
