"""Convert openai guided-diffusion / improved-diffusion checkpoints into Cellflow model folders.

Our diffusion UNet (:func:`cellflow.diffusion.build_unet`, a diffusers ``UNet2DModel``) and our
noise-aware classifier (:class:`cellflow.classifier.NoiseAwareClassifier`) are guided-diffusion's
``UNetModel`` and ``EncoderUNetModel``, parameter for parameter, so a checkpoint trained with
guided-diffusion (or OpenAI's public class-conditional ImageNet models) can stand in for the
models that our training stages write to ``results/{dataset}/models/{diffusion,classifier}``.

A guided-diffusion checkpoint is a bare state dict: the architecture lives in the command-line
flags it was trained with (``MODEL_FLAGS`` / ``CLASSIFIER_FLAGS`` of guided-diffusion's README),
so the converter takes those flags, verbatim, and checks every tensor of the checkpoint against
the model they describe: no key may be missing, left over or mis-shaped. What the mapping has to
get right beyond renaming:

* attention: guided-diffusion's one 1x1 ``qkv`` convolution becomes diffusers' ``to_q``, ``to_k``
  and ``to_v``. Its channels are ordered per head (q, k, v of head 0, then head 1, ...) in the
  legacy order (``QKVAttentionLegacy``) and as three thirds (all q, all k, all v) in the new
  order (``QKVAttention``, ``use_new_attention_order``); the classifier's attention pool always
  uses the new order;
* labels: guided-diffusion numbers classes by the sorted class names (its file-name prefixes),
  our config by the order of ``datasets.<name>.classes``; the label embedding rows (UNet) and
  the logit rows (classifier) are permuted so that our label i is ``classes[i]``;
* the noise schedule comes from ``diffusion_steps`` and ``noise_schedule``.

Flags that only steer training or sampling (``use_checkpoint``, ``use_fp16``,
``timestep_respacing``, ``use_kl``, ``rescale_learned_sigmas``, improved-diffusion's
``sigma_small``) are accepted and do not change the conversion. Refused, each with an error
naming the flag: ``class_cond False`` (Cellflow steers between classes), ``predict_xstart True``
(our samplers read epsilon), ``rescale_timesteps True`` with ``diffusion_steps`` other than 1000
(the network would expect rescaled timesteps), ``channel_mult`` not starting at 1 (diffusers ties
the time embedding to the first width), attention heads of different widths at different levels
(``num_heads`` without ``num_head_channels`` where the attended widths differ, as in the public
128x128 model: diffusers' ``UNet2DModel`` has one ``attention_head_dim``), and for the classifier
anything but scale-shift norm, BigGAN up/down ResBlocks and the ``attention`` or ``adaptive``
pool. improved-diffusion's layout (strided-convolution up/down sampling, ``resblock_updown
False``; ``use_scale_shift_norm False``) converts to a ``UNet2DModel`` with diffusers' matching
settings.
"""

from __future__ import annotations

import difflib
import json
import math
import pickle
import shlex
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

import torch
from diffusers import UNet2DModel

from cellflow.classifier import NoiseAwareClassifier
from cellflow.diffusion import NoiseSchedule, UNetArchitecture, build_unet

__all__ = ["CheckpointError", "ClassifierFlags", "Converted", "GuidedDiffusionError",
           "UNetFlags", "convert_classifier", "convert_files", "convert_unet",
           "describe_conversion", "load_checkpoint", "noise_schedule",
           "parse_classifier_flags", "parse_unet_flags", "write_converted"]

QKV_ORDERS: Final = ("legacy", "new")
# guided-diffusion's normalization(): GroupNorm with 32 groups everywhere.
_GROUPS: Final = 32
# create_model's / create_classifier's channel_mult when none is given, by image_size.
_DEFAULT_CHANNEL_MULT: Final = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4),
                                128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}


class GuidedDiffusionError(ValueError):
    """A checkpoint or its flags that cannot be converted; the message says what and why."""


class CheckpointError(GuidedDiffusionError):
    """A checkpoint file that is not a plain state dict of tensors."""


@dataclass(frozen=True)
class _DiffusionFlags:
    """The diffusion flags of ``diffusion_defaults()``, which both flag sets include."""

    learn_sigma: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    timestep_respacing: str = ""
    use_kl: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = False
    rescale_learned_sigmas: bool = False


@dataclass(frozen=True)
class UNetFlags(_DiffusionFlags):
    """guided-diffusion's ``model_and_diffusion_defaults()``, by name and default.

    ``sigma_small`` is improved-diffusion's (accepted so that its flag strings parse).
    Weights depend on the architecture flags only; ``dropout`` is kept in the UNet's config
    (it matters for fine-tuning); the other diffusion flags are checked or ignored as the
    module docstring says.
    """

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 4
    num_heads_upsample: int = -1
    num_head_channels: int = -1
    attention_resolutions: str = "16,8"
    channel_mult: str = ""
    dropout: float = 0.0
    class_cond: bool = False
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_fp16: bool = False
    use_new_attention_order: bool = False
    sigma_small: bool = False


