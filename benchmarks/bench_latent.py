"""Throughput and peak memory of the latent baselines (LDM, DiT), and an estimate on one GPU.

Every case runs in a fresh subprocess, so its peak memory is its own: the peak resident set
size of that process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, Python, torch and the
model included), not a tracemalloc count (which misses torch's own allocations).

* demo sizes (32 px, the schema's default KL-f4 autoencoder: 8 x 8 x 3 latents), batch 16:
  a full training step (encoding with the autoencoder, epsilon loss, backward, AdamW) and
  guided sampling (DDIM, 50 steps, each on the doubled batch, then decoding);
* paper sizes, batch 1 on the CPU (more does not fit the time): the LDM-4 UNet of Rombach et
  al. 2022 on 64 x 64 x 3 latents (KL-f4 at 256 px) and DiT-S/2 and DiT-XL/2 of Peebles & Xie
  2023 on 32 x 32 x 4 latents (KL-f8 at 256 px), 1000 classes: a training step of the denoiser
  on latents, one guided DDIM step (2 images through the model), and the autoencoders'
  encoding and decoding of one 256 px image, timed apart and summed per image.

The GPU figures are estimates, not measurements: the forward FLOPs are counted
(``torch.utils.flop_counter``, attention in its math form so that it is counted too; a FLOP
here is 2 per multiply-add, so DiT-XL/2's 237 are the paper's 118.6 "Gflops"), a
training image costs 3 x forward (+ its encoding), a sample 2 x steps x forward (+ its
decoding), at an assumed 35 % of an A100's 312 TFLOP/s bf16 peak.

Run: python -m benchmarks.bench_latent   (appends to benchmarks/results/latent.md)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.machine import record

DDIM_STEPS = 50
A100_BF16_FLOPS = 312e12
ASSUMED_UTILISATION = 0.35

# The schema's defaults (workflow/schemas/config.schema.yaml): autoencoder.model, ldm.model
DEMO_AUTOENCODER = {"factor": 4, "latent_channels": 3, "block_out_channels": [64, 128, 128],
                    "layers_per_block": 2}
DEMO_LDM = {"block_out_channels": [64, 128, 256], "layers_per_block": 2,
            "attention_levels": [1, 2], "attention_head_dim": 32, "dropout": 0.0}
# LDM-4 (Rombach et al. 2022, their f4 configs): 224 x [1, 2, 3, 4], 2 res blocks, attention
# at 1/2, 1/4, 1/8 of the 64 px latent, 32-channel heads.
PAPER_LDM = {"block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
             "attention_levels": [1, 2, 3], "attention_head_dim": 32, "dropout": 0.0}
# Stable Diffusion's KL autoencoders: f4 (3 levels, 3 channels) and f8 (4 levels, 4 channels)
PAPER_KL_F4 = {"factor": 4, "latent_channels": 3, "block_out_channels": [128, 256, 512],
               "layers_per_block": 2}
PAPER_KL_F8 = {"factor": 8, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
               "layers_per_block": 2}


def dit(size: str, patch: int = 2) -> dict[str, Any]:
    return {"size": size, "patch_size": patch, "num_layers": None, "dropout": 0.0}


def build_vae(model: dict[str, Any], size: int):
    try:  # the project's autoencoder, where it exists
        from cellflow.autoencoder import build_autoencoder
    except ImportError:
        from diffusers import AutoencoderKL

        from cellflow.diffusion import group_norm_groups

        levels = len(model["block_out_channels"])
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(model["block_out_channels"]),
            layers_per_block=model["layers_per_block"], latent_channels=model["latent_channels"],
            norm_num_groups=group_norm_groups(model["block_out_channels"]), sample_size=size,
            scaling_factor=1.0).eval()
    return build_autoencoder(model, size).eval()


def build_denoiser(kind: str, model: dict[str, Any], latent: int, channels: int, classes: int):
    from cellflow.latent import build_dit, build_ldm_unet

    return (build_ldm_unet if kind == "ldm" else build_dit)(model, latent, channels, classes)


def forward_flops(network, z, t, labels) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from cellflow.latent import latent_epsilon

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        latent_epsilon(network, z, t, labels)
    return counter.get_total_flops()


def vae_flops(vae, images) -> tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        with FlopCounterMode(display=False) as encoding:
            latents = vae.encode(images).latent_dist.mean
        with FlopCounterMode(display=False) as decoding:
            vae.decode(latents)
    return encoding.get_total_flops(), decoding.get_total_flops()


def timed(function, repeats: int) -> float:
    function()  # warm-up: allocations, kernel choice
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def measure_demo(kind: str, model: dict[str, Any], batch: int, repeats: int) -> dict[str, Any]:
    """Demo sizes: the stage's training step and the generation's guided sampling, whole."""
    from cellflow.diffusion import NoiseSchedule
    from cellflow.latent import guided_latent_sample, latent_loss

    torch.manual_seed(0)
    classes, size = 3, 32
    vae = build_vae(DEMO_AUTOENCODER, size).requires_grad_(False)
    network = build_denoiser(kind, model, size // DEMO_AUTOENCODER["factor"],
                             DEMO_AUTOENCODER["latent_channels"], classes)
    scheduler = NoiseSchedule().ddpm()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, size, size) * 2 - 1
    labels = torch.randint(0, classes, (batch,))

    def train_step():
        network.train()
        loss = latent_loss(network, vae, scheduler, images, labels,
                           torch.Generator().manual_seed(0), 0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_seconds = timed(train_step, repeats)
    network.eval()
    sample_seconds = timed(lambda: guided_latent_sample(
        network, vae, NoiseSchedule(), labels, DDIM_STEPS, 1.5, torch.Generator().manual_seed(0)),
        1)
    return {
        "parameters_M": sum(p.numel() for p in network.parameters()) / 1e6,
        "train_images_per_s": batch / train_seconds,
        "sample_images_per_s": batch / sample_seconds,
        "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def measure_paper(kind: str, model: dict[str, Any], latent: int, channels: int,
                  repeats: int) -> dict[str, Any]:
    """Paper sizes, batch 1: the denoiser's training step and one guided DDIM step."""
    from cellflow.latent import latent_epsilon, null_label

    torch.manual_seed(0)
    network = build_denoiser(kind, model, latent, channels, 1000)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    z = torch.randn(1, channels, latent, latent)
    t = torch.tensor([500])
    label = torch.tensor([3])
    flops = forward_flops(network.eval(), z, t, label)

    def train_step():
        network.train()
        loss = (latent_epsilon(network, z, t, label) - z).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_seconds = timed(train_step, repeats)
    network.eval()
    doubled = torch.cat([z, z])
    both = torch.tensor([3, null_label(network)])
    with torch.no_grad():
        step_seconds = timed(lambda: latent_epsilon(network, doubled, t.expand(2), both), repeats)
    return {
        "parameters_M": sum(p.numel() for p in network.parameters()) / 1e6,
        "forward_GFLOPs": flops / 1e9,
        "train_step_s": train_seconds,
        "guided_step_s": step_seconds,
        "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def measure_vae(model: dict[str, Any], size: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    vae = build_vae(model, size)
    images = torch.rand(1, 3, size, size) * 2 - 1
    encode_flops, decode_flops = vae_flops(vae, images)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
        encode_seconds = timed(lambda: vae.encode(images).latent_dist.sample(), repeats)
        decode_seconds = timed(lambda: vae.decode(latents), repeats)
    return {
        "parameters_M": sum(p.numel() for p in vae.parameters()) / 1e6,
        "encode_GFLOPs": encode_flops / 1e9, "decode_GFLOPs": decode_flops / 1e9,
        "encode_s": encode_seconds, "decode_s": decode_seconds,
        "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


MEASURES = {"demo": measure_demo, "paper": measure_paper, "vae": measure_vae}


def run_isolated(what: str, *arguments: Any) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bench_latent", "--one",
               json.dumps([what, *arguments])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(what, arguments[0], result, flush=True)
    return result


def a100_images_per_s(flops_per_image: float) -> float:
    return A100_BF16_FLOPS * ASSUMED_UTILISATION / flops_per_image


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        what, *arguments = json.loads(args.one)
        print(json.dumps(MEASURES[what](*arguments)))
        return

    started = time.perf_counter()
    rows = []
    for name, kind, model in (("LDM (schema default UNet)", "ldm", DEMO_LDM),
                              ("DiT-tiny/2", "dit", dit("tiny")),
                              ("DiT-S/2 (schema default)", "dit", dit("S"))):
        result = run_isolated("demo", kind, model, 16, 3)
        rows.append({
            "model (demo: 32 px, KL-f4 schema default, 8x8x3 latents)": name,
            "params M": f"{result.get('parameters_M', float('nan')):.2f}",
            "batch": 16,
            "train images/s (encode+fwd+bwd+AdamW)": f"{result.get('train_images_per_s', 0):.3g}",
            f"sample images/s (DDIM {DDIM_STEPS}, CFG, decode)":
                f"{result.get('sample_images_per_s', 0):.3g}",
            "peak RSS GiB": f"{result.get('peak_rss_GiB', float('nan')):.2f}",
        })
    record("latent", f"Latent baselines at demo size ({torch.get_num_threads()} threads)", rows)

    vaes = {"KL-f4": run_isolated("vae", PAPER_KL_F4, 256, 2),
            "KL-f8": run_isolated("vae", PAPER_KL_F8, 256, 2)}
    paper_rows, estimate_rows = [], []
    for name, kind, model, latent, channels, vae_name in (
            ("LDM-4 UNet 224x[1,2,3,4]", "ldm", PAPER_LDM, 64, 3, "KL-f4"),
            ("DiT-S/2", "dit", dit("S"), 32, 4, "KL-f8"),
            ("DiT-XL/2", "dit", dit("XL"), 32, 4, "KL-f8")):
        result = run_isolated("paper", kind, model, latent, channels, 2)
        vae = vaes[vae_name]
        if "error" in result or "error" in vae:
            paper_rows.append({"model (paper, batch 1)": name, "error":
                               result.get("error") or vae.get("error")})
            continue
        train_s = result["train_step_s"] + vae["encode_s"]
        sample_s = DDIM_STEPS * result["guided_step_s"] + vae["decode_s"]
        paper_rows.append({
            "model (paper, batch 1)": f"{name}, {latent}x{latent}x{channels} ({vae_name} 256 px)",
            "params M": f"{result['parameters_M']:.1f}",
            "fwd GFLOPs": f"{result['forward_GFLOPs']:.1f}",
            "train step s (denoiser)": f"{result['train_step_s']:.2f}",
            "autoencoder encode / decode s": f"{vae['encode_s']:.2f} / {vae['decode_s']:.2f}",
            "train images/s (+encode)": f"{1 / train_s:.3g}",
            "guided DDIM step s (2 evals)": f"{result['guided_step_s']:.2f}",
            f"sample images/s ({DDIM_STEPS} steps + decode)": f"{1 / sample_s:.3g}",
            "CPU GFLOP/s (train step)":
                f"{3 * result['forward_GFLOPs'] / result['train_step_s']:.0f}",
            "peak RSS GiB (denoiser)": f"{result['peak_rss_GiB']:.2f}",
        })
        train_flops = 3 * result["forward_GFLOPs"] * 1e9 + vae["encode_GFLOPs"] * 1e9
        sample_flops = (2 * DDIM_STEPS * result["forward_GFLOPs"] * 1e9
                        + vae["decode_GFLOPs"] * 1e9)
        train_rate, sample_rate = a100_images_per_s(train_flops), a100_images_per_s(sample_flops)
        estimate_rows.append({
            "model": name,
            "train GFLOP/image (3 x fwd + encode)": f"{train_flops / 1e9:.0f}",
            "est. A100 train images/s": f"{train_rate:.0f}",
            "est. A100 h per 100k steps at batch 256": f"{1e5 * 256 / train_rate / 3600:.0f}",
            f"sample GFLOP/image ({2 * DDIM_STEPS} evals + decode)": f"{sample_flops / 1e9:.0f}",
            "est. A100 sample images/s": f"{sample_rate:.1f}",
            "est. A100 min per 1000 samples": f"{1000 / sample_rate / 60:.1f}",
            "CPU / est. A100 (train)": f"1 : {train_rate * train_s:.0f}",
        })
    vae_rows = [{"autoencoder (256 px, batch 1)": name,
                 "params M": f"{v.get('parameters_M', float('nan')):.1f}",
                 "encode GFLOPs": f"{v.get('encode_GFLOPs', float('nan')):.0f}",
                 "decode GFLOPs": f"{v.get('decode_GFLOPs', float('nan')):.0f}",
                 "encode s": f"{v.get('encode_s', float('nan')):.2f}",
                 "decode s": f"{v.get('decode_s', float('nan')):.2f}",
                 "peak RSS GiB": f"{v.get('peak_rss_GiB', float('nan')):.2f}"}
                for name, v in vaes.items()]
    record("latent", "Paper-size latent autoencoders on this CPU (random weights)", vae_rows)
    record("latent", "Paper-size latent baselines on this CPU (batch 1, measured)", paper_rows)
    record("latent", f"Paper sizes on one A100: ESTIMATE, not a measurement (counted FLOPs at "
                     f"{ASSUMED_UTILISATION:.0%} of {A100_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16)",
           estimate_rows)
    print(f"benchmark took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
