"""The training loop, checkpoints and the two training stages, on tiny models and data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cellflow.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_optimizer_state,
    load_weights,
    save_checkpoint,
    verify_checkpoint,
)
from cellflow.config import DatasetConfig, PrepareConfig, validate_config
from cellflow.data import prepare_dataset
from cellflow.diffusion import NoiseSchedule, UNetArchitecture, build_unet, epsilon_loss
from cellflow.stages import StageSpec, train_classifier, train_diffusion
from cellflow.synthetic import generate_dataset
from cellflow.training import TrainConfig, dihedral_augment, train_model

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = UNetArchitecture((16, 32), 1, (1,), 16)


class ArbitraryObject:
    """Anything but tensors and plain containers must not be unpickled from a checkpoint."""


def train_config(**overrides) -> TrainConfig:
    settings = dict(steps=6, batch_size=8, grad_accum_steps=1, learning_rate=1e-3,
                    weight_decay=0.0, warmup_steps=2, lr_schedule="constant_with_warmup",
                    grad_clip=1.0, ema_decay=0.99, mixed_precision="no", gpus=0,
                    runtime_minutes=5, checkpoint_every=2, keep_checkpoints=2, augment=True)
    settings.update(overrides)
    return TrainConfig.from_dict(settings)


@pytest.fixture(scope="module")
def tiles() -> tuple[torch.Tensor, torch.Tensor]:
    """32 synthetic 16-px tiles of two well-separated classes, as uint8 (N, 3, H, W)."""
    from cellflow.synthetic import render_tile

    rng = np.random.default_rng(0)
    images, labels = [], []
    for label, progression in ((0, 0.05), (1, 0.95)):
        for _ in range(16):
            images.append(render_tile(progression, 16, rng).image.transpose(2, 0, 1))
            labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def diffusion_loss():
    scheduler = NoiseSchedule().ddpm()
    return lambda model, x, y, g: epsilon_loss(model, scheduler, x, y, g)


def fresh_unet(seed: int = 0):
    torch.manual_seed(seed)
    return build_unet(TINY_UNET, 16, 2)


def test_diffusion_loss_goes_down(tiles, tmp_path):
    images, labels = tiles
    result = train_model(fresh_unet(), diffusion_loss(), images, labels,
                         train_config(steps=40, checkpoint_every=40, augment=False), 0,
                         tmp_path, {"test": 1})
    losses = result.log["loss"].to_numpy()
    assert len(losses) == 40
    assert losses[-10:].mean() < 0.6 * losses[:5].mean()


def test_interrupted_run_resumes_to_identical_parameters(tiles, tmp_path):
    images, labels = tiles
    config = train_config(steps=6, checkpoint_every=2, grad_accum_steps=2)
    straight = train_model(fresh_unet(), diffusion_loss(), images, labels, config, 7,
                           tmp_path / "straight", {"run": "a"})

    calls = {"n": 0}
    base = diffusion_loss()

    def dies_during_step_five(model, x, y, g):
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 1:  # first micro-batch of step 5 (2 micro-batches per step)
            raise KeyboardInterrupt("killed")
        return base(model, x, y, g)

    with pytest.raises(KeyboardInterrupt):
        train_model(fresh_unet(), dies_during_step_five, images, labels, config, 7,
                    tmp_path / "resumed", {"run": "a"})
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-0000002",
                                                                       "step-0000004"]
    # a new process would build a fresh model with other initial weights: they must not matter
    resumed = train_model(fresh_unet(seed=99), diffusion_loss(), images, labels, config, 7,
                          tmp_path / "resumed", {"run": "a"})
    assert resumed.resumed_from_step == 4
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    pd.testing.assert_series_equal(straight.log["loss"], resumed.log["loss"])


def test_same_seed_same_weights_other_seed_differs(tiles, tmp_path):
    images, labels = tiles
    config = train_config(steps=3, checkpoint_every=3)
    runs = [train_model(fresh_unet(), diffusion_loss(), images, labels, config, seed,
                        tmp_path / str(i), {"i": i}).model
            for i, seed in enumerate((1, 1, 2))]
    weights = [next(iter(m.state_dict().values())) for m in runs]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_checkpoint_round_trip(tmp_path):
    model = fresh_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 16, 16), 5, class_labels=torch.tensor([0, 1])).sample.sum().backward()
    optimizer.step()
    folder = save_checkpoint(tmp_path, 12, {"model": model.state_dict()},
                             optimizer.state_dict(), {"note": "x"})
    other = fresh_unet(seed=3)
    load_weights(other, folder / "model.safetensors")
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    state = load_optimizer_state(folder / "optimizer.pt")
    saved = optimizer.state_dict()["state"]
    assert all(torch.equal(saved[k]["exp_avg"], state["state"][k]["exp_avg"]) for k in saved)
    assert json.loads((folder / "state.json").read_text()) == {"note": "x", "step": 12}


def test_bad_checkpoints_name_the_file_and_the_problem(tmp_path):
    model = fresh_unet()
    folder = save_checkpoint(tmp_path, 1, {"model": model.state_dict()}, {"state": {}}, {})
    weights = folder / "model.safetensors"

    with pytest.raises(CheckpointError, match=r"nothing\.safetensors: missing"):
        load_weights(model, folder / "nothing.safetensors")

    bigger = build_unet(UNetArchitecture((16, 48), 1, (1,), 16), 16, 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not match the model: "
                                              r".*has shape \(32,"):
        load_weights(bigger, weights)
    three_classes = build_unet(TINY_UNET, 16, 3)
    with pytest.raises(CheckpointError, match="class_embedding.weight' has shape"):
        load_weights(three_classes, weights)

    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or truncated"):
        load_weights(model, weights)

    with (folder / "optimizer.pt").open("wb") as handle:
        pickle.dump({"state": ArbitraryObject()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: unreadable, truncated or not"):
        load_optimizer_state(folder / "optimizer.pt")


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_before_it(tiles, tmp_path):
    images, labels = tiles
    config = train_config(steps=6, checkpoint_every=2, keep_checkpoints=3)
    straight = train_model(fresh_unet(), diffusion_loss(), images, labels, config, 3,
                           tmp_path / "straight", {"run": "a"})
    four = train_config(steps=4, checkpoint_every=2, keep_checkpoints=3)
    train_model(fresh_unet(), diffusion_loss(), images, labels, four, 3, tmp_path / "hit",
                {"run": "a"})
    newest = list_checkpoints(tmp_path / "hit")[-1]
    assert newest.name == "step-0000004"
    # 4 KiB of random bytes inside the EMA weights: the safetensors file still parses
    ema = newest / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-5000:-904] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    ema.write_bytes(bytes(data))
    (tmp_path / "hit" / ".partial-step-0000006-123").mkdir()  # a save that never finished
    resumed = train_model(fresh_unet(), diffusion_loss(), images, labels, config, 3,
                          tmp_path / "hit", {"run": "a"})
    assert resumed.resumed_from_step == 2
    assert (tmp_path / "hit" / "corrupt-step-0000004").is_dir()
    assert not list((tmp_path / "hit").glob(".partial-step-*"))
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_checkpoint_verification_names_the_file(tmp_path):
    model = fresh_unet()
    folder = save_checkpoint(tmp_path, 1, {"model": model.state_dict()}, {"state": {}}, {})
    verify_checkpoint(folder)
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "step": 2}))
    with pytest.raises(CheckpointError, match=r"state\.json: checksum mismatch"):
        verify_checkpoint(folder)
    weights = model.state_dict()
    weights["conv_in.bias"] = torch.full_like(weights["conv_in.bias"], float("nan"))
    folder = save_checkpoint(tmp_path, 3, {"model": weights}, {"state": {}}, {})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: non-finite values in "
                                              r"\[conv_in\.bias\]"):
        verify_checkpoint(folder)


def test_a_failed_save_names_the_checkpoint_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    import cellflow.checkpoint as checkpoint

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2861312")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"step-0000005: writing the checkpoint failed "
                                              r"\(.*unexpected pos.*MiB free"):
        save_checkpoint(tmp_path, 5, {"model": fresh_unet().state_dict()}, {"state": {}}, {})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_of_another_configuration_is_refused(tiles, tmp_path):
    images, labels = tiles
    config = train_config(steps=2, checkpoint_every=2)
    train_model(fresh_unet(), diffusion_loss(), images, labels, config, 0, tmp_path,
                {"learning_rate": 1})
    with pytest.raises(CheckpointError, match=r"state\.json: written for another configuration "
                                              r"\(differs in: learning_rate\)"):
        train_model(fresh_unet(), diffusion_loss(), images, labels, config, 0, tmp_path,
                    {"learning_rate": 2})


def test_batch_size_must_split_over_accumulation(tiles, tmp_path):
    images, labels = tiles
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by grad_accum_steps"):
        train_model(fresh_unet(), diffusion_loss(), images, labels,
                    train_config(batch_size=6, grad_accum_steps=4), 0, tmp_path, {})


def test_dihedral_augment_permutes_pixels_only():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = dihedral_augment(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape
    for before, after in zip(images, out, strict=True):
        assert torch.equal(before.flatten().sort().values, after.flatten().sort().values)


@pytest.fixture(scope="module")
def prepared_manifest(tmp_path_factory) -> Path:
    """A prepared synthetic dataset of two well-separated classes at 16 px.

    Four stages are generated and the two extremes configured, so the classes differ clearly
    (the middle folders are ignored, as a config that picks a subset of classes would).
    """
    root = tmp_path_factory.mktemp("stage")
    generate_dataset(root / "raw", ["normal", "mild", "severe", "neoplastic"], 24, 16, seed=0)
    dataset = stage_dataset()
    prepare_dataset(dataset, PrepareConfig("exclude", "upscale", "drop", 4), root / "raw/images",
                    root / "data", seed=0, threads=1)
    return root / "data" / "manifest.tsv"


def stage_dataset() -> DatasetConfig:
    config = stage_config()
    return DatasetConfig.from_dict("toy", config["datasets"]["toy"])


def stage_config() -> dict:
    raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    raw["datasets"] = {"toy": {"kind": "synthetic", "resolution": 16,
                               "classes": ["normal", "neoplastic"]}}
    raw.pop("downstream")  # its generative strategies would need transitions
    for model in ("diffusion", "classifier"):
        raw[model]["model"].update(block_out_channels=[16, 32], attention_levels=[1],
                                   attention_head_dim=16)
        raw[model]["train"].update(steps=4, checkpoint_every=2, batch_size=8)
    raw["diffusion"]["samples"] = {"per_class": 2, "ddim_steps": 3}
    return validate_config(raw)


def stage_spec(config: dict, model: str) -> StageSpec:
    return StageSpec(stage_dataset(), NoiseSchedule(**config["noise_schedule"]), config[model],
                     config["seed"])


def test_diffusion_stage_writes_a_loadable_model(prepared_manifest, tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    config = stage_config()
    out = tmp_path / "diffusion"
    train_diffusion(stage_spec(config, "diffusion"), prepared_manifest, out, tmp_path / "ckpt")
    unet = UNet2DModel.from_pretrained(out / "unet")
    assert unet.config.num_class_embeds == 2 and unet.config.sample_size == 16
    assert DDPMScheduler.from_pretrained(out / "scheduler").config.num_train_timesteps == 1000
    assert list(pd.read_csv(out / "train_log.csv")["step"]) == [1, 2, 3, 4]
    for name in ("loss_curve.png", "samples.png", "training.json"):
        assert (out / name).stat().st_size > 0
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    # a rerun (e.g. after the outputs were deleted) finds the final checkpoint: no new steps
    again = train_diffusion(stage_spec(config, "diffusion"), prepared_manifest, out,
                            tmp_path / "ckpt")
    assert again.resumed_from_step == 4 and len(again.log) == 4


def test_classifier_beats_chance_at_small_t(prepared_manifest, tmp_path):
    config = stage_config()
    config["classifier"]["train"].update(steps=300, batch_size=16, learning_rate=1e-3,
                                         checkpoint_every=300)
    config["classifier"]["eval"] = {"bands": 4, "noise_draws": 8}
    _, table = train_classifier(stage_spec(config, "classifier"), prepared_manifest,
                                tmp_path / "classifier", tmp_path / "ckpt")
    assert list(table["t_start"]) == [0, 250, 500, 750]
    # Beats chance (2 classes) beyond what guessing reaches once in a thousand runs, and
    # knows more about nearly clean images than about nearly pure noise.
    from scipy.stats import binom

    guessing = binom.ppf(0.999, table.loc[0, "n"], 0.5) / table.loc[0, "n"]
    assert table.loc[0, "accuracy"] > guessing, table
    assert table.loc[0, "accuracy"] > table.loc[3, "accuracy"], table
    on_disk = pd.read_csv(tmp_path / "classifier" / "accuracy_by_t.tsv", sep="\t")
    pd.testing.assert_frame_equal(on_disk, table)
    assert (tmp_path / "classifier" / "classifier" / "config.json").is_file()


def test_non_finite_weights_are_never_exported():
    from cellflow.stages import require_finite

    model = fresh_unet()
    require_finite(model, "diffusion model of toy")
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="diffusion model of toy has non-finite weights "
                                                 "in conv_in.weight"):
        require_finite(model, "diffusion model of toy")


def test_training_data_digest_follows_the_data_not_where_it_was_read(prepared_manifest,
                                                                      tmp_path):
    import shutil

    from cellflow.stages import training_data_digest

    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(prepared_manifest.parent, moved)
    table = pd.read_csv(moved / "manifest.tsv", sep="\t", keep_default_na=False)
    table["source_path"] = "/another/place/" + table["source_path"].astype(str)
    table.to_csv(moved / "manifest.tsv", sep="\t", index=False)
    assert training_data_digest(moved / "manifest.tsv") == training_data_digest(prepared_manifest)
    first_train = table[table["split"] == "train"].sort_values("id").iloc[0]
    image = moved / first_train["path"]
    image.write_bytes(image.read_bytes()[:-1] + bytes([image.read_bytes()[-1] ^ 1]))
    assert training_data_digest(moved / "manifest.tsv") != training_data_digest(prepared_manifest)


def test_checkpoint_cadence_and_time_limits_keep_the_fingerprint(prepared_manifest):
    config = stage_config()
    spec = stage_spec(config, "diffusion")
    reference = spec.fingerprint("diffusion", prepared_manifest)
    for key, value in (("checkpoint_every", 1), ("keep_checkpoints", 5),
                       ("runtime_minutes", 600)):
        config["diffusion"]["train"][key] = value
    config["diffusion"]["samples"]["per_class"] = 9
    assert stage_spec(config, "diffusion").fingerprint("diffusion", prepared_manifest) == reference
    config["diffusion"]["train"]["learning_rate"] *= 2
    assert stage_spec(config, "diffusion").fingerprint("diffusion", prepared_manifest) != reference
