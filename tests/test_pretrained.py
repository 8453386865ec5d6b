"""Pretrained models: used as they are for a dataset (datasets.<name>.pretrained, checked
against it first) or fine-tuned (init_from, class rows carried over by name)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from diffusers import UNet2DModel

from benchmarks.adm_reference import reference_unet
from cellflow.classifier import NoiseAwareClassifier
from cellflow.config import DatasetConfig, PrepareConfig, validate_config
from cellflow.data import prepare_dataset
from cellflow.diffusion import NoiseSchedule, UNetArchitecture, build_unet
from cellflow.pretrained import for_fine_tuning, use_pretrained
from cellflow.stages import StageSpec, train_classifier, train_diffusion
from cellflow.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["normal", "neoplastic"]
TINY = UNetArchitecture((16, 32), 1, (1,), 16)
# 1000 classes, as OpenAI's ImageNet models have; two of them share the dataset's names
PRETRAINED_CLASSES = [f"imagenet{index}" for index in range(1000)]
PRETRAINED_CLASSES[17], PRETRAINED_CLASSES[503] = "neoplastic", "normal"


def run_config(**sections) -> dict:
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["datasets"] = {"toy": {"kind": "synthetic", "resolution": 16, "classes": CLASSES}}
    raw.pop("downstream")
    for model in ("diffusion", "classifier"):
        raw[model]["model"].update(block_out_channels=[16, 32], attention_levels=[1],
                                   attention_head_dim=16)
        raw[model]["train"].update(steps=4, checkpoint_every=2, batch_size=8)
    raw["diffusion"]["samples"] = {"per_class": 1, "ddim_steps": 2}
    raw["classifier"]["eval"] = {"bands": 2, "noise_draws": 1}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return validate_config(raw)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrained")
    generate_dataset(root / "raw", CLASSES, 16, 16, seed=0)
    dataset = DatasetConfig.from_dict("toy", run_config()["datasets"]["toy"])
    prepare_dataset(dataset, PrepareConfig("exclude", "upscale", "drop", 4), root / "raw/images",
                    root / "data", seed=0, threads=1)
    return root / "data" / "manifest.tsv"


def save_diffusion(folder: Path, unet: UNet2DModel, classes: list[str] | None = None) -> Path:
    unet.save_pretrained(folder / "unet")
    NoiseSchedule().ddpm().save_pretrained(folder / "scheduler")
    if classes is not None:
        (folder / "classes.json").write_text(json.dumps(classes))
    return folder


def tiny_classifier(classes: int, size: int = 16) -> NoiseAwareClassifier:
    return NoiseAwareClassifier(sample_size=size, num_classes=classes, block_out_channels=(16, 32),
                                layers_per_block=1, attention_levels=(1,), attention_head_dim=16,
                                norm_num_groups=16)


def test_a_1000_class_model_fine_tunes_to_the_datasets_classes(manifest, tmp_path):
    torch.manual_seed(0)
    pretrained = build_unet(TINY, 16, 1000)
    folder = save_diffusion(tmp_path / "imagenet", pretrained, PRETRAINED_CLASSES)
    entry = {"path": str(folder)}
    model, report = for_fine_tuning(entry, "diffusion", ["normal", "neoplastic", "mitosis"],
                                    "diffusion.init_from")
    assert model.config.num_class_embeds == 3
    rows = model.class_embedding.weight.detach()
    source = pretrained.class_embedding.weight.detach()
    assert torch.equal(rows[0], source[503]) and torch.equal(rows[1], source[17])
    assert report["carried_over"] == ["normal", "neoplastic"] and report["fresh"] == ["mitosis"]
    assert not any(torch.equal(rows[2], row) for row in source)
    # every other weight is the pretrained one
    pretrained_state = pretrained.state_dict()
    for name, tensor in model.state_dict().items():
        if name != "class_embedding.weight":
            assert torch.equal(tensor, pretrained_state[name]), name

    config = run_config(diffusion={"init_from": entry, "label_dropout": 0.1})
    config["diffusion"]["train"].update(steps=30, learning_rate=1e-3, checkpoint_every=30,
                                        warmup_steps=1)
    spec = StageSpec(DatasetConfig.from_dict("toy", config["datasets"]["toy"]), NoiseSchedule(),
                     config["diffusion"], 0)
    out = tmp_path / "fine-tuned"
    result = train_diffusion(spec, manifest, out, tmp_path / "checkpoints")
    losses = result.log["loss"].to_numpy()
    assert losses[-10:].mean() < losses[:5].mean(), losses
    tuned = UNet2DModel.from_pretrained(out / "unet")
    assert tuned.config.num_class_embeds == 3  # two classes and the null class
    record = json.loads((out / "training.json").read_text())
    assert record["initialised_from"]["carried_over"] == CLASSES
    assert record["fingerprint"]["init_from"]["digest"]  # another file is another model


def test_a_classifier_fine_tunes_with_its_head_rows_mapped(manifest, tmp_path):
    torch.manual_seed(0)
    pretrained = tiny_classifier(1000)
    pretrained.save_pretrained(tmp_path / "imagenet" / "classifier")
    (tmp_path / "imagenet" / "classes.json").write_text(json.dumps(PRETRAINED_CLASSES))
    config = run_config(classifier={"init_from": {"path": str(tmp_path / "imagenet")}})
    spec = StageSpec(DatasetConfig.from_dict("toy", config["datasets"]["toy"]), NoiseSchedule(),
                     config["classifier"], 0)
    train_classifier(spec, manifest, tmp_path / "out", tmp_path / "checkpoints")
    tuned = NoiseAwareClassifier.from_pretrained(tmp_path / "out" / "classifier")
    assert tuned.config.num_classes == 2
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert record["initialised_from"]["carried_over"] == CLASSES


def pretrained_spec(model: str, path: Path, **dataset) -> dict:
    config = run_config()
    entry = {**config["datasets"]["toy"], **dataset}
    return {"dataset_name": "toy", "dataset": entry, "noise_schedule": config["noise_schedule"],
            "model": model, "key": f"datasets.toy.pretrained.{model}",
            "pretrained": {"path": str(path)},
            "settings": {"samples": config["diffusion"]["samples"],
                         "eval": config["classifier"]["eval"]}, "seed": 0}


def test_a_pretrained_model_is_put_where_a_trained_one_would_be(manifest, tmp_path):
    torch.manual_seed(0)
    folder = save_diffusion(tmp_path / "given", build_unet(TINY, 16, 2), CLASSES)
    use_pretrained(pretrained_spec("diffusion", folder), manifest, tmp_path / "diffusion")
    out = tmp_path / "diffusion"
    assert UNet2DModel.from_pretrained(out / "unet").config.num_class_embeds == 2
    assert (out / "samples.png").stat().st_size > 0 and (out / "scheduler").is_dir()
    assert pd.read_csv(out / "train_log.csv").empty  # not trained here: the figure says so
    assert json.loads((out / "pretrained.json").read_text())["path"] == str(folder)

    tiny_classifier(2).save_pretrained(tmp_path / "given_classifier" / "classifier")
    use_pretrained(pretrained_spec("classifier", tmp_path / "given_classifier"), manifest,
                   tmp_path / "classifier")
    table = pd.read_csv(tmp_path / "classifier" / "accuracy_by_t.tsv", sep="\t")
    assert len(table) == 2 and table["accuracy"].between(0, 1).all()


def test_a_pretrained_model_that_cannot_serve_the_dataset_is_refused(manifest, tmp_path):
    torch.manual_seed(0)
    key = "datasets.toy.pretrained.diffusion"
    cases = {
        "other_resolution": (save_diffusion(tmp_path / "a", build_unet(TINY, 32, 2)),
                             "is for 32 px images, the dataset is prepared at 16 px"),
        "four_classes": (save_diffusion(tmp_path / "b", build_unet(TINY, 16, 4)),
                         "has 4 label embeddings, the dataset 2 classes"),
        "class_order": (save_diffusion(tmp_path / "c", build_unet(TINY, 16, 2),
                                       ["neoplastic", "normal"]),
                        "classes are neoplastic, normal in label order"),
        "missing": (tmp_path / "nowhere", "does not exist"),
        "not_a_model": (tmp_path, "is not a diffusion model folder"),
    }
    for name, (path, message) in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
            use_pretrained(pretrained_spec("diffusion", path), manifest, tmp_path / name)
        assert key in str(error.value)
        assert not (tmp_path / name).exists()  # nothing half-written

    other_schedule = tmp_path / "d"
    save_diffusion(other_schedule, build_unet(TINY, 16, 2))
    NoiseSchedule(beta_schedule="squaredcos_cap_v2").ddpm().save_pretrained(
        other_schedule / "scheduler")
    with pytest.raises(ValueError, match="another noise schedule .*beta_schedule"):
        use_pretrained(pretrained_spec("diffusion", other_schedule), manifest, tmp_path / "e")
    tiny_classifier(3).save_pretrained(tmp_path / "f" / "classifier")
    with pytest.raises(ValueError, match="the classifier has 3 classes, the dataset 2"):
        use_pretrained(pretrained_spec("classifier", tmp_path / "f"), manifest, tmp_path / "g")


def test_config_checks_pretrained_entries_and_cfg_needs():
    from cellflow.config import ConfigError

    with pytest.raises(ConfigError, match=r"datasets.toy.pretrained.diffusion.adm_flags: a "
                                          r"guided-diffusion checkpoint"):
        run_config_with_dataset(pretrained={"diffusion": {"path": "model.pt"}})
    with pytest.raises(ConfigError, match=r"pretrained.classifier.qkv_order: only for a .pt"):
        run_config_with_dataset(pretrained={"classifier": {"path": "folder",
                                                           "qkv_order": "new"}})
    with pytest.raises(ConfigError, match=r"generation.methods: cellflow_cfg needs .*"
                                          r"diffusion.label_dropout > 0"):
        run_config(generation={"methods": ["cellflow_cfg"]})
    run_config(generation={"methods": ["cellflow_cfg"]}, diffusion={"label_dropout": 0.1})
    with pytest.raises(ConfigError, match=r"downstream.strategies.adm: trains on the images of "
                                          r"generation method 'adm'"):
        validate_config({**run_config(generation={"methods": ["cellflow"]}),
                         "downstream": {"strategies": {"none": {}, "adm": {}}}})


def run_config_with_dataset(**dataset) -> dict:
    config = run_config()
    config["datasets"]["toy"].update(dataset)
    return validate_config(config)


# A guided-diffusion checkpoint at the toy dataset's 16 px (guided-diffusion's GroupNorm needs
# widths that are multiples of 32).
ADM_FLAGS = ("--image_size 16 --num_channels 32 --channel_mult 1,2 --num_res_blocks 1 "
             "--attention_resolutions 8 --num_head_channels 32 --class_cond True "
             "--resblock_updown True --use_scale_shift_norm True --learn_sigma True")


def guided_diffusion_checkpoint(path: Path, classes: int) -> Path:
    torch.save(reference_unet(ADM_FLAGS, classes, seed=3).state_dict(), path)
    return path


def test_a_1000_class_guided_diffusion_checkpoint_fine_tunes(manifest, tmp_path):
    checkpoint = guided_diffusion_checkpoint(tmp_path / "imagenet.pt", 1000)
    entry = {"path": str(checkpoint), "adm_flags": ADM_FLAGS,
             "checkpoint_classes": PRETRAINED_CLASSES}
    model, report = for_fine_tuning(entry, "diffusion", ["neoplastic", "mitosis", "normal"],
                                    "diffusion.init_from")
    assert model.config.num_class_embeds == 3 and model.config.out_channels == 6
    state = torch.load(checkpoint, weights_only=True)
    rows = model.class_embedding.weight.detach()
    assert torch.equal(rows[0], state["label_emb.weight"][17])
    assert torch.equal(rows[2], state["label_emb.weight"][503])
    assert report["fresh"] == ["mitosis"]

    config = run_config(diffusion={"init_from": entry})
    config["diffusion"]["train"].update(steps=20, learning_rate=1e-3, checkpoint_every=20,
                                        warmup_steps=1)
    spec = StageSpec(DatasetConfig.from_dict("toy", config["datasets"]["toy"]), NoiseSchedule(),
                     config["diffusion"], 0)
    result = train_diffusion(spec, manifest, tmp_path / "out", tmp_path / "checkpoints")
    losses = result.log["loss"].to_numpy()
    assert losses[-8:].mean() < losses[:4].mean(), losses


def test_a_guided_diffusion_checkpoint_is_converted_by_the_pretrained_job(manifest, tmp_path):
    checkpoint = guided_diffusion_checkpoint(tmp_path / "mhist.pt", 2)
    spec = pretrained_spec("diffusion", checkpoint)
    spec["pretrained"]["adm_flags"] = ADM_FLAGS
    use_pretrained(spec, manifest, tmp_path / "diffusion")
    record = json.loads((tmp_path / "diffusion" / "pretrained.json").read_text())
    assert record["format"] == "guided-diffusion"
    # guided-diffusion numbered the classes by sorted name: neoplastic 0, normal 1; ours are
    # normal 0, neoplastic 1, so the label rows swap
    unet = UNet2DModel.from_pretrained(tmp_path / "diffusion" / "unet")
    state = torch.load(checkpoint, weights_only=True)
    assert torch.equal(unet.class_embedding.weight.detach()[0], state["label_emb.weight"][1])
    spec["pretrained"]["adm_flags"] = ADM_FLAGS.replace("--num_res_blocks 1",
                                                        "--num_res_blocks 2")
    with pytest.raises(ValueError, match="datasets.toy.pretrained.diffusion: .*mhist.pt"):
        use_pretrained(spec, manifest, tmp_path / "wrong")