@dataclass(frozen=True)
class ClassifierFlags(_DiffusionFlags):
    """guided-diffusion's ``classifier_and_diffusion_defaults()``, by name and default.

    Two Cellflow extensions name what ``create_classifier`` fixes, so that small classifiers
    (and images other than 64/128/256/512 px) can be described: ``classifier_channel_mult``
    ("" = create_classifier's resolution-dependent multipliers) and
    ``classifier_num_head_channels`` (create_classifier's 64). The diffusion flags do not change
    a classifier's weights; only ``rescale_timesteps`` is checked.
    """

    image_size: int = 64
    classifier_use_fp16: bool = False
    classifier_width: int = 128
    classifier_depth: int = 2
    classifier_attention_resolutions: str = "32,16,8"
    classifier_use_scale_shift_norm: bool = True
    classifier_resblock_updown: bool = True
    classifier_pool: str = "attention"
    classifier_channel_mult: str = ""
    classifier_num_head_channels: int = 64


class Converted(NamedTuple):
    """A converted model and what the conversion did (JSON-ready; see convert_unet)."""

    model: torch.nn.Module
    report: dict[str, Any]


_Flags = TypeVar("_Flags", UNetFlags, ClassifierFlags)
FlagSource = str | Mapping[str, Any] | None
_TRUE: Final = {"true", "t", "yes", "y", "1"}  # guided-diffusion's str2bool
_FALSE: Final = {"false", "f", "no", "n", "0"}


def parse_unet_flags(source: FlagSource | UNetFlags = None) -> UNetFlags:
    """UNet flags from guided-diffusion's flag string (``--image_size 256 --class_cond True
    ...``) or a mapping of flag names to values; unset flags keep guided-diffusion's defaults."""
    return _parse(UNetFlags, source, ClassifierFlags)


def parse_classifier_flags(source: FlagSource | ClassifierFlags = None) -> ClassifierFlags:
    """Classifier flags (``--classifier_width 128 ...``), as :func:`parse_unet_flags`."""
    return _parse(ClassifierFlags, source, UNetFlags)


def _parse(kind: type[_Flags], source: Any, other: type) -> _Flags:
    if isinstance(source, kind):
        return source
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, str):
        raw = _tokens(source)
    elif isinstance(source, Mapping):
        raw = {str(name).removeprefix("--"): value for name, value in source.items()}
    else:
        raise GuidedDiffusionError(f"{kind.__name__}: expected a flag string or a mapping, "
                                   f"got {type(source).__name__}")
    known = {field.name: field for field in fields(kind)}
    values = {}
    for name, value in raw.items():
        if name not in known:
            hint = difflib.get_close_matches(name, known, n=1)
            elsewhere = {field.name for field in fields(other)} - set(known)
            if name in elsewhere:
                where = "a classifier flag" if other is ClassifierFlags else "a UNet flag"
                detail = f" ({where}: pass it with the other model's flags)"
            else:
                detail = f" (did you mean --{hint[0]}?)" if hint else ""
            raise GuidedDiffusionError(f"unknown {kind.__name__} flag --{name}{detail}")
        values[name] = _typed(name, value, type(known[name].default))
    return kind(**values)


def _tokens(text: str) -> dict[str, str]:
    """``--name value`` and ``--name=value`` pairs of a flag string, in order."""
    words = shlex.split(text)
    pairs: dict[str, str] = {}
    at = 0
    while at < len(words):
        word = words[at]
        if not word.startswith("--") or word == "--":
            raise GuidedDiffusionError(f"expected a --flag in the flag string, got {word!r}")
        name, equals, value = word[2:].partition("=")
        if not equals:
            if at + 1 >= len(words) or words[at + 1].startswith("--"):
                raise GuidedDiffusionError(f"flag --{name} has no value")
            value = words[at + 1]
            at += 1
        pairs[name] = value
        at += 1
    return pairs


def _typed(name: str, value: Any, kind: type) -> Any:
    """``value`` as the flag's type (that of its default), as guided-diffusion's argparse reads
    it; sequences of numbers are accepted for the comma-separated flags."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise GuidedDiffusionError(f"flag --{name} must be True or False, got {value!r}")
    if kind is str:
        if isinstance(value, Sequence) and not isinstance(value, str):
            return ",".join(str(item) for item in value)
        return str(value)
    if isinstance(value, bool):
        raise GuidedDiffusionError(f"flag --{name} must be a number, got {value!r}")
    try:
        return float(value) if kind is float else _integer(value)
    except (TypeError, ValueError):
        what = "a number" if kind is float else "an integer"
        raise GuidedDiffusionError(f"flag --{name} must be {what}, got {value!r}") from None


def _integer(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, read with ``weights_only=True``.

    guided-diffusion saves a bare state dict; ``{"state_dict": ...}`` is accepted too. A file
    that holds other Python objects is refused: unpickling them could run code, and Cellflow
    never unpickles code from a checkpoint.
    """
    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from None
        raise CheckpointError(
            f"{path} holds Python objects, not a plain state dict of tensors; Cellflow reads "
            "checkpoints with torch.load(weights_only=True) and never unpickles code. Save the "
            "weights alone: torch.save(model.state_dict(), path). (torch: "
            f"{str(err).strip().splitlines()[-1]})") from None
    except RuntimeError as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from None
    if (isinstance(loaded, Mapping) and set(loaded) == {"state_dict"}
            and isinstance(loaded["state_dict"], Mapping)):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: not a state dict of tensors: {key!r} holds a "
                                  f"{type(value).__name__}")
    return dict(loaded)


