"""Downstream training, evaluation and the benchmark tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from cellflow.aggregate import mean_ci, read_runs, summarise
from cellflow.config import DatasetConfig, PrepareConfig, validate_config
from cellflow.data import prepare_dataset
from cellflow.downstream import (
    DownstreamTrainConfig,
    create_backbone,
    generated_training_set,
    soft_cross_entropy,
    train_downstream,
)
from cellflow.synthetic import generate_dataset

SIZE = 32


def test_soft_label_loss_equals_cross_entropy_on_one_hot():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    ours = soft_cross_entropy(logits, F.one_hot(labels, 4).float())
    assert torch.allclose(ours, F.cross_entropy(logits, labels), atol=1e-6)
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0])
    weighted = soft_cross_entropy(logits, F.one_hot(labels, 4).float(), weights)
    assert torch.allclose(weighted, F.cross_entropy(logits, labels, weight=weights), atol=1e-6)


def test_unknown_backbone_and_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet81'.*close matches: .*resnet"):
        create_backbone("resnet81", 2, SIZE)
    with pytest.raises(FileNotFoundError, match=r"downstream\.pretrained\.resnet18"):
        create_backbone("resnet18", 2, SIZE, str(tmp_path / "missing.safetensors"))
    vit = create_backbone("vit_tiny_patch16_224", 3, 64)
    assert vit(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_local_pretrained_weights_are_loaded(tmp_path):
    from safetensors.torch import save_file

    source = create_backbone("resnet18", 2, SIZE)
    save_file(source.state_dict(), str(tmp_path / "r18.safetensors"))
    loaded = create_backbone("resnet18", 2, SIZE, str(tmp_path / "r18.safetensors"))
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)


def test_confidence_intervals_match_scipy():
    values = np.array([0.71, 0.74, 0.69, 0.77, 0.72])
    mean, sd, low, high = mean_ci(values)
    expected = stats.t.interval(0.95, 4, loc=values.mean(), scale=stats.sem(values))
    assert (low, high) == pytest.approx(expected)
    assert sd == pytest.approx(values.std(ddof=1)) and mean == pytest.approx(values.mean())
    assert np.isnan(mean_ci(np.array([0.5]))[2])


def test_summary_pairs_strategies_with_none_by_seed(tmp_path):
    paths = []
    scores = {("none", 0): 0.60, ("none", 1): 0.70, ("none", 2): 0.65,
              ("mixup", 0): 0.66, ("mixup", 1): 0.71, ("mixup", 2): 0.72}
    for (name, seed), value in scores.items():
        path = tmp_path / f"{name}{seed}.json"
        metrics = dict(accuracy=value, balanced_accuracy=value, macro_f1=value, auroc=value)
        path.write_text(json.dumps({"backbone": "resnet18", "strategy": name, "seed": seed,
                                    "test": metrics}))
        paths.append(path)
    summary = summarise(read_runs(paths, "toy"))
    row = summary[(summary["strategy"] == "mixup") & (summary["metric"] == "accuracy")].iloc[0]
    differences = np.array([0.06, 0.01, 0.07])
    assert row["diff_vs_none"] == pytest.approx(differences.mean())
    assert (row["diff_ci95_low"], row["diff_ci95_high"]) == pytest.approx(
        stats.t.interval(0.95, 2, loc=differences.mean(), scale=stats.sem(differences)))
    baseline = summary[(summary["strategy"] == "none") & (summary["metric"] == "accuracy")]
    assert np.isnan(baseline["diff_vs_none"].iloc[0]) and row["n_paired"] == 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Two clearly different synthetic classes at 32 px, prepared."""
    root = tmp_path_factory.mktemp("downstream")
    generate_dataset(root / "raw", ["normal", "mild", "severe", "neoplastic"], 30, SIZE, seed=0)
    config = validate_config({"datasets": {"toy": {"kind": "synthetic", "resolution": SIZE,
                                                   "classes": ["normal", "neoplastic"]}}})
    dataset = DatasetConfig.from_dict("toy", config["datasets"]["toy"])
    prepare_dataset(dataset, PrepareConfig("exclude", "upscale", "drop", 4),
                    root / "raw" / "images", root / "data", seed=0, threads=1)
    return root / "data" / "manifest.tsv"


