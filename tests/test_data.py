from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellflow.config import DatasetConfig, GroupRule, PrepareConfig, SplitConfig, SyntheticConfig
from cellflow.data import (
    DataError,
    center_crop_resize,
    grouped_split,
    image_groups,
    prepare_dataset,
    stratified_split,
)
from cellflow.datasets.folder import read_class_folders

PREPARE = PrepareConfig(on_corrupt="exclude", on_small="upscale", on_duplicate="drop",
                        contact_sheet_images=8)


def dataset(classes=("a", "b"), resolution=32, root=None, group=None) -> DatasetConfig:
    return DatasetConfig(
        name="toy", kind="folder", resolution=resolution, classes=tuple(classes),
        transitions=(), split=SplitConfig(val_fraction=0.2, test_fraction=0.2, group=group),
        synthetic=SyntheticConfig(images_per_class=4, image_size=64), root=root,
    )


def prepare(root, out, config=None, prepare_config=PREPARE, seed=0):
    return prepare_dataset(config or dataset(root=root), prepare_config, root, out, seed=seed,
                           threads=2)


def test_prepares_images_manifest_counts_and_sheets(make_folder_dataset, tmp_path):
    root = make_folder_dataset({"a": 10, "b": 15}, size=48)
    out = tmp_path / "out"
    manifest = prepare(root, out)
    assert len(manifest) == 25
    on_disk = pd.read_csv(out / "manifest.tsv", sep="\t", keep_default_na=False)
    assert list(on_disk.columns) == ["id", "path", "label", "label_name", "split",
                                     "source_path", "note", "group"]
    assert on_disk["id"].is_unique
    assert set(on_disk["label"]) == {0, 1}
    assert (on_disk["label"] == on_disk["label_name"].map({"a": 0, "b": 1})).all()
    for path in on_disk["path"]:
        with Image.open(out / path) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    counts = pd.read_csv(out / "class_counts.tsv", sep="\t").set_index("class")
    assert counts.loc["a", "total"] == 10 and counts.loc["total", "total"] == 25
    assert counts.loc["b", ["train", "val", "test"]].sum() == 15
    assert (out / "contact_sheets" / "a.png").is_file()
    assert not list(out.glob(".staging-*"))


def test_split_is_stratified_seeded_and_leak_free():
    labels = ["a"] * 100 + ["b"] * 40
    split = SplitConfig(val_fraction=0.15, test_fraction=0.2)
    first = stratified_split(labels, split, seed=3)
    assert first == stratified_split(labels, split, seed=3)
    assert first != stratified_split(labels, split, seed=4)
    table = pd.crosstab(pd.Series(labels, name="c"), pd.Series(first, name="s"))
    assert table.loc["a", "test"] == 20 and table.loc["a", "val"] == 15
    assert table.loc["b", "test"] == 8 and table.loc["b", "val"] == 6
    assert table.loc["a", "train"] == 65 and table.loc["b", "train"] == 26


def test_too_few_images_in_a_class_is_an_error():
    with pytest.raises(DataError, match="class 'b' has 2 image"):
        stratified_split(["a"] * 10 + ["b"] * 2, SplitConfig(0.2, 0.2), seed=0)


def test_official_split_is_kept_and_val_carved_from_train(make_folder_dataset, tmp_path):
    root = tmp_path / "official"
    make_folder_dataset({"a": 12, "b": 12}, root=root / "train", seed=1)
    make_folder_dataset({"a": 5, "b": 4}, root=root / "test", seed=2)
    manifest = prepare(root, tmp_path / "out")
    from_test = manifest["source_path"].str.contains("/test/")
    assert (manifest.loc[from_test, "split"] == "test").all()
    assert set(manifest.loc[~from_test, "split"]) == {"train", "val"}
    assert (manifest.loc[~from_test, "split"] == "val").sum() == 2 * round(12 * 0.2)


