"""The latent autoencoder: its geometry, loss, scaling, round trip and training stage."""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cellflow.autoencoder import (
    AutoencoderForTraining,
    autoencoder_loss,
    build_autoencoder,
    decode,
    encode,
    latent_scaling_factor,
    reconstruction_quality,
    reconstruction_summary,
    train_autoencoder,
)
from cellflow.config import DatasetConfig, PrepareConfig, validate_config
from cellflow.data import prepare_dataset
from cellflow.diffusion import NoiseSchedule
from cellflow.stages import StageSpec
from cellflow.synthetic import generate_dataset, render_tile
from cellflow.training import TrainConfig, to_model_range, train_model

REPO = Path(__file__).resolve().parents[1]
TRAIN_STEPS = 60


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These networks are tiny: a second intra-op thread only spins, and on a shared 2-core
    machine a spinning pool makes the file many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def architecture(factor: int = 4, widths: tuple[int, ...] = (8, 16, 16),
                 latent_channels: int = 3) -> dict:
    return {"factor": factor, "latent_channels": latent_channels,
            "block_out_channels": list(widths), "layers_per_block": 1}


def synthetic_tiles(count: int, size: int, seed: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) synthetic tiles across the whole progression range."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([render_tile(float(p), size, rng).image.transpose(2, 0, 1)
                                      for p in np.linspace(0, 1, count)]))


@pytest.fixture(scope="module")
def tiles() -> tuple[torch.Tensor, torch.Tensor]:
    """48 training and 16 held-out 16-px tiles, drawn with different seeds."""
    return synthetic_tiles(48, 16, seed=0), synthetic_tiles(16, 16, seed=1)


@pytest.fixture(scope="module")
def trained(tiles, tmp_path_factory):
    """Held-out PSNR/SSIM and L1 error before training; the EMA autoencoder after it."""
    train, held_out = tiles
    torch.manual_seed(0)
    vae = build_autoencoder(architecture(), 16)
    before = reconstruction_quality(vae, held_out), round_trip_error(vae, held_out)
    config = TrainConfig(steps=TRAIN_STEPS, batch_size=8, grad_accum_steps=1,
                         learning_rate=2e-3, weight_decay=0.0, warmup_steps=5,
                         lr_schedule="constant_with_warmup", grad_clip=1.0, ema_decay=0.99,
                         mixed_precision="no", gpus=0, checkpoint_every=TRAIN_STEPS,
                         keep_checkpoints=1, augment=True)
    result = train_model(AutoencoderForTraining(vae), partial(autoencoder_loss, kl_weight=1e-6),
                         train, torch.zeros(len(train), dtype=torch.long), config, 0,
                         tmp_path_factory.mktemp("ae-ckpt"), {"test": "autoencoder"})
    return before, result.ema.vae.eval()


def round_trip_error(vae, images: torch.Tensor) -> float:
    """Mean absolute error of the round trip, in [-1, 1]."""
    return float((decode(vae, encode(vae, images)) - to_model_range(images)).abs().mean())


