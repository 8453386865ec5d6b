"""The batched stair bridge against the literal reference loop, on the trained demo model.

Checks the targets of the bridge: frames equal to the reference within 1e-4 (max abs, float32)
with the same stairs; UNet evaluations per trajectory exactly K + sum of stairs (reference:
K + last stair + sum of stairs); at most K + largest stair sequential UNet rounds per batch;
and wall time per trajectory against the reference.

Run after `make demo` (it needs results/synthetic/models/):
    python -m benchmarks.bench_bridge [--sources 8]     (appends to benchmarks/results/bridge.md)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.bridge_oracle import reference_trajectory
from benchmarks.machine import record
from cellflow.bridge import BridgeConfig, StairBridge
from cellflow.diffusion import NoiseSchedule
from cellflow.generation.common import load_classifier, load_unet, pick_sources, read_images

RESULTS = Path("results/synthetic")


def compare(unet, classifier, images: torch.Tensor, steps: int, frames: int) -> dict:
    """Run the batched bridge and the reference loop on the same sources; time both."""
    schedule = NoiseSchedule()
    config = BridgeConfig(inversion_steps=steps, frames=frames, classifier_scale=2.0,
                          decode_start="faithful", stair_mapping="mirror",
                          max_rows_per_call=len(images) * frames)
    labels = torch.zeros(len(images), dtype=torch.long), torch.ones(len(images), dtype=torch.long)
    started = time.perf_counter()
    ours = StairBridge(unet, classifier, schedule, config).trajectories(images, *labels)
    ours_seconds = (time.perf_counter() - started) / len(images)
    alphas = schedule.ddpm().alphas_cumprod
    started = time.perf_counter()
    oracle = [reference_trajectory(unet, classifier, alphas, images[b:b + 1], 0, 1,
                                   steps=steps, amount=frames) for b in range(len(images))]
    oracle_seconds = (time.perf_counter() - started) / len(images)
    return {
        "ours": ours, "oracle": oracle, "ours_seconds": ours_seconds,
        "oracle_seconds": oracle_seconds,
        "max_difference": max(float((ours.frames[b] - o.frames.cpu()).abs().max())
                              for b, o in enumerate(oracle)),
        "same_stairs": all(list(ours.stairs[b]) == o.stairs for b, o in enumerate(oracle)),
        "expected_evaluations": sum(steps + int(row.sum()) for row in ours.stairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--float64-sources", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100, help="K (reference: 100)")
    parser.add_argument("--frames", type=int, default=10, help="N (reference: 10)")
    args = parser.parse_args()
    if not (RESULTS / "models" / "diffusion").is_dir():
        raise SystemExit("no demo model: run `make demo` first (results/synthetic/models/)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet = load_unet(RESULTS / "models" / "diffusion", device)
    classifier = load_classifier(RESULTS / "models" / "classifier", device)
    data = pd.read_csv(RESULTS / "data" / "manifest.tsv", sep="\t", keep_default_na=False)
    images = read_images(RESULTS / "data",
                         pick_sources(data, "normal", args.sources)["path"]).to(device)

    single = compare(unet, classifier, images, args.steps, args.frames)
    double = compare(unet.double(), classifier.double(),
                     images[:args.float64_sources].double(), args.steps, args.frames)
    ours, oracle, k = single["ours"], single["oracle"], args.steps
    rows = [
        {"measure": "sources (demo model, normal -> hyperplastic)", "value": len(images)},
        {"measure": "same stairs as the reference (float32 / float64)",
         "value": f"{single['same_stairs']} / {double['same_stairs']}"},
        {"measure": "max |frame - reference frame|, float32 (target < 1e-4)",
         "value": f"{single['max_difference']:.2e}"},
        {"measure": f"max |frame - reference frame|, float64 ({args.float64_sources} sources)",
         "value": f"{double['max_difference']:.2e}"},
        {"measure": "UNet evaluations per trajectory: ours (= K + sum of stairs)",
         "value": f"{ours.counter.unet_evaluations / len(images):.1f} "
                  f"(expected {single['expected_evaluations'] / len(images):.1f})"},
        {"measure": "UNet evaluations per trajectory: reference (K + last + sum)",
         "value": f"{sum(o.unet_evaluations for o in oracle) / len(oracle):.1f}"},
        {"measure": "sequential UNet rounds for the batch (bound K + largest stair)",
         "value": f"{ours.counter.sequential_rounds} (bound {k + int(ours.stairs.max())})"},
        {"measure": f"seconds per trajectory, batched ({len(images)} at once, float32)",
         "value": f"{single['ours_seconds']:.2f}"},
        {"measure": "seconds per trajectory, reference loop (batch 1, float32)",
         "value": f"{single['oracle_seconds']:.2f}"},
        {"measure": "speed-up",
         "value": f"{single['oracle_seconds'] / single['ours_seconds']:.2f}x"},
    ]
    record("bridge", f"Stair bridge vs reference loop (K={k}, N={args.frames}, "
                     f"device {device.type})", rows)
    exact = double["max_difference"] < 1e-9 and single["same_stairs"] and double["same_stairs"]
    if not exact or ours.counter.unet_evaluations != single["expected_evaluations"]:
        raise SystemExit("the batched bridge departs from the reference (see the table above)")


if __name__ == "__main__":
    main()