def test_bad_files_are_reported_converted_or_excluded(make_folder_dataset, tmp_path):
    root = make_folder_dataset({"a": 8, "b": 8}, size=48)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "a" / "empty.jpg").write_bytes(b"")
    Image.fromarray(np.full((48, 48), 128, np.uint8), "L").save(root / "b" / "gray.png")
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:24, :, 3] = 255  # lower half transparent: should come out white
    Image.fromarray(rgba, "RGBA").save(root / "b" / "alpha.png")
    (root / "b" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    manifest = prepare(root, out).set_index("id")

    excluded = pd.read_csv(out / "excluded.tsv", sep="\t")
    names = excluded["source_path"].map(lambda p: Path(p).name)
    reasons = dict(zip(names, excluded["reason"], strict=True))
    assert reasons["broken.png"].startswith("unreadable")
    assert reasons["empty.jpg"].startswith("unreadable")
    assert reasons["notes.txt"].startswith("not an image file (.jpeg")
    assert manifest.loc["b__gray", "note"] == "converted from L"
    with Image.open(out / manifest.loc["b__alpha", "path"]) as image:
        pixels = np.asarray(image)
    assert pixels.shape == (32, 32, 3)
    assert (pixels[-1, :, :] == 255).all(), "transparent pixels become white"
    assert pixels[0, :, 0].min() > 190 and pixels[0, :, 1].max() < 10


def test_corrupt_file_stops_the_run_when_asked(make_folder_dataset, tmp_path):
    root = make_folder_dataset({"a": 6, "b": 6})
    (root / "a" / "broken.png").write_bytes(b"garbage")
    strict = PrepareConfig("error", "upscale", "drop", 8)
    with pytest.raises(DataError, match=r"broken\.png: unreadable"):
        prepare(root, tmp_path / "out", prepare_config=strict)
    assert not (tmp_path / "out" / "manifest.tsv").exists()


def test_small_images_upscaled_or_refused(make_folder_dataset, tmp_path):
    root = make_folder_dataset({"a": 6, "b": 6}, size=20)
    manifest = prepare(root, tmp_path / "out")
    assert manifest["note"].str.contains("upscaled from 20x20").all()
    refuse = PrepareConfig("exclude", "error", "drop", 8)
    with pytest.raises(DataError, match=r"a_000\.png: 20x20 is smaller than the resolution 32"):
        prepare(root, tmp_path / "out2", prepare_config=refuse)


def test_duplicates_never_cross_splits(make_folder_dataset, tmp_path):
    root = make_folder_dataset({"a": 10, "b": 10})
    for copy in range(3):
        (root / "b" / f"copy_{copy}.png").write_bytes((root / "a" / "a_000.png").read_bytes())
    (root / "a" / "same_class_copy.png").write_bytes((root / "a" / "a_001.png").read_bytes())
    manifest = prepare(root, tmp_path / "out")
    assert len(manifest) == 20
    excluded = pd.read_csv(tmp_path / "out" / "excluded.tsv", sep="\t")
    # a copy filed under another class is a label conflict, and says which label was kept
    conflicts = excluded["reason"].str.startswith("label conflict: filed under class b")
    assert conflicts.sum() == 3
    assert excluded.loc[conflicts, "reason"].str.contains(r"a_000\.png \(class a\) is kept").all()
    assert excluded["reason"].str.startswith("duplicate of").sum() == 1
    strict = PrepareConfig("exclude", "upscale", "error", 8)
    with pytest.raises(DataError, match="duplicate of"):
        prepare(root, tmp_path / "out2", prepare_config=strict)


def test_missing_root_empty_class_and_unknown_class(make_folder_dataset, tmp_path):
    with pytest.raises(DataError, match="data root .*nowhere does not exist"):
        read_class_folders(dataset(), tmp_path / "nowhere")
    root = make_folder_dataset({"a": 6})
    with pytest.raises(DataError, match=r"no folder for class\(es\) b"):
        read_class_folders(dataset(), root)
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"class\(es\) b have no readable image"):
        prepare(root, tmp_path / "out")


def test_extra_folder_is_ignored_with_a_warning(make_folder_dataset, tmp_path, caplog):
    root = make_folder_dataset({"a": 6, "b": 6, "c": 6})
    manifest = prepare(root, tmp_path / "out")
    assert set(manifest["label_name"]) == {"a", "b"}
    assert "is not a configured class" in caplog.text


