"""Noise-aware classifier: shapes, time conditioning, serialization, per-sample independence,
the guidance gradient, and that the network can actually learn."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cellflow.classifier import NoiseAwareClassifier, class_log_prob_gradient

TINY: dict[str, Any] = {
    "sample_size": 16,
    "block_out_channels": (32, 32),
    "layers_per_block": 1,
    "attention_levels": (1,),
    "attention_head_dim": 16,
    "norm_num_groups": 8,
}


def tiny(seed: int = 0, **overrides: Any) -> NoiseAwareClassifier:
    torch.manual_seed(seed)
    return NoiseAwareClassifier(**{**TINY, **overrides}).eval()


def images(batch: int, seed: int = 1, size: int = 16, dtype: torch.dtype = torch.float32
           ) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator, dtype=dtype)


@pytest.fixture(autouse=True)
def _few_threads() -> Iterator[None]:
    # Tiny convolutions run fastest on few threads, and results stay reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("pool", ["attention", "mean"])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_logits_shape_for_scalar_and_per_sample_timesteps(pool: str, batch: int) -> None:
    model = tiny(pool=pool, num_classes=3)
    x = images(batch)
    timesteps = [7, torch.tensor(7), torch.tensor([7]), torch.full((batch,), 7)]
    with torch.no_grad():
        outputs = [model(x, t) for t in timesteps]
    for out in outputs:
        assert out.shape == (batch, 3)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()
        # Every way of saying "t = 7 for all" means the same thing.
        torch.testing.assert_close(out, outputs[0])


@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_timestep_changes_logits_per_sample(pool: str) -> None:
    model = tiny(pool=pool)
    x = images(2)
    with torch.no_grad():
        early, late = model(x, 10), model(x, 900)
        mixed = model(x, torch.tensor([10, 900]))
    assert (early - late).abs().max() > 1e-3, "the time embedding does not reach the logits"
    # Per-sample timesteps are applied to their own sample.
    torch.testing.assert_close(mixed[0], early[0])
    torch.testing.assert_close(mixed[1], late[1])


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = tiny(num_classes=4, pool="attention")
    model.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert "config.json" in files
    assert any(name.endswith(".safetensors") for name in files), files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in files), files

    loaded = NoiseAwareClassifier.from_pretrained(tmp_path).eval()
    assert loaded.config.num_classes == 4
    assert tuple(loaded.config.block_out_channels) == TINY["block_out_channels"]
    x, t = images(3), torch.tensor([0, 500, 999])
    with torch.no_grad():
        assert torch.equal(model(x, t), loaded(x, t))


@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_no_cross_sample_mixing(pool: str) -> None:
    model = tiny(pool=pool)
    x = images(3)
    changed = x.clone()
    changed[1] = images(1, seed=99)[0]
    t, y = torch.tensor([100, 400, 700]), torch.tensor([0, 1, 1])
    with torch.no_grad():
        before, after = model(x, t), model(changed, t)
    assert (before[1] - after[1]).abs().max() > 1e-4, "sample 1 did not change"
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], rtol=1e-5, atol=1e-6)

    grad_before = class_log_prob_gradient(model, x, t, y)
    grad_after = class_log_prob_gradient(model, changed, t, y)
    torch.testing.assert_close(grad_after[[0, 2]], grad_before[[0, 2]], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("pool", "eps", "rel_tol"),
    [
        ("mean", 1e-4, 1e-6),
        # diffusers' AttentionPooling runs its softmax in float32 even in a float64 model, so
        # the check is only as tight as float32 rounding allows.
        ("attention", 1e-2, 1e-2),
    ],
)
def test_guidance_gradient_matches_finite_differences(pool: str, eps: float, rel_tol: float
                                                      ) -> None:
    model = tiny(pool=pool).double()
    x = images(2, dtype=torch.float64)
    t, y = torch.tensor([30, 600]), torch.tensor([1, 0])

    grad = class_log_prob_gradient(model, x, t, y)
    assert grad.shape == x.shape
    assert grad.dtype == x.dtype
    assert all(p.grad is None for p in model.parameters())
    assert grad.abs().max() > 1e-4

    def objective(z: torch.Tensor) -> float:
        with torch.no_grad():
            log_probs = torch.log_softmax(model(z, t), dim=-1)
        return float(log_probs[torch.arange(2), y].sum())

    largest = tuple(int(i) for i in torch.unravel_index(grad.abs().argmax(), grad.shape))
    for index in [largest, (0, 0, 0, 0), (0, 2, 7, 9), (1, 1, 15, 3), (1, 0, 8, 8)]:
        step = torch.zeros_like(x)
        step[index] = eps
        estimate = (objective(x + step) - objective(x - step)) / (2 * eps)
        assert math.isclose(grad[index].item(), estimate, rel_tol=rel_tol, abs_tol=1e-8), (
            index, grad[index].item(), estimate)


def test_guidance_gradient_works_under_no_grad_and_broadcasts_y() -> None:
    model = tiny()
    x = images(2)
    with torch.no_grad():
        grad_scalar = class_log_prob_gradient(model, x, torch.tensor(50), torch.tensor(1))
    grad_vector = class_log_prob_gradient(model, x, torch.tensor([50, 50]), torch.tensor([1, 1]))
    torch.testing.assert_close(grad_scalar, grad_vector)
    assert not grad_scalar.requires_grad
    assert all(p.grad is None for p in model.parameters())
    # The gradient of log p(y=0) + log p(y=1) is not that of log p(y=1): y is used.
    grad_other = class_log_prob_gradient(model, x, torch.tensor(50), torch.tensor([0, 1]))
    assert (grad_other[0] - grad_vector[0]).abs().max() > 0
    torch.testing.assert_close(grad_other[1], grad_vector[1])


@pytest.mark.parametrize(
    "y", [torch.tensor([0, 2]), torch.tensor([-1, 0]), torch.tensor([0, 1, 1]),
          torch.tensor([0.0, 1.0])])
def test_guidance_gradient_rejects_bad_labels(y: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="y must"):
        class_log_prob_gradient(tiny(), images(2), torch.tensor(5), y)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = tiny(layers_per_block=2).train()
    x, t = images(2), torch.tensor([3, 300])
    model(x, t).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing()
    model(x, t).square().sum().backward()
    for reference, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, reference)


def noisy_toy_batch(batch: int, generator: torch.Generator, max_t: int = 1000
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bright (class 1) vs dark (class 0) textured 16 px images, forward-diffused to a random t
    with the DDPM linear beta schedule."""
    labels = torch.randint(0, 2, (batch,), generator=generator)
    clean = (labels.float() - 0.5).view(-1, 1, 1, 1) + 0.3 * torch.randn(
        batch, 3, 16, 16, generator=generator)
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), dim=0)
    t = torch.randint(0, max_t, (batch,), generator=generator)
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * clean + (1 - abar).sqrt() * torch.randn(
        clean.shape, generator=generator)
    return noisy, t, labels


