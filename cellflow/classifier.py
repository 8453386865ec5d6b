"""Noise-aware image classifier for classifier-guided DDIM decoding.

Cellflow steers the reverse diffusion towards a target class with the gradient of a classifier
that was trained on *noisy* images: at every step the sampler sees x_t, not a clean image, so the
classifier must see x_t and its timestep t too (Dhariwal & Nichol 2021, openai/guided-diffusion).

The architecture is guided-diffusion's ``EncoderUNetModel`` (the "half UNet"), assembled from
diffusers building blocks so that it shares their tested ResBlocks and attention and their
``save_pretrained``/``from_pretrained`` format (``config.json`` + safetensors):

* sinusoidal timestep features of width ``block_out_channels[0]`` -> 2-layer MLP (4x as wide);
* ``conv_in``; one down level per entry of ``block_out_channels``, each with ``layers_per_block``
  ResBlocks whose GroupNorm is scaled and shifted by the time embedding (AdaGN,
  ``resnet_time_scale_shift="scale_shift"``), self-attention after each ResBlock at the levels in
  ``attention_levels``, and a BigGAN-style downsampling ResBlock ending every level but the last;
* a middle block (ResBlock, attention, ResBlock);
* GroupNorm -> SiLU -> guided-diffusion's ``AttentionPool2d`` (the mean token and every
  position, each with its own learned positional embedding, attend to each other; the mean
  token's output is projected straight to the class logits), or the mean over positions and a
  linear layer (guided-diffusion's ``adaptive`` pool).

There is no class input: the class enters only through the logits, whose log-softmax gradient
with respect to x_t is the guidance term (:func:`class_log_prob_gradient`).
"""

from __future__ import annotations

from typing import Final

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import nn

__all__ = ["POOLS", "NoiseAwareClassifier", "class_log_prob_gradient", "clean_logits",
           "fit_temperature"]

POOLS: Final = ("attention", "mean")
# guided-diffusion's normalization() is GroupNorm(32, ch) computed in float32 with its default eps.
_NORM_EPS: Final = 1e-5


