"""Downstream stage: is the data pipeline the bottleneck? And the demo's downstream budget.

Compares images/s of loading + augmentation (uint8 in memory -> float, basic flips/turns/jitter,
then each spatial strategy's batch operation) with images/s of a training step of the paper
backbones, at the paper input size (256 px). Also sums the run times of the demo's
train_downstream jobs from their Snakemake benchmark files (after `make demo`).

Run: python -m benchmarks.bench_downstream       (appends to benchmarks/results/downstream.md)
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from benchmarks.machine import record
from cellflow.augment import basic_augment, build_batch_augmentation
from cellflow.config import load_config
from cellflow.downstream import create_backbone
from cellflow.strategies import STRATEGIES, resolve_params
from cellflow.training import to_model_range

SIZE, BATCH = 256, 16


def loader_rate(strategy_name: str, repeats: int = 5) -> float:
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8)
    targets = F.one_hot(torch.arange(BATCH) % 4, 4).float()
    operation = build_batch_augmentation(strategy_name, resolve_params(strategy_name, None))
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(repeats):
        batch = basic_augment(to_model_range(images), generator)
        if operation is not None:
            operation(batch, targets, generator)
    return BATCH * repeats / (time.perf_counter() - started)


def step_rate(backbone: str, repeats: int = 2) -> float:
    model = create_backbone(backbone, 4, SIZE)
    optimizer = torch.optim.AdamW(model.parameters())
    images, labels = torch.randn(BATCH, 3, SIZE, SIZE), torch.arange(BATCH) % 4
    F.cross_entropy(model(images), labels).backward()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return BATCH * repeats / (time.perf_counter() - started)


def main() -> None:
    rows = [{"measure": f"load + augment, {name}, {SIZE} px",
             "images/s": f"{loader_rate(name):.0f}"}
            for name, info in STRATEGIES.items() if info.kind in ("basic", "spatial")]
    rows += [{"measure": f"training step {name}, {SIZE} px, batch {BATCH}",
              "images/s": f"{step_rate(name):.1f}"} for name in ("resnet18", "resnet50")]
    backbones = load_config("config/config.yaml")["downstream"]["backbones"]
    demo_runs = Path("results/synthetic/benchmarks/train_downstream")
    runs = [path for path in sorted(demo_runs.glob("*.tsv"))
            if path.name.split("-")[0] in backbones]
    if runs:
        seconds = sum(float(pd.read_csv(path, sep="\t")["s"].iloc[-1]) for path in runs)
        rows.append({"measure": f"demo: {len(runs)} train_downstream jobs, summed run time "
                                "(budget 180 s)", "images/s": f"{seconds:.0f} s"})
    record("downstream", "Downstream data pipeline vs training step", rows)


if __name__ == "__main__":
    main()