def test_failed_rerun_keeps_the_previous_preparation(make_folder_dataset, tmp_path):
    root = make_folder_dataset({"a": 6, "b": 6})
    out = tmp_path / "out"
    prepare(root, out)
    before = (out / "manifest.tsv").read_bytes()
    (root / "a" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(DataError):
        prepare(root, out, prepare_config=PrepareConfig("error", "upscale", "drop", 8))
    assert (out / "manifest.tsv").read_bytes() == before
    assert len(list((out / "images").rglob("*.png"))) == 12


def test_center_crop_resize_keeps_the_centre():
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255  # the central square is white, the sides black
    result = np.asarray(center_crop_resize(Image.fromarray(wide), 50))
    assert result.shape == (50, 50, 3)
    assert result[5:-5, 5:-5].min() > 240


def test_huge_images_are_excluded_by_the_configured_limit(make_folder_dataset, tmp_path):
    root = make_folder_dataset({"a": 4, "b": 4}, size=48)
    # 14000 x 14000 trips PIL's own decompression-bomb error; a mode-1 PNG stays small on disk
    Image.new("1", (14000, 14000)).save(root / "a" / "slide.png")
    Image.new("1", (3000, 3000)).save(root / "b" / "core.png")
    limit = PrepareConfig("exclude", "upscale", "drop", 8, max_image_pixels=10_000_000)
    manifest = prepare(root, tmp_path / "out", prepare_config=limit)
    excluded = pd.read_csv(tmp_path / "out" / "excluded.tsv", sep="\t")
    reason = excluded.set_index(excluded["source_path"].str.rsplit("/", n=1).str[-1])["reason"]
    assert "too large: 14000x14000 = 196,000,000 pixels" in reason["slide.png"]
    assert "prepare.max_image_pixels (10,000,000)" in reason["slide.png"]
    assert "core.png" not in reason.index  # 9 M pixels: within the limit
    assert len(manifest) == 9
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's limit is restored after the stage


def test_ids_keep_unicode_and_colliding_names_get_a_hash(make_folder_dataset, tmp_path):
    from cellflow.data import image_id

    root = make_folder_dataset({"a": 4, "b": 4}, size=48)
    rng = np.random.default_rng(5)
    for name in ("患者1.png", "病例1.png", "x y.png", "x_y.png", "tile.jpg"):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "a" / name)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "a" / "tile.png")
    assert image_id("a/患者1.png") == "a__患者1" != image_id("a/病例1.png")
    manifest = prepare(root, tmp_path / "out")
    assert manifest["id"].is_unique and len(manifest) == 14
    ids = set(manifest["id"])
    assert {"a__患者1", "a__病例1"} <= ids
    assert len([i for i in ids if i.startswith("a__x_y-")]) == 2
    assert len([i for i in ids if i.startswith("a__tile-")]) == 2


def test_outputs_follow_the_umask_and_too_few_images_name_the_dataset(make_folder_dataset,
                                                                      tmp_path):
    import os
    import stat

    root = make_folder_dataset({"a": 6, "b": 6}, size=40)
    previous = os.umask(0o022)
    try:
        prepare(root, tmp_path / "out")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "manifest.tsv").stat().st_mode) == 0o644
    few = make_folder_dataset({"a": 6, "b": 2}, size=40, root=tmp_path / "few")
    with pytest.raises(DataError, match=r"dataset 'toy' \(.*few\): class 'b' has 2 image"):
        prepare(few, tmp_path / "out-few")


def test_exif_links_hidden_files_and_nested_folders_are_reported(make_folder_dataset, tmp_path,
                                                                 caplog):
    root = make_folder_dataset({"a": 6, "b": 6}, size=40)
    sideways = np.zeros((40, 60, 3), dtype=np.uint8)
    sideways[:, :30] = 255  # left half white, stored sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(sideways).save(root / "a" / "phone.jpg", exif=exif, quality=100)
    (root / "a" / ".DS_Store").write_bytes(b"\0")
    (root / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "b" / "nested").mkdir()
    Image.fromarray(np.full((40, 40, 3), 9, dtype=np.uint8)).save(root / "b" / "nested" / "x.png")
    Image.fromarray(np.full((40, 40, 3), 50, dtype=np.uint8)).save(root / "a" / "b_000.png")
    manifest = prepare(root, tmp_path / "out")
    phone = manifest[manifest["id"] == "a__phone"].iloc[0]
    assert "turned upright (EXIF orientation 6)" in phone["note"]
    with Image.open(tmp_path / "out" / phone["path"]) as image:
        upright = np.asarray(image)
    assert upright[:8].mean() > 200 and upright[-8:].mean() < 50  # white on top after turning
    excluded = pd.read_csv(tmp_path / "out" / "excluded.tsv", sep="\t")
    reasons = dict(zip(excluded["source_path"].str.rsplit("/", n=1).str[-1], excluded["reason"],
                       strict=True))
    assert reasons["gone.png"] == "broken symbolic link" and reasons[".DS_Store"] == "hidden file"
    assert "b__nested__x" in set(manifest["id"])
    assert "is in a sub-folder of class 'b'" in caplog.text
    assert "a file named b_000.png is in class folders 'a' and 'b'" in caplog.text


