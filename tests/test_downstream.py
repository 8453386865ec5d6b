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

from cellflow.aggregate import (
    mean_ci,
    mean_confusion,
    per_class_from_confusion,
    per_class_summary,
    read_metrics,
    read_runs,
    summarise,
)
from cellflow.config import DatasetConfig, PrepareConfig, validate_config
from cellflow.data import prepare_dataset
from cellflow.downstream import (
    DownstreamTrainConfig,
    classification_metrics,
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



def test_calibration_error_is_zero_when_calibrated_and_grows_with_overconfidence():
    labels = np.array([0, 1, 2, 1])
    assert classification_metrics(np.eye(3)[labels], labels, 3)["ece"] == pytest.approx(0.0)
    wrong = np.array([[0.95, 0.05], [0.9, 0.1]])  # confident, and both wrong
    assert classification_metrics(wrong, np.array([1, 1]), 2)["ece"] == pytest.approx(0.925)
    # top-class confidences 0.6 (right), 0.7 (wrong), 0.8 (right), each alone in its bin
    probs = np.array([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    assert classification_metrics(probs, np.array([0, 1, 1]), 2)["ece"] == pytest.approx(
        (0.4 + 0.7 + 0.2) / 3)


def crafted_predictions() -> tuple[np.ndarray, np.ndarray]:
    """Four classes: class 2 is never predicted, class 3 never occurs (zero divisions)."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 0])
    predicted = np.array([0, 0, 1, 3, 1, 1, 0, 1, 0, 0])
    return labels, predicted


def test_per_class_metrics_match_sklearn_and_the_confusion_matrix():
    from sklearn.metrics import precision_recall_fscore_support

    labels, predicted = crafted_predictions()
    metrics = classification_metrics(np.eye(4)[predicted], labels, 4)
    expected = np.array(precision_recall_fscore_support(labels, predicted, labels=range(4),
                                                        zero_division=0)).T
    ours = [[entry[key] for key in ("precision", "recall", "f1", "support")]
            for entry in metrics["per_class"]]
    np.testing.assert_allclose(ours, expected)
    assert metrics["per_class"][0]["precision"] == pytest.approx(3 / 5)  # by hand
    assert metrics["per_class"][2] == {"class_index": 2, "precision": 0.0, "recall": 0.0,
                                       "f1": 0.0, "support": 2}
    derived = per_class_from_confusion(np.array(metrics["confusion_matrix"]))
    pd.testing.assert_frame_equal(pd.DataFrame(derived), pd.DataFrame(metrics["per_class"]))


def run_metrics(strategy: str, seed: int, confusion: list[list[int]], *, old: bool = False
                ) -> dict:
    """A metrics.json as train_downstream writes it; ``old``: as written before per_class/ece."""
    test = {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.5, "auroc": 0.5,
            "confusion_matrix": confusion, "n": int(np.sum(confusion))}
    if not old:
        test.update(ece=(0.3 if strategy == "none" else 0.1) + 0.1 * seed,
                    per_class=per_class_from_confusion(confusion))
    return {"backbone": "resnet18", "strategy": strategy, "seed": seed,
            "classes": ["normal", "mild", "tumour"], "test": test}


SEED_CONFUSIONS = ([[4, 1, 0], [2, 2, 0], [0, 0, 0]], [[5, 0, 0], [1, 3, 0], [0, 0, 0]])


def write_runs(tmp_path: Path, old_seeds: tuple[int, ...] = ()) -> list[Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for strategy in ("none", "mixup"):
        for seed, confusion in enumerate(SEED_CONFUSIONS):
            path = tmp_path / f"{strategy}{seed}.json"
            path.write_text(json.dumps(run_metrics(strategy, seed, confusion,
                                                   old=seed in old_seeds)))
            paths.append(path)
    return paths


def test_per_class_summary_averages_seeds_and_old_runs_give_the_same(tmp_path):
    summary = per_class_summary(read_metrics(write_runs(tmp_path), "toy"))
    assert len(summary) == 2 * 3 * 3  # strategies x classes x metrics
    recall = summary[(summary["strategy"] == "none") & (summary["class"] == "normal")
                     & (summary["metric"] == "recall")].iloc[0]
    assert recall["mean"] == pytest.approx((4 / 5 + 5 / 5) / 2)
    assert recall["sd"] == pytest.approx(np.std([4 / 5, 1.0], ddof=1))
    assert recall["n_seeds"] == 2 and recall["support"] == 5

    old = per_class_summary(read_metrics(write_runs(tmp_path / "old", old_seeds=(0, 1)), "toy"))
    pd.testing.assert_frame_equal(old, summary)


def test_mean_confusion_averages_seeds_and_normalises_rows(tmp_path):
    confusion = mean_confusion(read_metrics(write_runs(tmp_path), "toy"))
    none = confusion[confusion["strategy"] == "none"]
    assert len(none) == 9 and set(none["n_seeds"]) == {2} and set(none["n_test"]) == {9}
    cell = none[(none["true_class"] == "mild") & (none["predicted_class"] == "normal")].iloc[0]
    assert cell["count_mean"] == pytest.approx(1.5) and cell["fraction"] == pytest.approx(1.5 / 4)
    rows = none.groupby("true_class")["fraction"].sum(min_count=1)
    assert rows[["normal", "mild"]].tolist() == pytest.approx([1.0, 1.0])
    assert np.isnan(rows["tumour"])  # no test images of the class: no fractions


def test_old_runs_without_per_class_or_ece_still_summarise(tmp_path):
    runs = read_runs(write_runs(tmp_path, old_seeds=(0,)), "toy")
    summary = summarise(runs)
    ece = summary[summary["metric"] == "ece"].set_index("strategy")
    assert set(ece["better"]) == {"lower"}
    assert set(summary.loc[summary["metric"] != "ece", "better"]) == {"higher"}
    assert ece.loc["mixup", "mean"] == pytest.approx(0.2)  # only the seed that has it
    # strategy minus none on the one seed both have: negative, and for ECE that is better
    assert ece.loc["mixup", "diff_vs_none"] == pytest.approx(0.2 - 0.4)
    assert ece.loc["mixup", "n_paired"] == 1 and np.isnan(ece.loc["none", "diff_vs_none"])
    everything_old = summarise(read_runs(write_runs(tmp_path, old_seeds=(0, 1)), "toy"))
    assert everything_old.loc[everything_old["metric"] == "ece", "mean"].isna().all()


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
    for split in ("val", "test"):
        assert 0 <= metrics[split]["ece"] <= 1
        assert [entry["class_index"] for entry in metrics[split]["per_class"]] == [0, 1]


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


def test_a_killed_run_resumes_from_its_last_epoch_to_the_same_weights(prepared, tmp_path,
                                                                       monkeypatch):
    from safetensors.torch import load_file

    import cellflow.downstream as stage

    def run(out: Path, work: Path) -> dict:
        return train_downstream(prepared, ["normal", "neoplastic"], SIZE, "resnet10t", "mixup",
                                None, train_config(epochs=3), 0, out, work_dir=work)

    uninterrupted = run(tmp_path / "whole", tmp_path / "work-whole")
    assert not any((tmp_path / "work-whole").iterdir()), "the checkpoint outlived its run"

    real_evaluate, calls = stage.evaluate, []

    def killed_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(stage, "evaluate", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", tmp_path / "work")
    assert not (tmp_path / "resumed").exists()
    assert len(list((tmp_path / "work").glob("*/step-0000001"))) == 1
    monkeypatch.setattr(stage, "evaluate", real_evaluate)
    resumed = run(tmp_path / "resumed", tmp_path / "work")

    assert resumed["epochs_run"] == uninterrupted["epochs_run"] == 3
    assert resumed["test"] == uninterrupted["test"]
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    again = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(whole[key], again[key]) for key in whole)
    losses = [pd.read_csv(tmp_path / name / "train_log.csv")["train_loss"].tolist()
              for name in ("whole", "resumed")]
    assert losses[0] == losses[1]
