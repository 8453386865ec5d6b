"""The reference Cellflow loop, literally: batch 1, inversion repeated per stair.

A test and benchmark oracle for ``cellflow.bridge`` (not used by the pipeline). It follows
``main_transflow.py`` as the algorithm specification describes it (sections 4.1-4.5), written
independently of the package: numpy Fourier measure, hand-written DDIM steps in float64
alphas, the classifier gradient taken with autograd directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class OracleResult:
    frames: torch.Tensor  # (N, 3, H, W)
    stairs: list[int]
    measures: np.ndarray  # M(x_1)..M(x_K)
    unet_evaluations: int
    classifier_evaluations: int


def measure(latent: torch.Tensor) -> float:
    """Reference 4.3 on one (3, H, W) latent, with numpy's unnormalised DFT."""
    r, g, b = latent.double().cpu().numpy()
    gray = 0.299 * r + 0.587 * g + 0.114 * b
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(gray)))
    centre = gray.shape[0] // 2
    reach = min(10, centre)
    left = spectrum[centre, centre - reach:centre - 1]
    right = spectrum[centre, centre + 1:centre + reach]
    return float(np.concatenate([left, right]).mean())


def adaptive_list(curve: list[float], amount: int) -> list[int]:
    """Reference 4.4, step by step."""
    values = list(curve)
    low, high = min(values), max(values)
    previous, chosen, failure = 0, [], False
    for i in range(1, amount + 1):
        if failure:
            break
        level = low + (high - low) * i / amount
        count = 0
        while True:
            count += 1
            if count > 101:
                failure = True
            distances = [abs(v - level) for v in values]
            index = distances.index(min(distances))
            if index > previous:
                chosen.append(index)
                previous = index
                break
            values[index] = 0
            if failure:
                break
    if failure:
        gap = len(values) // amount
        chosen = [gap * i for i in range(1, amount + 1)]
        chosen[-1] -= 1
    return chosen


def reference_trajectory(unet, classifier, alphas_cumprod: torch.Tensor, image: torch.Tensor,
                         source: int, target: int, steps: int = 100, amount: int = 10,
                         scale: float = 2.0) -> OracleResult:
    """One trajectory from ``image`` (1, 3, H, W) as the reference computes it."""
    stride = len(alphas_cumprod) // steps
    a = [float(alphas_cumprod[k * stride]) for k in range(steps)] + [0.0]
    y_source = torch.tensor([source])
    y_target = torch.tensor([target])
    evaluations = {"unet": 0, "classifier": 0}

    def eps(x, level, label):
        evaluations["unet"] += 1
        with torch.no_grad():
            return unet(x, level * stride, class_labels=label).sample[:, :3]

    def invert_step(x, level):
        e = eps(x, level, y_source)
        x0 = (x - (1 - a[level]) ** 0.5 * e) / a[level] ** 0.5
        return a[level + 1] ** 0.5 * x0 + (1 - a[level + 1]) ** 0.5 * e

    def guidance(x, level):
        evaluations["classifier"] += 1
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x, level * stride), dim=-1)
            return torch.autograd.grad(log_probs[0, target], x)[0]

    # the Fourier pass: a full inversion, measuring every latent
    x, measures = image, []
    for level in range(steps):
        x = invert_step(x, level)
        measures.append(measure(x[0]))
    stairs = adaptive_list(measures[::-1], amount)

    # the stair loop: inversion continued from the previous stair, then a guided decode
    latent, done, frames = image, 0, []
    for stair in stairs:
        for level in range(done, stair):
            latent = invert_step(latent, level)
        done = stair
        z = latent
        for level in reversed(range(stair)):
            e = eps(z, level, y_target) - (1 - a[level]) ** 0.5 * scale * guidance(z, level)
            x0 = (z - (1 - a[level]) ** 0.5 * e) / a[level] ** 0.5
            a_previous = a[level - 1] if level > 0 else 1.0
            z = a_previous ** 0.5 * x0 + (1 - a_previous) ** 0.5 * e
        frames.append(z[0])
    return OracleResult(torch.stack(frames), stairs, np.array(measures), evaluations["unet"],
                        evaluations["classifier"])
