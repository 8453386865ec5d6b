"""Benchmark tables: per (dataset, backbone, strategy) mean, SD and 95% CI over seeds, and each
strategy's paired difference to ``none`` (same dataset, backbone and seed)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
KEYS = ["dataset", "backbone", "strategy"]


def read_runs(paths: Iterable[str | Path], dataset: str) -> pd.DataFrame:
    """One row per run (metrics.json of a downstream run) with its test metrics."""
    rows = []
    for path in paths:
        run = json.loads(Path(path).read_text())
        rows.append({"dataset": dataset, "backbone": run["backbone"],
                     "strategy": run["strategy"], "seed": run["seed"],
                     **{metric: run["test"][metric] for metric in METRICS}})
    return pd.DataFrame(rows)


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
    """Long table: one row per (dataset, backbone, strategy, metric)."""
    rows = []
    for (dataset, backbone, name), group in runs.groupby(KEYS, sort=True):
        reference = runs[(runs["dataset"] == dataset) & (runs["backbone"] == backbone)
                         & (runs["strategy"] == baseline)].set_index("seed")
        for metric in METRICS:
            mean, sd, low, high = mean_ci(group[metric].to_numpy())
            paired = group.set_index("seed")[metric].sub(reference[metric]).dropna()
            diff, _, diff_low, diff_high = (mean_ci(paired.to_numpy()) if name != baseline
                                            and len(paired) else (np.nan,) * 4)
            rows.append({"dataset": dataset, "backbone": backbone, "strategy": name,
                         "metric": metric, "n_seeds": len(group), "mean": mean, "sd": sd,
                         "ci95_low": low, "ci95_high": high,
                         f"diff_vs_{baseline}": diff, "diff_ci95_low": diff_low,
                         "diff_ci95_high": diff_high, "n_paired": len(paired)})
    return pd.DataFrame(rows)
