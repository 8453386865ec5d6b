"""Augmentation strategies: the registry, the basic augmentation and each batch operation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from cellflow.augment import basic_augment, build_batch_augmentation, fourier_mask
from cellflow.generation import METHODS as GENERATION_METHODS
from cellflow.strategies import STRATEGIES, resolve_params, strategy

SPATIAL = ["cutout", "mixup", "cutmix", "fmix", "resizemix", "saliencymix"]
PASTING = ["cutmix", "fmix", "resizemix", "saliencymix"]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_batch(count: int = 6, size: int = 32, classes: int = 4, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal images (not in [0, 1]) and soft targets: Dirichlet rows."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.normal(size=(count, 3, size, size))).float()
    targets = torch.from_numpy(rng.dirichlet(np.ones(classes), size=count)).float()
    return images, targets


def identified_batch(count: int = 4, size: int = 32, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i: channel 0 constant i (says where a pixel came from), textured channels 1-2;
    targets one-hot on class i."""
    images, _ = random_batch(count, size, seed=seed)
    images[:, 0] = torch.arange(count, dtype=torch.float32)[:, None, None]
    return images, torch.eye(count)


def dihedral_images(image: torch.Tensor) -> list[torch.Tensor]:
    flips = (image, image.flip(-1))
    if image.shape[-1] != image.shape[-2]:
        return [turned for flipped in flips for turned in (flipped, flipped.rot90(2, (-2, -1)))]
    return [flipped.rot90(k, (-2, -1)) for flipped in flips for k in range(4)]


def test_registry_kinds_defaults_and_references() -> None:
    # every generation method is a strategy
    assert set(STRATEGIES) == {"none", *SPATIAL, *GENERATION_METHODS}
    assert strategy("none").kind == "basic" and dict(strategy("none").defaults) == {}
    for name in SPATIAL:
        assert strategy(name).kind == "spatial" and strategy(name).defaults["prob"] == 1.0
    for name in GENERATION_METHODS:
        assert strategy(name).kind == "generative"
        assert dict(strategy(name).defaults) == {"ratio": 1.0}
    assert all(chosen.reference and chosen.name == name for name, chosen in STRATEGIES.items())
    assert strategy("mixup").defaults["alpha"] == 0.2
    assert dict(strategy("resizemix").defaults) == {"alpha": 0.1, "beta": 0.8, "prob": 1.0}


def test_unknown_strategy_lists_the_valid_names_sorted() -> None:
    with pytest.raises(ValueError, match="mixpu") as error:
        strategy("mixpu")
    assert ", ".join(sorted(STRATEGIES)) in str(error.value)


def test_resolve_params_overrides_defaults_and_rejects_unknown_keys() -> None:
    assert resolve_params("mixup", None) == {"alpha": 0.2, "prob": 1.0}
    assert resolve_params("mixup", {"alpha": 1.0}) == {"alpha": 1.0, "prob": 1.0}
    assert resolve_params("cellflow", {"ratio": 0.5}) == {"ratio": 0.5}
    with pytest.raises(ValueError, match="'alhpa'.*alpha, prob"):
        resolve_params("mixup", {"alhpa": 1.0})
    with pytest.raises(ValueError, match="'ratio'"):
        build_batch_augmentation("cutmix", {"ratio": 1.0})


def test_only_spatial_strategies_have_a_batch_operation() -> None:
    for name in STRATEGIES:
        operation = build_batch_augmentation(name, {})
        assert (operation is not None) == (name in SPATIAL), name


