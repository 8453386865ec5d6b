"""`cellflow new-dataset`, `cellflow show-config` and what `cellflow check-config` checks of
the machine (data roots, weights files, timm backbone names)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cellflow.cli import main
from cellflow.config import load_config, load_configs, validate_config
from cellflow.generation import METHODS
from cellflow.strategies import STRATEGIES
from tests.layouts.mhist import make_mhist
from tests.test_workflow import job_counts, snakemake

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "config" / "config.yaml"
DEMO_BASELINES = REPO / "config" / "demo-baselines.yaml"
PAPER = REPO / "config" / "paper.yaml"


def class_folders(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    """root/<class>/<i>.png: tiny distinct images."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def prose(text: str) -> str:
    """The comments of a YAML text as one line (wrapped comments joined)."""
    return " ".join(line.strip().lstrip("#").strip() for line in text.splitlines()
                    if line.strip().startswith("#"))


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_class_folder_dataset_gets_a_config_that_checks_and_plans_every_job(tmp_path, capsys):
    root = class_folders(tmp_path / "raw", {"benign": 4, "atypia": 4, "malignant": 4})
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not an image")
    out = tmp_path / "config" / "tissue.yaml"
    code, printed, _ = run(capsys, "new-dataset", "tissue", str(root), "--output", str(out))
    assert code == 0
    assert f"wrote {out}" in printed
    assert f"snakemake -n --configfile {out}" in printed
    text = prose(out.read_text())
    config = load_config(out)
    dataset = config["datasets"]["tissue"]
    # classes in folder order, transitions between consecutive ones, to be edited
    assert dataset["kind"] == "folder" and dataset["root"] == str(root)
    assert dataset["classes"] == ["atypia", "benign", "malignant"]
    assert dataset["transitions"] == [{"source": "atypia", "target": "benign"},
                                      {"source": "benign", "target": "malignant"}]
    assert "EDIT them to the biological progression" in text
    assert "atypia 4, benign 4, malignant 4 images" in text
    assert "Not classes: notes/ (no images)" in text
    assert "steps: 250  # Optimizer steps." in out.read_text()  # each key with its meaning
    # every strategy and every generation method, Cellflow benchmarked under its own name
    assert config["benchmark"] == "tissue"
    assert config["generation"]["methods"] == list(METHODS)
    assert list(config["downstream"]["strategies"]) == list(STRATEGIES)
    assert config["downstream"]["strategies"]["fmix"] == dict(STRATEGIES["fmix"].defaults)
    assert config["diffusion"]["label_dropout"] > 0  # cellflow_cfg needs the null class
    # the demo's sizes (the latent baselines' from the file layered over it)
    demo = load_configs([DEMO, DEMO_BASELINES])
    assert dataset["resolution"] == demo["datasets"]["synthetic"]["resolution"]
    for section in ("classifier", "autoencoder", "ldm", "dit", "bridge", "baselines",
                    "evaluation", "noise_schedule"):
        assert config[section] == demo[section], section
    assert config["diffusion"]["model"] == demo["diffusion"]["model"]
    assert config["diffusion"]["train"] == demo["diffusion"]["train"]
    for key in ("backbones", "seeds", "train", "pretrained"):
        assert config["downstream"][key] == demo["downstream"][key]

    code, printed, _ = run(capsys, "check-config", str(out))
    assert code == 0 and "tissue: folder, 3 classes, 32 px" in printed

    planned = job_counts(snakemake(tmp_path, "-n", "--configfile", str(out)).stdout)
    backbones, seeds = len(demo["downstream"]["backbones"]), len(demo["downstream"]["seeds"])
    assert planned["train_downstream"] == backbones * len(STRATEGIES) * seeds == 26
    assert planned["generate"] == len(METHODS) == 6
    for rule in ("prepare_data", "train_diffusion", "train_classifier", "train_autoencoder",
                 "benchmark_table", "front_page"):
        assert planned[rule] == 1, rule
    assert planned["train_latent"] == 2  # ldm and dit
    assert "synthesize_dataset" not in planned


def test_an_official_layout_gets_its_declared_classes_options_and_the_paper_sizes(
        tmp_path, capsys):
    mhist = make_mhist(tmp_path / "mhist")
    out = tmp_path / "mhist.yaml"
    code, printed, err = run(capsys, "new-dataset", "polyps", str(mhist.root), "--kind",
                             "mhist", "--preset", "paper", "--output", str(out))
    assert code == 0, err
    assert "not in annotations.csv" in err  # what the reader says of the download reaches it
    config = load_config(out)
    dataset = config["datasets"]["polyps"]
    assert dataset["classes"] == ["HP", "SSA"]
    assert dataset["options"] == {"min_agreement": 4}  # written at its documented default
    assert dataset["resolution"] == 256
    paper = load_config(PAPER)
    for section in ("classifier", "autoencoder", "ldm", "dit", "bridge", "baselines"):
        assert config[section] == paper[section], section
    assert config["diffusion"]["model"] == paper["diffusion"]["model"]
    assert config["downstream"]["backbones"] == paper["downstream"]["backbones"]
    assert config["evaluation"]["feature_network"] == paper["evaluation"]["feature_network"]
    text = prose(out.read_text())
    assert "config/paper.yaml uses classes [HP, SSA]" in text
    assert "images HP 6, SSA 6" in text
    assert run(capsys, "check-config", str(out))[0] == 0

    planned = job_counts(snakemake(tmp_path, "-n", "--configfile", str(out)).stdout)
    assert planned["train_downstream"] == 4 * len(STRATEGIES) * 3
    assert planned["generate"] == len(METHODS)


