"""guided-diffusion's own models (guided-diffusion-sdk, a test-only extra) with random weights
that exercise every layer: the reference the converter's tests and benchmark compare with."""

from __future__ import annotations

import warnings

import torch

from cellflow.guided_diffusion import parse_unet_flags

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # its torch.cuda.amp decorators
    from guided_diffusion.script_util import create_model

CREATE_MODEL_FLAGS = ("image_size", "num_channels", "num_res_blocks", "channel_mult",
                      "learn_sigma", "class_cond", "attention_resolutions", "num_heads",
                      "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
                      "dropout", "resblock_updown", "use_new_attention_order")


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """guided-diffusion zero-initialises every ResBlock's and attention's output layer and the
    final convolution, and GroupNorms start at (1, 0): give all of those random values, or
    half the network would be an identity and a wrong mapping there could pass unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            elif parameter.ndim == 1 and bool((parameter == 1).all()):  # GroupNorm weight
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module.eval()


def reference_unet(flags: str, classes: int, seed: int = 0) -> torch.nn.Module:
    """guided-diffusion's create_model for ``flags`` (the way its scripts build it), with
    ``classes`` label rows instead of ImageNet's 1000, perturbed."""
    parsed = parse_unet_flags(flags)
    torch.manual_seed(seed)
    model = create_model(**{name: getattr(parsed, name) for name in CREATE_MODEL_FLAGS})
    model.label_emb = torch.nn.Embedding(classes, model.label_emb.embedding_dim)
    return perturb(model, seed)