class AttentionPool2d(nn.Module):
    """guided-diffusion's attention pool, parameter for parameter (same names and shapes).

    The positional embedding holds one vector per position and one for the mean token, so the
    pool is tied to its input's side ``spatial``; attention uses ``channels // head_channels``
    heads in the "new" qkv order (q, k and v each a contiguous third of the projection).
    """

    def __init__(self, spatial: int, channels: int, head_channels: int, out_channels: int
                 ) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(channels, spatial ** 2 + 1) / channels ** 0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)
        self.num_heads = channels // head_channels
        self.spatial = spatial

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, out_channels)."""
        batch, channels, height, width = hidden.shape
        if (height, width) != (self.spatial, self.spatial):
            raise ValueError(f"the attention pool was built for {self.spatial}x{self.spatial} "
                             f"features (the classifier's sample_size), got {height}x{width}")
        tokens = hidden.reshape(batch, channels, -1)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1)
        tokens = tokens + self.positional_embedding[None].to(tokens.dtype)
        length, per_head = tokens.shape[-1], channels // self.num_heads

        def heads(part: torch.Tensor) -> torch.Tensor:  # (B, C, L) -> (B, heads, L, C/heads)
            return part.reshape(batch, self.num_heads, per_head, length).transpose(2, 3)

        query, key, value = (heads(part) for part in self.qkv_proj(tokens).chunk(3, dim=1))
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(2, 3).reshape(batch, channels, length)
        return self.c_proj(attended)[:, :, 0]


class NoiseAwareClassifier(ModelMixin, ConfigMixin):
    """Half-UNet classifier of noisy images x_t conditioned on the diffusion timestep t.

    ``attention_levels`` index ``block_out_channels``; every level except the last halves the
    resolution, so ``sample_size`` must be divisible by ``2 ** (len(block_out_channels) - 1)``.
    The middle block and the attention pool always use attention, so the last channel count must
    be divisible by ``attention_head_dim``, as must those of the attention levels.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 3,
        num_classes: int = 2,
        block_out_channels: tuple[int, ...] = (64, 128, 128, 256),
        layers_per_block: int = 2,
        attention_levels: tuple[int, ...] = (2, 3),
        attention_head_dim: int = 64,
        norm_num_groups: int = 32,
        pool: str = "attention",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        # config.json stores tuples as lists; accept both.
        block_out_channels = tuple(int(c) for c in block_out_channels)
        attention_levels = tuple(sorted({int(level) for level in attention_levels}))
        _validate(
            sample_size=sample_size,
            in_channels=in_channels,
            num_classes=num_classes,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            attention_levels=attention_levels,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            pool=pool,
            dropout=dropout,
        )
        self.downsample_factor = 2 ** (len(block_out_channels) - 1)

        # Time: the same embedding as diffusers' UNet2DModel (cos-first sinusoids, no frequency
        # shift, as in guided-diffusion's timestep_embedding) followed by a SiLU MLP.
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(
            block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0
        )
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)

        self.down_blocks = nn.ModuleList()
        output_channel = block_out_channels[0]
        for level, channels in enumerate(block_out_channels):
            input_channel, output_channel = output_channel, channels
            self.down_blocks.append(
                get_down_block(
                    "AttnDownBlock2D" if level in attention_levels else "ResnetDownsampleBlock2D",
                    num_layers=layers_per_block,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=level < len(block_out_channels) - 1,
                    resnet_eps=_NORM_EPS,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim,
                    resnet_time_scale_shift="scale_shift",
                    # BigGAN-style downsampling ResBlock (guided-diffusion's resblock_updown).
                    downsample_type="resnet",
                    dropout=dropout,
                )
            )

        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1],
            temb_channels=time_embed_dim,
            dropout=dropout,
            resnet_eps=_NORM_EPS,
            resnet_act_fn="silu",
            resnet_time_scale_shift="scale_shift",
            attention_head_dim=attention_head_dim,
            resnet_groups=norm_num_groups,
            # diffusers drops the attention's GroupNorm under scale_shift unless told otherwise;
            # guided-diffusion's AttentionBlock normalizes its input, so keep it.
            attn_groups=norm_num_groups,
        )

        self.norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[-1], eps=_NORM_EPS)
        self.act_out = nn.SiLU()
        # Not named `pool`: diffusers resolves that name to the config value first.
        if pool == "attention":
            self.attention_pool = AttentionPool2d(sample_size // self.downsample_factor,
                                                  block_out_channels[-1], attention_head_dim,
                                                  num_classes)
        else:
            self.head = nn.Linear(block_out_channels[-1], num_classes)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        """(B, C, H, W) noisy images in [-1,1]-scaled x_t, timestep (B,) or scalar in [0, 1000)
        -> (B, num_classes) logits.

        Every operation is per sample (GroupNorm, attention over one image's positions), so the
        logits of one image never depend on the other images of the batch.
        """
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample must be (B, {self.config.in_channels}, H, W), got {tuple(sample.shape)}"
            )
        height, width = sample.shape[-2:]
        if height % self.downsample_factor or width % self.downsample_factor:
            raise ValueError(
                f"sample height and width must be divisible by {self.downsample_factor}, "
                f"got {height}x{width}"
            )
        timesteps = _batch_timesteps(timestep, sample.shape[0], sample.device)

        # Timesteps always returns float32 features; the MLP may run in another precision.
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))

        hidden = self.conv_in(sample)
        for block in self.down_blocks:
            hidden, _ = block(hidden_states=hidden, temb=emb)
        hidden = self.mid_block(hidden, emb)
        hidden = self.act_out(self.norm_out(hidden))

        if self.config.pool == "attention":
            return self.attention_pool(hidden)
        return self.head(hidden.mean(dim=(2, 3)))


