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

Beyond the reference (off by default): ``fourier_band="scaled"`` scales the measure's frequency
band with the image size (the reference band is fixed for 256 px), and
``stair_selection="posterior"`` places the stairs where the target posterior of the decoded
frames is evenly spaced between the source and the deepest decode (:meth:`StairBridge.
posterior_stairs`). With exact models (``cellflow.exact``) the Fourier stairs all lie beyond the
depth at which a fine-detail class difference is already replaced, so their frames jump to the
target at once; ``benchmarks/results/exact_bridge.md`` records what each option gives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from diffusers import UNet2DModel

from cellflow.classifier import NoiseAwareClassifier, class_log_prob_gradient, clean_logits
from cellflow.diffusion import NoiseSchedule, predict_epsilon

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # OpenCV's RGB2GRAY, as the reference measure uses
REFERENCE_SIZE = 256  # the image side the reference's Fourier band was chosen for
FOURIER_BANDS = ("reference", "scaled")
Decoded = dict[tuple[int, int], torch.Tensor]  # (image, stair) -> decoded frame


@dataclass(frozen=True)
class BridgeConfig:
    inversion_steps: int = 100
    frames: int = 10
    classifier_scale: float = 2.0
    decode_start: Literal["faithful", "exact"] = "faithful"
    stair_mapping: Literal["mirror", "crossing"] = "mirror"
    max_rows_per_call: int = 64
    timestep_spacing: Literal["uniform", "quadratic"] = "uniform"
    stair_selection: Literal["fourier", "posterior"] = "fourier"
    fourier_band: Literal["reference", "scaled"] = "reference"
    posterior_candidates: int = 12  # decode depths of the coarse sweep of posterior stairs
    # "classifier": the classifier's gradient steers decoding (classifier_scale); "free":
    # classifier-free guidance in inversion and decoding, eps = (1 + w) eps(x, y) - w eps(x, 0)
    # with w = cfg_weight (the upstream convention; diffusers' guidance_scale is 1 + w)
    guidance: Literal["classifier", "free"] = "classifier"
    cfg_weight: float = 1.8

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BridgeConfig:
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__ if name in raw})


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
    # (B, N) the classifier's p(target | frame) at t = 0 (NaN without a classifier)
    target_probability: np.ndarray
    # (B,) which rule placed each row's stairs: fourier, fourier-fallback (the even stairs),
    # posterior, or posterior-fallback (the target posterior did not rise: Fourier stairs)
    stair_rule: list[str]
    source_probability: np.ndarray  # (B,) p(target | source image) by the same classifier
    counter: EvaluationCounter = field(default_factory=EvaluationCounter)


class RespacedSchedule:
    """The K-step respaced schedule: level k is a DDPM timestep t_k, a_k its alpha-bar.

    ``uniform`` (the reference): t_k = k T / K. ``quadratic`` (DDIM, Song et al. 2021):
    t_k = floor(T (k / K)^2), made strictly increasing, which puts a quarter of the levels in
    the first 6% of the schedule, where classes that differ in fine detail are told apart.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int, spacing: str = "uniform") -> None:
        total = schedule.num_train_timesteps
        if spacing == "uniform":
            if not 1 <= steps <= total or total % steps:
                raise ValueError(
                    f"inversion_steps {steps} must divide num_train_timesteps {total}")
            timesteps = [k * (total // steps) for k in range(steps)]
        elif spacing == "quadratic":
            if not 2 <= steps <= total:
                raise ValueError(f"inversion_steps {steps} must lie in [2, {total}]")
            timesteps = []
            for k in range(steps):
                step = int(total * (k / steps) ** 2)
                timesteps.append(max(step, timesteps[-1] + 1) if timesteps else 0)
        else:
            raise ValueError(f"unknown timestep_spacing '{spacing}' (uniform, quadratic)")
        self.steps = steps
        self.total = total
        self.timesteps = timesteps
        alphas = schedule.ddpm().alphas_cumprod.double()
        # a_K := 0 ends the inversion at pure noise; decoding past level 0 goes to 1 (x0-hat).
        self.alphas = torch.cat([alphas[timesteps], torch.zeros(1, dtype=alphas.dtype)])

    def timestep(self, level: int) -> int:
        """The DDPM timestep of a level; level K (pure noise) is reported as T."""
        return self.timesteps[level] if level < self.steps else self.total

    def alpha(self, level: int) -> float:
        return float(self.alphas[level])


def fourier_reach(size: int, band: str = "reference") -> int:
    """Highest frequency of the measure's band: 10 (reference), or 10 * size / 256, at least 2.

    The reference's band covers frequencies up to 10 of 128 at 256 px; at 32 px the same 10
    reach 10 of 16, deep into the frequencies where noise dominates. ``scaled`` keeps the band's
    share of the spectrum and equals the reference at 256 px.
    """
    if band == "reference":
        reach = 10
    elif band == "scaled":
        reach = max(2, round(10 * size / REFERENCE_SIZE))
    else:
        raise ValueError(f"unknown fourier_band '{band}' ({', '.join(FOURIER_BANDS)})")
    return min(reach, size // 2)


def fourier_measure(latents: torch.Tensor, band: str = "reference") -> torch.Tensor:
    """The reference's 'high-frequency' measure of each latent in a batch, in float64.

    Mean DFT magnitude along the centre row (zero vertical frequency) of the gray image at
    horizontal frequencies -r..-2 and +1..+(r - 1), r = :func:`fourier_reach` (10 for the
    reference band): despite its name, a very low-frequency statistic of the column-sum profile.
    """
    if latents.shape[-1] != latents.shape[-2]:
        raise ValueError(f"the Fourier measure needs square images, got {tuple(latents.shape)}")
    weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64)
    gray = torch.einsum("bchw,c->bhw", latents.detach().cpu().double(), weights)
    spectrum = torch.fft.fftshift(torch.fft.fft2(gray), dim=(-2, -1)).abs()
    centre = gray.shape[-1] // 2
    reach = fourier_reach(gray.shape[-1], band)
    columns = [*range(centre - reach, centre - 1), *range(centre + 1, centre + reach)]
    return spectrum[:, centre, columns].mean(dim=-1)


def fallback_stairs(steps: int, frames: int) -> list[int]:
    """The reference's even stairs [gap, 2 gap, ..., N gap - 1], gap = K // N."""
    gap = steps // frames
    return [gap * i for i in range(1, frames)] + [gap * frames - 1]