def test_an_official_layout_not_downloaded_yet_is_written_and_reported(tmp_path, capsys):
    missing = tmp_path / "gleason-download"
    out = tmp_path / "gleason.yaml"
    code, _, err = run(capsys, "new-dataset", "gleason", str(missing), "--kind", "gleason2019",
                       "--output", str(out))
    assert code == 0
    assert f"{missing}: no such folder yet" in err
    config = load_config(out)  # valid: the schema does not look at the disk
    options = config["datasets"]["gleason"]["options"]
    assert options["consensus"] == "majority" and options["patch_size"] == 1024
    assert "# stride: <integer>" in out.read_text()  # no default: a commented-out line
    code, _, err = run(capsys, "check-config", str(out))
    assert code == 1
    assert f"datasets.gleason.root: {missing} does not exist or is not a folder" in err


@pytest.mark.parametrize(("counts", "expected"), [
    (None, "no such folder"),
    ({"benign": 3}, "only one class folder with images (benign/)"),
    ({}, "no class folders with images"),
    ({"benign": 3, "bad name": 3}, "'bad name'"),
])
def test_data_that_makes_no_dataset_is_refused_naming_the_root(tmp_path, capsys, counts,
                                                                 expected):
    root = tmp_path / "raw"
    if counts is not None:
        root.mkdir()
        class_folders(root, counts)
    out = tmp_path / "x.yaml"
    code, _, err = run(capsys, "new-dataset", "x", str(root), "--output", str(out))
    assert code == 1
    assert str(root) in err and expected in err
    assert not out.exists()


def test_images_without_class_folders_are_told_apart(tmp_path, capsys):
    root = class_folders(tmp_path / "raw", {"benign": 3})
    code, _, err = run(capsys, "new-dataset", "x", str(root / "benign"), "--output",
                       str(tmp_path / "x.yaml"))
    assert code == 1 and "it holds images itself" in err


def test_an_existing_file_is_kept_unless_forced(tmp_path, capsys):
    root = class_folders(tmp_path / "raw", {"a": 3, "b": 3})
    out = tmp_path / "x.yaml"
    out.write_text("keep: me\n")
    code, _, err = run(capsys, "new-dataset", "x", str(root), "--output", str(out))
    assert code == 1 and f"{out} already exists" in err and "--force" in err
    assert out.read_text() == "keep: me\n"
    assert run(capsys, "new-dataset", "x", str(root), "--output", str(out), "--force")[0] == 0
    assert load_config(out)["datasets"]["x"]["classes"] == ["a", "b"]


def test_the_default_output_is_config_name_yaml_and_roots_resolve(tmp_path, capsys, monkeypatch):
    root = class_folders(tmp_path / "raw", {"a": 3, "b": 3})
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "new-dataset", "mine", "raw")[0] == 0
    config = load_config(tmp_path / "config" / "mine.yaml")
    assert config["benchmark"] == "mine"
    # snakemake runs in the repository: a root relative to elsewhere is written in full
    assert config["datasets"]["mine"]["root"] == str(root.resolve())


@pytest.mark.parametrize(("argv", "expected"), [
    (["--preset", "paper", "--resolution", "100"], "a multiple of 64"),
    (["--kind", "cpia"], "unlabelled pretraining pool"),
    (["--kind", "synthetic"], "config/config.yaml"),
    (["--kind", "mhsit"], "unknown dataset kind"),
])
def test_options_that_cannot_work_are_refused(tmp_path, capsys, argv, expected):
    root = class_folders(tmp_path / "raw", {"a": 3, "b": 3})
    code, _, err = run(capsys, "new-dataset", "x", str(root), "--output",
                       str(tmp_path / "x.yaml"), *argv)
    assert code == 1 and expected in err


def test_the_presets_must_be_beside_the_package(tmp_path, capsys, monkeypatch):
    root = class_folders(tmp_path / "raw", {"a": 3, "b": 3})
    monkeypatch.setattr("cellflow.scaffold.repository_root", lambda: tmp_path / "site-packages")
    code, _, err = run(capsys, "new-dataset", "x", str(root), "--output",
                       str(tmp_path / "x.yaml"))
    assert code == 1 and "installed without its repository" in err
    assert "config/config.yaml" in err


