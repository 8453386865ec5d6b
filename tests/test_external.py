"""The external generation method: images made outside the pipeline (e.g. by StyleGAN-XL's
own code), checked like real data and imported with a manifest like every other method's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellflow.config import DatasetConfig, SplitConfig, SyntheticConfig
from cellflow.data import DataError
from cellflow.diffusion import NoiseSchedule
from cellflow.generation.common import MANIFEST_COLUMNS, GenerationJob
from cellflow.generation.external import run

SIZE = 16
# not alphabetical: labels must follow the config's order, not the folders'
CLASSES = ("tumor", "normal")


def dataset(classes: tuple[str, ...] = CLASSES, resolution: int = SIZE) -> DatasetConfig:
    return DatasetConfig(name="mhist", kind="folder", resolution=resolution, classes=classes,
                         transitions=(), split=SplitConfig(0.1, 0.1),
                         synthetic=SyntheticConfig(1, resolution))


def job(tmp_path: Path, root: Path, name: str | None = "stylegan_xl",
        data: DatasetConfig | None = None) -> GenerationJob:
    settings = {"root": str(root), "reference": "Sauer et al. 2022, arXiv:2202.00273"}
    if name is not None:
        settings["name"] = name
    return GenerationJob(dataset=data or dataset(), schedule=NoiseSchedule(), bridge={},
                         settings=settings, seed=0, data_manifest=tmp_path / "manifest.tsv",
                         models={}, out_dir=tmp_path / "out")


def write_images(folder: Path, count: int, seed: int, size: int = SIZE, suffix: str = ".png"
                 ) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"seed{index:04d}{suffix}"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def generated(root: Path, counts: dict[str, int]) -> dict[str, list[Path]]:
    return {name: write_images(root / name, count, seed)
            for seed, (name, count) in enumerate(counts.items())}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_valid_folder_is_imported_with_a_manifest_like_the_other_methods(tmp_path):
    root = tmp_path / "sgxl"
    sources = generated(root / "mhist", {"normal": 2, "tumor": 3})
    sources["tumor"].append(write_images(root / "mhist" / "tumor", 1, 9, suffix=".tif")[0]
                            .rename(root / "mhist" / "tumor" / "seed9999.tif"))

    manifest = run(job(tmp_path, root))

    out = tmp_path / "out"
    assert list(manifest.columns) == MANIFEST_COLUMNS
    written = pd.read_csv(out / "manifest.tsv", sep="\t", keep_default_na=False)
    pd.testing.assert_frame_equal(written, manifest, check_dtype=False)
    assert manifest["target_class"].value_counts().to_dict() == {"tumor": 4, "normal": 2}
    # rows in config order; labels by config order (tumor 0, normal 1), hard labels
    assert manifest["target_class"].tolist() == ["tumor"] * 4 + ["normal"] * 2
    assert (manifest["source_class"] == manifest["target_class"]).all()
    assert manifest.groupby("target_class")["target_label"].unique().map(list).to_dict() == {
        "tumor": [0], "normal": [1]}
    assert (manifest["source_label"] == manifest["target_label"]).all()
    assert set(manifest["method"]) == {"stylegan_xl"}
    assert (manifest[["frame_index", "stair", "timestep"]].to_numpy()
            == [1, 0, 0]).all()
    assert (manifest["soft_label_weight"] == 1.0).all()
    assert manifest["source_id"].tolist()[:2] == ["stylegan_xl_tumor_0000",
                                                  "stylegan_xl_tumor_0001"]
    assert manifest["path"].iloc[0] == "images/tumor/stylegan_xl_tumor_0000.png"

    origin = pd.read_csv(out / "origin.tsv", sep="\t", keep_default_na=False)
    assert origin["source_id"].tolist() == manifest["source_id"].tolist()
    by_class = [*sources["tumor"], *sources["normal"]]  # each class in sorted path order
    for row, source in zip(origin.itertuples(), by_class, strict=True):
        output = out / row.path
        assert output.is_file() and output.suffix == ".png"
        with Image.open(output) as image:
            assert image.format == "PNG" and image.mode == "RGB"
        np.testing.assert_array_equal(pixels(output), pixels(source))
        assert row.source_path == str(source.resolve())
        assert row.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        assert row.note == ""

    summary = json.loads((out / "generation.json").read_text())
    assert summary["method"] == "stylegan_xl"
    assert summary["outputs"] == 6
    assert summary["outputs_per_class"] == {"tumor": 4, "normal": 2}
    assert summary["root"] == str(root)
    assert summary["folder"] == str((root / "mhist").resolve())
    assert summary["reference"].startswith("Sauer")
    assert summary["seconds"] >= 0


def test_the_method_is_called_external_without_a_name(tmp_path):
    root = tmp_path / "gan"
    generated(root, {"tumor": 1, "normal": 1})
    manifest = run(job(tmp_path, root, name=None))
    assert set(manifest["method"]) == {"external"}
    assert manifest["path"].tolist() == ["images/tumor/external_tumor_0000.png",
                                         "images/normal/external_normal_0000.png"]


def test_root_per_dataset_wins_over_class_folders_directly_under_root(tmp_path):
    root = tmp_path / "gan"
    generated(root / "mhist", {"tumor": 2, "normal": 1})
    generated(root, {"tumor": 5, "normal": 5})  # another set, directly under the root
    manifest = run(job(tmp_path, root))
    assert manifest["target_class"].value_counts().to_dict() == {"tumor": 2, "normal": 1}
    summary = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert summary["layout"] == "<root>/<dataset>"
    assert summary["folder"] == str((root / "mhist").resolve())


def test_class_folders_directly_under_root_are_read_without_a_dataset_folder(tmp_path):
    root = tmp_path / "gan"
    generated(root, {"tumor": 3, "normal": 2})
    manifest = run(job(tmp_path, root))
    assert manifest["target_class"].value_counts().to_dict() == {"tumor": 3, "normal": 2}
    summary = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert summary["layout"] == "<root>"


def test_a_missing_root_is_named(tmp_path):
    with pytest.raises(DataError, match=r"root .*nowhere does not exist"):
        run(job(tmp_path, tmp_path / "nowhere"))


def test_a_folder_that_is_not_a_configured_class_is_an_error(tmp_path):
    root = tmp_path / "gan"
    generated(root / "mhist", {"tumor": 1, "normal": 1, "benign": 1})
    with pytest.raises(DataError) as error:
        run(job(tmp_path, root))
    message = str(error.value)
    assert str(root / "mhist" / "benign") in message
    assert "tumor, normal" in message  # the configured classes, in config order
    assert not (tmp_path / "out").exists()


def test_a_class_without_images_names_its_folder(tmp_path):
    root = tmp_path / "gan"
    generated(root, {"tumor": 2})
    (root / "normal").mkdir()
    (root / "normal" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"normal has no images of class 'normal'") as error:
        run(job(tmp_path, root))
    assert str(root / "normal") in str(error.value)


def test_a_class_without_a_folder_names_the_folder_expected(tmp_path):
    root = tmp_path / "gan"
    generated(root, {"tumor": 2})
    with pytest.raises(DataError, match=r"no folder .*normal for class 'normal'"):
        run(job(tmp_path, root))


def test_unreadable_images_are_all_named_and_nothing_is_written(tmp_path):
    root = tmp_path / "gan"
    sources = generated(root, {"tumor": 3, "normal": 2})
    garbage = root / "tumor" / "seed0001.png"
    garbage.write_bytes(b"this is not a png")
    truncated = sources["normal"][1]
    truncated.write_bytes(truncated.read_bytes()[:60])
    previous = tmp_path / "out"
    previous.mkdir()
    (previous / "manifest.tsv").write_text("an earlier import\n")

    with pytest.raises(DataError, match=r"2 image\(s\) rejected") as error:
        run(job(tmp_path, root))
    message = str(error.value)
    assert f"{garbage}: unreadable" in message
    assert f"{truncated}: unreadable" in message
    assert str(sources["tumor"][0]) not in message
    # the previous result stays as it was
    assert (previous / "manifest.tsv").read_text() == "an earlier import\n"
    assert not (previous / "images").exists()


def test_an_image_of_another_size_is_an_error_not_resized(tmp_path):
    root = tmp_path / "gan"
    generated(root, {"tumor": 2, "normal": 2})
    wrong = write_images(root / "normal" / "x", 1, 5, size=32)[0]  # a sub-folder: read too
    with pytest.raises(DataError) as error:
        run(job(tmp_path, root))
    message = str(error.value)
    assert f"{wrong}: 32x32, but the dataset resolution is 16x16" in message
    assert "not resized" in message and "generate at 16x16" in message
    assert not (tmp_path / "out").exists()


def test_grayscale_and_rgba_are_converted_to_rgb_like_real_data(tmp_path):
    root = tmp_path / "gan"
    generated(root, {"tumor": 1, "normal": 1})
    gray = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    Image.fromarray(gray, "L").save(root / "tumor" / "seed0002.png")
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[: SIZE // 2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(root / "normal" / "seed0002.png")

    manifest = run(job(tmp_path, root))

    out = tmp_path / "out"
    converted_gray = pixels(out / manifest["path"].iloc[1])
    np.testing.assert_array_equal(converted_gray, np.repeat(gray[..., None], 3, axis=2))
    converted_rgba = pixels(out / manifest["path"].iloc[3])
    assert (converted_rgba[: SIZE // 2] == [200, 0, 0]).all()
    assert (converted_rgba[SIZE // 2:] == 255).all()  # transparent -> white, as data.to_rgb
    origin = pd.read_csv(out / "origin.tsv", sep="\t", keep_default_na=False)
    assert origin["note"].tolist() == ["", "converted from L", "", "converted from RGBA"]
    summary = json.loads((out / "generation.json").read_text())
    assert summary["converted_to_rgb"] == 2


def test_other_files_are_ignored_and_reported(tmp_path):
    root = tmp_path / "gan"
    generated(root, {"tumor": 1, "normal": 1})
    (root / "tumor" / "log.txt").write_text("sampling log")
    (root / "tumor" / ".seed0000.png").write_bytes(b"hidden")
    manifest = run(job(tmp_path, root))
    assert len(manifest) == 2
    summary = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert len(summary["ignored_files"]) == 2
    assert any("log.txt: not an image file" in line for line in summary["ignored_files"])
