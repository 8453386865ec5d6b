"""Exact models for the bridge: Gaussian image classes whose epsilon and classifier are closed form.

Every class y is a Gaussian over images, x0 ~ N(mu_y, Sigma_y) with a low-rank-plus-diagonal
covariance Sigma_y = W_y W_y^T + diag(v_y). Under the forward process x_t = sqrt(a) x0 +
sqrt(1 - a) eps the noisy images stay Gaussian,

    x_t | y ~ N(sqrt(a) mu_y, C_y(a)),   C_y(a) = a Sigma_y + (1 - a) I,

so the optimal epsilon predictor is sqrt(1 - a) C_y(a)^-1 (x_t - sqrt(a) mu_y) and the optimal
noise-aware classifier has logits log N(x_t; sqrt(a) mu_y, C_y(a)) + log prior. Woodbury's
identity and the matrix determinant lemma keep both at O(D k) for rank k.

:class:`ExactEpsilon` and :class:`ExactClassifier` are drop-in replacements for the trained UNet
and classifier in :class:`cellflow.bridge.StairBridge`, so the bridge runs unchanged on models
with no training error: whatever its trajectories do is the method's doing.

Two designs (:func:`gaussian_design`) put the class difference where pathology puts it or not:
``fine`` (the target adds small dark nuclei, orthogonal to every high-variance direction) and
``coarse`` (the target shifts the staining along the highest-variance direction). Both have the
same Mahalanobis distance between the class means, so they are equally hard to classify.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Final, Literal

import numpy as np
import torch
from torch import nn

__all__ = ["DESIGNS", "ExactClassifier", "ExactEpsilon", "GaussianClass", "GaussianImageModel",
           "gaussian_design"]

DESIGNS: Final = ("fine", "coarse")
# RGB in [0, 1] of eosin-stained stroma and of hematoxylin-stained nuclei (H&E-like colours).
_EOSIN: Final = (0.86, 0.52, 0.76)
_HEMATOXYLIN: Final = (0.30, 0.22, 0.52)


@dataclass(frozen=True)
class GaussianClass:
    """x0 ~ N(mean, factors @ factors.T + diag(variance)), flattened images in float64."""

    mean: torch.Tensor  # (D,)
    factors: torch.Tensor  # (D, k)
    variance: torch.Tensor  # (D,), > 0 so that every density is proper at t = 0

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        latent = torch.randn(count, self.factors.shape[1], generator=generator,
                             dtype=torch.float64)
        pixel = torch.randn(count, len(self.mean), generator=generator, dtype=torch.float64)
        return self.mean + latent @ self.factors.T + pixel * self.variance.sqrt()


class GaussianImageModel:
    """Class-conditional Gaussian images of shape ``shape`` under a DDPM noise schedule."""

    def __init__(self, classes: Sequence[GaussianClass], shape: tuple[int, int, int],
                 alphas_cumprod: torch.Tensor, priors: Sequence[float] | None = None) -> None:
        if len(classes) < 2:
            raise ValueError(f"a class model needs at least 2 classes, got {len(classes)}")
        size = math.prod(shape)
        for index, group in enumerate(classes):
            if group.mean.shape != (size,) or group.variance.shape != (size,):
                raise ValueError(f"class {index}: mean and variance must have {size} entries")
            if group.factors.ndim != 2 or group.factors.shape[0] != size:
                raise ValueError(f"class {index}: factors must be ({size}, k)")
            if not bool((group.variance > 0).all()):
                raise ValueError(f"class {index}: the diagonal variance must be positive")
        priors = [1 / len(classes)] * len(classes) if priors is None else list(priors)
        if len(priors) != len(classes) or min(priors) <= 0:
            raise ValueError("priors must be positive, one per class")
        self.classes = tuple(classes)
        self.shape = shape
        self.alphas_cumprod = alphas_cumprod.double()
        self.log_priors = torch.log(torch.tensor(priors, dtype=torch.float64) / sum(priors))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def alpha(self, timestep: int | torch.Tensor) -> float:
        """Alpha-bar of a DDPM timestep (one for the whole batch, as the bridge calls it)."""
        return float(self.alphas_cumprod[int(torch.as_tensor(timestep).flatten()[0])])

    def _whiten(self, residual: torch.Tensor, label: int, alpha: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """C_y(a)^-1 residual for (B, D) residuals, and log det C_y(a) (Woodbury, det lemma)."""
        group = self.classes[label]
        diagonal = alpha * group.variance + (1 - alpha)
        factors = alpha ** 0.5 * group.factors
        scaled = factors / diagonal[:, None]
        capacitance = torch.eye(factors.shape[1], dtype=torch.float64) + factors.T @ scaled
        solved = residual / diagonal
        correction = torch.linalg.solve(capacitance, (solved @ factors).T).T
        logdet = torch.linalg.slogdet(capacitance)[1] + diagonal.log().sum()
        return solved - correction @ scaled.T, logdet

    def log_likelihood(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """(B, C): log N(x; sqrt(a) mu_y, C_y(a)) of flattened (B, D) noisy images."""
        columns = []
        for label, group in enumerate(self.classes):
            residual = x - alpha ** 0.5 * group.mean
            whitened, logdet = self._whiten(residual, label, alpha)
            quadratic = (residual * whitened).sum(dim=1)
            columns.append(-0.5 * (quadratic + logdet + x.shape[1] * math.log(2 * math.pi)))
        return torch.stack(columns, dim=1)

    def log_posterior(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """(B, C): log p(y | x_t) of flattened noisy images at alpha-bar ``alpha``."""
        return torch.log_softmax(self.log_likelihood(x, alpha) + self.log_priors, dim=1)

    def epsilon(self, x: torch.Tensor, alpha: float, labels: torch.Tensor) -> torch.Tensor:
        """(B, D): the exact epsilon sqrt(1 - a) C_y(a)^-1 (x_t - sqrt(a) mu_y), per row's y."""
        out = torch.empty_like(x)
        for label in labels.unique().tolist():
            rows = labels == label
            residual = x[rows] - alpha ** 0.5 * self.classes[label].mean
            out[rows] = (1 - alpha) ** 0.5 * self._whiten(residual, label, alpha)[0]
        return out

    def mahalanobis(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, C): distance of each clean image to every class under that class's Sigma_y."""
        return torch.stack([
            (residual * self._whiten(residual, label, 1.0)[0]).sum(dim=1).clamp_min(0).sqrt()
            for label, group in enumerate(self.classes)
            for residual in [x0 - group.mean]], dim=1)

    def position(self, x0: torch.Tensor, source: int, target: int) -> torch.Tensor:
        """(B,): lambda of each image on the line between two class means (0 source, 1 target)."""
        start, end = self.classes[source].mean, self.classes[target].mean
        direction = end - start
        return (x0 - start) @ direction / direction.dot(direction)

    def sample(self, label: int, count: int, generator: torch.Generator) -> torch.Tensor:
        """(count, 3, H, W) clean images of one class."""
        return self.classes[label].sample(count, generator).reshape(count, *self.shape)


