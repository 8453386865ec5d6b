"""Data stage throughput: synthetic tile rendering and preparation of a folder dataset.

Run: python benchmarks/bench_data.py  (appends to benchmarks/results/data.md)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import record
from cellflow.config import DatasetConfig, PrepareConfig, SplitConfig, SyntheticConfig
from cellflow.data import prepare_dataset
from cellflow.synthetic import generate_dataset, render_tile


def time_render(size: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    render_tile(0.5, size, rng)  # warm-up: first call pays for imports and caches
    start = time.perf_counter()
    for index in range(repeats):
        render_tile(index / repeats, size, rng)
    return (time.perf_counter() - start) / repeats


def time_prepare(source_size: int, resolution: int, per_class: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        generate_dataset(raw, ["a", "b"], per_class, source_size, seed=0)
        dataset = DatasetConfig(
            name="bench", kind="folder", resolution=resolution, classes=("a", "b"),
            transitions=(), split=SplitConfig(0.15, 0.15),
            synthetic=SyntheticConfig(per_class, source_size), root=raw / "images",
        )
        prepare = PrepareConfig("exclude", "upscale", "drop", 16)
        start = time.perf_counter()
        prepare_dataset(dataset, prepare, raw / "images", Path(tmp) / "out", 0, threads)
        return 2 * per_class / (time.perf_counter() - start)


def main() -> None:
    rows = [
        {"measure": f"render one synthetic tile, {size} px", "value": f"{1e3 * seconds:.1f} ms"}
        for size, seconds in ((64, time_render(64, 200)), (256, time_render(256, 40)))
    ]
    for threads in (1, 2):
        rate = time_prepare(512, 256, per_class=100, threads=threads)
        rows.append({"measure": f"prepare 512 px PNG -> 256 px, {threads} thread(s)",
                     "value": f"{rate:.0f} images/s"})
    record("data", "Data stage throughput", rows)


if __name__ == "__main__":
    main()
