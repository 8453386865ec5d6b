"""Exact Gaussian class models, and the bridge options measured on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellflow.bridge import (
    BridgeConfig,
    RespacedSchedule,
    StairBridge,
    candidate_depths,
    fourier_reach,
    increasing_within,
    posterior_targets,
    soft_label_weight,
)
from cellflow.classifier import fit_temperature
from cellflow.diffusion import NoiseSchedule
from cellflow.exact import (
    ExactClassifier,
    ExactEpsilon,
    GaussianClass,
    GaussianImageModel,
    gaussian_design,
    score_trajectories,
)

SCHEDULE = NoiseSchedule()
ALPHAS = SCHEDULE.ddpm().alphas_cumprod


@pytest.fixture(scope="module", params=["fine", "coarse"])
def model(request) -> GaussianImageModel:
    return gaussian_design(request.param, 8, ALPHAS)


def _sources(model: GaussianImageModel, count: int, seed: int = 0) -> torch.Tensor:
    return model.sample(0, count, torch.Generator().manual_seed(seed))


def test_exact_epsilon_is_the_scaled_score(model):
    """eps(x_t) = -sqrt(1 - a) grad log p(x_t | y), the identity every DDIM step relies on."""
    x = _sources(model, 3).flatten(1) * 0.7 + 0.1
    for timestep in (0, 250, 900):
        alpha = float(ALPHAS[timestep])
        for label in (0, 1):
            probe = x.clone().requires_grad_(True)
            model.log_likelihood(probe, alpha)[:, label].sum().backward()
            labels = torch.full((3,), label)
            expected = -(1 - alpha) ** 0.5 * probe.grad
            torch.testing.assert_close(model.epsilon(x, alpha, labels), expected,
                                       rtol=1e-9, atol=1e-9)


def test_woodbury_likelihood_matches_the_dense_gaussian(model):
    x = _sources(model, 2, seed=3).flatten(1)
    alpha = float(ALPHAS[400])
    for label, group in enumerate(model.classes):
        covariance = alpha * (group.factors @ group.factors.T + torch.diag(group.variance)) \
            + (1 - alpha) * torch.eye(len(group.mean), dtype=torch.float64)
        dense = torch.distributions.MultivariateNormal(alpha ** 0.5 * group.mean, covariance)
        torch.testing.assert_close(model.log_likelihood(x, alpha)[:, label], dense.log_prob(x))


def test_exact_posterior_matches_monte_carlo_frequencies():
    """Among noisy images drawn from the joint, class 1 is as frequent as p(1 | x_t) says."""
    model = gaussian_design("fine", 8, ALPHAS)
    generator = torch.Generator().manual_seed(7)
    alpha = float(ALPHAS[60])
    clean = torch.cat([model.sample(label, 3000, generator) for label in (0, 1)]).flatten(1)
    labels = torch.repeat_interleave(torch.tensor([0, 1]), 3000)
    noisy = alpha ** 0.5 * clean + (1 - alpha) ** 0.5 * torch.randn(
        clean.shape, generator=generator, dtype=torch.float64)
    posterior = model.log_posterior(noisy, alpha).exp()[:, 1]
    assert 0.2 < float((posterior > 0.5).float().mean()) < 0.8  # not a trivially sure case
    edges = torch.linspace(0, 1, 6)
    checked = 0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (posterior >= low) & (posterior < high)
        if inside.sum() >= 200:
            frequency = labels[inside].double().mean()
            assert abs(float(frequency - posterior[inside].mean())) < 0.05
            checked += 1
    assert checked >= 3


def test_design_separation_sets_the_bayes_error():
    """Mahalanobis distance 4 between the means: Bayes error Phi(-2) = 2.3% at t = 0."""
    for design in ("fine", "coarse"):
        model = gaussian_design(design, 8, ALPHAS)
        generator = torch.Generator().manual_seed(1)
        wrong = [(model.log_posterior(model.sample(label, 2000, generator).flatten(1), 1.0)
                  .argmax(dim=1) != label).double().mean() for label in (0, 1)]
        assert 0.01 < float(sum(wrong) / 2) < 0.04
        means = [group.mean for group in model.classes]
        distance = model.mahalanobis(means[1][None])[0, 0]
        assert float(distance) == pytest.approx(4.0, rel=1e-6)
        assert float(model.position(means[1][None], 0, 1)) == pytest.approx(1.0)


def test_fine_design_differs_only_in_low_variance_directions():
    fine = gaussian_design("fine", 8, ALPHAS)
    difference = fine.classes[1].mean - fine.classes[0].mean
    factors = fine.classes[0].factors
    assert float((factors.T @ difference).abs().max()) < 1e-9 * float(difference.norm())
    coarse = gaussian_design("coarse", 8, ALPHAS)
    along = coarse.classes[1].mean - coarse.classes[0].mean
    cosine = along.dot(coarse.classes[0].factors[:, 0]) / (
        along.norm() * coarse.classes[0].factors[:, 0].norm())
    assert float(cosine) == pytest.approx(1.0)


def test_bad_class_models_are_rejected():
    mean, factors = torch.zeros(12, dtype=torch.float64), torch.zeros(12, 2, dtype=torch.float64)
    good = GaussianClass(mean, factors, torch.ones(12, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2 classes"):
        GaussianImageModel([good], (3, 2, 2), ALPHAS)
    with pytest.raises(ValueError, match="variance must be positive"):
        GaussianImageModel([good, GaussianClass(mean, factors, torch.zeros(12))], (3, 2, 2),
                           ALPHAS)
    with pytest.raises(ValueError, match="unknown design 'blurry'"):
        gaussian_design("blurry", 8, ALPHAS)


def _bridge(model: GaussianImageModel, guided: bool = True, **options) -> StairBridge:
    config = BridgeConfig(**{"inversion_steps": 20, "frames": 5, **options})
    return StairBridge(ExactEpsilon(model), ExactClassifier(model) if guided else None,
                       SCHEDULE, config)


def _run(bridge: StairBridge, sources: torch.Tensor):
    count = len(sources)
    return bridge.trajectories(sources, torch.zeros(count, dtype=torch.long),
                               torch.ones(count, dtype=torch.long))


def test_posterior_stairs_increase_within_range_and_follow_the_posterior(model):
    sources = _sources(model, 4)
    result = _run(_bridge(model, stair_selection="posterior", classifier_scale=0.0), sources)
    assert result.stairs.shape == (4, 5)
    assert (np.diff(result.stairs, axis=1) > 0).all()
    assert result.stairs.min() >= 1 and result.stairs.max() <= 20
    assert set(result.stair_rule) == {"posterior"}
    scores = score_trajectories(model, sources, result.frames, 0, 1)
    fourier = score_trajectories(model, sources, _run(_bridge(model, classifier_scale=0.0),
                                                      sources).frames, 0, 1)
    # Evenly spaced targets: the posterior stairs are never further from i/N than the
    # reference's Fourier stairs are, on the same sources.
    assert np.median([s["posterior_max_deviation"] for s in scores]) <= \
        np.median([s["posterior_max_deviation"] for s in fourier])
    assert result.counter.unet_evaluations > 20 * 4 + int(result.stairs.sum())


def test_frame_posteriors_are_the_classifier_probability_at_t0(model):
    sources = _sources(model, 3, seed=2)
    bridge = _bridge(model)
    result = _run(bridge, sources)
    exact = model.log_posterior(sources.flatten(1), float(ALPHAS[0])).exp()[:, 1]
    np.testing.assert_allclose(result.source_probability, exact.numpy(), rtol=1e-9)
    frames = result.frames.flatten(0, 1).flatten(1)
    np.testing.assert_allclose(result.target_probability.ravel(),
                               model.log_posterior(frames, float(ALPHAS[0])).exp()[:, 1].numpy(),
                               rtol=1e-9)
    # the posterior soft label of a frame, a source image taken as a frame included, is that
    # probability itself
    assert soft_label_weight("posterior", 1, 5, 4, 20, result.source_probability[0]) == \
        pytest.approx(float(exact[0]))
    with pytest.raises(ValueError, match="needs the frame's p\\(target\\)"):
        soft_label_weight("posterior", 1, 5, 4, 20)


def test_scale_zero_equals_unguided_decoding(model):
    sources = _sources(model, 2, seed=4)
    guided = _run(_bridge(model, classifier_scale=0.0), sources)
    unguided = _run(_bridge(model, guided=False, classifier_scale=2.0), sources)
    assert torch.equal(guided.frames, unguided.frames)
    assert guided.counter.classifier_evaluations == 0
    assert np.isnan(unguided.target_probability).all()


def test_guidance_scale_moves_the_last_frame_past_the_target():
    """The target label and the classifier gradient both count the class: s > 0 overshoots."""
    model = gaussian_design("fine", 8, ALPHAS)
    sources = _sources(model, 6, seed=5)
    landing = {}
    for scale in (0.0, 2.0):
        result = _run(_bridge(model, classifier_scale=scale), sources)
        scores = score_trajectories(model, sources, result.frames, 0, 1)
        landing[scale] = np.median([s["position_last"] for s in scores])
    assert landing[2.0] > landing[0.0] + 0.1


def test_posterior_stairs_need_a_classifier(model):
    with pytest.raises(ValueError, match="needs the noise-aware classifier"):
        _bridge(model, guided=False, stair_selection="posterior")


def test_quadratic_spacing_is_strictly_increasing_and_uniform_is_unchanged():
    quadratic = RespacedSchedule(SCHEDULE, 100, "quadratic")
    assert quadratic.timesteps[0] == 0 and np.all(np.diff(quadratic.timesteps) > 0)
    assert quadratic.timesteps[10] == 10 and quadratic.timesteps[-1] == 980
    assert sum(t < 60 for t in quadratic.timesteps) >= 25
    assert quadratic.timestep(100) == 1000 and quadratic.alpha(100) == 0.0
    uniform = RespacedSchedule(SCHEDULE, 100)
    assert uniform.timesteps == [10 * k for k in range(100)]
    with pytest.raises(ValueError, match="unknown timestep_spacing 'cubic'"):
        RespacedSchedule(SCHEDULE, 100, "cubic")


def test_scaled_fourier_band_keeps_the_share_of_the_spectrum():
    assert fourier_reach(256, "scaled") == fourier_reach(256, "reference") == 10
    assert fourier_reach(32, "reference") == 10 and fourier_reach(32, "scaled") == 2
    assert fourier_reach(128, "scaled") == 5 and fourier_reach(16, "reference") == 8
    with pytest.raises(ValueError, match="unknown fourier_band"):
        fourier_reach(32, "wide")


def test_stair_helpers():
    assert increasing_within([3, 3, 3, 9], 1, 10) == [3, 4, 5, 9]
    assert increasing_within([10, 10, 10], 1, 10) == [8, 9, 10]
    assert increasing_within([1, 1, 1], 1, 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="do not fit"):
        increasing_within([1, 2, 3], 1, 2)
    depths = candidate_depths(100, 12)
    assert depths[0] == 1 and depths[-1] == 100 and depths == sorted(set(depths))
    assert sum(d <= 10 for d in depths) >= len(depths) // 2  # geometric: dense at small depth
    targets = posterior_targets(0.1, 0.9, 4)
    np.testing.assert_allclose(targets, [0.3, 0.5, 0.7, 0.9])
    assert targets[-1] == 0.9


def test_temperature_scaling_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6000, 3, generator=generator)
    labels = torch.multinomial(torch.softmax(logits / 2.5, dim=1), 1, generator=generator)[:, 0]
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)
    # perfectly separated images cannot calibrate: the softmax is left as it is
    assert fit_temperature(torch.tensor([[5.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])) == 1.0
    with pytest.raises(ValueError, match="need \\(n, C\\) logits"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0))
