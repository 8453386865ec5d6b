"""The Cellflow stair bridge: DDIM inversion, Fourier-spaced stairs, guided decoding per stair.

Follows the reference method (``shared/reference/cellflow-algorithm.md`` sections 4.1-4.8):

1. invert each source image with DDIM (eta 0) and its source label over a respaced schedule of
   K steps, keeping every intermediate latent x_0..x_K;
2. measure each latent with a low-frequency Fourier magnitude, reverse the curve and pick N stair
   timesteps whose measures are evenly spaced between its extremes (greedy, with the reference's
   fallback when levels collapse);
3. decode from each stair's latent to t = 0 with the target label and classifier guidance on the
   probability-flow ODE.

Unlike the reference (batch 1, inversion repeated per stair), one inversion pass serves all
stairs of all images in a batch, and the decodes of every (image, stair) row run together:
rows join the batch when the decode index reaches their start, so a batch needs at most
K + max stair sequential UNet calls, and each trajectory costs K + sum of stairs evaluations.

Schedulers: the levels are the diffusers scheduler's alpha-bars, respaced; the moves
are the three-line DDIM update written out in ``StairBridge.ddim_step``.
``DDIMInverseScheduler`` does not fit the inversion: it evaluates the UNet at the destination
level and stops at the alpha-bar of the last timestep instead of 0, a different discretisation.
``DDIMScheduler.step`` is the same decoding update (a test holds them equal) but computes its
coefficients in float32; one float64 update for both directions keeps the batched frames within
1e-4 of the reference loop.

Two reference quirks are reproduced by default and can be switched off: the stair index from the
reversed curve is used as the timestep directly (``stair_mapping="mirror"``; ``"crossing"``
uses the index where the measure crosses the level), and decoding starts one level below the
stair's latent (``decode_start="faithful"``; ``"exact"`` starts at the stair itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from diffusers import UNet2DModel

from cellflow.classifier import NoiseAwareClassifier, class_log_prob_gradient
from cellflow.diffusion import NoiseSchedule

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # OpenCV's RGB2GRAY, as the reference measure uses


@dataclass(frozen=True)
class BridgeConfig:
    inversion_steps: int = 100
    frames: int = 10
    classifier_scale: float = 2.0
    decode_start: Literal["faithful", "exact"] = "faithful"
    stair_mapping: Literal["mirror", "crossing"] = "mirror"
    max_rows_per_call: int = 64

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BridgeConfig:
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


@dataclass
class EvaluationCounter:
    """How much work the bridge did: what the batching is meant to reduce."""

    unet_evaluations: int = 0  # images passed through the UNet, summed over calls
    unet_calls: int = 0  # batched forward calls
    sequential_rounds: int = 0  # one timestep of the lock-step loops, however many chunks
    classifier_evaluations: int = 0  # images through classifier forward + backward


@dataclass
class BridgeResult:
    frames: torch.Tensor  # (B, N, 3, H, W) in [-1, 1], ordered by increasing stair
    stairs: np.ndarray  # (B, N) respaced stair timesteps, strictly increasing per row
    measures: np.ndarray  # (B, K) Fourier measure of x_1..x_K (inversion order)
    counter: EvaluationCounter = field(default_factory=EvaluationCounter)


class RespacedSchedule:
    """The K-step respaced schedule: level k is DDPM timestep k * stride, a_k its alpha-bar."""

    def __init__(self, schedule: NoiseSchedule, steps: int) -> None:
        total = schedule.num_train_timesteps
        if not 1 <= steps <= total or total % steps:
            raise ValueError(f"inversion_steps {steps} must divide num_train_timesteps {total}")
        self.steps = steps
        self.stride = total // steps
        alphas = schedule.ddpm().alphas_cumprod.double()
        # a_K := 0 ends the inversion at pure noise; decoding past level 0 goes to 1 (x0-hat).
        self.alphas = torch.cat([alphas[:: self.stride][:steps],
                                 torch.zeros(1, dtype=alphas.dtype)])

    def timestep(self, level: int) -> int:
        return level * self.stride

    def alpha(self, level: int) -> float:
        return float(self.alphas[level])


def fourier_measure(latents: torch.Tensor) -> torch.Tensor:
    """The reference's 'high-frequency' measure of each latent in a batch, in float64.

    Mean DFT magnitude along the centre row (zero vertical frequency) of the gray image at
    horizontal frequencies -10..-2 and +1..+9 (fewer for images under 20 px): despite its
    name, a very low-frequency statistic of the column-sum profile.
    """
    if latents.shape[-1] != latents.shape[-2]:
        raise ValueError(f"the Fourier measure needs square images, got {tuple(latents.shape)}")
    weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64)
    gray = torch.einsum("bchw,c->bhw", latents.detach().cpu().double(), weights)
    spectrum = torch.fft.fftshift(torch.fft.fft2(gray), dim=(-2, -1)).abs()
    centre = gray.shape[-1] // 2
    reach = min(10, centre)
    columns = [*range(centre - reach, centre - 1), *range(centre + 1, centre + reach)]
    return spectrum[:, centre, columns].mean(dim=-1)


def adaptive_stairs(reversed_measure: Sequence[float], frames: int) -> list[int]:
    """Pick ``frames`` strictly increasing indices of the reversed curve (reference 4.4).

    Target levels are evenly spaced between the curve's extremes; each is matched greedily to
    the closest remaining entry beyond the previous pick. When a level needs more than 101
    tries, the even fallback [gap, 2 gap, ..., N gap - 1] is used instead.
    """
    values = np.asarray(reversed_measure, dtype=np.float64).copy()
    low, high = values.min(), values.max()
    previous, picks, failed = 0, [], False
    for level in range(1, frames + 1):
        target = low + (high - low) * level / frames
        tries = 0
        while True:
            tries += 1
            failed = failed or tries > 101
            closest = int(np.argmin(np.abs(values - target)))
            if closest > previous:
                picks.append(closest)
                previous = closest
                break
            values[closest] = 0.0
            if failed:
                break
        if failed:
            break
    if failed or len(picks) < frames:
        gap = len(values) // frames
        return [gap * i for i in range(1, frames)] + [gap * frames - 1]
    return picks


def stairs_from_measures(measures: np.ndarray, config: BridgeConfig) -> list[int]:
    """Stair timesteps of one image from its inversion-order measures M(x_1)..M(x_K)."""
    picks = adaptive_stairs(measures[::-1], config.frames)
    if config.stair_mapping == "mirror":
        return picks
    return sorted(config.inversion_steps - pick for pick in picks)


class StairBridge:
    """Batched, cached stair bridge between the classes of one trained model pair."""

    def __init__(self, unet: UNet2DModel, classifier: NoiseAwareClassifier | None,
                 schedule: NoiseSchedule, config: BridgeConfig) -> None:
        self.unet = unet.eval()
        self.classifier = classifier.eval() if classifier is not None else None
        self.config = config
        self.respaced = RespacedSchedule(schedule, config.inversion_steps)
        self.device = next(unet.parameters()).device
        self.dtype = next(unet.parameters()).dtype

    @torch.no_grad()
    def invert(self, images: torch.Tensor, labels: torch.Tensor, counter: EvaluationCounter
               ) -> tuple[list[torch.Tensor], np.ndarray]:
        """DDIM-invert (eta 0) to pure noise; return x_0..x_K (on the CPU) and M(x_1..x_K)."""
        current = images.to(self.device, self.dtype)
        latents = [current.cpu()]
        measures = []
        labels = labels.to(self.device)
        for level in range(self.respaced.steps):
            epsilon = self._epsilon(current, level, labels, counter)
            current = self.ddim_step(current, epsilon, level, level + 1)
            counter.sequential_rounds += 1
            latents.append(current.cpu())
            measures.append(fourier_measure(current).numpy())
        return latents, np.stack(measures, axis=1)

    @torch.no_grad()
    def decode(self, starts: torch.Tensor, start_levels: Sequence[int], labels: torch.Tensor,
               scale: float, counter: EvaluationCounter) -> torch.Tensor:
        """Guided DDIM decoding (eta 0) of rows that start at different levels, to t = 0.

        Row r is treated as being at level ``start_levels[r]`` and joins the batch when the
        loop reaches it; all active rows share one timestep per round.
        """
        rows = starts.to(self.device, self.dtype).clone()
        labels = labels.to(self.device)
        start_levels = torch.as_tensor(list(start_levels))
        for level in range(int(start_levels.max()), -1, -1):
            active = torch.nonzero(start_levels >= level).flatten().to(self.device)
            t = self.respaced.timestep(level)
            for chunk in active.split(self.config.max_rows_per_call):
                z = rows[chunk]
                epsilon = self._epsilon(z, level, labels[chunk], counter)
                if scale and self.classifier is not None:
                    gradient = class_log_prob_gradient(self.classifier, z, t, labels[chunk])
                    counter.classifier_evaluations += len(chunk)
                    epsilon = epsilon - (1 - self.respaced.alpha(level)) ** 0.5 * scale * gradient
                rows[chunk] = self.ddim_step(z, epsilon, level, level - 1)
            counter.sequential_rounds += 1
        return rows

    def trajectories(self, images: torch.Tensor, source_labels: torch.Tensor,
                     target_labels: torch.Tensor) -> BridgeResult:
        """Frames from each source image (B, 3, H, W in [-1, 1]) towards its target class."""
        counter = EvaluationCounter()
        latents, measures = self.invert(images, source_labels, counter)
        stairs = np.array([stairs_from_measures(row, self.config) for row in measures])
        rows = [(b, int(tau)) for b in range(len(images)) for tau in stairs[b]]
        shift = 1 if self.config.decode_start == "faithful" else 0
        starts = torch.stack([latents[tau][b] for b, tau in rows])
        decoded = self.decode(
            starts, [tau - shift for _, tau in rows],
            torch.stack([target_labels[b] for b, _ in rows]),
            self.config.classifier_scale, counter)
        frames = decoded.cpu().reshape(len(images), self.config.frames, *images.shape[1:])
        return BridgeResult(frames, stairs, measures, counter)

    def ddib(self, images: torch.Tensor, source_labels: torch.Tensor,
             target_labels: torch.Tensor) -> tuple[torch.Tensor, EvaluationCounter]:
        """DDIB: invert fully with the source label, decode with the target label, no guidance."""
        counter = EvaluationCounter()
        latents, _ = self.invert(images, source_labels, counter)
        last = self.respaced.steps - 1  # the DDIB convention: start decoding at level K - 1
        decoded = self.decode(latents[-1], [last] * len(images), target_labels, 0.0, counter)
        return decoded.cpu(), counter

    def sample(self, labels: torch.Tensor, generator: torch.Generator, size: int
               ) -> tuple[torch.Tensor, EvaluationCounter]:
        """ADM: class-conditional DDIM samples from noise with classifier guidance."""
        counter = EvaluationCounter()
        noise = torch.randn((len(labels), 3, size, size), generator=generator)
        last = self.respaced.steps - 1
        decoded = self.decode(noise, [last] * len(labels), labels,
                              self.config.classifier_scale, counter)
        return decoded.cpu(), counter

    def ddim_step(self, x: torch.Tensor, epsilon: torch.Tensor, level: int, to_level: int
                  ) -> torch.Tensor:
        """Deterministic DDIM move of x from ``level`` to ``to_level`` along epsilon.

        Up (inversion) or down (decoding) one level, with a_K = 0 and a_{-1} = 1 (the last
        decoding step returns x0-hat). Downwards it is ``DDIMScheduler.step`` with eta 0; written
        out so that both directions use the same float64 level coefficients.
        """
        a_now = self.respaced.alpha(level)
        a_next = 1.0 if to_level < 0 else self.respaced.alpha(to_level)
        x0 = (x - (1 - a_now) ** 0.5 * epsilon) / a_now ** 0.5
        return a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * epsilon

    def _epsilon(self, x: torch.Tensor, level: int, labels: torch.Tensor,
                 counter: EvaluationCounter) -> torch.Tensor:
        counter.unet_evaluations += len(x)
        counter.unet_calls += 1
        t = self.respaced.timestep(level)
        return self.unet(x, t, class_labels=labels).sample[:, :3]


def soft_label_weight(rule: str, frame: int, frames: int, stair: int, steps: int) -> float:
    """Weight of the target class in frame ``frame`` (1-based) of ``frames``.

    ``linear``: frame / frames, the reading of the reference's ratio folders (r = m / N);
    ``timestep``: stair / steps, how deep into the noise the frame was decoded from;
    ``hard``: 1, every frame labelled as the target class.
    """
    if rule == "linear":
        return frame / frames
    if rule == "timestep":
        return stair / steps
    if rule == "hard":
        return 1.0
    raise ValueError(f"unknown soft label rule '{rule}' (linear, timestep, hard)")