def test_show_config_merges_the_files_in_order_and_fills_every_default(tmp_path, capsys):
    override = write(tmp_path / "steps.yaml", {"diffusion": {"train": {"steps": 7}}})
    code, printed, _ = run(capsys, "show-config", str(DEMO), str(DEMO_BASELINES),
                           str(override))
    assert code == 0
    shown = yaml.safe_load(printed)
    demo, baselines = yaml.safe_load(DEMO.read_text()), yaml.safe_load(DEMO_BASELINES.read_text())
    assert shown["datasets"] == validate_config(demo)["datasets"]  # from the first file
    assert shown["generation"]["methods"] == baselines["generation"]["methods"]  # the second
    assert shown["benchmark"] == "demo-baselines"
    assert shown["diffusion"]["train"]["steps"] == 7  # the third, merged key by key
    assert shown["diffusion"]["train"]["learning_rate"] == demo["diffusion"]["train"][
        "learning_rate"]
    # defaults none of the files sets
    assert shown["prepare"]["max_image_pixels"] == 1_000_000_000
    assert shown["evaluation"]["kid_subsets"] == 100
    assert shown["diffusion"]["train"]["grad_clip"] == 1.0
    assert shown == load_configs([DEMO, DEMO_BASELINES, override])
    assert validate_config(shown) == shown  # the effective config is a config of its own
    code, commented, _ = run(capsys, "show-config", "--comments", str(DEMO))
    assert code == 0 and "# Base seed of every random choice" in commented
    assert yaml.safe_load(commented) == load_configs([DEMO])


def test_show_config_names_a_missing_file_or_a_bad_key(tmp_path, capsys):
    code, _, err = run(capsys, "show-config", str(DEMO), str(tmp_path / "nothere.yaml"))
    assert code == 1 and "nothere.yaml: config file not found" in err
    typo = write(tmp_path / "typo.yaml", {"bridge": {"frams": 3}})
    code, _, err = run(capsys, "show-config", str(DEMO), str(typo))
    assert code == 1 and "bridge.frams: unknown key (did you mean 'frames'?)" in err


def demo_with(tmp_path: Path, edit) -> Path:
    config = yaml.safe_load(DEMO.read_text())
    edit(config)
    return write(tmp_path / "edited.yaml", config)


def test_check_config_rejects_an_unknown_backbone_naming_the_key(tmp_path, capsys):
    path = demo_with(tmp_path, lambda c: c["downstream"].update(
        backbones=["resnet10t", "resnet181"]))
    code, _, err = run(capsys, "check-config", str(path))
    assert code == 1
    assert "downstream.backbones[1]: unknown timm model 'resnet181' (did you mean resnet18?)" \
        in err
    assert "backbones[0]" not in err
    # the workflow's own check (what it runs when it parses) does not import timm
    assert run(capsys, "check-config", "--schema-only", str(path))[0] == 0


def test_check_config_rejects_missing_weights_naming_each_key(tmp_path, capsys):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")

    def edit(config):
        config["downstream"]["pretrained"] = {"resnet10t": str(tmp_path / "resnet10t.pth")}
        config["evaluation"] = {"inception_weights": str(empty)}
        config["datasets"]["synthetic"]["pretrained"] = {
            "classifier": {"path": str(tmp_path / "converted" / "classifier")}}

    code, _, err = run(capsys, "check-config", str(demo_with(tmp_path, edit)))
    assert code == 1
    assert f"downstream.pretrained.resnet10t: {tmp_path / 'resnet10t.pth'} not found" in err
    assert f"evaluation.inception_weights: {empty} is empty or unreadable" in err
    assert "datasets.synthetic.pretrained.classifier.path: " in err


def test_check_config_rejects_a_missing_dataset_root(tmp_path, capsys):
    sheet = tmp_path / "samples.tsv"

    def edit(config):
        config["datasets"]["mine"] = {
            "kind": "folder", "root": str(tmp_path / "not-there"), "resolution": 32,
            "classes": ["a", "b"], "transitions": [{"source": "a", "target": "b"}],
            "split": {"group": {"sheet": str(sheet), "column": "patient"}}}

    path = demo_with(tmp_path, edit)
    code, _, err = run(capsys, "check-config", str(path))
    assert code == 1
    assert f"datasets.mine.root: {tmp_path / 'not-there'} does not exist or is not a folder" in err
    assert f"datasets.mine.split.group.sheet: {sheet} not found" in err
    assert "datasets.synthetic.root" not in err  # generated, it has none
    class_folders(tmp_path / "not-there", {"a": 3, "b": 3})
    sheet.write_text("path\tpatient\n")
    assert run(capsys, "check-config", str(path))[0] == 0
    # several files merge as they do for snakemake --configfile
    bad = write(tmp_path / "bad.yaml", {"downstream": {"backbones": ["resnet5O"]}})
    code, _, err = run(capsys, "check-config", str(path), str(bad))
    assert code == 1 and f"{path} + {bad}: downstream.backbones[0]" in err