def noise_schedule(flags: FlagSource | UNetFlags | ClassifierFlags) -> NoiseSchedule:
    """Our NoiseSchedule for ``diffusion_steps`` and ``noise_schedule``: guided-diffusion's
    linear schedule scales Ho et al.'s betas 1e-4 .. 0.02 by 1000 / steps; its cosine
    schedule (Nichol & Dhariwal 2021, betas capped at 0.999) is diffusers' squaredcos_cap_v2."""
    if not isinstance(flags, UNetFlags | ClassifierFlags):
        flags = parse_unet_flags(flags)
    steps = flags.diffusion_steps
    if steps < 1:
        raise GuidedDiffusionError(f"--diffusion_steps must be positive, got {steps}")
    if flags.noise_schedule == "linear":
        scale = 1000 / steps
        return NoiseSchedule(steps, scale * 1e-4, scale * 0.02, "linear")
    if flags.noise_schedule == "cosine":
        return NoiseSchedule(steps, beta_schedule="squaredcos_cap_v2")
    raise GuidedDiffusionError(f"--noise_schedule must be linear or cosine, got "
                               f"{flags.noise_schedule!r}")


# ---------------------------------------------------------------------------------------------
# Architecture from the flags


@dataclass(frozen=True)
class _Layout:
    """What the flags say about the network's shape, in diffusers' terms."""

    widths: tuple[int, ...]
    blocks: int
    attention_levels: tuple[int, ...]
    head_dim: int
    scale_shift: bool
    resblock_updown: bool


def _channel_mult(text: str, image_size: int, flag: str) -> tuple[float, ...]:
    if text == "":
        if image_size not in _DEFAULT_CHANNEL_MULT:
            raise GuidedDiffusionError(
                f"--{flag} is empty and guided-diffusion has no default channel multipliers for "
                f"--image_size {image_size} (only {sorted(_DEFAULT_CHANNEL_MULT)}); pass them, "
                f"e.g. --{flag} 1,2,2 (improved-diffusion's 32 px models use 1,2,2,2)")
        return _DEFAULT_CHANNEL_MULT[image_size]
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise GuidedDiffusionError(f"--{flag} must be comma-separated integers, got "
                                   f"{text!r}") from None