def test_tiny_classifier_learns_a_separable_toy_problem() -> None:
    model = tiny(seed=3).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, t, y = noisy_toy_batch(16, generator)
        loss = torch.nn.functional.cross_entropy(model(x, t), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    x, t, y = noisy_toy_batch(256, torch.Generator().manual_seed(1), max_t=100)
    with torch.no_grad():
        accuracy = (model(x, t).argmax(dim=-1) == y).float().mean().item()
    assert accuracy > 0.9, accuracy


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"pool": "max"}, "pool"),
        ({"attention_levels": (2,)}, "attention_levels"),
        ({"attention_levels": (-1,)}, "attention_levels"),
        ({"sample_size": 15}, "sample_size"),
        ({"block_out_channels": (32, 36)}, "norm_num_groups"),
        ({"norm_num_groups": 7}, "norm_num_groups"),
        ({"num_classes": 1}, "num_classes"),
        ({"attention_head_dim": 24}, "attention_head_dim"),
        ({"block_out_channels": ()}, "block_out_channels"),
        ({"layers_per_block": 0}, "layers_per_block"),
        ({"dropout": 1.0}, "dropout"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(overrides: dict[str, Any], name: str
                                                     ) -> None:
    with pytest.raises(ValueError, match=name):
        NoiseAwareClassifier(**{**TINY, **overrides})


def test_bad_inputs_raise_value_error() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="sample"):
        model(torch.zeros(2, 1, 16, 16), 3)
    with pytest.raises(ValueError, match="sample"):
        model(torch.zeros(2, 3, 15, 16), 3)
    with pytest.raises(ValueError, match="timestep"):
        model(images(2), torch.tensor([1, 2, 3]))
