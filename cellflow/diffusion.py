"""The class-conditional diffusion model: a diffusers UNet2DModel and its noise schedule.

Network and schedule stay separate objects (the diffusers split): the UNet predicts the noise
epsilon of x_t given t and a class label, the scheduler owns the betas of the forward process.
The ADM architecture of guided-diffusion maps onto UNet2DModel as follows:

| ADM (guided-diffusion)                 | here (diffusers UNet2DModel)                          |
|----------------------------------------|-------------------------------------------------------|
| channel_mult, num_channels             | block_out_channels                                    |
| num_res_blocks (decoder: +1)           | layers_per_block (diffusers up blocks also get +1)    |
| attention_resolutions                  | attention_levels (indices of block_out_channels)      |
| num_head_channels                      | attention_head_dim                                    |
| use_scale_shift_norm (AdaGN)           | resnet_time_scale_shift="scale_shift"                 |
| AttentionBlock's GroupNorm (middle too)| attn_norm_num_groups (diffusers drops it otherwise)   |
| resblock_updown (BigGAN up/down)       | Resnet{Down,Up}sampleBlock2D, *sample_type="resnet"  |
| class_cond: label embedding + time emb | num_class_embeds (added to the time embedding)        |
| sinusoidal [cos, sin] time embedding   | flip_sin_to_cos=True, freq_shift=0                    |
| learn_sigma (6 output channels)        | learn_sigma: 6 channels, of which DDIM reads epsilon  |
| use_fp16 (torso in fp16)               | mixed precision through accelerate                    |
| legacy / new qkv attention order       | q, k, v projections (guided_diffusion converts both)  |

The loss is the plain epsilon MSE ("simple" loss), without ADM's variational bound term that
trains the learned variance: with ``learn_sigma`` the variance channels exist so that ADM
checkpoints load and fine-tune, but nothing here trains or reads them (eta = 0 DDIM needs
epsilon only).

Classifier-free guidance (Ho & Salimans 2022) needs an unconditional epsilon from the same
network: ``null_class`` adds one label embedding after the dataset's classes, the "no class"
label that training substitutes for a share of the labels (``label_dropout``).

At equal settings the network has exactly as many parameters as guided-diffusion's
``UNetModel`` (tests/test_adm.py, benchmarks/results/adm.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process shared by the diffusion model, the classifier and the bridge."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    def ddpm(self) -> DDPMScheduler:
        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            beta_schedule=self.beta_schedule,
            prediction_type="epsilon",
            clip_sample=False,
        )

    def ddim(self) -> DDIMScheduler:
        # set_alpha_to_one=True: the last DDIM step returns x0-hat (guided-diffusion's a_{-1} = 1)
        return DDIMScheduler.from_config(self.ddpm().config, set_alpha_to_one=True,
                                         timestep_spacing="leading")


@dataclass(frozen=True)
class UNetArchitecture:
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: tuple[int, ...]
    attention_head_dim: int
    dropout: float = 0.0
    learn_sigma: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> UNetArchitecture:
        return cls(
            block_out_channels=tuple(raw["block_out_channels"]),
            layers_per_block=raw["layers_per_block"],
            attention_levels=tuple(raw["attention_levels"]),
            attention_head_dim=raw["attention_head_dim"],
            dropout=raw["dropout"],
            learn_sigma=raw.get("learn_sigma", False),
        )


def build_unet(architecture: UNetArchitecture, sample_size: int, num_classes: int,
               null_class: bool = False, channels: int = 3) -> UNet2DModel:
    """An ADM-style class-conditional UNet (see the module table for the mapping); with
    ``null_class`` label ``num_classes`` is the unconditional one of classifier-free guidance.
    ``channels``: of the input and of epsilon (3 for RGB; an autoencoder's latent channels for
    the latent diffusion baseline, cellflow.latent)."""
    levels = len(architecture.block_out_channels)
    bad = [level for level in architecture.attention_levels if not 0 <= level < levels]
    if bad:
        raise ValueError(f"attention_levels {bad} out of range for {levels} levels")
    if sample_size % 2 ** (levels - 1):
        raise ValueError(f"sample_size {sample_size} is not divisible by 2**{levels - 1} "
                         f"({levels} levels in block_out_channels)")
    attention = set(architecture.attention_levels)
    down = [("AttnDownBlock2D" if i in attention else "ResnetDownsampleBlock2D")
            for i in range(levels)]
    up = [("AttnUpBlock2D" if i in attention else "ResnetUpsampleBlock2D")
          for i in reversed(range(levels))]
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=2 * channels if architecture.learn_sigma else channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=architecture.block_out_channels,
        layers_per_block=architecture.layers_per_block,
        attention_head_dim=architecture.attention_head_dim,
        norm_num_groups=group_norm_groups(architecture.block_out_channels),
        # diffusers drops the middle attention's GroupNorm under scale_shift unless given its
        # groups; ADM's AttentionBlock normalises its input.
        attn_norm_num_groups=group_norm_groups(architecture.block_out_channels),
        resnet_time_scale_shift="scale_shift",
        downsample_type="resnet",
        upsample_type="resnet",
        num_class_embeds=num_classes + int(null_class),
        dropout=architecture.dropout,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def group_norm_groups(channels: Sequence[int]) -> int:
    """GroupNorm groups: 32 as in ADM, fewer for the tiny demo widths."""
    for groups in (32, 16, 8, 4, 2, 1):
        if all(width % groups == 0 for width in channels):
            return groups
    raise AssertionError("unreachable: 1 divides every width")


def predict_epsilon(unet: UNet2DModel, sample: torch.Tensor, timestep: torch.Tensor | int,
                    labels: torch.Tensor) -> torch.Tensor:
    """The UNet's epsilon: its first three output channels (the others, with learn_sigma,
    are ADM's variance interpolation, which deterministic DDIM does not use)."""
    return unet(sample, timestep, class_labels=labels).sample[:, :3]


def epsilon_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    label_dropout: float = 0.0,
) -> torch.Tensor:
    """Epsilon-prediction MSE at t ~ U{0..T-1}, with noise drawn from ``generator``.

    ``label_dropout`` replaces that share of the labels by the null class (the UNet's last
    label embedding), which teaches the unconditional epsilon of classifier-free guidance.
    """
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],),
                              generator=generator).to(images.device)
    noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    if label_dropout:
        dropped = (torch.rand(images.shape[0], generator=generator) < label_dropout)
        null = unet.config.num_class_embeds - 1
        labels = torch.where(dropped.to(labels.device), torch.full_like(labels, null), labels)
    noisy = scheduler.add_noise(images, noise, timesteps)
    predicted = predict_epsilon(unet, noisy, timesteps, labels)
    return F.mse_loss(predicted.float(), noise.float())


@torch.no_grad()
def ddim_sample(
    unet: UNet2DModel,
    schedule: NoiseSchedule,
    labels: torch.Tensor,
    num_steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Class-conditional DDIM samples (eta = 0) in [-1, 1], shape (len(labels), 3, H, W)."""
    scheduler = schedule.ddim()
    scheduler.set_timesteps(num_steps)
    size = unet.config.sample_size
    parameter = next(unet.parameters())
    sample = torch.randn((len(labels), 3, size, size), generator=generator).to(
        parameter.device, parameter.dtype)
    labels = labels.to(parameter.device)
    for t in scheduler.timesteps:
        epsilon = predict_epsilon(unet, sample, t, labels)
        sample = scheduler.step(epsilon, t, sample, eta=0.0).prev_sample
    return sample.clamp(-1, 1)