class ExactEpsilon(nn.Module):
    """The exact epsilon predictor, called like a diffusers ``UNet2DModel``."""

    def __init__(self, model: GaussianImageModel) -> None:
        super().__init__()
        self.model = model
        # The bridge reads device and dtype from the first parameter.
        self.anchor = nn.Parameter(torch.zeros(0, dtype=torch.float64), requires_grad=False)

    def forward(self, sample: torch.Tensor, timestep: int | torch.Tensor,
                class_labels: torch.Tensor) -> SimpleNamespace:
        flat = sample.double().flatten(1)
        labels = torch.as_tensor(class_labels).long().expand(len(flat))
        epsilon = self.model.epsilon(flat, self.model.alpha(timestep), labels)
        return SimpleNamespace(sample=epsilon.reshape(sample.shape).to(sample.dtype))


class ExactClassifier(nn.Module):
    """The Bayes-optimal noise-aware classifier, called like :class:`NoiseAwareClassifier`."""

    def __init__(self, model: GaussianImageModel) -> None:
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(num_classes=model.num_classes)
        self.anchor = nn.Parameter(torch.zeros(0, dtype=torch.float64), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    def forward(self, sample: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        return self.model.log_posterior(sample.double().flatten(1), self.model.alpha(timestep))


def _smooth_fields(resolution: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, R, R) orthonormal low-frequency patterns: random cosine mixtures, orthogonalised."""
    grid = np.arange(resolution) / resolution
    patterns = []
    for _ in range(count):
        field = np.zeros((resolution, resolution))
        for fy, fx in rng.integers(0, 3, size=(4, 2)):
            phase = rng.uniform(0, 2 * np.pi, size=2)
            field += np.outer(np.cos(2 * np.pi * fy * grid + phase[0]),
                              np.cos(2 * np.pi * fx * grid + phase[1]))
        patterns.append(field.ravel())
    basis, _ = np.linalg.qr(np.stack(patterns, axis=1))
    return basis.T.reshape(count, resolution, resolution)


def _nuclei(resolution: int, count: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """(R, R) in [0, 1]: ``count`` soft round nuclei at random places."""
    yy, xx = np.mgrid[:resolution, :resolution]
    canvas = np.zeros((resolution, resolution))
    for cy, cx in rng.uniform(0, resolution, size=(count, 2)):
        canvas = np.maximum(canvas, np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2)))
    return canvas


def _stain(amount: np.ndarray, colour: Sequence[float], background: Sequence[float]) -> np.ndarray:
    """(3, R, R) in the models' range [-1, 1]: from a background colour towards a stain."""
    start = np.asarray(background)[:, None, None]
    return 2 * (start + (np.asarray(colour)[:, None, None] - start) * amount[None]) - 1


def gaussian_design(design: Literal["fine", "coarse"], resolution: int,
                    alphas_cumprod: torch.Tensor, separation: float = 4.0, rank: int = 8,
                    texture_std: float = 0.15, pixel_std: float = 0.05, seed: int = 0
                    ) -> GaussianImageModel:
    """Two H&E-like Gaussian classes (0 = source, 1 = target) at ``resolution`` px.

    Both share the covariance: ``rank`` smooth staining patterns of standard deviation
    ``texture_std`` (the high-variance directions of tissue images) plus pixel noise of
    ``pixel_std``. The source mean is eosin-pink stroma with a few nuclei. The target mean adds
    a difference of Mahalanobis length ``separation`` (Bayes error Phi(-separation / 2)):

    * ``fine``: more nuclei, projected off the staining patterns, so the difference lives only
      in pixel-noise directions (how nuclei differ between fine-grained classes);
    * ``coarse``: along the first staining pattern, the highest-variance direction.
    """
    if design not in DESIGNS:
        raise ValueError(f"unknown design '{design}' ({', '.join(DESIGNS)})")
    rng = np.random.default_rng(seed)
    size = 3 * resolution ** 2
    stroma = np.asarray(_EOSIN)
    source = _stain(_nuclei(resolution, max(2, resolution ** 2 // 64), resolution / 24, rng),
                    _HEMATOXYLIN, stroma).ravel()
    fields = _smooth_fields(resolution, rank, rng)
    # Each pattern varies the eosin or hematoxylin density: a colour direction times a field.
    colours = [1 - stroma, np.asarray(_HEMATOXYLIN) - stroma]
    factors = np.stack([
        (colours[j % 2] / np.linalg.norm(colours[j % 2]))[:, None, None] * fields[j][None]
        for j in range(rank)], axis=1).reshape(size, rank)
    # Unit-norm columns scaled so that each pixel of a pattern has about texture_std.
    factors *= texture_std * resolution * np.linspace(1.0, 0.5, rank)
    variance = np.full(size, pixel_std ** 2)
    if design == "fine":
        extra = _nuclei(resolution, max(4, resolution ** 2 // 32), resolution / 32, rng)
        difference = (_stain(extra, _HEMATOXYLIN, stroma) - _stain(0 * extra, stroma, stroma)
                      ).ravel()
        basis, _ = np.linalg.qr(factors)
        difference -= basis @ (basis.T @ difference)
    else:
        difference = factors[:, 0].copy()
    shared = dict(factors=torch.from_numpy(factors), variance=torch.from_numpy(variance))
    unscaled = GaussianImageModel(
        [GaussianClass(mean=torch.zeros(size, dtype=torch.float64), **shared)] * 2,
        (3, resolution, resolution), alphas_cumprod)
    # the class difference's own Mahalanobis length under the shared Sigma
    length = float(unscaled.mahalanobis(torch.from_numpy(difference)[None])[0, 0])
    difference *= separation / length
    classes = [GaussianClass(mean=torch.from_numpy(source), **shared),
               GaussianClass(mean=torch.from_numpy(source + difference), **shared)]
    return GaussianImageModel(classes, (3, resolution, resolution), alphas_cumprod)


# Steps back smaller than this are rounding on a saturated posterior, not a path going back.
MONOTONE_SLACK: Final = 1e-3


def score_trajectories(model: GaussianImageModel, sources: torch.Tensor, frames: torch.Tensor,
                       source: int, target: int, tolerance: float = 0.15) -> list[dict]:
    """Per trajectory, the exact view of its frames (frame 0 = the source image itself).

    For frame i of N: the exact p(target | frame) of clean images, the position lambda between
    the class means and the Mahalanobis distance to each class. A trajectory is a path when its
    posteriors are monotone (up to :data:`MONOTONE_SLACK`) and frame i's posterior is within
    ``tolerance`` of i / N; ``posterior_max_step`` is its largest rise between two frames.
    """
    count, frames_per = frames.shape[:2]
    images = torch.cat([sources[:, None], frames], dim=1).double().flatten(2)
    flat = images.flatten(0, 1)
    posterior = model.log_posterior(flat, 1.0).exp()[:, target].reshape(count, -1).numpy()
    position = model.position(flat, source, target).reshape(count, -1).numpy()
    distance = model.mahalanobis(flat).reshape(count, frames_per + 1, -1).numpy()
    even = np.arange(1, frames_per + 1) / frames_per
    rows = []
    for b in range(count):
        deviation = np.abs(posterior[b, 1:] - even)
        rows.append({
            "posterior_first": float(posterior[b, 1]),
            "posterior_last": float(posterior[b, -1]),
            "posterior_max_deviation": float(deviation.max()),
            "posterior_within_tolerance": bool((deviation <= tolerance).all()),
            "posterior_max_step": float(np.diff(posterior[b]).max()),
            "posterior_monotone": bool((np.diff(posterior[b]) >= -MONOTONE_SLACK).all()),
            "position_monotone": bool((np.diff(position[b]) >= -MONOTONE_SLACK).all()),
            "position_first": float(position[b, 1]),
            "position_last": float(position[b, -1]),
            "mahalanobis_source_last": float(distance[b, -1, source]),
            "mahalanobis_target_last": float(distance[b, -1, target]),
            "posterior": posterior[b].round(4).tolist(),
            "position": position[b].round(4).tolist(),
            "mahalanobis_source": distance[b, :, source].round(3).tolist(),
            "mahalanobis_target": distance[b, :, target].round(3).tolist(),
        })
    return rows
