"""Our UNet and classifier next to guided-diffusion's: parameter counts at ADM's settings, and
what converted guided-diffusion weights compute (cellflow.guided_diffusion).

Needs the test-only extra guided-diffusion-sdk (openai/guided-diffusion's unet.py, packaged):

    python -m benchmarks.bench_adm_architecture   (appends to benchmarks/results/adm.md)

The 256 px row is OpenAI's public class-conditional ImageNet configuration (channels 256,
multipliers 1,1,2,2,4,4, attention at 32, 16 and 8 px, 64-channel heads, scale-shift norm,
BigGAN up/down), with 2 classes, as a pathology dataset has, and without learned sigma
(``learn_sigma`` adds the same 3 output channels to both).

The conversion table gives random guided-diffusion weights (every zero-initialised output
layer and GroupNorm perturbed, so no block is an identity) to the converter and compares, in
float32, epsilon (the first 3 output channels), the classifier's logits and the guidance
gradient grad_x log p(y | x_t) (autograd through guided-diffusion's model against
cellflow.classifier.class_log_prob_gradient) at 5 timesteps, for both qkv orders: at the
demo-sized 32 px configuration, and at the layout of OpenAI's public 64x64 model (3 ResBlocks a
level, attention at 32, 16 and 8 px, 64-channel heads, learned sigma; its classifier 4 ResBlocks
deep) at a width of 64 instead of 192 (classifier: 64 instead of 128). For scale, the table
gives the largest |epsilon| and |gradient|, and how far our own float32 epsilon lies from the
same network's in float64: the differences are float32 rounding, not a mapping error.
"""

from __future__ import annotations

import copy
import warnings

import torch

from benchmarks.adm_reference import perturb, reference_unet
from benchmarks.machine import record
from cellflow.classifier import NoiseAwareClassifier, class_log_prob_gradient
from cellflow.diffusion import UNetArchitecture, build_unet, predict_epsilon
from cellflow.guided_diffusion import convert_classifier, convert_unet, parse_unet_flags

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
    record("adm", "Converted guided-diffusion weights against guided-diffusion (float32, "
                  "random weights)", conversion_rows())


# name: (UNet flags, classifier: (width, channel_mult, depth, attention rates, head channels))
CONVERSIONS = {
    "demo-sized 32 px": (
        "--image_size 32 --num_channels 32 --channel_mult 1,2,2 --num_res_blocks 2 "
        "--attention_resolutions 8 --num_head_channels 32 --class_cond True "
        "--resblock_updown True --use_scale_shift_norm True",
        (32, (1, 2, 2), 2, (4,), 32)),
    "public 64x64 layout, width 64": (
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
        "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 64 "
        "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
        "--use_scale_shift_norm True",
        (64, (1, 2, 3, 4), 4, (2, 4, 8), 64)),
}
TIMESTEPS = (0, 250, 500, 750, 999)


def conversion_rows() -> list[dict[str, object]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: more threads only spin on a shared machine
    try:
        return _conversion_rows()
    finally:
        torch.set_num_threads(threads)


def _conversion_rows() -> list[dict[str, object]]:
    classes = ["normal", "tumor"]
    rows = []
    for name, (unet_flags, (width, mult, depth, rates, head)) in CONVERSIONS.items():
        for order in ("legacy", "new"):
            flags = f"{unet_flags} --use_new_attention_order {order == 'new'}"
            parsed = parse_unet_flags(flags)
            reference = reference_unet(flags, 2)
            unet, _ = convert_unet(reference.state_dict(), flags, classes)
            unet64 = copy.deepcopy(unet).double()  # the yardstick: our own float32 rounding

            size = parsed.image_size
            classifier_reference = perturb(adm.EncoderUNetModel(
                image_size=size, in_channels=3, model_channels=width, out_channels=2,
                num_res_blocks=depth, attention_resolutions=rates, channel_mult=mult,
                num_head_channels=head, use_scale_shift_norm=True, resblock_updown=True,
                pool="attention", use_new_attention_order=order == "new"))
            classifier_flags = (
                f"--image_size {size} --classifier_width {width} --classifier_depth {depth} "
                f"--classifier_channel_mult {','.join(map(str, mult))} "
                f"--classifier_attention_resolutions {','.join(str(size // r) for r in rates)} "
                f"--classifier_num_head_channels {head}")
            classifier, _ = convert_classifier(classifier_reference.state_dict(),
                                               classifier_flags, classes, qkv_order=order)

            worst = {"eps": 0.0, "eps_scale": 0.0, "rounding": 0.0, "logit": 0.0,
                     "gradient": 0.0, "gradient_scale": 0.0}
            generator = torch.Generator().manual_seed(1)
            labels = torch.tensor([0, 1, 1, 0])
            for t in TIMESTEPS:
                x = torch.randn(4, 3, size, size, generator=generator)
                steps = torch.full((4,), t)
                with torch.no_grad():
                    theirs = reference(x, steps, labels)[:, :3]
                    mine = predict_epsilon(unet, x, steps, labels)
                    exact = predict_epsilon(unet64, x.double(), steps, labels)
                    logits = classifier_reference(x, steps), classifier(x, steps)
                x_in = x.clone().requires_grad_(True)
                chosen = torch.log_softmax(classifier_reference(x_in, steps), -1).gather(
                    1, labels[:, None]).sum()
                (expected,) = torch.autograd.grad(chosen, x_in)
                gradient = class_log_prob_gradient(classifier, x, steps, labels)
                worst["eps"] = max(worst["eps"], float((theirs - mine).abs().max()))
                worst["eps_scale"] = max(worst["eps_scale"], float(theirs.abs().max()))
                worst["rounding"] = max(worst["rounding"], float((mine - exact).abs().max()))
                worst["logit"] = max(worst["logit"], float((logits[0] - logits[1]).abs().max()))
                worst["gradient"] = max(worst["gradient"],
                                        float((expected - gradient).abs().max()))
                worst["gradient_scale"] = max(worst["gradient_scale"],
                                              float(expected.abs().max()))
            rows.append({"configuration": name, "qkv order": order,
                         "max abs eps difference": f"{worst['eps']:.1e}",
                         "(max abs eps)": f"{worst['eps_scale']:.2f}",
                         "(ours: float32 vs float64)": f"{worst['rounding']:.1e}",
                         "max abs logit difference": f"{worst['logit']:.1e}",
                         "max abs guidance-gradient difference": f"{worst['gradient']:.1e}",
                         "(max abs gradient)": f"{worst['gradient_scale']:.1e}"})
    return rows


if __name__ == "__main__":
    main()