def test_weights_written_through_atomic_path_follow_the_umask(tmp_path):
    import stat

    import torch
    from safetensors.torch import save_file

    from cellflow import io
    from cellflow.io import atomic_path

    with atomic_path(tmp_path / "model.safetensors") as temporary:
        save_file({"weight": torch.zeros(2)}, str(temporary))  # safetensors writes 0600
    mode = stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode)
    assert mode == 0o666 & ~io._UMASK


def short(splits):
    """train/val/test as r/a/e, to compare a split with a recorded one at a glance."""
    return "".join(split[1] for split in splits)


def test_without_a_group_rule_the_split_is_the_image_level_one(make_folder_dataset, tmp_path):
    # recorded from the image-level split before grouped splits existed: same seed, same draws
    labels = ["a"] * 9 + ["b"] * 7 + ["c"] * 5
    assert short(stratified_split(labels, SplitConfig(0.2, 0.2), seed=11)) == \
        "rarrreerarrerrarrarer"
    fixed = ["train"] * 6 + ["test"] * 3 + ["train"] * 5 + ["test"] * 2 + ["train"] * 4 + ["test"]
    assert short(stratified_split(labels, SplitConfig(0.2, 0.2), seed=11, fixed=fixed)) == \
        "rrrarreeerrarreerrrae"
    root = make_folder_dataset({"a": 10, "b": 15}, size=48)
    manifest = prepare(root, tmp_path / "out")
    assert short(manifest["split"]) == "rrarerearrrrarererrerrraa"
    on_disk = pd.read_csv(tmp_path / "out" / "manifest.tsv", sep="\t", keep_default_na=False)
    assert (on_disk["group"] == "").all()
    counts = pd.read_csv(tmp_path / "out" / "group_counts.tsv", sep="\t")
    assert list(counts.columns) == ["split", "groups", "images"]
    assert (counts["groups"] == counts["images"]).all()  # each image is its own unit


def random_layout(rng):
    """Patients of 1-8 images, mostly of one class but some of mixed classes."""
    labels, groups = [], []
    for patient in range(int(rng.integers(18, 40))):
        main = "abc"[patient % 3]
        for _ in range(int(rng.integers(1, 9))):
            labels.append(main if rng.random() > 0.3 else "abc"[int(rng.integers(3))])
            groups.append(f"p{patient}")
    return labels, groups


@pytest.mark.parametrize("layout", range(8))
def test_grouped_split_keeps_groups_whole_and_every_class_in_every_split(layout):
    labels, groups = random_layout(np.random.default_rng(layout))
    for seed in range(4):
        splits = grouped_split(labels, groups, SplitConfig(0.15, 0.2), seed)
        table = pd.DataFrame({"label": labels, "group": groups, "split": splits})
        assert (table.groupby("group")["split"].nunique() == 1).all()
        per_class = pd.crosstab(table["label"], table["split"])
        assert list(per_class.columns) == ["test", "train", "val"]
        assert (per_class > 0).all().all()
        assert splits == grouped_split(labels, groups, SplitConfig(0.15, 0.2), seed)


def test_grouped_split_is_stratified_as_far_as_groups_allow():
    labels = [label for patient in range(60) for label in ["abc"[patient % 3]] * 4]
    groups = [f"p{patient}" for patient in range(60) for _ in range(4)]
    splits = grouped_split(labels, groups, SplitConfig(0.2, 0.2), seed=5)
    table = pd.crosstab(pd.Series(labels, name="c"), pd.Series(splits, name="s"))
    assert (table["test"] == 16).all() and (table["val"] == 16).all()  # 4 patients each
    assert (table["train"] == 48).all()
    assert splits != grouped_split(labels, groups, SplitConfig(0.2, 0.2), seed=6)


def test_a_class_in_too_few_groups_is_an_error():
    labels = ["a"] * 12 + ["b"] * 6
    groups = [f"p{i % 6}" for i in range(12)] + ["q1"] * 3 + ["q2"] * 3
    with pytest.raises(DataError, match=r"class 'b' is in 2 group\(s\)"):
        grouped_split(labels, groups, SplitConfig(0.2, 0.2), seed=0)


