"""Degenerate results, named where they appear: in a ``flags`` column, on the figure, in the log.

A benchmark number can be computed correctly and still mislead: FID of colour noise, a baseline
that is already perfect, a "landing" between two class means that coincide, an interval from
two seeds. Each check here is a pure function returning the flags that apply; the tables carry
their codes (``;``-separated), the figures print their messages and the jobs log them as
warnings. Every threshold is derived from the data's own reference (real images, the metric's
range, the test set size) or stated with its reason, never fitted to make a case pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Below this many seeds a t-interval is wider than the metric's range (t(0.975, 1) = 12.7):
# the seeds themselves are shown instead.
MIN_SEEDS_FOR_INTERVAL = 3
# An order of magnitude above the real-vs-real floor: no longer a matter of sample size.
FID_FLOOR_RATIO = 10.0
# Real tissue is spatially correlated at every resolution; images less correlated than this
# share of real training images look like per-pixel noise.
NOISE_PERCENTILE = 1.0
# A whole image within one grey level of its mean is constant, whatever the dataset.
CONSTANT_PIXEL_STD = 1.0


@dataclass(frozen=True)
class Flag:
    code: str
    message: str


def codes(flags: Iterable[Flag]) -> str:
    """The ``flags`` cell of a table: codes in order, ``;``-separated, empty when clean."""
    return ";".join(dict.fromkeys(flag.code for flag in flags))


def warn(flags: Iterable[Flag], where: str) -> None:
    for flag in flags:
        log.warning("%s: %s (%s)", where, flag.message, flag.code)


# --- images -------------------------------------------------------------------------------------

def lag1_autocorrelation(images: np.ndarray) -> np.ndarray:
    """Per image, the mean correlation of each pixel's luminance with its right and lower
    neighbours: about 1 for smooth tissue, about 0 for independent per-pixel noise.

    ``images``: uint8 (N, 3, H, W). A constant image has no correlation: NaN.
    """
    luminance = images.astype(np.float64).mean(axis=1)
    correlations = []
    for first, second in ((luminance[:, :, :-1], luminance[:, :, 1:]),
                          (luminance[:, :-1, :], luminance[:, 1:, :])):
        first = first.reshape(len(images), -1)
        second = second.reshape(len(images), -1)
        first = first - first.mean(axis=1, keepdims=True)
        second = second - second.mean(axis=1, keepdims=True)
        scale = np.sqrt((first ** 2).sum(axis=1) * (second ** 2).sum(axis=1))
        products = (first * second).sum(axis=1)
        correlations.append(np.divide(products, scale, out=np.full(len(images), np.nan),
                                      where=scale > 0))
    return np.mean(correlations, axis=0)


def pixel_std(images: np.ndarray) -> np.ndarray:
    """Per image, the standard deviation of all its values (0-255 scale)."""
    return images.reshape(len(images), -1).astype(np.float64).std(axis=1)


def image_set_flags(generated: np.ndarray, real: np.ndarray, what: str,
                    correlation: np.ndarray | None = None) -> list[Flag]:
    """Whether most of a generated set is per-pixel noise or constant, against real images.

    ``correlation``: the generated images' ``lag1_autocorrelation``, if the caller has it.
    """
    flags = []
    if not len(generated):
        return flags
    constant = pixel_std(generated) < CONSTANT_PIXEL_STD
    if constant.mean() > 0.5:
        flags.append(Flag("constant", f"{constant.mean():.0%} of {what} images are constant "
                                      f"(pixel SD < {CONSTANT_PIXEL_STD:g} grey level)"))
    reference = lag1_autocorrelation(real)
    reference = reference[np.isfinite(reference)]
    if len(reference):
        floor = float(np.percentile(reference, NOISE_PERCENTILE))
        if correlation is None:
            correlation = lag1_autocorrelation(generated)
        noisy = np.nan_to_num(correlation, nan=0.0) < floor
        if noisy.mean() > 0.5:
            flags.append(Flag(
                "noise", f"{noisy.mean():.0%} of {what} images are noise: neighbouring pixels "
                         f"correlate less (median {np.nanmedian(correlation):.2f}) than in "
                         f"{100 - NOISE_PERCENTILE:g}% of real training images "
                         f"(below {floor:.2f})"))
    return flags


def fid_floor_flags(fid: float, floor: float, space: str) -> list[Flag]:
    """A FID far beyond what real held-out images reach at the same sample size."""
    if not (np.isfinite(fid) and np.isfinite(floor)) or floor <= 0:
        return []
    if fid > FID_FLOOR_RATIO * floor:
        return [Flag(f"fid-{space}-far-above-floor",
                     f"FID ({space}) {fid:.0f} is {fid / floor:.0f}x the real-vs-real floor "
                     f"{floor:.0f}: these images are not from the data distribution, so the "
                     f"number does not rank them")]
    return []


# --- classification -----------------------------------------------------------------------------

def seed_flags(n_seeds: int) -> list[Flag]:
    if n_seeds < MIN_SEEDS_FOR_INTERVAL:
        return [Flag("too-few-seeds", f"{n_seeds} seed(s): no confidence interval (needs "
                                      f"{MIN_SEEDS_FOR_INTERVAL}); the seeds are shown")]
    return []


def ceiling_flags(baseline_values: Sequence[float], n_test: int | None,
                  maximum: float = 1.0) -> list[Flag]:
    """The real-only baseline at the metric's maximum on every seed: an augmentation can only
    tie or lose, so differences say nothing about it."""
    values = np.asarray(baseline_values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return []
    if values.min() >= maximum - 1e-12:
        on = f" on {n_test} test images" if n_test else ""
        return [Flag("baseline-at-ceiling",
                     f"the real-only baseline scores {maximum:g} on every seed{on}: the test "
                     f"set is too easy to show an augmentation's effect")]
    return []


def clip_interval(low: float, high: float, bounds: tuple[float, float] = (0.0, 1.0)
                  ) -> tuple[float, float, list[Flag]]:
    """The interval cut to the metric's range, and a flag when it had to be cut."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return low, high, []
    clipped = (max(low, bounds[0]), min(high, bounds[1]))
    if clipped != (low, high):
        return (*clipped, [Flag("ci-clipped", f"95% interval [{low:.2f}, {high:.2f}] runs "
                                              f"outside [{bounds[0]:g}, {bounds[1]:g}]: shown "
                                              f"clipped; the seeds are too few or too spread")])
    return low, high, []


