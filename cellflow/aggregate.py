"""Benchmark tables: per (dataset, backbone, strategy) mean, SD and 95% CI over seeds, and each
strategy's paired difference to ``none`` (same dataset, backbone and seed); per-class precision,
recall and F1 and the seed-averaged confusion matrices of the same runs."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

# Higher is better for these; the benchmark figure calls the highest mean the best.
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
# Lower is better: summarised alongside, kept out of METRICS so that nothing that ranks
# METRICS by their highest mean ranks these too. Runs written before a metric existed give NaN.
LOWER_IS_BETTER = ("ece",)
KEYS = ["dataset", "backbone", "strategy"]
PER_CLASS_METRICS = ("precision", "recall", "f1")


def read_metrics(paths: Iterable[str | Path], dataset: str) -> list[dict[str, Any]]:
    """The metrics.json of each downstream run, with the dataset it belongs to."""
    return [{**json.loads(Path(path).read_text()), "dataset": dataset} for path in paths]


def read_runs(paths: Iterable[str | Path], dataset: str) -> pd.DataFrame:
    """One row per run (metrics.json of a downstream run) with its test metrics and the
    number of test images they were measured on (``n_test``)."""
    return pd.DataFrame([{**_run_key(run), "seed": run["seed"],
                          "n_test": run["test"].get("n", np.nan),
                          **{metric: run["test"].get(metric, np.nan)
                             for metric in METRICS + LOWER_IS_BETTER}}
                         for run in read_metrics(paths, dataset)])


def _run_key(run: dict[str, Any]) -> dict[str, Any]:
    return {key: run[key] for key in KEYS}


def mean_ci(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample SD and the t-distribution confidence interval of the mean."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return (np.nan,) * 4
    mean = float(values.mean())
    if len(values) < 2:
        return mean, np.nan, np.nan, np.nan
    sd = float(values.std(ddof=1))
    if sd == 0:
        return mean, 0.0, mean, mean
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean,
                                 scale=sd / np.sqrt(len(values)))
    return mean, sd, float(low), float(high)


def summarise(runs: pd.DataFrame, baseline: str = "none") -> pd.DataFrame:
    """Long table: one row per (dataset, backbone, strategy, metric).

    ``diff_vs_{baseline}`` is always strategy minus baseline; ``better`` says which sign is an
    improvement (negative for ECE), so a reader of the table never has to guess.
    """
    rows = []
    for (dataset, backbone, name), group in runs.groupby(KEYS, sort=True):
        reference = runs[(runs["dataset"] == dataset) & (runs["backbone"] == backbone)
                         & (runs["strategy"] == baseline)].set_index("seed")
        for metric in METRICS + LOWER_IS_BETTER:
            mean, sd, low, high = mean_ci(group[metric].to_numpy())
            paired = group.set_index("seed")[metric].sub(reference[metric]).dropna()
            diff, _, diff_low, diff_high = (mean_ci(paired.to_numpy()) if name != baseline
                                            and len(paired) else (np.nan,) * 4)
            rows.append({"dataset": dataset, "backbone": backbone, "strategy": name,
                         "metric": metric, "better": "lower" if metric in LOWER_IS_BETTER
                         else "higher", "n_seeds": len(group), "mean": mean, "sd": sd,
                         "ci95_low": low, "ci95_high": high,
                         f"diff_vs_{baseline}": diff, "diff_ci95_low": diff_low,
                         "diff_ci95_high": diff_high, "n_paired": len(paired)})
    return pd.DataFrame(rows)


def per_class_from_confusion(confusion: np.ndarray) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class of a confusion matrix (rows: true class).

    As sklearn's ``precision_recall_fscore_support(zero_division=0)`` computes them, so runs
    written before metrics.json carried ``per_class`` give the same numbers.
    """
    confusion = np.asarray(confusion, dtype=float)
    hits, support, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)

    def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
        return np.divide(numerator, denominator, out=np.zeros_like(numerator),
                         where=denominator > 0)

    precision, recall = ratio(hits, predicted), ratio(hits, support)
    f1 = ratio(2 * hits, support + predicted)  # 2TP / (2TP + FP + FN), sklearn's form
    return [{"class_index": index, "precision": float(precision[index]),
             "recall": float(recall[index]), "f1": float(f1[index]),
             "support": int(support[index])} for index in range(len(confusion))]


def per_class_runs(runs: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Long table: one row per (run, class, metric) of the test split, named classes."""
    rows = []
    for run in runs:
        test = run["test"]
        classes = test.get("per_class") or per_class_from_confusion(test["confusion_matrix"])
        for entry in classes:
            for metric in PER_CLASS_METRICS:
                rows.append({**_run_key(run), "seed": run["seed"],
                             "class_index": entry["class_index"],
                             "class": run["classes"][entry["class_index"]],
                             "support": entry["support"], "metric": metric,
                             "value": entry[metric]})
    return pd.DataFrame(rows)


def per_class_summary(runs: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Test precision, recall and F1 per (dataset, backbone, strategy, class, metric): mean and
    SD over seeds, ``n_seeds``, and ``support`` (test images of the class, the same each seed).

    ``runs``: what ``read_metrics`` returns.
    """
    per_run = per_class_runs(runs)
    keys = [*KEYS, "class_index", "class", "metric"]
    return (per_run.groupby(keys, sort=True)
            .agg(mean=("value", "mean"), sd=("value", "std"), n_seeds=("seed", "nunique"),
                 support=("support", "max"))
            .reset_index())


def mean_confusion(runs: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Test confusion matrix per (dataset, backbone, strategy), averaged over seeds; long form.

    One row per (true class, predicted class): ``count_mean`` (images, mean over seeds) and
    ``fraction`` (of the true class's images, so a row sums to 1: recall on the diagonal; NaN
    where the class has no test images), with ``n_seeds`` and ``n_test`` (test images per run).
    ``runs``: what ``read_metrics`` returns.
    """
    grouped: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(tuple(_run_key(run).values()), []).append(run)
    rows = []
    for key, group in sorted(grouped.items()):
        counts = np.mean([np.asarray(run["test"]["confusion_matrix"], dtype=float)
                          for run in group], axis=0)
        totals = counts.sum(1, keepdims=True)
        fractions = np.divide(counts, totals, out=np.full_like(counts, np.nan),
                              where=totals > 0)
        classes = group[0]["classes"]
        for (true, predicted), count in np.ndenumerate(counts):
            rows.append({**dict(zip(KEYS, key, strict=True)), "true_index": true,
                         "true_class": classes[true], "predicted_index": predicted,
                         "predicted_class": classes[predicted], "count_mean": float(count),
                         "fraction": float(fractions[true, predicted]),
                         "n_seeds": len(group), "n_test": float(counts.sum())})
    return pd.DataFrame(rows)
