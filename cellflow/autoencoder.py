"""The latent autoencoder of the LDM and DiT baselines: build, train, encode, decode, judge.

Latent diffusion (Rombach et al. 2022) and the diffusion transformer (Peebles & Xie 2023) do
not denoise pixels but the latents of a KL-regularised autoencoder. Pretrained autoencoders
(Stable Diffusion's) are trained on photographs at 256 px and more; the pathology tiles here
are small and of another domain, so each dataset gets its own, trained with the shared loop
of ``cellflow.training`` and written as a diffusers ``AutoencoderKL`` that the latent models
and their samplers load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from cellflow.data import load_split
from cellflow.diffusion import group_norm_groups
from cellflow.figures import save_sample_grid
from cellflow.io import staged_directory, write_table, write_text
from cellflow.stages import StageSpec, _write_common, checkpoint_folder, require_finite
from cellflow.training import TrainConfig, TrainResult, to_model_range, train_model

# PSNR and SSIM of images in [-1, 1]: the range both are measured on.
DATA_RANGE = 2.0


def build_autoencoder(model: Mapping[str, Any], sample_size: int) -> AutoencoderKL:
    """The ``AutoencoderKL`` an ``autoencoder.model`` config section describes.

    Every level but the last halves the image, so a downsampling ``factor`` needs
    log2(factor) + 1 widths. The scaling factor starts at 1 rather than diffusers' default
    0.18215, which is Stable Diffusion's autoencoder's and means nothing for this one; the
    training stage replaces it by the value measured on the training images.
    """
    factor = model["factor"]
    if factor < 2 or factor & (factor - 1):
        raise ValueError(f"autoencoder.model.factor must be a power of two >= 2, got {factor}")
    widths = tuple(model["block_out_channels"])
    levels = int(math.log2(factor)) + 1
    if len(widths) != levels:
        raise ValueError(
            f"autoencoder.model.block_out_channels has {len(widths)} widths {list(widths)}; "
            f"factor {factor} needs {levels} (one per level: log2({factor}) + 1)")
    if sample_size % factor:
        raise ValueError(f"autoencoder.model.factor {factor} does not divide the image size "
                         f"{sample_size} px (the dataset's resolution)")
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=widths,
        layers_per_block=model["layers_per_block"],
        latent_channels=model["latent_channels"],
        norm_num_groups=group_norm_groups(widths),
        sample_size=sample_size,
        scaling_factor=1.0,
    )


class AutoencoderForTraining(torch.nn.Module):
    """An ``AutoencoderKL`` behind a ``forward`` that returns what its loss needs.

    The training loop runs data parallel over several GPUs, and data parallelism
    synchronises gradients only of computations that pass through the model's ``forward``;
    ``AutoencoderKL.forward`` does not return the posterior the KL term needs, so a loss that
    called ``encode`` and ``decode`` itself would train each GPU's copy apart from the others.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructions of ``images`` from a posterior sample, and each image's KL."""
        moments = self.vae.encode(images).latent_dist.parameters
        # In float32: under fp16 autocast exp(logvar) overflows long before logvar's clamp.
        posterior = DiagonalGaussianDistribution(moments.float())
        latents = posterior.sample(generator=generator)
        return self.vae.decode(latents).sample, posterior.kl()


def autoencoder_loss(model: AutoencoderForTraining, images: torch.Tensor, labels: torch.Tensor,
                     generator: torch.Generator, kl_weight: float) -> torch.Tensor:
    """Mean absolute reconstruction error plus the weighted KL of the posterior to N(0, I).

    ``images`` are in [-1, 1]; ``labels`` are not used (the autoencoder is unconditional,
    the signature is the training loop's). The latents are sampled with ``generator``, so a
    resumed run draws what an uninterrupted one would.

    Normalisation: LDM's autoencoder loss sums the L1 error over an image's pixels and the KL
    over its latent, and averages both over the batch. Here both sums are divided by the
    number of pixel values of an image (3 H W): the loss curve reads as a mean absolute error
    in [-1, 1], and ``kl_weight`` keeps LDM's meaning (1e-6 in its KL-f4 and KL-f8 configs).

    There is no perceptual (LPIPS) or adversarial term as in Rombach et al.: both need
    pretrained networks, which the pipeline does not download, so reconstructions are blurrier
    than those of Stable Diffusion's autoencoder.
    """
    reconstruction, kl = model(images, generator)
    error = (reconstruction.float() - images.float()).abs().mean()
    return error + kl_weight * kl.mean() / images[0].numel()


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32
                          ) -> float:
    """1 / the standard deviation of the posterior means of ``images``.

    Rombach et al.'s scale: a diffusion model's noise schedule assumes data of about unit
    variance, and the latents of a weakly KL-regularised autoencoder have an arbitrary one.
    ``images`` are uint8 [0, 255] or float [-1, 1] (N, 3, H, W); the sums run in float64 over
    batches, so that a whole training split need not be held as latents.
    """
    total = squares = 0.0
    count = 0
    for batch in _batches(images, batch_size, vae):
        means = vae.encode(batch).latent_dist.mean.double()
        total += float(means.sum())
        squares += float((means ** 2).sum())
        count += means.numel()
    variance = squares / count - (total / count) ** 2
    if not variance > 0:
        raise ValueError(f"the autoencoder's latents of {len(images)} images do not vary "
                         f"(variance {variance}); it cannot be scaled to unit variance")
    return 1.0 / math.sqrt(variance)


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents (N, C, H/f, W/f) of uint8 [0, 255] or float [-1, 1] ``images``.

    The posterior's mean without ``generator`` (a deterministic encoding, for inversion and
    evaluation), a sample from it with one (what the latent models are trained on). Returned
    as float32 on the CPU, whatever the autoencoder's device and dtype.
    """
    encoded = []
    for batch in _batches(images, batch_size, vae):
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mode() if generator is None else posterior.sample(generator)
        encoded.append((latents * vae.config.scaling_factor).float().cpu())
    return torch.cat(encoded)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Images in [-1, 1] (float32, on the CPU) of scaled ``latents``, the inverse of ``encode``.

    Clamped: the decoder is not bounded, and every later step reads images in [-1, 1].
    """
    decoded = []
    for batch in latents.split(batch_size):
        scaled = batch.to(vae.device, vae.dtype) / vae.config.scaling_factor
        decoded.append(vae.decode(scaled).sample.clamp(-1, 1).float().cpu())
    return torch.cat(decoded)


def reconstruction_quality(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32
                           ) -> pd.DataFrame:
    """PSNR (dB) and SSIM of each image's round trip through the posterior mean, in order.

    Both on [-1, 1] (data range 2). They bound what the latent models can reach: a latent
    model's samples are never sharper than the decoder's reconstructions.
    """
    rows = []
    for first in range(0, len(images), batch_size):
        real = _model_range(images[first:first + batch_size])
        rebuilt = decode(vae, encode(vae, real, batch_size), batch_size)
        psnr = peak_signal_noise_ratio(rebuilt, real, data_range=DATA_RANGE, reduction="none",
                                       dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(rebuilt, real, data_range=DATA_RANGE,
                                                   reduction="none")
        rows += [{"psnr": float(p), "ssim": float(s)} for p, s in zip(psnr, ssim, strict=True)]
    return pd.DataFrame(rows, columns=["psnr", "ssim"])


def reconstruction_summary(quality: pd.DataFrame) -> dict[str, float | int]:
    """Mean PSNR and SSIM of a ``reconstruction_quality`` table, with its number of images."""
    return {"psnr_mean": float(quality["psnr"].mean()),
            "ssim_mean": float(quality["ssim"].mean()),
            "images": len(quality)}


def train_autoencoder(spec: StageSpec, manifest: Path, out_dir: Path, checkpoint_root: Path
                      ) -> TrainResult:
    """Train the dataset's autoencoder; write ``vae/``, its reconstructions, log and curve.

    ``spec.settings`` is the ``autoencoder`` config section. The exported weights are the
    EMA's, with the scaling factor measured on the training images in their config.
    """
    images, labels = load_split(manifest, "train")
    torch.manual_seed(spec.seed)
    vae = build_autoencoder(spec.settings["model"], spec.dataset.resolution)
    kl_weight = spec.settings["kl_weight"]
    # StageSpec.fingerprint covers the model and train settings; the KL weight changes the
    # weights as well, so checkpoints of another weight must not be resumed.
    fingerprint = {**spec.fingerprint("autoencoder", manifest), "kl_weight": kl_weight}
    result = train_model(
        AutoencoderForTraining(vae), partial(autoencoder_loss, kl_weight=kl_weight),
        torch.from_numpy(images), torch.from_numpy(labels),
        TrainConfig.from_dict(spec.settings["train"]), spec.seed,
        checkpoint_folder(checkpoint_root, fingerprint), fingerprint,
        description=f"autoencoder {spec.dataset.name}",
    )
    if not result.is_main_process:
        return result  # the main process samples and writes the outputs
    ema_vae = result.ema.vae.eval()
    require_finite(ema_vae, f"autoencoder of {spec.dataset.name}")
    scaling_factor = latent_scaling_factor(ema_vae, torch.from_numpy(images))
    ema_vae.register_to_config(scaling_factor=scaling_factor)

    val_images = torch.from_numpy(load_split(manifest, "val")[0])
    quality = reconstruction_quality(ema_vae, val_images)
    quality.insert(0, "id", _split_ids(manifest, "val"))
    factor = spec.settings["model"]["factor"]
    side = spec.dataset.resolution // factor
    summary = {
        **reconstruction_summary(quality),
        "latent_shape": [spec.settings["model"]["latent_channels"], side, side],
        "scaling_factor": scaling_factor,
    }
    shown = val_images[:spec.settings["eval"]["reconstructions"]]
    rebuilt = decode(ema_vae, encode(ema_vae, shown))

    with staged_directory(out_dir) as staging:
        ema_vae.save_pretrained(staging / "vae")
        write_table(staging / "reconstruction.tsv", quality)
        write_text(staging / "reconstruction.json", json.dumps(summary, indent=2))
        save_sample_grid(
            torch.cat([to_model_range(shown), rebuilt]), ["validation", "reconstruction"],
            staging / "reconstructions.png",
            f"{spec.dataset.name}: validation images and their KL-f{factor} reconstructions "
            f"({summary['psnr_mean']:.1f} dB mean PSNR) after "
            f"{spec.settings['train']['steps']} training steps")
        _write_common(staging, result, spec, fingerprint, "autoencoder")
    return result


def _model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [-1, 1]; float ones as they are (already in the model's range)."""
    return to_model_range(images) if images.dtype == torch.uint8 else images


def _batches(images: torch.Tensor, batch_size: int, vae: AutoencoderKL) -> Iterator[torch.Tensor]:
    """``images`` in [-1, 1] on the autoencoder's device and dtype, a batch at a time.

    Converted per batch: a split held as uint8 takes a quarter of its float32 size.
    """
    for first in range(0, len(images), batch_size):
        yield _model_range(images[first:first + batch_size]).to(vae.device, vae.dtype)


def _split_ids(manifest: Path, split: str) -> list[str]:
    """The ids of a split's images, in the order ``load_split`` reads them."""
    table = pd.read_csv(manifest, sep="\t", keep_default_na=False)
    return table.loc[table["split"] == split, "id"].astype(str).tolist()
