"""Our UNet and classifier against guided-diffusion's own modules (guided-diffusion-sdk, a
test-only dependency that packages openai/guided-diffusion's unet.py): the same architecture,
parameter for parameter, at ADM's settings."""

from __future__ import annotations

import warnings

import pytest
import torch

from cellflow.classifier import AttentionPool2d, NoiseAwareClassifier
from cellflow.diffusion import UNetArchitecture, build_unet

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # its torch.cuda.amp decorators
    from guided_diffusion import unet as adm

# (resolution, channels, attention downsampling rates, classes)
CONFIGS = [(32, (64, 128, 128), (2, 4), 3), (32, (32, 64, 64, 128), (4, 8), 2)]


def count(module: torch.nn.Module) -> int:
    """Parameters in all. Tensor by tensor the layouts differ (diffusers keeps q, k and v as
    three linear layers where ADM has one 1x1 qkv convolution), their sizes may not."""
    return sum(parameter.numel() for parameter in module.parameters())


def levels(rates: tuple[int, ...]) -> tuple[int, ...]:
    """ADM's attention_resolutions are downsampling rates; ours are level indices."""
    return tuple(rate.bit_length() - 1 for rate in rates)


@pytest.mark.parametrize(("size", "channels", "rates", "classes"), CONFIGS)
def test_the_unet_has_adm_parameters(size, channels, rates, classes):
    reference = adm.UNetModel(
        image_size=size, in_channels=3, model_channels=channels[0], out_channels=3,
        num_res_blocks=2, attention_resolutions=rates,
        channel_mult=tuple(c // channels[0] for c in channels), num_classes=classes,
        num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True)
    ours = build_unet(UNetArchitecture(channels, 2, levels(rates), 32), size, classes)
    # the middle block's attention normalises its input, as ADM's AttentionBlock does
    assert ours.mid_block.attentions[0].group_norm is not None
    assert count(ours) == count(reference)


@pytest.mark.parametrize(("size", "channels", "rates", "classes"), CONFIGS)
def test_the_classifier_has_adm_parameters(size, channels, rates, classes):
    reference = adm.EncoderUNetModel(
        image_size=size, in_channels=3, model_channels=channels[0], out_channels=classes,
        num_res_blocks=2, attention_resolutions=rates,
        channel_mult=tuple(c // channels[0] for c in channels), num_head_channels=32,
        use_scale_shift_norm=True, resblock_updown=True, pool="attention")
    ours = NoiseAwareClassifier(sample_size=size, num_classes=classes,
                                block_out_channels=channels, layers_per_block=2,
                                attention_levels=levels(rates), attention_head_dim=32)
    assert count(ours) == count(reference)


def test_the_attention_pool_computes_what_adms_does():
    torch.manual_seed(0)
    reference = adm.AttentionPool2d(8, 128, 32, 3)
    ours = AttentionPool2d(8, 128, 32, 3)
    ours.load_state_dict(reference.state_dict())  # the same parameter names and shapes
    features = torch.randn(4, 128, 8, 8)
    assert torch.allclose(ours(features), reference(features), atol=1e-5)
    with pytest.raises(ValueError, match="built for 8x8 features"):
        ours(torch.randn(1, 128, 4, 4))