def class_log_prob_gradient(
    classifier: NoiseAwareClassifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """grad_x of sum_i log softmax(classifier(x, t))[i, y_i] — the guidance term (per-sample,
    since nothing mixes samples across the batch).

    Computed on a detached copy with requires_grad, under torch.enable_grad(), so it works inside
    a sampler's ``torch.no_grad()`` loop; returns a tensor shaped (and typed) like x; uses
    ``torch.autograd.grad``, so it leaves no grads on the classifier parameters. ``y`` holds one
    class index per sample, or one for the whole batch.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got {tuple(x.shape)}")
    batch = x.shape[0]
    y = torch.as_tensor(y, device=x.device)
    if y.is_floating_point() or y.is_complex():
        raise ValueError(f"y must hold integer class indices, got dtype {y.dtype}")
    y = y.long()
    if y.ndim == 0:
        y = y.expand(batch)
    if y.shape != (batch,):
        raise ValueError(f"y must be a scalar or shaped ({batch},), got {tuple(y.shape)}")
    num_classes = classifier.config.num_classes
    if batch and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y must lie in [0, {num_classes}), got {y.tolist()}")

    with torch.enable_grad():
        x_in = x.detach().to(dtype=classifier.dtype).requires_grad_(True)
        logits = classifier(x_in, t)
        # Half-precision log-softmax is too coarse for a gradient; never downcast float64.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        selected = torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(selected, x_in)
    return grad.to(dtype=x.dtype)


@torch.no_grad()
def clean_logits(classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 64
                 ) -> torch.Tensor:
    """(N, C) logits at t = 0 of images in [-1, 1], in float64 on the CPU, ``batch_size`` at a
    time on the classifier's device: what p(class | clean image) is read from."""
    parameter = next(classifier.parameters())
    chunks = [classifier(images[first:first + batch_size].to(parameter.device, parameter.dtype),
                         0).double().cpu()
              for first in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, classifier.config.num_classes)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of softmax(logits / T).

    Fitted on held-out images (the validation split), it makes p(target | frame) a calibrated
    probability without changing any prediction. Searched over log T in [1/20, 20]. Images that
    are all classified correctly carry no calibration information (their NLL only falls as
    T -> 0, towards hard 0/1 posteriors), so then T stays 1: the classifier's own softmax.
    """
    from scipy.optimize import minimize_scalar

    logits, labels = logits.detach().double().cpu(), torch.as_tensor(labels).long().cpu()
    if logits.ndim != 2 or len(logits) != len(labels) or not len(labels):
        raise ValueError(f"need (n, C) logits and n labels, n >= 1; got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")

    if bool((logits.argmax(dim=1) == labels).all()):
        return 1.0

    def nll(log_temperature: float) -> float:
        scaled = logits / float(np.exp(log_temperature))
        return float(torch.nn.functional.cross_entropy(scaled, labels))

    best = minimize_scalar(nll, bounds=(-np.log(20), np.log(20)), method="bounded")
    return float(np.exp(best.x))


def _batch_timesteps(timestep: torch.Tensor | int, batch: int, device: torch.device
                     ) -> torch.Tensor:
    """Broadcast a python number, a 0-d or one-element tensor to (batch,); check a (batch,) one."""
    timesteps = torch.as_tensor(timestep, device=device)
    if timesteps.ndim == 0 or (timesteps.ndim == 1 and timesteps.numel() == 1):
        return timesteps.reshape(()).expand(batch)
    if timesteps.shape != (batch,):
        raise ValueError(
            f"timestep must be a scalar or shaped ({batch},), got {tuple(timesteps.shape)}"
        )
    return timesteps


def _validate(
    *,
    sample_size: int,
    in_channels: int,
    num_classes: int,
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    attention_levels: tuple[int, ...],
    attention_head_dim: int,
    norm_num_groups: int,
    pool: str,
    dropout: float,
) -> None:
    """Reject configurations that would fail deep inside diffusers, or silently misbehave."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    if not block_out_channels or min(block_out_channels) < 1:
        raise ValueError(
            f"block_out_channels must be a non-empty tuple of positive ints, got "
            f"{block_out_channels}"
        )
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block must be at least 1, got {layers_per_block}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    levels = len(block_out_channels)
    bad_levels = [level for level in attention_levels if not 0 <= level < levels]
    if bad_levels:
        raise ValueError(
            f"attention_levels must index block_out_channels (0..{levels - 1}), got "
            f"{bad_levels}"
        )
    factor = 2 ** (levels - 1)
    if sample_size < 1 or sample_size % factor:
        raise ValueError(
            f"sample_size must be a positive multiple of 2**(len(block_out_channels) - 1) = "
            f"{factor}, got {sample_size}"
        )
    if norm_num_groups < 1 or any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(
            f"every entry of block_out_channels {block_out_channels} must be divisible by "
            f"norm_num_groups={norm_num_groups}"
        )
    attended = {block_out_channels[level] for level in attention_levels}
    attended.add(block_out_channels[-1])  # middle block and attention pool
    if attention_head_dim < 1 or any(c % attention_head_dim for c in attended):
        raise ValueError(
            f"attention_head_dim={attention_head_dim} must divide the channel counts "
            f"{sorted(attended)} of the attention levels, the middle block and the pool"
        )