@pytest.mark.parametrize("name", SPATIAL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_operations_keep_shape_dtype_and_soft_targets(name: str, dtype: torch.dtype
                                                             ) -> None:
    augment = build_batch_augmentation(name, {})
    for seed in range(5):
        images, targets = random_batch(seed=seed)
        mixed, mixed_targets = augment(images.to(dtype), targets, seeded(seed))
        assert mixed.shape == images.shape and mixed.dtype == dtype
        assert mixed_targets.shape == targets.shape and mixed_targets.dtype == targets.dtype
        assert torch.allclose(mixed_targets.sum(1), torch.ones(len(targets)), atol=1e-6)
        assert mixed_targets.min() >= 0 and mixed_targets.max() <= 1


@pytest.mark.parametrize("name", PASTING)
def test_partner_label_weight_is_the_fraction_of_pixels_taken_from_it(name: str) -> None:
    augment = build_batch_augmentation(name, {})
    images, targets = identified_batch()
    swapped = 0
    for seed in range(12):
        mixed, mixed_targets = augment(images, targets, seeded(seed))
        for row in range(len(images)):
            origin = mixed[row, 0]
            fractions = torch.stack([torch.isclose(origin, torch.tensor(float(k)), atol=1e-5)
                                     .float().mean() for k in range(len(images))])
            assert fractions.sum() == 1  # every pixel comes from the image or one partner
            assert torch.allclose(mixed_targets[row], fractions, atol=1e-6)
            swapped += int(fractions[row] < 1)
    assert swapped > 10


def test_mixup_blends_images_and_labels_with_the_same_weight() -> None:
    augment = build_batch_augmentation("mixup", {})
    images, targets = identified_batch()
    for seed in range(5):
        mixed, mixed_targets = augment(images, targets, seeded(seed))
        expected = mixed_targets @ torch.arange(4, dtype=torch.float32)
        assert torch.allclose(mixed[:, 0], expected[:, None, None].expand(-1, 32, 32), atol=1e-5)


def partner_weights(name: str, params: dict, draws: int, size: int = 8) -> np.ndarray:
    """The partner's label weight of many batches (8 one-hot images, one weight per batch)."""
    augment = build_batch_augmentation(name, params)
    generator = seeded(123)
    images, targets = torch.zeros(8, 3, size, size), torch.eye(8)
    weights = [1 - float(augment(images, targets, generator)[1].diagonal().min())
               for _ in range(draws)]
    return np.array(weights)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_lambda_follows_its_beta_distribution(alpha: float) -> None:
    weights = partner_weights("mixup", {"alpha": alpha}, 2000)
    assert stats.kstest(weights, "beta", args=(alpha, alpha)).pvalue > 0.01
    assert abs(weights.var() - 1 / (4 * (2 * alpha + 1))) < 0.01


def test_cutmix_area_is_uniform_up_to_clipping() -> None:
    """Against a simulation of the paper's box: side sqrt(1 - lam) H, centre anywhere, clipped."""
    size = 32
    areas = partner_weights("cutmix", {}, 2000, size)
    rng = np.random.default_rng(0)
    side = (size * np.sqrt(1 - rng.uniform(size=200000))).astype(int)
    centre = rng.integers(0, size, size=(2, 200000))
    extent = (np.clip(centre + (side + 1) // 2, 0, size) - np.clip(centre - side // 2, 0, size))
    assert stats.ks_2samp(areas, extent.prod(0) / size**2).pvalue > 0.01


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_fmix_mask_covers_the_requested_fraction_exactly(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for lam in (0.0, 0.13, 0.5, 0.77, 1.0, *rng.uniform(size=10)):
        mask = fourier_mask(shape, float(lam), 3.0, rng)
        assert mask.shape == shape and mask.dtype == torch.bool
        assert int(mask.sum()) == round(lam * shape[0] * shape[1])


def low_frequency_share(mask: np.ndarray) -> float:
    """Share of the mask's non-constant spectral energy below 1/8 cycle per pixel."""
    power = np.abs(np.fft.fft2(mask - mask.mean())) ** 2
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(mask.shape[0]),
                                      np.fft.fftfreq(mask.shape[1]), indexing="ij"))
    return float(power[frequency < 1 / 8].sum() / power.sum())


def test_fmix_mask_is_low_frequency() -> None:
    rng = np.random.default_rng(1)
    for lam in (0.3, 0.5, 0.7):
        mask = fourier_mask((64, 64), lam, 3.0, rng).numpy().astype(float)
        shuffled = rng.permutation(mask.ravel()).reshape(mask.shape)
        assert low_frequency_share(mask) > 0.8
        assert low_frequency_share(shuffled) < 0.15


def test_saliencymix_cuts_around_the_partners_salient_blob() -> None:
    size, blob = 64, (20, 40)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    bright = 2 * torch.exp(-((rows - blob[0]) ** 2 + (cols - blob[1]) ** 2) / 8.0)
    images = torch.stack([torch.full((3, size, size), -1.0), bright.expand(3, -1, -1) - 0.5])
    augment = build_batch_augmentation("saliencymix", {})
    checked = 0
    for seed in range(30):
        mixed, targets = augment(images, torch.eye(2), seeded(seed))
        pasted = (mixed[0] != -1).all(0)
        if not pasted.any():  # the image kept itself (its partner was itself)
            continue
        assert torch.equal(mixed[0][:, pasted], images[1][:, pasted])  # same place as in it
        taken_rows = pasted.any(1).nonzero()[:, 0]
        taken_cols = pasted.any(0).nonzero()[:, 0]
        box = (taken_rows[0], taken_rows[-1], taken_cols[0], taken_cols[-1])
        assert pasted[box[0]:box[1] + 1, box[2]:box[3] + 1].all()  # one rectangle
        for low, high, centre in ((box[0], box[1], blob[0]), (box[2], box[3], blob[1])):
            assert low <= centre <= high
            if low > 0 and high < size - 1:
                assert abs((low + high) / 2 - centre) <= 1.5
        assert targets[0, 1] == pytest.approx(float(pasted.float().mean()), abs=1e-6)
        checked += 1
    assert checked >= 5


def test_cutout_zeroes_one_clipped_square_and_keeps_labels() -> None:
    size, side = 32, 10
    augment = build_batch_augmentation("cutout", {"size_fraction": side / size})
    images, targets = torch.ones(16, 3, size, size), torch.eye(16)
    unclipped = 0
    for seed in range(4):
        cut, cut_targets = augment(images, targets, seeded(seed))
        assert torch.equal(cut_targets, targets)
        assert torch.equal(torch.unique(cut), torch.tensor([0.0, 1.0]))
        for image in cut:
            hole = image[0] == 0
            assert torch.equal(hole.expand(3, -1, -1), image == 0)  # all channels alike
            rows, cols = hole.any(1).nonzero()[:, 0], hole.any(0).nonzero()[:, 0]
            assert hole[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
            assert int(hole.sum()) == len(rows) * len(cols)  # one rectangle
            for taken in (rows, cols):
                assert len(taken) <= side
                clipped = taken[0] == 0 or taken[-1] == size - 1
                assert clipped or len(taken) == side
            unclipped += int(len(rows) == len(cols) == side)
    assert unclipped > 0


@pytest.mark.parametrize("name", SPATIAL)
def test_prob_zero_leaves_the_batch_alone(name: str) -> None:
    images, targets = random_batch()
    augment = build_batch_augmentation(name, {"prob": 0.0})
    same_images, same_targets = augment(images, targets, seeded(0))
    assert torch.equal(same_images, images) and torch.equal(same_targets, targets)


@pytest.mark.parametrize("name", SPATIAL)
def test_same_seed_same_output_other_seed_other_output(name: str) -> None:
    images, targets = random_batch(count=8)
    augment = build_batch_augmentation(name, {})
    first = augment(images, targets, seeded(7))
    again = augment(images, targets, seeded(7))
    other = augment(images, targets, seeded(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("shape", [(3, 16, 16), (3, 12, 20)])
def test_basic_augment_without_jitter_only_flips_and_turns(shape: tuple[int, ...]) -> None:
    images = torch.randn(48, *shape, generator=seeded(0), dtype=torch.float64) * 5 + 3
    out = basic_augment(images, seeded(1), colour_jitter=0.0)
    assert out.shape == images.shape and out.dtype == images.dtype
    chosen = []
    for image, augmented in zip(images, out, strict=True):
        matches = [k for k, candidate in enumerate(dihedral_images(image))
                   if torch.equal(candidate, augmented)]
        assert len(matches) == 1
        chosen.append(matches[0])
    assert set(chosen) == set(range(len(dihedral_images(images[0]))))  # all of them drawn


def test_basic_augment_jitter_is_a_mild_channel_gain_and_brightness_shift() -> None:
    images = torch.randn(8, 3, 16, 16, generator=seeded(0))
    plain = basic_augment(images, seeded(3), colour_jitter=0.0)
    jittered = basic_augment(images, seeded(3), colour_jitter=0.05)
    assert jittered.dtype == images.dtype and not torch.equal(jittered, plain)
    x, y = plain.flatten(2).double(), jittered.flatten(2).double()
    gain = ((x - x.mean(-1, keepdim=True)) * (y - y.mean(-1, keepdim=True))).sum(-1) / (
        (x - x.mean(-1, keepdim=True)) ** 2).sum(-1)
    shift = y.mean(-1) - gain * x.mean(-1)
    assert torch.allclose(y, gain[..., None] * x + shift[..., None], atol=1e-5)
    assert ((gain - 1).abs() <= 0.05 + 1e-6).all() and (shift.abs() <= 0.05 + 1e-6).all()
    assert torch.allclose(shift, shift[:, :1].expand(-1, 3), atol=1e-5)  # one per image


def test_basic_augment_is_reproducible_under_its_generator() -> None:
    images = torch.randn(8, 3, 16, 16, generator=seeded(0)).half()
    first = basic_augment(images, seeded(5))
    assert first.dtype == torch.float16 and first.shape == images.shape
    assert torch.equal(first, basic_augment(images, seeded(5)))
    assert not torch.equal(first, basic_augment(images, seeded(6)))
