"""Augmentation strategies of the downstream benchmark: the batch operations of the spatial
strategies (the registry of names, kinds and paper defaults is :mod:`cellflow.strategies`).

Targets are soft label rows (generated trajectory frames carry soft labels), so the label
mixing is written here rather than taken from timm's ``Mixup``, which expects class indices.
The partner weight is always measured on the pixels actually taken from the partner (timm's
``correct_lam``), so a clipped box or a rounded mask never mislabels a sample. Images may be in
any normalised range: holes are filled with 0, the channel mean of normalised data.

Every random draw comes from the ``torch.Generator`` passed in (through :func:`numpy_rng` where
numpy samples a distribution), never from global state, so a seeded run repeats exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cellflow.strategies import STRATEGIES, resolve_params, strategy

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # OpenCV's RGB2GRAY, as the SaliencyMix code uses
SALIENCY_SIZE = 64  # Hou & Zhang's working width; OpenCV's spectral residual uses 64 x 64
# Spectrum bins below this fraction of the largest are rounding and resampling noise: without a
# floor the residual blows their random phases up and the saliency peak lands anywhere.
SPECTRUM_FLOOR = 1e-5

BatchAugmentation = Callable[
    [torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
_Operation = Callable[
    [torch.Tensor, torch.Tensor, np.random.Generator, Mapping[str, Any]],
    tuple[torch.Tensor, torch.Tensor]]


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from ``generator``: numpy samples Beta, torch does not."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))


def basic_augment(images: torch.Tensor, generator: torch.Generator,
                  colour_jitter: float = 0.05) -> torch.Tensor:
    """Per-image random flip, 90-degree turn and mild H&E colour jitter (shape and dtype kept).

    Tissue has no canonical orientation, and stain strength varies between slides and labs,
    which mostly scales the channels. The jitter multiplies each channel by 1 + u and adds a
    brightness shift v (u, v ~ U(-colour_jitter, colour_jitter)), which needs no value range.
    Non-square images turn by 0 or 180 degrees only, so the shape is kept.
    """
    count, channels = images.shape[:2]
    flips = torch.rand(count, generator=generator, device=generator.device) < 0.5
    turns = torch.randint(0, 4, (count,), generator=generator, device=generator.device)
    if images.shape[-1] != images.shape[-2]:
        turns = turns - turns % 2
    flipped = torch.where(flips.to(images.device)[:, None, None, None], images.flip(-1), images)
    out = flipped.clone()
    for quarter in (1, 2, 3):
        chosen = (turns == quarter).to(images.device)
        if chosen.any():
            out[chosen] = flipped[chosen].rot90(quarter, dims=(-2, -1))
    gain = 1 + colour_jitter * _symmetric(generator, (count, channels, 1, 1))
    shift = colour_jitter * _symmetric(generator, (count, 1, 1, 1))
    return out * gain.to(out) + shift.to(out)


def build_batch_augmentation(name: str, params: Mapping[str, Any]) -> BatchAugmentation | None:
    """The batch-level operation of a spatial strategy (None for none and generative ones).

    The returned function takes (images (B, 3, H, W), soft targets (B, C), generator) and
    applies the strategy with probability ``prob`` per batch; the mixing partner of each image
    is the image at the same place in a random permutation of the batch.
    """
    if name not in STRATEGIES or strategy(name).kind != "spatial":
        return None  # an external generator's name is a generative strategy too
    settings = resolve_params(name, params)
    operation = _OPERATIONS[name]

    def augment(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_batch(images, targets)
        rng = numpy_rng(generator)
        if rng.random() >= settings["prob"]:
            return images, targets
        return operation(images, targets, rng, settings)

    return augment


def fourier_mask(shape: tuple[int, int], lam: float, decay_power: float,
                 rng: np.random.Generator) -> torch.Tensor:
    """FMix's binary mask: True on exactly round(lam * H * W) pixels of a low-frequency field.

    The field is the inverse FFT of a complex Gaussian spectrum scaled by 1 / f^decay_power
    (frequencies below one cycle per image clamped, as in the reference code), so the mask
    is made of a few large blobs of any shape, not a box; it keeps its top-lam quantile.
    """
    height, width = shape
    frequency = np.hypot(np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :])
    scale = 1.0 / np.maximum(frequency, 1.0 / max(height, width)) ** decay_power
    spectrum = scale * (rng.standard_normal(frequency.shape)
                        + 1j * rng.standard_normal(frequency.shape))
    field = np.fft.irfft2(spectrum, s=(height, width))
    kept = np.zeros(height * width, dtype=bool)
    kept[np.argsort(-field.ravel(), kind="stable")[:round(lam * height * width)]] = True
    return torch.from_numpy(kept.reshape(height, width))


def spectral_residual_saliency(images: torch.Tensor) -> torch.Tensor:
    """Spectral-residual saliency (Hou & Zhang 2007) of each image, (B, 64, 64) in float64.

    Follows OpenCV's ``StaticSaliencySpectralResidual``, which the SaliencyMix code calls:
    gray image at 64 x 64, log amplitude minus its 3 x 3 box filter, inverse FFT with the
    original phase, squared magnitude, 5 x 5 Gaussian blur (sigma 8). The fixed working size
    makes the residual pick object-scale structure whatever the image resolution. The amplitude
    gets a small floor (``SPECTRUM_FLOOR``) before the log.
    """
    weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64, device=images.device)
    gray = torch.einsum("bchw,c->bhw", images.detach().double(), weights)[:, None]
    gray = F.interpolate(gray, size=(SALIENCY_SIZE, SALIENCY_SIZE), mode="bilinear",
                         align_corners=False, antialias=True)
    spectrum = torch.fft.fft2(gray)
    amplitude = spectrum.abs()
    floor = SPECTRUM_FLOOR * amplitude.amax(dim=(-2, -1), keepdim=True) + 1e-12
    log_amplitude = (amplitude + floor).log()
    residual = log_amplitude - F.avg_pool2d(F.pad(log_amplitude, (1, 1, 1, 1), mode="reflect"),
                                            3, stride=1)
    saliency = torch.fft.ifft2(torch.polar(residual.exp(), spectrum.angle())).abs() ** 2
    taps = torch.exp(-torch.arange(-2, 3, dtype=torch.float64, device=images.device) ** 2 / 128)
    taps = taps / taps.sum()
    saliency = F.pad(saliency, (2, 2, 2, 2), mode="reflect")
    saliency = F.conv2d(F.conv2d(saliency, taps.view(1, 1, 1, 5)), taps.view(1, 1, 5, 1))
    return saliency[:, 0]


def salient_points(images: torch.Tensor) -> torch.Tensor:
    """(B, 2) row and column of each image's most salient pixel, in the image's own grid."""
    saliency = spectral_residual_saliency(images).flatten(1).argmax(dim=1)
    rows, cols = saliency // SALIENCY_SIZE, saliency % SALIENCY_SIZE
    height, width = images.shape[-2:]
    return torch.stack([((2 * rows + 1) * height) // (2 * SALIENCY_SIZE),
                        ((2 * cols + 1) * width) // (2 * SALIENCY_SIZE)], dim=1).cpu()


def _symmetric(generator: torch.Generator, size: tuple[int, ...]) -> torch.Tensor:
    return 2 * torch.rand(size, generator=generator, device=generator.device) - 1


def _check_batch(images: torch.Tensor, targets: torch.Tensor) -> None:
    if images.ndim != 4 or targets.ndim != 2 or len(images) != len(targets):
        raise ValueError(f"expected images (B, C, H, W) and targets (B, classes), got "
                         f"{tuple(images.shape)} and {tuple(targets.shape)}")


def _cut_size(shape: torch.Size, lam: float) -> tuple[int, int]:
    """CutMix's box of area 1 - lam (before clipping), as ``timm.data.mixup.rand_bbox``."""
    ratio = math.sqrt(1.0 - lam)
    return int(shape[-2] * ratio), int(shape[-1] * ratio)