def adaptive_stairs(reversed_measure: Sequence[float], frames: int) -> list[int]:
    """Pick ``frames`` strictly increasing indices of the reversed curve (reference 4.4).

    Target levels are evenly spaced between the curve's extremes; each is matched greedily to
    the closest remaining entry beyond the previous pick. When a level needs more than 101
    tries, the even fallback (:func:`fallback_stairs`) is used instead.
    """
    picks = greedy_stairs(reversed_measure, frames)
    return fallback_stairs(len(reversed_measure), frames) if picks is None else picks


def greedy_stairs(reversed_measure: Sequence[float], frames: int) -> list[int] | None:
    """The greedy of :func:`adaptive_stairs`, or None where the reference falls back."""
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
        return None
    return picks


def stairs_from_measures(measures: np.ndarray, config: BridgeConfig) -> tuple[list[int], str]:
    """Stair timesteps of one image from its inversion-order measures M(x_1)..M(x_K), and
    whether the greedy placed them (``fourier``) or the reference fell back to even stairs."""
    picks = greedy_stairs(measures[::-1], config.frames)
    rule = "fourier" if picks is not None else "fourier-fallback"
    if picks is None:
        picks = fallback_stairs(len(measures), config.frames)
    if config.stair_mapping == "mirror":
        return picks, rule
    return sorted(config.inversion_steps - pick for pick in picks), rule


def posterior_targets(start: float, end: float, frames: int) -> np.ndarray:
    """The N target posteriors evenly spaced from the source's (excluded) to the deepest's."""
    targets = start + (end - start) * np.arange(1, frames + 1) / frames
    targets[-1] = end  # exactly, so that the deepest decode always reaches the last target
    return targets


def increasing_within(stairs: Sequence[int], low: int, high: int) -> list[int]:
    """The nearest strictly increasing sequence within [low, high] (needs len <= high-low+1)."""
    out = list(stairs)
    if len(out) > high - low + 1:
        raise ValueError(f"{len(out)} stairs do not fit strictly increasing in [{low}, {high}]")
    for i in range(len(out)):
        out[i] = max(out[i], low + i, out[i - 1] + 1 if i else low)
    for i in reversed(range(len(out))):
        out[i] = min(out[i], high - (len(out) - 1 - i))
        if i + 1 < len(out):
            out[i] = min(out[i], out[i + 1] - 1)
    return out


def candidate_depths(steps: int, count: int) -> list[int]:
    """``count`` stair depths in 1..K, geometrically spaced (and always including 1 and K).

    Classes that differ in fine detail are replaced within the first few percent of the
    schedule, so the sweep needs its resolution at small depths.
    """
    geometric = np.geomspace(1, steps, num=max(count, 2))
    return sorted({int(round(d)) for d in geometric} | {1, steps})