@pytest.mark.parametrize(("factor", "widths", "channels", "size"), [
    (4, (8, 16, 16), 3, 16),
    (4, (8, 16, 16), 4, 32),
    (8, (8, 8, 16, 16), 2, 16),
    (8, (8, 8, 16, 16), 4, 32),
])
def test_latent_shape_matches_the_config(factor, widths, channels, size):
    vae = build_autoencoder(architecture(factor, widths, channels), size)
    images = synthetic_tiles(3, size, seed=0)
    latents = encode(vae, images)
    assert latents.shape == (3, channels, size // factor, size // factor)
    assert decode(vae, latents).shape == images.shape
    assert vae.config.sample_size == size and vae.config.scaling_factor == 1.0


def test_the_round_trip_improves_with_training(trained, tiles):
    (before, error_before), vae = trained
    held_out = tiles[1]
    after = reconstruction_quality(vae, held_out)
    assert list(after.columns) == ["psnr", "ssim"] and len(after) == len(held_out)
    # measured: 11.7 dB -> 15.2 dB (L1 0.43 -> 0.29) after 60 steps
    assert after["psnr"].mean() > before["psnr"].mean() + 2.0, (before.mean(), after.mean())
    assert after["ssim"].mean() > before["ssim"].mean(), (before.mean(), after.mean())
    error_after = round_trip_error(vae, held_out)
    assert error_after < 0.8 * error_before, (error_before, error_after)
    summary = reconstruction_summary(after)
    assert summary["images"] == 16
    assert summary["psnr_mean"] == pytest.approx(after["psnr"].mean())


def test_encode_and_decode_batch_and_convert_consistently(trained, tiles):
    _, vae = trained
    images = tiles[1]
    latents = encode(vae, images)
    assert latents.dtype == torch.float32 and latents.device.type == "cpu"
    # uint8 and [-1, 1] input agree, and the batch size changes nothing
    torch.testing.assert_close(encode(vae, to_model_range(images), batch_size=5), latents)
    decoded = decode(vae, latents, batch_size=3)
    torch.testing.assert_close(decoded, decode(vae, latents))
    assert decoded.dtype == torch.float32 and decoded.device.type == "cpu"
    assert decoded.min() >= -1 and decoded.max() <= 1
    # a decoder's raw output beyond [-1, 1] comes back clamped
    assert decode(vae, latents * 50).abs().max() <= 1
    # with a generator: posterior samples, reproducible, around the mode
    drawn = encode(vae, images, generator=torch.Generator().manual_seed(3))
    again = encode(vae, images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, again) and not torch.equal(drawn, latents)


def test_the_scaling_factor_gives_unit_variance_latents(trained, tiles):
    vae = copy.deepcopy(trained[1])
    train, held_out = tiles
    unscaled = decode(vae, encode(vae, held_out))
    factor = latent_scaling_factor(vae, train, batch_size=7)
    assert factor != pytest.approx(1.0, abs=0.05)
    vae.register_to_config(scaling_factor=factor)
    assert float(encode(vae, train).std()) == pytest.approx(1.0, abs=1e-3)
    # the scale is undone on decoding: the round trip does not depend on it
    torch.testing.assert_close(decode(vae, encode(vae, held_out)), unscaled)


def test_the_loss_is_l1_plus_the_kl_per_pixel_value(trained, tiles):
    _, vae = trained
    model = AutoencoderForTraining(vae)
    images = to_model_range(tiles[0][:4])
    labels = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        plain = autoencoder_loss(model, images, labels, torch.Generator().manual_seed(1), 0.0)
        weighted = autoencoder_loss(model, images, labels, torch.Generator().manual_seed(1), 0.5)
        _, kl = model(images, torch.Generator().manual_seed(1))
    assert plain > 0 and kl.shape == (4,) and (kl > 0).all()
    torch.testing.assert_close(weighted - plain, 0.5 * kl.mean() / (3 * 16 * 16))


@pytest.mark.parametrize(("settings", "size", "message"), [
    (architecture(4, (8, 16, 16, 16)), 16,
     r"autoencoder\.model\.block_out_channels has 4 widths .*factor 4 needs 3"),
    (architecture(8, (8, 16, 16)), 32,
     r"autoencoder\.model\.block_out_channels has 3 widths .*factor 8 needs 4"),
    (architecture(4), 18, r"autoencoder\.model\.factor 4 does not divide the image size 18 px"),
    (architecture(8, (8, 8, 16, 16)), 20,
     r"autoencoder\.model\.factor 8 does not divide the image size 20 px"),
])
def test_a_bad_architecture_names_the_key(settings, size, message):
    with pytest.raises(ValueError, match=message):
        build_autoencoder(settings, size)


@pytest.fixture(scope="module")
def prepared_manifest(tmp_path_factory) -> Path:
    """A prepared synthetic dataset of two classes at 16 px (the two extreme stages)."""
    root = tmp_path_factory.mktemp("stage")
    generate_dataset(root / "raw", ["normal", "mild", "severe", "neoplastic"], 24, 16, seed=0)
    prepare_dataset(stage_dataset(stage_config()),
                    PrepareConfig("exclude", "upscale", "drop", 4), root / "raw/images",
                    root / "data", seed=0, threads=1)
    return root / "data" / "manifest.tsv"


def stage_config() -> dict:
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["datasets"] = {"toy": {"kind": "synthetic", "resolution": 16,
                               "classes": ["normal", "neoplastic"]}}
    raw.pop("downstream")  # its generative strategies would need transitions
    raw["autoencoder"] = {"model": architecture(),
                          "train": {"steps": 4, "checkpoint_every": 2, "batch_size": 8,
                                    "learning_rate": 1e-3},
                          "eval": {"reconstructions": 4}}
    return validate_config(raw)


def stage_dataset(config: dict) -> DatasetConfig:
    return DatasetConfig.from_dict("toy", config["datasets"]["toy"])


def stage_spec(config: dict) -> StageSpec:
    return StageSpec(stage_dataset(config), NoiseSchedule(**config["noise_schedule"]),
                     config["autoencoder"], config["seed"])


def test_the_stage_writes_a_loadable_autoencoder_and_resumes(prepared_manifest, tmp_path):
    from diffusers import AutoencoderKL

    config = stage_config()
    out = tmp_path / "autoencoder"
    train_autoencoder(stage_spec(config), prepared_manifest, out, tmp_path / "ckpt")
    vae = AutoencoderKL.from_pretrained(out / "vae")
    summary = json.loads((out / "reconstruction.json").read_text())
    assert vae.config.scaling_factor == summary["scaling_factor"] != 1.0
    assert summary["latent_shape"] == [3, 4, 4]
    assert list(encode(vae, torch.zeros(1, 3, 16, 16)).shape[1:]) == summary["latent_shape"]
    manifest = pd.read_csv(prepared_manifest, sep="\t", keep_default_na=False)
    val_ids = manifest.loc[manifest["split"] == "val", "id"].tolist()
    table = pd.read_csv(out / "reconstruction.tsv", sep="\t", keep_default_na=False)
    assert list(table.columns) == ["id", "psnr", "ssim"] and table["id"].tolist() == val_ids
    assert summary["images"] == len(val_ids) > 0
    assert summary["psnr_mean"] == pytest.approx(table["psnr"].mean())
    assert list(pd.read_csv(out / "train_log.csv")["step"]) == [1, 2, 3, 4]
    for name in ("reconstructions.png", "loss_curve.png", "training.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    assert json.loads((out / "training.json").read_text())["fingerprint"]["kl_weight"] == 1e-6

    # a rerun (e.g. after the outputs were deleted) finds the final checkpoint: no new steps
    again = train_autoencoder(stage_spec(config), prepared_manifest, out, tmp_path / "ckpt")
    assert again.resumed_from_step == 4 and len(again.log) == 4
    assert json.loads((out / "reconstruction.json").read_text()) == summary
    # another KL weight trains other weights: its checkpoints are not those
    config["autoencoder"]["kl_weight"] = 1e-3
    other = train_autoencoder(stage_spec(config), prepared_manifest, tmp_path / "other",
                              tmp_path / "ckpt")
    assert other.resumed_from_step == 0