# --- trajectories -------------------------------------------------------------------------------

def landing_flags(source_values: np.ndarray, target_values: np.ndarray, measure: str
                  ) -> list[Flag]:
    """Landing is a position on the line between two class means: undefined when the means are
    closer than the spread of the classes around them (pooled SD)."""
    source_values = np.asarray(source_values, dtype=float)
    target_values = np.asarray(target_values, dtype=float)
    if len(source_values) < 2 or len(target_values) < 2:
        return [Flag(f"landing-{measure}-undefined",
                     f"too few real images to place a landing on {measure}")]
    gap = abs(target_values.mean() - source_values.mean())
    spread = np.sqrt((source_values.var(ddof=1) + target_values.var(ddof=1)) / 2)
    if gap < spread:
        return [Flag(f"landing-{measure}-undefined",
                     f"class means of {measure} differ by {gap:.3g}, less than their spread "
                     f"(pooled SD {spread:.3g}): landing is not reported")]
    return []


# --- memorization -------------------------------------------------------------------------------

def memorization_flags(share_below_threshold: float, share_own_source: float,
                       threshold_quantile: float, what: str) -> list[Flag]:
    """Most images closer to a training image than nearly all real held-out images are
    (``threshold_quantile`` of them), or nearest to their own source: copies, not new images."""
    found = []
    if np.isfinite(share_below_threshold) and share_below_threshold > 0.5:
        found.append(Flag("copies", f"{share_below_threshold:.0%} of {what} are closer to a "
                                    f"training image than {1 - threshold_quantile:.0%} of real "
                                    f"test images are"))
    if np.isfinite(share_own_source) and share_own_source > 0.5:
        found.append(Flag("nearest-is-source", f"{share_own_source:.0%} of {what} have their "
                                               f"own source as nearest training image"))
    return found
