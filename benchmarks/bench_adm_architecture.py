"""Parameter counts of our UNet and classifier next to guided-diffusion's, at ADM's settings.

Needs the test-only extra guided-diffusion-sdk (openai/guided-diffusion's unet.py, packaged):

    python -m benchmarks.bench_adm_architecture   (appends to benchmarks/results/adm.md)

The 256 px row is OpenAI's public class-conditional ImageNet configuration (channels 256,
multipliers 1,1,2,2,4,4, attention at 32, 16 and 8 px, 64-channel heads, scale-shift norm,
BigGAN up/down), with 2 classes, as a pathology dataset has, and without learned sigma: our
UNet predicts epsilon only (ADM with ``learn_sigma`` has 3 more output channels).
"""

from __future__ import annotations

import warnings

import torch

from benchmarks.machine import record
from cellflow.classifier import NoiseAwareClassifier
from cellflow.diffusion import UNetArchitecture, build_unet

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion import unet as adm

# name: (resolution, channels, attention downsampling rates, head channels)
CONFIGS = {
    "ADM 256 px (ImageNet settings)": (256, (256, 256, 512, 512, 1024, 1024), (8, 16, 32), 64),
    "demo-sized 32 px": (32, (32, 64, 64), (4,), 32),
}


def count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def main() -> None:
    rows = []
    for name, (size, channels, rates, head) in CONFIGS.items():
        multipliers = tuple(c // channels[0] for c in channels)
        levels = tuple(rate.bit_length() - 1 for rate in rates)
        common = dict(image_size=size, in_channels=3, model_channels=channels[0],
                      num_res_blocks=2, attention_resolutions=rates, channel_mult=multipliers,
                      num_head_channels=head, use_scale_shift_norm=True, resblock_updown=True)
        pairs = {
            "diffusion UNet": (adm.UNetModel(out_channels=3, num_classes=2, **common),
                               build_unet(UNetArchitecture(channels, 2, levels, head), size, 2)),
            "noise-aware classifier": (
                adm.EncoderUNetModel(out_channels=2, pool="attention", **common),
                NoiseAwareClassifier(sample_size=size, num_classes=2, block_out_channels=channels,
                                     layers_per_block=2, attention_levels=levels,
                                     attention_head_dim=head)),
        }
        for model, (reference, ours) in pairs.items():
            rows.append({"configuration": name, "model": model,
                         "guided-diffusion": f"{count(reference):,}",
                         "Cellflow": f"{count(ours):,}",
                         "equal": count(reference) == count(ours)})
            del reference, ours
    record("adm", "Parameter counts against guided-diffusion (guided-diffusion-sdk 1.0.0)", rows)


if __name__ == "__main__":
    main()
