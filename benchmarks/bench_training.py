"""Training throughput (images/s, forward + backward + AdamW step) and peak memory.

Each measurement runs in a fresh subprocess, so its peak resident memory is its own. On a GPU
machine it also measures with bf16 autocast, and reports peak GPU memory.

Run: python -m benchmarks.bench_training [--quick]   (appends to benchmarks/results/training.md)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.machine import record
from cellflow.config import load_config


def build(model: str, config_name: str):
    from cellflow.diffusion import UNetArchitecture, build_unet
    from cellflow.stages import build_classifier

    config = load_config(f"config/{config_name}.yaml")
    dataset = next(iter(config["datasets"].values()))
    size, classes = dataset["resolution"], len(dataset["classes"])
    settings = config[model]
    if model == "diffusion":
        network = build_unet(UNetArchitecture.from_dict(settings["model"]), size, classes)
    else:
        network = build_classifier(settings["model"], size, classes)
    return network, size, classes, settings["train"]["batch_size"]


def measure(model: str, config_name: str, batch: int, precision: str, repeats: int) -> dict:
    """One configuration, in this process: images/s of full training steps and peak memory."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    network, size, classes, _ = build(model, config_name)
    network.to(device).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            if model == "diffusion":
                loss = F.mse_loss(network(x, t, class_labels=y).sample.float(), x)
            else:
                loss = F.cross_entropy(network(x, t).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernel selection
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / repeats
    return {
        "images_per_s": batch / seconds,
        "parameters_M": sum(p.numel() for p in network.parameters()) / 1e6,
        "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_GiB": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def demo_budget() -> dict:
    """Both demo models trained from scratch by their stage functions, timed end to end."""
    import tempfile

    from cellflow.stages import StageSpec, train_classifier, train_diffusion

    manifest = Path("results/synthetic/data/manifest.tsv")
    if not manifest.is_file():
        raise SystemExit("no demo data: run `make demo` first (results/synthetic/data/)")
    config = load_config("config/config.yaml")
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, stage in (("diffusion", train_diffusion), ("classifier", train_classifier)):
            spec = StageSpec.from_json(json.dumps({
                "dataset_name": "synthetic", "dataset": config["datasets"]["synthetic"],
                "noise_schedule": config["noise_schedule"], "settings": config[model],
                "seed": config["seed"]}))
            started = time.perf_counter()
            stage(spec, manifest, Path(tmp) / model, Path(tmp) / "checkpoints" / model)
            seconds[model] = time.perf_counter() - started
    return {
        "model": "demo budget: both demo models trained (stage functions, 2 threads)",
        "batch": 16, "precision": "no",
        "images/s (fwd+bwd+step)": f"{seconds['diffusion']:.0f} s + "
                                   f"{seconds['classifier']:.0f} s = "
                                   f"{sum(seconds.values()):.0f} s (budget 240 s)",
        "peak RSS GiB": "-", "peak GPU GiB": "-",
    }


def run_isolated(model: str, config_name: str, batch: int, precision: str, repeats: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_training", "--one",
               json.dumps([model, config_name, batch, precision, repeats])]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="demo models only")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return

    gpu = torch.cuda.is_available()
    cases = [("diffusion", "config", 16, 5), ("classifier", "config", 16, 5)]
    if not args.quick:
        # The paper UNet at batch 16 needs far more than a 24 GiB CPU machine has (batch 1
        # alone peaks near 13 GiB): on the CPU, measure batch 1 and estimate batch 16 from it.
        paper_batches = [16] if gpu else [1]
        cases += [(m, "paper", b, 1 if not gpu else 5) for m in ("diffusion", "classifier")
                  for b in paper_batches]
    rows = [] if args.quick or gpu else [demo_budget()]
    for model, config_name, batch, repeats in cases:
        for precision in (["no", "bf16"] if gpu else ["no"]):
            result = run_isolated(model, config_name, batch, precision, repeats)
            rows.append({
                "model": f"{model} ({config_name}, {result['parameters_M']:.1f} M params)",
                "batch": batch, "precision": precision,
                "images/s (fwd+bwd+step)": f"{result['images_per_s']:.3g}",
                "peak RSS GiB": f"{result['peak_rss_GiB']:.2f}",
                "peak GPU GiB": "-" if result["peak_gpu_GiB"] is None
                else f"{result['peak_gpu_GiB']:.2f}",
            })
            print(rows[-1], flush=True)
    if not gpu and not args.quick:
        rows += [estimate_batch(row, 16) for row in rows if row["batch"] == 1]
    record("training", "Training throughput and peak memory", rows)


def estimate_batch(row: dict, batch: int) -> dict:
    """Peak memory at ``batch`` from a batch-1 run: weights, gradients and AdamW moments
    (4 x 4 bytes per parameter) are paid once, the rest (activations) once per image."""
    parameters_m = float(row["model"].split("(")[1].split(",")[1].split("M")[0])
    fixed = parameters_m * 1e6 * 16 / 2**30
    per_image = float(row["peak RSS GiB"]) - fixed
    return {**row, "batch": f"{batch} (estimate)", "images/s (fwd+bwd+step)": "-",
            "peak RSS GiB": f"~{fixed + batch * per_image:.0f}"}


if __name__ == "__main__":
    main()