def test_pattern_groups_with_and_without_a_capture_group():
    paths = ["tumour/TCGA-01_x3.png", "normal/TCGA-02_y1.png", "normal/sub/TCGA-01_z.png"]
    by_capture = image_groups(paths, GroupRule(pattern=r"(TCGA-\d+)_"), "toy")
    assert by_capture == ["TCGA-01", "TCGA-02", "TCGA-01"]
    assert image_groups(paths, GroupRule(pattern=r"TCGA-\d+"), "toy") == by_capture
    assert image_groups(paths, None, "toy") == ["", "", ""]
    with pytest.raises(DataError, match=r"datasets\.toy\.split\.group\.pattern .* 1 image\(s\)"
                                        r".*: normal/other\.png"):
        image_groups([*paths, "normal/other.png"], GroupRule(pattern=r"TCGA-\d+"), "toy")
    with pytest.raises(DataError, match=r"datasets\.toy\.split\.group\.pattern: '\(' is not"):
        image_groups(paths, GroupRule(pattern="("), "toy")


def test_sheet_groups_and_their_errors(tmp_path):
    paths = ["a/x.png", "b/y.png"]
    tsv = tmp_path / "samples.tsv"
    tsv.write_text("path\tpatient\n./a/x.png\tP1\nb/y.png\tP2\nc/unused.png\tP3\n")
    assert image_groups(paths, GroupRule(sheet=tsv, column="patient"), "toy") == ["P1", "P2"]
    csv = tmp_path / "samples.csv"
    csv.write_text("file,slide\na/x.png,S1\n")
    rule = GroupRule(sheet=csv, column="slide", path_column="file")
    with pytest.raises(DataError, match=r"samples\.csv: no group in column 'slide' for 1 "
                                        r"image\(s\).*: b/y\.png"):
        image_groups(paths, rule, "toy")
    with pytest.raises(DataError, match=r"samples\.tsv: no column 'slide' "
                                        r"\(datasets\.toy\.split\.group\.column\)"):
        image_groups(paths, GroupRule(sheet=tsv, column="slide"), "toy")
    with pytest.raises(DataError, match=r"sample sheet .*nowhere\.tsv "
                                        r"\(datasets\.toy\.split\.group\.sheet\) not found"):
        image_groups(paths, GroupRule(sheet=tmp_path / "nowhere.tsv", column="patient"), "toy")


def test_prepare_with_groups_writes_them_and_their_counts(make_folder_dataset, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="cellflow.data")
    root = make_folder_dataset({"a": 12, "b": 12}, size=40)
    by_last_digit = GroupRule(pattern=r"_\d\d(\d)\.png")  # 10 groups, each of both classes
    out = tmp_path / "out"
    prepare(root, out, config=dataset(root=root, group=by_last_digit))
    manifest = pd.read_csv(out / "manifest.tsv", sep="\t", dtype={"group": str})
    assert set(manifest["group"]) == {str(digit) for digit in range(10)}
    assert (manifest.groupby("group")["split"].nunique() == 1).all()
    assert (pd.crosstab(manifest["label_name"], manifest["split"]) > 0).all().all()
    counts = pd.read_csv(out / "group_counts.tsv", sep="\t").set_index("split")
    assert counts.loc["total", "groups"] == 10 and counts.loc["total", "images"] == 24
    assert counts.loc[["train", "val", "test"], "groups"].sum() == 10
    assert f"train: {counts.loc['train', 'groups']} groups" in caplog.text
    with pytest.raises(DataError, match=r"datasets\.toy\.split\.group\.pattern"):
        prepare(root, tmp_path / "out2", config=dataset(root=root, group=GroupRule(pattern="z")))
    assert not (tmp_path / "out2").exists()


def test_official_split_is_kept_and_only_val_is_grouped(make_folder_dataset, tmp_path, caplog):
    root = tmp_path / "official"
    make_folder_dataset({"a": 12, "b": 12}, root=root / "train", seed=1)
    make_folder_dataset({"a": 5, "b": 4}, root=root / "test", seed=2)
    by_last_digit = GroupRule(pattern=r"_\d\d(\d)\.png")  # digits 0-4 are in train and test
    manifest = prepare(root, tmp_path / "out", config=dataset(root=root, group=by_last_digit))
    from_test = manifest["source_path"].str.contains("/test/")
    assert (manifest.loc[from_test, "split"] == "test").all()
    carved = manifest[~from_test]
    assert set(carved["split"]) == {"train", "val"}
    assert (carved.groupby("group")["split"].nunique() == 1).all()
    assert "5 group(s) are in more than one official split" in caplog.text