class StairBridge:
    """Batched, cached stair bridge between the classes of one trained model pair."""

    def __init__(self, unet: UNet2DModel, classifier: NoiseAwareClassifier | None,
                 schedule: NoiseSchedule, config: BridgeConfig, temperature: float = 1.0,
                 decoder: UNet2DModel | None = None) -> None:
        """``temperature`` divides the classifier's t = 0 logits wherever the bridge reads
        p(target | frame) (posterior stairs, frame posteriors); guidance never uses it.

        ``decoder``, when given, is the UNet every decode runs (inversion keeps ``unet``): the
        upstream's "hybrid attention" inverts with one checkpoint read in the legacy qkv order
        and decodes with it read in the new order. Classifier-free guidance needs UNets with a
        null class (one label embedding beyond the classifier's classes, the last).
        """
        if config.stair_selection == "posterior" and classifier is None:
            raise ValueError("stair_selection 'posterior' needs the noise-aware classifier")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if config.guidance not in ("classifier", "free"):
            raise ValueError(f"unknown guidance '{config.guidance}' (classifier, free)")
        self.unet = unet.eval()
        self.decoder = (decoder if decoder is not None else unet).eval()
        if config.guidance == "free":
            for name, network in (("unet", self.unet), ("decoder", self.decoder)):
                embeddings = network.config.num_class_embeds or 0
                if classifier is not None:
                    expected = classifier.config.num_classes + 1
                    if embeddings != expected:
                        raise ValueError(
                            f"classifier-free guidance needs a {name} with a null class: "
                            f"{expected} label embeddings for {expected - 1} classes, it has "
                            f"{embeddings} (train it with diffusion.label_dropout > 0)")
                elif embeddings < 2:
                    raise ValueError(f"classifier-free guidance needs a class-conditional "
                                     f"{name} with a null class")
        self.classifier = classifier.eval() if classifier is not None else None
        self.config = config
        self.temperature = temperature
        self.respaced = RespacedSchedule(schedule, config.inversion_steps,
                                         config.timestep_spacing)
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
            epsilon = self._epsilon(current, level, labels, counter, self.unet)
            current = self.ddim_step(current, epsilon, level, level + 1)
            counter.sequential_rounds += 1
            latents.append(current.cpu())
            measures.append(fourier_measure(current, self.config.fourier_band).numpy())
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
                epsilon = self._epsilon(z, level, labels[chunk], counter, self.decoder)
                if scale and self.classifier is not None and self.config.guidance == "classifier":
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
        fourier, fourier_rules = zip(*(stairs_from_measures(row, self.config)
                                       for row in measures), strict=True)
        source_probability = self.target_probability(images, target_labels)
        if self.config.stair_selection == "posterior":
            stairs, rules, decoded = self.posterior_stairs(
                latents, target_labels, source_probability, fourier, counter)
        else:
            stairs, rules = list(fourier), list(fourier_rules)
            decoded = self._decode_stairs(latents, target_labels,
                                          [(b, tau) for b, row in enumerate(stairs)
                                           for tau in row], counter)
        frames = torch.stack([torch.stack([decoded[b, tau] for tau in row])
                              for b, row in enumerate(stairs)])
        probability = self.target_probability(
            frames.flatten(0, 1), target_labels.repeat_interleave(self.config.frames)
        ).reshape(len(images), self.config.frames)
        return BridgeResult(frames, np.array(stairs), measures, probability, rules,
                            source_probability, counter)

    def posterior_stairs(self, latents: Sequence[torch.Tensor], target_labels: torch.Tensor,
                         source_probability: np.ndarray, fourier: Sequence[Sequence[int]],
                         counter: EvaluationCounter) -> tuple[list[list[int]], list[str], Decoded]:
        """Stairs whose decoded frames' p(target) are evenly spaced (``stair_selection:
        posterior``), with every frame decoded on the way.

        A coarse sweep decodes each image from :func:`candidate_depths`; the target posteriors
        run evenly from the source's to that of the deepest decode (stair K). Each target is
        bracketed by the first swept depth that reaches it and refined by bisection over the
        integer depths between, all images and targets of a round in one batched decode; the
        closer end of the final bracket is the stair, and the stairs are then made strictly
        increasing. Where the deepest decode is no more the target than the source (the
        classifier sees no progress) the row keeps its Fourier stairs (``posterior-fallback``).
        """
        steps, frames = self.config.inversion_steps, self.config.frames
        count = len(target_labels)
        decoded: Decoded = {}
        probability: dict[tuple[int, int], float] = {(b, 0): float(source_probability[b])
                                                     for b in range(count)}

        def evaluate(pairs: set[tuple[int, int]]) -> None:
            pairs = sorted(pair for pair in pairs if pair not in decoded)
            if not pairs:
                return
            decoded.update(self._decode_stairs(latents, target_labels, pairs, counter))
            images = torch.stack([decoded[pair] for pair in pairs])
            labels = torch.stack([target_labels[b] for b, _ in pairs])
            probability.update(zip(pairs, self.target_probability(images, labels).tolist(),
                                   strict=True))

        evaluate({(b, depth) for b in range(count)
                  for depth in candidate_depths(steps, self.config.posterior_candidates)})
        brackets: dict[tuple[int, int], list[int]] = {}
        targets: dict[int, np.ndarray] = {}
        for b in range(count):
            start, end = probability[b, 0], probability[b, steps]
            if end <= start:
                continue
            targets[b] = posterior_targets(start, end, frames)
            swept = sorted(depth for row, depth in probability if row == b)
            for i, target in enumerate(targets[b]):
                high = next(d for d in swept if probability[b, d] >= target)
                low = max([d for d in swept if d < high], default=0)
                brackets[b, i] = [low, high]
        while open_ := {key: pair for key, pair in brackets.items() if pair[1] - pair[0] > 1}:
            evaluate({(b, sum(pair) // 2) for (b, _), pair in open_.items()})
            for (b, i), pair in open_.items():
                middle = sum(pair) // 2
                pair[int(probability[b, middle] >= targets[b][i])] = middle
        stairs, rules = [], []
        for b in range(count):
            if b not in targets:
                stairs.append(list(fourier[b]))
                rules.append("posterior-fallback")
                continue
            picks = []
            for i, target in enumerate(targets[b]):
                low, high = brackets[b, i]
                closer_low = low > 0 and (abs(probability[b, low] - target)
                                          < abs(probability[b, high] - target))
                picks.append(low if closer_low else high)
            stairs.append(increasing_within(picks, 1, steps))
            rules.append("posterior")
        evaluate({(b, tau) for b, row in enumerate(stairs) for tau in row})
        return stairs, rules, decoded

    def target_probability(self, images: torch.Tensor, target_labels: torch.Tensor
                           ) -> np.ndarray:
        """p(target | image) of clean images by the classifier at t = 0, over the temperature."""
        if self.classifier is None:
            return np.full(len(images), np.nan)
        logits = clean_logits(self.classifier, images, self.config.max_rows_per_call)
        probabilities = torch.softmax(logits / self.temperature, dim=-1)
        return probabilities[torch.arange(len(images)), target_labels.cpu().long()].numpy()

    def _decode_stairs(self, latents: Sequence[torch.Tensor], target_labels: torch.Tensor,
                       pairs: Sequence[tuple[int, int]], counter: EvaluationCounter
                       ) -> Decoded:
        """Decode (image, stair) pairs from their inverted latents, all in one batched pass."""
        shift = 1 if self.config.decode_start == "faithful" else 0
        starts = torch.stack([latents[tau][b] for b, tau in pairs])
        decoded = self.decode(starts, [tau - shift for _, tau in pairs],
                              torch.stack([target_labels[b] for b, _ in pairs]),
                              self.config.classifier_scale, counter)
        return dict(zip(pairs, decoded.cpu(), strict=True))

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
                 counter: EvaluationCounter, unet: UNet2DModel) -> torch.Tensor:
        """The epsilon a DDIM move follows: the UNet's, or under classifier-free guidance
        (1 + w) eps(x, y) - w eps(x, null) from one UNet call on the doubled batch."""
        t = self.respaced.timestep(level)
        counter.unet_calls += 1
        if self.config.guidance == "classifier":
            counter.unet_evaluations += len(x)
            return predict_epsilon(unet, x, t, labels)
        counter.unet_evaluations += 2 * len(x)
        null = torch.full_like(labels, unet.config.num_class_embeds - 1)
        conditional, unconditional = predict_epsilon(
            unet, torch.cat([x, x]), t, torch.cat([labels, null])).chunk(2)
        weight = self.config.cfg_weight
        return (1 + weight) * conditional - weight * unconditional


SOFT_LABELS = ("linear", "timestep", "hard", "posterior")


def soft_label_weight(rule: str, frame: int, frames: int, stair: int, steps: int,
                      target_probability: float = float("nan")) -> float:
    """Weight of the target class in frame ``frame`` (1-based) of ``frames``.

    ``linear``: frame / frames, the reading of the reference's ratio folders (r = m / N);
    ``timestep``: stair / steps, how deep into the noise the frame was decoded from;
    ``hard``: 1, every frame labelled as the target class;
    ``posterior``: the calibrated classifier's p(target | frame), so that a frame that already
    looks like the target is labelled so, whatever its index.
    """
    if rule == "linear":
        return frame / frames
    if rule == "timestep":
        return stair / steps
    if rule == "hard":
        return 1.0
    if rule == "posterior":
        if not 0.0 <= target_probability <= 1.0:
            raise ValueError(f"soft label 'posterior' needs the frame's p(target) in [0, 1], "
                             f"got {target_probability}")
        return float(target_probability)
    raise ValueError(f"unknown soft label rule '{rule}' ({', '.join(SOFT_LABELS)})")