def _box_masks(shape: torch.Size, centres: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) masks of boxes of ``size`` around ``centres`` (N, 2), clipped to the image.

    The box spans [c - s // 2, c + (s + 1) // 2) on each axis, as ``timm``'s ``rand_bbox``;
    timm's own function is not called because it draws from numpy's global RNG.
    """
    rows = torch.arange(shape[-2])
    cols = torch.arange(shape[-1])
    top = centres[:, :1] - size[0] // 2
    left = centres[:, 1:] - size[1] // 2
    inside_rows = (rows >= top) & (rows < top + size[0])
    inside_cols = (cols >= left) & (cols < left + size[1])
    return (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]


def _mix_targets(targets: torch.Tensor, partners: torch.Tensor, weight: torch.Tensor
                 ) -> torch.Tensor:
    """Soft targets mixed with the partners' rows; ``weight`` (B,) is the partner's share."""
    weight = weight.to(targets)[:, None]
    return (1 - weight) * targets + weight * targets[partners]


def _paste(images: torch.Tensor, targets: torch.Tensor, partners: torch.Tensor,
           taken: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Take the pixels where ``taken`` (B or 1, 1, H, W) from the partners, labels by area."""
    taken = taken.to(images.device)
    share = taken.double().mean(dim=(1, 2, 3)).expand(len(images))
    return torch.where(taken, images[partners], images), _mix_targets(targets, partners, share)


def _partners(count: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(rng.permutation(count))


def _cutout(images: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator,
            settings: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """One square hole per image, centre anywhere in the image (so it may be clipped)."""
    side = max(1, round(settings["size_fraction"] * min(images.shape[-2:])))
    centres = torch.from_numpy(rng.integers(0, images.shape[-2:], size=(len(images), 2)))
    holes = _box_masks(images.shape, centres, (side, side)).to(images.device)
    return images.masked_fill(holes, 0.0), targets


def _mixup(images: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator,
           settings: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """One lam ~ Beta(alpha, alpha) per batch, as the paper's code."""
    lam = float(rng.beta(settings["alpha"], settings["alpha"]))
    partners = _partners(len(images), rng)
    share = torch.full((len(images),), 1.0 - lam, dtype=torch.float64)
    return lam * images + (1 - lam) * images[partners], _mix_targets(targets, partners, share)


def _cutmix(images: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator,
            settings: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """One box per batch, area 1 - lam with lam ~ Beta(alpha, alpha), centre anywhere."""
    lam = float(rng.beta(settings["alpha"], settings["alpha"]))
    partners = _partners(len(images), rng)
    centre = torch.from_numpy(rng.integers(0, images.shape[-2:], size=(1, 2)))
    return _paste(images, targets, partners,
                  _box_masks(images.shape, centre, _cut_size(images.shape, lam)))


def _fmix(images: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator,
          settings: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """One Fourier mask per batch (as the FMix code): the image keeps lam of its pixels."""
    lam = float(rng.beta(settings["alpha"], settings["alpha"]))
    partners = _partners(len(images), rng)
    kept = fourier_mask(tuple(images.shape[-2:]), lam, settings["decay_power"], rng)
    return _paste(images, targets, partners, ~kept[None, None])


def _resizemix(images: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator,
               settings: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole partner, shrunk by tau ~ U(alpha, beta), pasted at a random place inside."""
    tau = float(rng.uniform(settings["alpha"], settings["beta"]))
    partners = _partners(len(images), rng)
    height, width = images.shape[-2:]
    size = (max(1, round(tau * height)), max(1, round(tau * width)))
    top = int(rng.integers(0, height - size[0] + 1))
    left = int(rng.integers(0, width - size[1] + 1))
    shrunk = F.interpolate(images[partners].float(), size=size, mode="bilinear",
                           align_corners=False, antialias=True)
    mixed = images.clone()
    mixed[:, :, top:top + size[0], left:left + size[1]] = shrunk.to(images.dtype)
    share = torch.full((len(images),), size[0] * size[1] / (height * width), dtype=torch.float64)
    return mixed, _mix_targets(targets, partners, share)


def _saliencymix(images: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator,
                 settings: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A CutMix box centred on each partner's most salient pixel, pasted at the same place.

    The SaliencyMix code places one box per batch from the first partner's saliency; here each
    image gets the box of its own partner, which is what the method describes.
    """
    lam = float(rng.beta(settings["alpha"], settings["alpha"]))
    partners = _partners(len(images), rng)
    centres = salient_points(images)[partners]
    return _paste(images, targets, partners,
                  _box_masks(images.shape, centres, _cut_size(images.shape, lam)))


_OPERATIONS: Mapping[str, _Operation] = MappingProxyType({
    "cutout": _cutout,
    "mixup": _mixup,
    "cutmix": _cutmix,
    "fmix": _fmix,
    "resizemix": _resizemix,
    "saliencymix": _saliencymix,
})