def train_config(**overrides) -> DownstreamTrainConfig:
    values = dict(epochs=10, batch_size=8, learning_rate=1e-3, weight_decay=0.0,
                  warmup_epochs=1, patience=10, imbalance="weighted_loss",
                  mixed_precision="no", colour_jitter=0.05)
    values.update(overrides)
    return DownstreamTrainConfig(**values)


def test_short_run_beats_chance_and_writes_its_run(prepared, tmp_path):
    out = tmp_path / "run"
    metrics = train_downstream(prepared, ["normal", "neoplastic"], SIZE, "resnet18", "none",
                               None, train_config(), 0, out)
    assert metrics["test"]["balanced_accuracy"] > 0.7, metrics["test"]
    assert metrics["generated_train_images"] == 0
    assert json.loads((out / "metrics.json").read_text())["test"] == metrics["test"]
    assert len(pd.read_csv(out / "train_log.csv")) == metrics["epochs_run"]
    assert (out / "model.safetensors").stat().st_size > 0
    assert np.array(metrics["test"]["confusion_matrix"]).sum() == metrics["test"]["n"]


def test_generated_images_join_training_only(prepared, tmp_path):
    """A generative strategy adds manifest images with soft labels to training, never to
    validation or test (those come from the data manifest's own splits)."""
    from PIL import Image

    generated = tmp_path / "generated"
    (generated / "frames").mkdir(parents=True)
    rows = []
    for index in range(10):
        Image.new("RGB", (SIZE, SIZE), (200, 100, 200)).save(generated / f"frames/{index}.png")
        rows.append({"method": "cellflow", "source_id": f"s{index}", "source_class": "normal",
                     "target_class": "neoplastic", "source_label": 0, "target_label": 1,
                     "frame_index": index % 5 + 1, "stair": 10, "timestep": 100,
                     "soft_label_weight": (index % 5 + 1) / 5, "path": f"frames/{index}.png"})
    pd.DataFrame(rows).to_csv(generated / "manifest.tsv", sep="\t", index=False)
    images, targets = generated_training_set(generated, 6, 2, seed=0)
    assert images.shape == (6, 3, SIZE, SIZE)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    metrics = train_downstream(prepared, ["normal", "neoplastic"], SIZE, "resnet18", "cellflow",
                               {"ratio": 0.25}, train_config(epochs=1), 0, tmp_path / "run",
                               generated_dir=generated)
    real = pd.read_csv(prepared, sep="\t")
    assert metrics["real_train_images"] == (real["split"] == "train").sum()
    assert metrics["generated_train_images"] == min(10, round(0.25 * metrics["real_train_images"]))
    assert metrics["test"]["n"] == (real["split"] == "test").sum()


def test_unknown_strategy_lists_the_valid_ones(prepared, tmp_path):
    with pytest.raises(ValueError, match="unknown .*'mixpu'.*cutmix.*mixup"):
        train_downstream(prepared, ["normal", "neoplastic"], SIZE, "resnet18", "mixpu", None,
                         train_config(), 0, tmp_path / "run")


def test_config_schema_offers_exactly_the_registered_strategies():
    from cellflow.augment import STRATEGIES
    from cellflow.config import load_schema

    offered = load_schema()["$defs"]["downstream"]["properties"]["strategies"]["propertyNames"]
    assert sorted(offered["enum"]) == sorted(STRATEGIES)


def test_batch_norm_statistics_are_recalibrated_on_the_training_images():
    from cellflow.downstream import recalibrate_batch_norm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model[1].running_mean.fill_(100.0)  # stale statistics, as after a handful of steps
    images = np.random.default_rng(0).integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    recalibrate_batch_norm(model, images, torch.device("cpu"), batch_size=5)
    with torch.no_grad():
        features = model[0](torch.from_numpy(images).float() / 127.5 - 1)
    torch.testing.assert_close(model[1].running_mean, features.mean(dim=(0, 2, 3)))
    assert model.training  # the mode it was in
