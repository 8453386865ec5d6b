"""Each flag fires on the degenerate case it names and stays silent on a normal one."""

from __future__ import annotations

import numpy as np

from cellflow import flags


def smooth_images(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Tissue-like images: blurred blobs, spatially correlated like real stains."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    images = np.empty((count, 3, size, size), np.uint8)
    for index in range(count):
        field = np.zeros((size, size))
        for cy, cx in rng.uniform(0, size, (6, 2)):
            field += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 18.0)
        images[index] = np.clip(200 - 120 * field, 0, 255).astype(np.uint8)[None]
    return images


def test_noise_images_are_flagged_and_tissue_is_not():
    real = smooth_images(40)
    noise = np.random.default_rng(1).integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    assert [flag.code for flag in flags.image_set_flags(noise, real, "adm")] == ["noise"]
    assert flags.image_set_flags(smooth_images(20, seed=2), real, "adm") == []


def test_constant_images_are_flagged():
    real = smooth_images(40)
    constant = np.full((10, 3, 32, 32), 128, np.uint8)
    assert "constant" in flags.codes(flags.image_set_flags(constant, real, "ddib"))


def test_lag1_autocorrelation_separates_noise_from_smooth_images():
    noise = np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    assert np.all(np.abs(flags.lag1_autocorrelation(noise)) < 0.2)
    assert np.all(flags.lag1_autocorrelation(smooth_images(8)) > 0.8)


def test_fid_far_above_the_real_floor_is_flagged():
    assert flags.fid_floor_flags(27_881.0, 198.0, "domain")[0].code == \
        "fid-domain-far-above-floor"
    assert flags.fid_floor_flags(400.0, 198.0, "domain") == []
    assert flags.fid_floor_flags(float("nan"), 198.0, "domain") == []


def test_a_baseline_at_the_ceiling_is_flagged():
    assert flags.ceiling_flags([1.0, 1.0], n_test=24)[0].code == "baseline-at-ceiling"
    # one seed with one test image wrong leaves room to improve
    assert flags.ceiling_flags([1.0, 23 / 24], n_test=24) == []
    assert flags.ceiling_flags([0.8, 0.9], n_test=24) == []


def test_too_few_seeds_for_an_interval():
    assert flags.seed_flags(2)[0].code == "too-few-seeds"
    assert flags.seed_flags(flags.MIN_SEEDS_FOR_INTERVAL) == []


def test_an_interval_outside_the_metric_range_is_clipped_and_flagged():
    low, high, found = flags.clip_interval(-3.6, 1.24)
    assert (low, high) == (0.0, 1.0) and found[0].code == "ci-clipped"
    assert flags.clip_interval(0.4, 0.6) == (0.4, 0.6, [])


def test_codes_are_unique_and_ordered():
    found = [flags.Flag("b", ""), flags.Flag("a", ""), flags.Flag("b", "")]
    assert flags.codes(found) == "b;a"
    assert flags.codes([]) == ""


def test_copies_and_own_source_neighbours_are_flagged():
    found = flags.memorization_flags(0.9, 1.0, 0.05, "cellflow frame 1")
    assert [flag.code for flag in found] == ["copies", "nearest-is-source"]
    # about the quantile's share below the threshold is what a method that does not copy gets
    assert flags.memorization_flags(0.05, float("nan"), 0.05, "adm") == []