def _attention_levels(text: str, image_size: int, levels: int, flag: str) -> tuple[int, ...]:
    """Level indices whose downsampling rate is image_size // resolution, as guided-diffusion
    places attention (resolutions that match no level get none, there as here)."""
    try:
        rates = {image_size // int(part) for part in text.split(",") if part.strip()}
    except (ValueError, ZeroDivisionError):
        raise GuidedDiffusionError(f"--{flag} must be comma-separated positive integers, got "
                                   f"{text!r}") from None
    return tuple(level for level in range(levels) if 2 ** level in rates)


def _widths(mult: tuple[float, ...], base: int, image_size: int, flags: tuple[str, str]
            ) -> tuple[int, ...]:
    mult_flag, width_flag = flags
    if mult[0] != 1:
        raise GuidedDiffusionError(
            f"--{mult_flag} {','.join(map(str, mult))}: the first multiplier must be 1 (diffusers "
            "sizes the time embedding by the first level's width, guided-diffusion by "
            f"--{width_flag}); not supported")
    widths = tuple(int(m * base) for m in mult)
    if base < 1 or any(width % _GROUPS for width in widths):
        raise GuidedDiffusionError(
            f"--{width_flag} {base} with --{mult_flag} {','.join(map(str, mult))} gives widths "
            f"{widths}; guided-diffusion's GroupNorm needs multiples of {_GROUPS}")
    factor = 2 ** (len(widths) - 1)
    if image_size < 1 or image_size % factor:
        raise GuidedDiffusionError(f"--image_size {image_size} is not divisible by {factor} "
                                   f"({len(widths)} levels)")
    return widths


def _unet_layout(flags: UNetFlags) -> _Layout:
    mult = _channel_mult(flags.channel_mult, flags.image_size, "channel_mult")
    widths = _widths(mult, flags.num_channels, flags.image_size, ("channel_mult", "num_channels"))
    if flags.num_res_blocks < 1:
        raise GuidedDiffusionError(f"--num_res_blocks must be positive, got "
                                   f"{flags.num_res_blocks}")
    levels = _attention_levels(flags.attention_resolutions, flags.image_size, len(widths),
                               "attention_resolutions")
    if flags.num_head_channels != -1:
        per_layer = {("num_head_channels", widths[level], flags.num_head_channels)
                     for level in (*levels, len(widths) - 1)}
    else:
        up_heads = flags.num_heads if flags.num_heads_upsample == -1 else flags.num_heads_upsample
        per_layer = ({("num_heads", widths[level], flags.num_heads)
                      for level in (*levels, len(widths) - 1)}
                     | {("num_heads_upsample", widths[level], up_heads) for level in levels})
    head_dims = set()
    for flag, width, value in sorted(per_layer):
        if value < 1:
            raise GuidedDiffusionError(f"--{flag} must be positive, got {value}")
        heads = value if flag != "num_head_channels" else width // value
        if width % value:
            raise GuidedDiffusionError(f"--{flag} {value} does not divide the attention width "
                                       f"{width}")
        head_dims.add(width // heads)
    if len(head_dims) > 1:
        raise GuidedDiffusionError(
            f"--num_heads {flags.num_heads} (with --num_head_channels -1, --num_heads_upsample "
            f"{flags.num_heads_upsample}) gives attention heads of {_joined(head_dims)} "
            f"channels at the attention widths {_joined({w for _, w, _ in per_layer})}; "
            "diffusers' UNet2DModel has one attention_head_dim for every level, so this "
            "checkpoint has no exact diffusers equivalent (not supported)")
    return _Layout(widths, flags.num_res_blocks, levels, head_dims.pop(),
                   flags.use_scale_shift_norm, flags.resblock_updown)


def _joined(numbers: set[int]) -> str:
    values = [str(number) for number in sorted(numbers)]
    return ", ".join(values[:-1]) + f" and {values[-1]}" if len(values) > 1 else values[0]


def _check_diffusion_flags(flags: UNetFlags | ClassifierFlags) -> None:
    if flags.predict_xstart:
        raise GuidedDiffusionError("--predict_xstart True: the network predicts x0, Cellflow's "
                                   "samplers read epsilon (not supported)")
    if flags.rescale_timesteps and flags.diffusion_steps != 1000:
        raise GuidedDiffusionError(
            f"--rescale_timesteps True with --diffusion_steps {flags.diffusion_steps}: the "
            "network was fed t * 1000 / steps, Cellflow feeds t (not supported)")
    noise_schedule(flags)


def _build_unet(layout: _Layout, flags: UNetFlags, num_classes: int) -> UNet2DModel:
    """build_unet where the flags are ours (scale-shift norm, BigGAN up/down); otherwise the
    same UNet2DModel with diffusers' strided-conv resampling and/or additive time embedding."""
    architecture = UNetArchitecture(layout.widths, layout.blocks, layout.attention_levels,
                                    layout.head_dim, flags.dropout, flags.learn_sigma)
    if layout.scale_shift and layout.resblock_updown:
        return build_unet(architecture, flags.image_size, num_classes)
    resampling = "resnet" if layout.resblock_updown else "conv"
    plain = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if layout.resblock_updown \
        else ("DownBlock2D", "UpBlock2D")
    attention = set(layout.attention_levels)
    levels = range(len(layout.widths))
    return UNet2DModel(
        sample_size=flags.image_size,
        in_channels=3,
        out_channels=6 if flags.learn_sigma else 3,
        down_block_types=tuple("AttnDownBlock2D" if i in attention else plain[0] for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if i in attention else plain[1]
                             for i in reversed(levels)),
        block_out_channels=layout.widths,
        layers_per_block=layout.blocks,
        attention_head_dim=layout.head_dim,
        norm_num_groups=_GROUPS,
        attn_norm_num_groups=_GROUPS,
        resnet_time_scale_shift="scale_shift" if layout.scale_shift else "default",
        downsample_type=resampling,
        upsample_type=resampling,
        downsample_padding=1,
        num_class_embeds=num_classes,
        dropout=flags.dropout,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


# ---------------------------------------------------------------------------------------------
# Key mapping: (our prefix, guided-diffusion prefix, kind of module)

_RESNET: Final = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3",
                  "conv_shortcut": "skip_connection"}


def _encoder_prefixes(layout: _Layout, resample_kind: str) -> list[tuple[str, str, str]]:
    """Our down blocks and middle block against guided-diffusion's input_blocks and
    middle_block (the same in UNetModel and EncoderUNetModel)."""
    pairs = [("time_embedding.linear_1", "time_embed.0", "same"),
             ("time_embedding.linear_2", "time_embed.2", "same"),
             ("conv_in", "input_blocks.0.0", "same")]
    block = 1
    for level in range(len(layout.widths)):
        for layer in range(layout.blocks):
            ours = f"down_blocks.{level}"
            pairs.append((f"{ours}.resnets.{layer}", f"input_blocks.{block}.0", "resnet"))
            if level in layout.attention_levels:
                pairs.append((f"{ours}.attentions.{layer}", f"input_blocks.{block}.1",
                              "attention"))
            block += 1
        if level < len(layout.widths) - 1:
            theirs = (f"input_blocks.{block}.0" if resample_kind == "resnet"
                      else f"input_blocks.{block}.0.op")
            pairs.append((f"down_blocks.{level}.downsamplers.0", theirs, resample_kind))
            block += 1
    pairs += [("mid_block.resnets.0", "middle_block.0", "resnet"),
              ("mid_block.attentions.0", "middle_block.1", "attention"),
              ("mid_block.resnets.1", "middle_block.2", "resnet")]
    return pairs


def _unet_prefixes(layout: _Layout) -> list[tuple[str, str, str]]:
    resample = "resnet" if layout.resblock_updown else "conv"
    pairs = _encoder_prefixes(layout, resample)
    pairs.append(("class_embedding", "label_emb", "classes"))
    block = 0
    for up, level in enumerate(reversed(range(len(layout.widths)))):
        attended = level in layout.attention_levels
        for layer in range(layout.blocks + 1):
            ours = f"up_blocks.{up}"
            pairs.append((f"{ours}.resnets.{layer}", f"output_blocks.{block}.0", "resnet"))
            if attended:
                pairs.append((f"{ours}.attentions.{layer}", f"output_blocks.{block}.1",
                              "attention"))
            if level and layer == layout.blocks:
                index = 2 if attended else 1
                theirs = (f"output_blocks.{block}.{index}" if layout.resblock_updown
                          else f"output_blocks.{block}.{index}.conv")
                pairs.append((f"{ours}.upsamplers.0", theirs, resample))
            block += 1
    pairs += [("conv_norm_out", "out.0", "same"), ("conv_out", "out.2", "same")]
    return pairs


def _classifier_prefixes(layout: _Layout, pool: str) -> list[tuple[str, str, str]]:
    pairs = _encoder_prefixes(layout, "resnet")
    pairs.append(("norm_out", "out.0", "same"))
    if pool == "attention":
        pairs += [("attention_pool.positional_embedding", "out.2.positional_embedding", "param"),
                  ("attention_pool.qkv_proj", "out.2.qkv_proj", "same"),
                  ("attention_pool.c_proj", "out.2.c_proj", "classes")]
    else:
        pairs.append(("head", "out.3", "head"))
    return pairs


@dataclass(frozen=True)
class _Source:
    """Where one of our tensors comes from: a checkpoint key, the shape it must have there,
    and how it becomes ours (class rows are permuted afterwards where ``class_rows``)."""

    key: str
    shape: tuple[int, ...]
    take: Callable[[torch.Tensor], torch.Tensor]
    class_rows: bool = False


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _qkv(which: int, heads: int, order: str, bias: bool
         ) -> Callable[[torch.Tensor], torch.Tensor]:
    """q (0), k (1) or v (2) of guided-diffusion's qkv projection, as one diffusers Linear."""

    def take(tensor: torch.Tensor) -> torch.Tensor:
        width = tensor.shape[0] // 3
        rows = tensor if bias else tensor[..., 0]
        tail = () if bias else (width,)
        if order == "legacy":  # per head: q, k, v of width / heads channels each
            return rows.reshape(heads, 3, width // heads, *tail)[:, which].reshape(width, *tail)
        return rows.reshape(3, width, *tail)[which]  # all q, all k, all v (heads inside each)

    return take


def _plan(model: torch.nn.Module, prefixes: list[tuple[str, str, str]], qkv_order: str,
          ) -> dict[str, _Source]:
    """Our state-dict key -> its source in the checkpoint."""
    by_prefix = {ours: (theirs, kind) for ours, theirs, kind in prefixes}
    plan = {}
    for key, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        prefix, rest = key, ""
        while prefix not in by_prefix:
            if "." not in prefix:
                raise AssertionError(f"no guided-diffusion counterpart for our {key}")
            prefix, last = prefix.rsplit(".", 1)
            rest = f"{last}.{rest}" if rest else last
        theirs, kind = by_prefix[prefix]
        if kind == "param":
            plan[key] = _Source(theirs, shape, _identity)
        elif kind in ("same", "classes"):
            plan[key] = _Source(f"{theirs}.{rest}", shape, _identity, kind == "classes")
        elif kind == "head":  # Linear (K, C) <- 1x1 conv (K, C, 1, 1)
            weight = rest == "weight"
            plan[key] = _Source(f"{theirs}.{rest}", shape + (1, 1) * weight,
                                (lambda t: t[:, :, 0, 0]) if weight else _identity, True)
        elif kind == "conv":  # Downsample2D / Upsample2D: conv.X <- op.X / conv.X
            plan[key] = _Source(f"{theirs}.{rest.split('.', 1)[1]}", shape, _identity)
        elif kind == "resnet":
            part, param = rest.split(".", 1)
            plan[key] = _Source(f"{theirs}.{_RESNET[part]}.{param}", shape, _identity)
        else:  # attention
            part, param = rest.rsplit(".", 1)
            is_bias = param == "bias"
            if part == "group_norm":
                plan[key] = _Source(f"{theirs}.norm.{param}", shape, _identity)
            elif part == "to_out.0":
                plan[key] = _Source(f"{theirs}.proj_out.{param}",
                                    shape if is_bias else shape + (1,),
                                    _identity if is_bias else (lambda t: t[..., 0]))
            else:
                which = ("to_q", "to_k", "to_v").index(part)
                heads = model.get_submodule(prefix).heads
                width = shape[0]
                plan[key] = _Source(f"{theirs}.qkv.{param}",
                                    (3 * width,) if is_bias else (3 * width, width, 1),
                                    _qkv(which, heads, qkv_order, is_bias))
    return plan


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _check_keys(state_dict: Mapping[str, torch.Tensor], plan: Mapping[str, _Source],
                what: str, hint: str) -> None:
    """Every checkpoint key used, every needed key present, every shape right; else one error
    that names them all."""
    needed: dict[str, tuple[int, ...]] = {}
    for source in plan.values():
        needed.setdefault(source.key, source.shape)
    missing = [key for key in needed if key not in state_dict]
    unexpected = [key for key in state_dict if key not in needed]
    misshaped = [f"{key} (checkpoint {tuple(state_dict[key].shape)}, expected {shape})"
                 for key, shape in needed.items()
                 if key in state_dict and tuple(state_dict[key].shape) != shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {_listing(misshaped)}")
    if problems:
        raise GuidedDiffusionError(f"the {what} checkpoint does not fit its flags ({hint}): "
                                   + "; ".join(problems))


def _class_order(classes: Sequence[str], checkpoint_classes: Sequence[str] | None, rows: int,
                 source: str) -> tuple[list[str], list[int]]:
    """The checkpoint's class order and, for each of our labels, its checkpoint label."""
    classes = list(classes)
    order = sorted(classes) if checkpoint_classes is None else list(checkpoint_classes)
    if rows != len(classes):
        raise GuidedDiffusionError(
            f"the checkpoint has {rows} classes ({source} has {rows} rows) but {len(classes)} "
            f"classes were given ({', '.join(classes)})")
    if len(order) != rows or len(set(order)) != len(order):
        raise GuidedDiffusionError(f"checkpoint_classes must name the checkpoint's {rows} "
                                   f"labels once each, got {order}")
    absent = [name for name in classes if name not in order]
    if absent:
        raise GuidedDiffusionError(f"class {absent[0]!r} is not among checkpoint_classes "
                                   f"{order}")
    return order, [order.index(name) for name in classes]


def _check_classes(classes: Sequence[str]) -> None:
    if isinstance(classes, str) or len(set(classes)) != len(classes) or len(classes) < 2:
        raise GuidedDiffusionError(f"classes must be at least 2 distinct names, got "
                                   f"{classes!r}")


def _qkv_choice(qkv_order: str | None, new_by_flags: bool, flag: str) -> tuple[str, str]:
    if qkv_order is None:
        return ("new" if new_by_flags else "legacy"), f"from {flag}"
    if qkv_order not in QKV_ORDERS:
        raise GuidedDiffusionError(f"qkv_order must be one of {QKV_ORDERS}, got {qkv_order!r}")
    return qkv_order, "given"


def _convert(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
             prefixes: list[tuple[str, str, str]], qkv_order: str, classes: Sequence[str],
             checkpoint_classes: Sequence[str] | None, class_key: str, what: str, hint: str,
             ) -> dict[str, Any]:
    """Load ``state_dict`` into ``model``; the report's class mapping and key counts."""
    plan = _plan(model, prefixes, qkv_order)
    if class_key not in state_dict:
        _check_keys(state_dict, plan, what, hint)  # names the missing class rows, and the rest
    order, index = _class_order(classes, checkpoint_classes, state_dict[class_key].shape[0],
                                class_key)
    _check_keys(state_dict, plan, what, hint)
    rows = torch.tensor(index)
    converted = {}
    for key, source in plan.items():
        tensor = source.take(state_dict[source.key])
        converted[key] = tensor[rows] if source.class_rows else tensor
    model.load_state_dict(converted, strict=True)
    model.eval()
    dtypes = Counter(str(tensor.dtype).removeprefix("torch.") for tensor in state_dict.values())
    return {
        "qkv_order": qkv_order,
        "classes": list(classes),
        "checkpoint_classes": order,
        "class_mapping": [{"label": label, "class": name, "checkpoint_label": source}
                          for label, (name, source) in enumerate(zip(classes, index,
                                                                     strict=True))],
        "permuted": index != list(range(len(index))),
        "keys": {"checkpoint": len(state_dict), "used": len({s.key for s in plan.values()}),
                 "model": len(plan)},
        "checkpoint_dtypes": dict(dtypes),
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
    }


def _ignored(flags: UNetFlags | ClassifierFlags, names: Sequence[str]) -> list[str]:
    """The weight-neutral flags that were set to something other than their default."""
    default = type(flags)()
    return [f"{name}={getattr(flags, name)}" for name in names
            if getattr(flags, name) != getattr(default, name)]


def convert_unet(state_dict: Mapping[str, torch.Tensor], flags: FlagSource | UNetFlags,
                 classes: Sequence[str], checkpoint_classes: Sequence[str] | None = None,
                 qkv_order: str | None = None) -> Converted:
    """A guided-diffusion ``UNetModel`` state dict as our diffusers UNet2DModel.

    ``classes`` is our label order (the config's); ``checkpoint_classes`` the checkpoint's
    (default ``sorted(classes)``, guided-diffusion's order): label-embedding rows are permuted
    so that our label i is ``classes[i]``. ``qkv_order`` ("legacy" | "new") overrides
    ``use_new_attention_order``. The report (JSON-ready) holds the flags, the qkv order, the
    class mapping, key and parameter counts, the architecture and the noise schedule.
    """
    flags = parse_unet_flags(flags)
    _check_classes(classes)
    if not flags.class_cond:
        raise GuidedDiffusionError(
            "--class_cond False: Cellflow needs a class-conditional diffusion model (it moves "
            "images between classes); only class_cond True checkpoints convert")
    _check_diffusion_flags(flags)
    layout = _unet_layout(flags)
    order, order_source = _qkv_choice(qkv_order, flags.use_new_attention_order,
                                      "use_new_attention_order")
    model = _build_unet(layout, flags, len(classes))
    hint = ("wrong architecture flags, or a checkpoint for another image_size / "
            "attention_resolutions?")
    report = {"model": "unet", "flags": asdict(flags)}
    report |= _convert(model, state_dict, _unet_prefixes(layout), order, classes,
                       checkpoint_classes, "label_emb.weight", "UNet", hint)
    report |= {
        "qkv_order_source": order_source,
        "architecture": {"block_out_channels": list(layout.widths),
                         "layers_per_block": layout.blocks,
                         "attention_levels": list(layout.attention_levels),
                         "attention_head_dim": layout.head_dim,
                         "learn_sigma": flags.learn_sigma,
                         "resampling": "resblock" if layout.resblock_updown else "conv",
                         "time_scale_shift": layout.scale_shift,
                         "built_by": ("cellflow.diffusion.build_unet"
                                      if layout.scale_shift and layout.resblock_updown
                                      else "UNet2DModel")},
        "noise_schedule": asdict(noise_schedule(flags)),
        "ignored_flags": _ignored(flags, ("use_checkpoint", "use_fp16", "timestep_respacing",
                                          "use_kl", "rescale_learned_sigmas", "sigma_small")),
    }
    return Converted(model, report)


def convert_classifier(state_dict: Mapping[str, torch.Tensor],
                       flags: FlagSource | ClassifierFlags, classes: Sequence[str],
                       checkpoint_classes: Sequence[str] | None = None,
                       qkv_order: str | None = None) -> Converted:
    """A guided-diffusion ``EncoderUNetModel`` (``create_classifier``) state dict as our
    NoiseAwareClassifier; logit rows permuted as the UNet's label rows in convert_unet.

    create_classifier builds legacy-order attention blocks (``qkv_order`` overrides that); the
    attention pool is always in the new order. Ours supports scale-shift norm with BigGAN
    up/down ResBlocks and the ``attention`` and ``adaptive`` (our ``mean``) pools.
    """
    flags = parse_classifier_flags(flags)
    _check_classes(classes)
    for flag in ("classifier_use_scale_shift_norm", "classifier_resblock_updown"):
        if not getattr(flags, flag):
            raise GuidedDiffusionError(f"--{flag} False: Cellflow's classifier has scale-shift "
                                       "norm and BigGAN up/down ResBlocks only (not supported)")
    pools = {"attention": "attention", "adaptive": "mean"}
    if flags.classifier_pool not in pools:
        raise GuidedDiffusionError(f"--classifier_pool {flags.classifier_pool}: Cellflow's "
                                   "classifier pools with 'attention' or 'adaptive' only "
                                   "(not supported)")
    _check_diffusion_flags(flags)
    mult = _channel_mult(flags.classifier_channel_mult, flags.image_size,
                         "classifier_channel_mult")
    widths = _widths(mult, flags.classifier_width, flags.image_size,
                     ("classifier_channel_mult", "classifier_width"))
    if flags.classifier_depth < 1:
        raise GuidedDiffusionError(f"--classifier_depth must be positive, got "
                                   f"{flags.classifier_depth}")
    levels = _attention_levels(flags.classifier_attention_resolutions, flags.image_size,
                               len(widths), "classifier_attention_resolutions")
    head = flags.classifier_num_head_channels
    attended = sorted({widths[level] for level in (*levels, len(widths) - 1)})
    if head < 1 or any(width % head for width in attended):
        raise GuidedDiffusionError(f"--classifier_num_head_channels {head} must divide the "
                                   f"attention widths {attended}")
    layout = _Layout(widths, flags.classifier_depth, levels, head, True, True)
    order, order_source = _qkv_choice(qkv_order, False, "create_classifier")
    pool = pools[flags.classifier_pool]
    model = NoiseAwareClassifier(sample_size=flags.image_size, num_classes=len(classes),
                                 block_out_channels=widths, layers_per_block=layout.blocks,
                                 attention_levels=levels, attention_head_dim=head,
                                 norm_num_groups=_GROUPS, pool=pool, dropout=0.0)
    class_key = "out.2.c_proj.weight" if pool == "attention" else "out.3.weight"
    embedding = state_dict.get("out.2.positional_embedding")
    expected = (widths[-1], (flags.image_size // 2 ** (len(widths) - 1)) ** 2 + 1)
    if (pool == "attention" and embedding is not None and embedding.ndim == 2
            and embedding.shape[0] == expected[0] and embedding.shape[1] != expected[1]):
        side = math.isqrt(max(embedding.shape[-1] - 1, 0))
        raise GuidedDiffusionError(
            f"the classifier checkpoint's attention pool is for {side}x{side} features "
            f"(out.2.positional_embedding {tuple(embedding.shape)}, expected {expected}): "
            f"about {side * 2 ** (len(widths) - 1)} px images with these widths, not "
            f"--image_size {flags.image_size}")
    report = {"model": "classifier", "flags": asdict(flags)}
    report |= _convert(model, state_dict, _classifier_prefixes(layout, pool), order, classes,
                       checkpoint_classes, class_key, "classifier",
                       "wrong classifier flags, or a checkpoint for another image_size?")
    report |= {
        "qkv_order_source": order_source,
        "attention_pool_qkv_order": "new" if pool == "attention" else None,
        "architecture": {"block_out_channels": list(widths), "layers_per_block": layout.blocks,
                         "attention_levels": list(levels), "attention_head_dim": head,
                         "pool": pool},
        "ignored_flags": _ignored(flags, ("classifier_use_fp16", "learn_sigma",
                                          "diffusion_steps", "noise_schedule",
                                          "timestep_respacing", "use_kl",
                                          "rescale_learned_sigmas")),
    }
    return Converted(model, report)


# ---------------------------------------------------------------------------------------------
# Model folders


def write_converted(out_dir: str | Path, *, unet: Converted | None = None,
                    schedule: NoiseSchedule | None = None, unet_source: str | Path | None = None,
                    classifier: Converted | None = None,
                    classifier_source: str | Path | None = None) -> dict[str, Any]:
    """Write the converted models in our training stages' layout; returns conversion.json.

    ``out_dir/diffusion/{unet,scheduler}`` (UNet2DModel and DDPMScheduler, as
    ``results/{dataset}/models/diffusion``), ``out_dir/classifier/classifier`` (as
    ``results/{dataset}/models/classifier``) and ``out_dir/conversion.json`` (sources with their
    sha256, flags, qkv order, class mapping and list). Each model folder is written beside its
    place and swapped in whole (cellflow.io.staged_directory), so a failed run leaves the old
    folder; a model not given leaves its folder, and its entry in an existing conversion.json,
    as they were.
    """
    from cellflow.checkpoint import file_sha256
    from cellflow.io import staged_directory, write_text

    if unet is None and classifier is None:
        raise GuidedDiffusionError("nothing to write: give a UNet, a classifier or both")
    if unet is not None and schedule is None:
        raise GuidedDiffusionError("a converted UNet needs its noise schedule (scheduler/)")
    out_dir = Path(out_dir)
    converted = [(name, item) for name, item in (("unet", unet), ("classifier", classifier))
                 if item is not None]
    classes = {tuple(item.report["classes"]) for _, item in converted}
    if len(classes) > 1:
        raise GuidedDiffusionError(f"the UNet and the classifier were converted for different "
                                   f"classes: {sorted(classes)}")
    if unet is not None and classifier is not None:
        sizes = (unet.report["flags"]["image_size"], classifier.report["flags"]["image_size"])
        if sizes[0] != sizes[1]:
            raise GuidedDiffusionError(f"the UNet is for {sizes[0]} px images, the classifier "
                                       f"for {sizes[1]} px")
    record_path = out_dir / "conversion.json"
    record: dict[str, Any] = {"models": {}}
    if record_path.exists():
        try:
            previous = json.loads(record_path.read_text())
            record["models"] = {name: entry for name, entry in previous.get("models", {}).items()
                                if (out_dir / entry["folder"]).is_dir()}
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
            record["models"] = {}
    sources = {"unet": unet_source, "classifier": classifier_source}
    for name, item in converted:
        source = sources[name]
        folder = "diffusion/unet" if name == "unet" else "classifier/classifier"
        entry = {"folder": folder,
                 "source": None if source is None else {
                     "file": Path(source).name, "path": str(Path(source).resolve()),
                     "sha256": file_sha256(Path(source))},
                 **item.report}
        if name == "unet":
            entry["scheduler"] = "diffusion/scheduler"
            entry["noise_schedule"] = asdict(schedule)
        with staged_directory(out_dir / folder.split("/")[0]) as staging:
            item.model.save_pretrained(staging / folder.split("/")[1])
            if name == "unet":
                schedule.ddpm().save_pretrained(staging / "scheduler")
        record["models"][name] = entry
    record["classes"] = list(converted[0][1].report["classes"])
    write_text(record_path, json.dumps(record, indent=2) + "\n")
    return record


def convert_files(out_dir: str | Path, classes: Sequence[str], *,
                  unet: str | Path | None = None, unet_flags: FlagSource | UNetFlags = None,
                  classifier: str | Path | None = None,
                  classifier_flags: FlagSource | ClassifierFlags = None,
                  checkpoint_classes: Sequence[str] | None = None,
                  qkv_order: str | None = None) -> dict[str, Any]:
    """Load, convert and write the given checkpoint files (what ``cellflow
    import-guided-diffusion`` does); returns the conversion record (conversion.json)."""
    if unet is None and classifier is None:
        raise GuidedDiffusionError("give a UNet checkpoint, a classifier checkpoint or both")
    converted_unet = converted_classifier = schedule = None
    if unet is not None:
        flags = parse_unet_flags(unet_flags)
        converted_unet = convert_unet(load_checkpoint(unet), flags, classes,
                                      checkpoint_classes, qkv_order)
        schedule = noise_schedule(flags)
    if classifier is not None:
        converted_classifier = convert_classifier(load_checkpoint(classifier),
                                                  parse_classifier_flags(classifier_flags),
                                                  classes, checkpoint_classes, qkv_order)
    return write_converted(out_dir, unet=converted_unet, schedule=schedule, unet_source=unet,
                           classifier=converted_classifier, classifier_source=classifier)


def describe_conversion(record: Mapping[str, Any], out_dir: str | Path) -> str:
    """A few lines on what a conversion wrote: models, parameters, qkv order, class mapping."""
    lines = []
    for name, entry in record["models"].items():
        source = entry["source"]["file"] if entry.get("source") else "(state dict)"
        architecture = entry["architecture"]
        lines.append(f"{name}: {source} -> {Path(out_dir) / entry['folder']} "
                     f"({entry['parameters']:,} parameters, widths "
                     f"{architecture['block_out_channels']}, qkv order {entry['qkv_order']} "
                     f"({entry['qkv_order_source']}), {entry['keys']['checkpoint']} tensors)")
        if name == "unet":
            schedule = entry["noise_schedule"]
            lines.append("  noise schedule (diffusion/scheduler; the config's noise_schedule "
                         f"must match): {json.dumps(schedule)}")
        if entry.get("ignored_flags"):
            lines.append(f"  ignored (no effect on weights): {', '.join(entry['ignored_flags'])}")
    first = next(iter(record["models"].values()))
    mapping = ", ".join(f"{row['label']}={row['class']} (checkpoint label "
                        f"{row['checkpoint_label']})" for row in first["class_mapping"])
    lines.append(f"classes: {mapping}")
    lines.append(f"wrote {Path(out_dir) / 'conversion.json'}")
    return "\n".join(lines)
