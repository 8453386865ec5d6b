"""The latent baselines (cellflow.latent): LDM and DiT in a tiny autoencoder's latent space.

16 px images, a KL-f4 autoencoder with 3 latent channels (4 x 4 x 3 latents), models of 20-64
channels and 1-2 layers. The autoencoder is trained here for a few seconds on flat images of
random brightness, so that its decoder shows brightness (a random one need not).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from PIL import Image

from cellflow import latent
from cellflow.checkpoint import list_checkpoints
from cellflow.diffusion import NoiseSchedule
from cellflow.latent import (
    DIT_SIZES,
    build_dit,
    build_ldm_unet,
    decode,
    encode,
    guided_latent_sample,
    latent_epsilon,
    latent_loss,
    load_dit,
    null_label,
    train_dit,
    train_ldm,
)
from cellflow.training import TrainConfig, train_model

SCHEDULE = NoiseSchedule()
SIZE = 16  # px; latents 4 x 4
# widths 20/40: GroupNorm of 4 groups (5 and 10 channels each, see CONDITIONING)
LDM_MODEL = {"block_out_channels": [20, 40], "layers_per_block": 1, "attention_levels": [1],
             "attention_head_dim": 20, "dropout": 0.0}
DIT_MODEL = {"size": "tiny", "patch_size": 2, "num_layers": None, "dropout": 0.0}
BUILD = {"ldm": lambda: build_ldm_unet(LDM_MODEL, 4, 3, 2),
         "dit": lambda: build_dit(DIT_MODEL, 4, 3, 2)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 16, 16), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=3,
                         norm_num_groups=8, sample_size=SIZE, scaling_factor=1.0)


def train_config(**overrides) -> TrainConfig:
    settings = dict(steps=200, batch_size=16, grad_accum_steps=1, learning_rate=3e-3,
                    weight_decay=0.0, warmup_steps=10, lr_schedule="constant_with_warmup",
                    grad_clip=1.0, ema_decay=0.99, mixed_precision="no", gpus=0,
                    runtime_minutes=5, checkpoint_every=1000, keep_checkpoints=2, augment=False)
    return TrainConfig.from_dict({**settings, **overrides})


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return trained_vae()


def trained_vae() -> AutoencoderKL:
    """Trained 120 steps (L1 reconstruction) on flat noisy images of random brightness; its
    scaling factor makes the latents of unit variance, as LDM's does."""
    model = tiny_vae()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(120):
        level = torch.rand(16, 1, 1, 1, generator=generator) * 1.8 - 0.9
        images = (level + 0.1 * torch.randn(16, 3, SIZE, SIZE, generator=generator)).clamp(-1, 1)
        posterior = model.encode(images).latent_dist
        reconstruction = model.decode(posterior.sample(generator=generator)).sample
        loss = (reconstruction - images).abs().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval().requires_grad_(False)
    latents = encode(model, dark_and_bright()[0].float() / 127.5 - 1, None)
    model.register_to_config(scaling_factor=float(1 / latents.std()))
    return model


def dark_and_bright(count: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 16, 16): class 0 dark (about 50 of 255), class 1 bright (about 205)."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(2).repeat_interleave(count // 2)
    levels = torch.where(labels == 0, 50.0, 205.0)[:, None, None, None]
    images = levels + 12 * torch.randn(count, 3, SIZE, SIZE, generator=generator)
    return images.round().clamp(0, 255).to(torch.uint8), labels


@pytest.fixture(scope="module")
def trained(vae, tmp_path_factory) -> dict[str, torch.nn.Module]:
    return train_both(vae, tmp_path_factory.mktemp("trained"))


def train_both(vae: AutoencoderKL, root: Path, **overrides) -> dict[str, torch.nn.Module]:
    """An LDM and a DiT trained 200 steps on dark vs bright (EMA weights), label dropout 0.1."""
    images, labels = dark_and_bright()
    scheduler = SCHEDULE.ddpm()
    models = {}
    for kind, build in BUILD.items():
        torch.manual_seed(0)
        result = train_model(
            build(), lambda m, x, y, g: latent_loss(m, vae, scheduler, x, y, g, 0.1),
            images, labels, train_config(**overrides), 0, root / kind, {"kind": kind})
        models[kind] = result.ema.eval()
    return models


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


# (share of samples nearer their own class's brightness, class-mean gap as a share of the
# real one). The tiny UNet conditions less sharply than the DiT; it needs several channels per
# GroupNorm group: at widths 16/32 (one channel per group) the norm removes each channel's mean,
# the very feature that tells a flat dark latent from a flat bright one, and only about 60 % of
# its samples follow their label after 200 steps.
CONDITIONING = {"ldm": (0.8, 0.6), "dit": (0.95, 0.8)}


@pytest.mark.parametrize("kind", ["ldm", "dit"])
def test_samples_follow_the_class_label(trained, vae, kind):
    labels = torch.tensor([0, 1]).repeat_interleave(32)
    images, evaluations = guided_latent_sample(trained[kind], vae, SCHEDULE, labels, 20, 1.0,
                                               torch.Generator().manual_seed(3))
    assert images.shape == (64, 3, SIZE, SIZE) and evaluations == 2 * 64 * 20
    assert images.min() >= -1 and images.max() <= 1
    level = brightness(images)
    real = brightness(decode(vae, encode(vae, dark_and_bright()[0].float() / 127.5 - 1,
                                         torch.Generator().manual_seed(0))))
    dark, bright = real[:16].mean(), real[16:].mean()
    assert bright - dark > 0.8  # the autoencoder shows the classes apart
    nearer_own = ((level - bright).abs() < (level - dark).abs()) == (labels == 1)
    share, gap = CONDITIONING[kind]
    assert nearer_own.float().mean() >= share, level.tolist()
    assert level[32:].mean() - level[:32].mean() > gap * (bright - dark), level.tolist()


@pytest.mark.parametrize("kind", ["ldm", "dit"])
def test_sampling_is_deterministic_under_a_seed(trained, vae, kind):
    labels = torch.tensor([0, 1, 1])

    def sample(seed: int) -> torch.Tensor:
        return guided_latent_sample(trained[kind], vae, SCHEDULE, labels, 5, 1.5,
                                    torch.Generator().manual_seed(seed))[0]

    first = sample(0)
    assert torch.equal(first, sample(0))
    assert (first - sample(1)).abs().max() > 1e-3


def plain_conditional_ddim(model, vae, labels, steps, generator):
    """Reference: DDIM eta = 0 with the conditional epsilon only, batch not doubled."""
    scheduler = SCHEDULE.ddim()
    scheduler.set_timesteps(steps)
    parameter = next(model.parameters())
    config = model.config
    z = torch.randn((len(labels), config.in_channels, config.sample_size, config.sample_size),
                    generator=generator).to(parameter.dtype)
    with torch.no_grad():
        for t in scheduler.timesteps:
            z = scheduler.step(latent_epsilon(model, z, t, labels), t, z, eta=0.0).prev_sample
    return decode(vae, z)


def with_null_row_changed(model):
    """A copy of ``model`` whose null-label embedding (only) is replaced."""
    changed = copy.deepcopy(model)
    null = null_label(model)
    tables = ([block.norm1.emb.class_embedder.embedding_table
               for block in changed.transformer_blocks]
              if isinstance(model, DiTTransformer2DModel) else [changed.class_embedding])
    with torch.no_grad():
        for table in tables:
            table.weight[null] += torch.randn(table.weight.shape[1],
                                              generator=torch.Generator().manual_seed(5),
                                              dtype=table.weight.dtype)
    return changed


@pytest.mark.parametrize("kind", ["ldm", "dit"])
def test_weight_zero_is_conditional_ddim_and_guidance_uses_the_null_class(trained, vae, kind):
    model, decoder = copy.deepcopy(trained[kind]).double(), copy.deepcopy(vae).double()
    labels = torch.tensor([0, 1, 0])

    def guided(network, weight):
        return guided_latent_sample(network, decoder, SCHEDULE, labels, 6, weight,
                                    torch.Generator().manual_seed(4))

    unguided, evaluations = guided(model, 0.0)
    assert evaluations == 2 * 3 * 6  # one call per step on the doubled batch
    reference = plain_conditional_ddim(model, decoder, labels, 6, torch.Generator().manual_seed(4))
    torch.testing.assert_close(unguided, reference, rtol=0, atol=1e-10)
    assert (guided(model, 2.0)[0] - unguided).abs().max() > 1e-3
    # the unconditional half reads the null row: changing it moves w > 0, never w = 0
    other = with_null_row_changed(model)
    torch.testing.assert_close(guided(other, 0.0)[0], unguided, rtol=0, atol=1e-10)
    assert (guided(other, 2.0)[0] - guided(model, 2.0)[0]).abs().max() > 1e-4


def perturbed_dit(seed: int = 0) -> DiTTransformer2DModel:
    """A tiny DiT with random weights everywhere (the DiT initialisation zeros the output)."""
    torch.manual_seed(seed)
    model = build_dit({**DIT_MODEL, "dropout": 0.0}, 4, 3, 2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    return model


def test_dit_sizes_initialisation_and_no_builtin_label_dropout(tmp_path):
    depth, hidden, heads = DIT_SIZES["tiny"]
    model = build_dit(DIT_MODEL, 4, 3, 2)
    assert (model.config.num_layers, model.inner_dim, model.config.num_attention_heads) == (
        depth, hidden, heads)
    assert model.config.in_channels == model.config.out_channels == 3
    assert build_dit({**DIT_MODEL, "num_layers": 1}, 4, 3, 2).config.num_layers == 1
    # DiT's adaLN-Zero initialisation: the untrained model predicts zero epsilon
    z = torch.randn(4, 3, 4, 4)
    assert torch.equal(latent_epsilon(model, z, 10, torch.tensor([0, 1, 2, 0])),
                       torch.zeros_like(z))
    # the null row exists; the label table has a row per class and one more
    assert null_label(model) == 2
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 3

    # in training mode (dropout 0) diffusers' own label dropout would change ~10 % of the rows
    def train_equals_eval(network) -> bool:
        z = torch.randn(128, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        t = torch.randint(0, 1000, (128,), generator=torch.Generator().manual_seed(1))
        labels = torch.randint(0, 2, (128,), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            trained_mode = latent_epsilon(network.train(), z, t, labels)
            evaluated = latent_epsilon(network.eval(), z, t, labels)
        return torch.equal(trained_mode, evaluated)

    network = perturbed_dit()
    assert train_equals_eval(network)
    network.save_pretrained(tmp_path / "dit")
    assert not train_equals_eval(DiTTransformer2DModel.from_pretrained(tmp_path / "dit"))
    assert train_equals_eval(load_dit(tmp_path / "dit"))


@pytest.mark.parametrize("kind", ["ldm", "dit"])
def test_label_dropout_is_seeded_and_picks_the_null_label(vae, kind):
    model = perturbed_dit() if kind == "dit" else BUILD["ldm"]()
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["class_labels"].clone()),
        with_kwargs=True)
    images = torch.rand(256, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.randint(0, 2, (256,), generator=torch.Generator().manual_seed(1))
    scheduler = SCHEDULE.ddpm()
    losses = [latent_loss(model, vae, scheduler, images, labels,
                          torch.Generator().manual_seed(seed), dropout).item()
              for seed, dropout in ((7, 0.5), (7, 0.5), (8, 0.5), (7, 0.0))]
    assert losses[0] == losses[1] and losses[0] != losses[2]
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
    dropped = seen[0] == 2
    assert 0.4 < dropped.float().mean() < 0.6
    assert torch.equal(seen[0][~dropped], labels[~dropped])
    assert not bool((seen[3] == 2).any())


@pytest.mark.parametrize("kind", ["ldm", "dit"])
def test_interrupted_latent_training_resumes_to_identical_parameters(vae, tmp_path, kind):
    images, labels = dark_and_bright()
    scheduler = SCHEDULE.ddpm()
    config = train_config(steps=6, batch_size=8, checkpoint_every=2, augment=True)

    def fresh(seed: int = 0):
        torch.manual_seed(seed)
        return BUILD[kind]()

    def loss(model, x, y, g):
        return latent_loss(model, vae, scheduler, x, y, g, 0.3)

    straight = train_model(fresh(), loss, images, labels, config, 7, tmp_path / "straight",
                           {"run": kind})
    calls = {"n": 0}

    def dies_in_step_five(model, x, y, g):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return loss(model, x, y, g)

    with pytest.raises(KeyboardInterrupt):
        train_model(fresh(), dies_in_step_five, images, labels, config, 7,
                    tmp_path / "resumed", {"run": kind})
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-0000002",
                                                                       "step-0000004"]
    resumed = train_model(fresh(seed=99), loss, images, labels, config, 7,
                          tmp_path / "resumed", {"run": kind})
    assert resumed.resumed_from_step == 4
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    pd.testing.assert_series_equal(straight.log["loss"], resumed.log["loss"])


def test_bad_configs_name_the_key(vae):
    with pytest.raises(ValueError, match=r"dit\.model\.patch_size 4 does not divide .* 6"):
        build_dit({**DIT_MODEL, "patch_size": 4}, 6, 3, 2)
    with pytest.raises(ValueError, match=r"dit\.model\.size 'XXL' .*known: S, B, L, XL, tiny"):
        build_dit({**DIT_MODEL, "size": "XXL"}, 4, 3, 2)
    with pytest.raises(ValueError, match=r"ldm\.model: sample_size 2 is not divisible by 2\*\*2"):
        build_ldm_unet({**LDM_MODEL, "block_out_channels": [16, 16, 32]}, 2, 3, 2)
    with pytest.raises(ValueError, match=r"ldm\.model: attention_levels \[3\]"):
        build_ldm_unet({**LDM_MODEL, "attention_levels": [3]}, 4, 3, 2)
    with pytest.raises(ValueError, match=r"datasets\.toy\.resolution 18 .* factor 4"):
        latent.latent_geometry(vae, 18, "toy")


def test_schema_defaults_build():
    from cellflow.config import validate_config

    config = validate_config({"datasets": {"toy": {"kind": "synthetic", "resolution": 32,
                                                   "classes": ["a", "b"]}}})
    unet = build_ldm_unet(config["ldm"]["model"], 8, 3, 2)
    assert unet.config.in_channels == unet.config.out_channels == 3
    assert unet.config.num_class_embeds == 3 and unet.config.sample_size == 8
    dit = build_dit(config["dit"]["model"], 8, 3, 2)  # DiT-S/2
    assert (dit.config.num_layers, dit.inner_dim, dit.config.patch_size) == (12, 384, 2)
    assert set(config["baselines"]["ldm"]) == {"per_class", "ddim_steps", "guidance_weight",
                                               "batch_size"}


def dataset_entry(classes: list[str]) -> dict:
    """A validated ``datasets.toy`` entry (the schema's defaults filled in)."""
    from cellflow.config import validate_config

    return validate_config({"datasets": {"toy": {"kind": "synthetic", "resolution": SIZE,
                                                 "classes": classes}}})["datasets"]["toy"]


# --- stages ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, object]:
    """A prepared synthetic dataset of two classes at 16 px, and its DatasetConfig."""
    from cellflow.config import DatasetConfig, PrepareConfig
    from cellflow.data import prepare_dataset
    from cellflow.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("stage")
    generate_dataset(root / "raw", ["normal", "neoplastic"], 12, SIZE, seed=0)
    dataset = DatasetConfig.from_dict("toy", dataset_entry(["normal", "neoplastic"]))
    prepare_dataset(dataset, PrepareConfig("exclude", "upscale", "drop", 4), root / "raw/images",
                    root / "data", seed=0, threads=1)
    return root / "data" / "manifest.tsv", dataset


def stage_settings(model: dict) -> dict:
    train = {**vars(train_config(steps=2, batch_size=4, checkpoint_every=1))}
    return {"model": model, "label_dropout": 0.1, "train": train,
            "samples": {"per_class": 2, "ddim_steps": 3, "guidance_weight": 1.0}}


def test_stages_write_loadable_folders_and_follow_the_autoencoder(prepared, tmp_path):
    from cellflow.stages import StageSpec

    manifest, dataset = prepared
    for seed, name in ((0, "ae_a"), (1, "ae_b")):
        tiny_vae(seed).save_pretrained(tmp_path / name / "vae")
    for kind, stage, model, cls in (("ldm", train_ldm, LDM_MODEL, UNet2DModel),
                                    ("dit", train_dit, DIT_MODEL, DiTTransformer2DModel)):
        spec = StageSpec(dataset, SCHEDULE, stage_settings(model), 0)
        out, checkpoints = tmp_path / kind, tmp_path / "ckpt" / kind
        stage(spec, manifest, tmp_path / "ae_a", out, checkpoints)
        network = cls.from_pretrained(out / "model")
        assert network.config.in_channels == 3 and network.config.sample_size == 4
        assert null_label(network) == 2
        assert DDPMScheduler.from_pretrained(out / "scheduler").config.num_train_timesteps == 1000
        description = json.loads((out / "model.json").read_text())
        assert description["kind"] == kind and description["latent_shape"] == [3, 4, 4]
        assert description["parameters"] == sum(p.numel() for p in network.parameters())
        for name in ("samples.png", "loss_curve.png", "train_log.csv"):
            assert (out / name).stat().st_size > 0
        training = json.loads((out / "training.json").read_text())
        assert training["steps"] == 2 and training["fingerprint"]["model"] == kind
        # another autoencoder: other checkpoints; the same one again: resumed, no new steps
        stage(spec, manifest, tmp_path / "ae_b", tmp_path / f"{kind}_b", checkpoints)
        assert len(list(checkpoints.iterdir())) == 2
        again = stage(spec, manifest, tmp_path / "ae_a", out, checkpoints)
        assert again.resumed_from_step == 2 and len(again.log) == 2
        digests = {json.loads((folder / "training.json").read_text())["fingerprint"][
            "autoencoder_sha256"] for folder in (out, tmp_path / f"{kind}_b")}
        assert len(digests) == 2


# --- generation ------------------------------------------------------------------------------

def generation_job(kind: str, models: dict, out: Path, work: Path | None = None):
    from cellflow.config import DatasetConfig
    from cellflow.generation.common import GenerationJob

    dataset = DatasetConfig.from_dict("toy", dataset_entry(["dark", "bright"]))
    settings = {"per_class": 3, "ddim_steps": 4, "guidance_weight": 1.5, "batch_size": 2}
    return GenerationJob(dataset, SCHEDULE, {}, settings, 0, Path("unused.tsv"), models, out,
                         work)


@pytest.fixture(scope="module")
def model_folders(trained, vae, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    vae.save_pretrained(root / "autoencoder" / "vae")
    for kind, model in trained.items():
        model.save_pretrained(root / kind / "model")
    return {"autoencoder": root / "autoencoder", **{kind: root / kind for kind in trained}}


@pytest.mark.parametrize("kind", ["ldm", "dit"])
def test_generation_writes_the_manifest_and_resumes_to_identical_outputs(
        model_folders, tmp_path, monkeypatch, kind):
    import importlib

    from cellflow.generation.common import MANIFEST_COLUMNS

    run = importlib.import_module(f"cellflow.generation.{kind}").run
    straight = tmp_path / "straight"
    table = run(generation_job(kind, model_folders, straight))
    on_disk = pd.read_csv(straight / "manifest.tsv", sep="\t")
    assert list(on_disk.columns) == MANIFEST_COLUMNS and len(on_disk) == len(table) == 3 * 2
    assert set(on_disk["method"]) == {kind}
    assert list(on_disk["source_id"]) == [f"{kind}_{name}_{i:04d}" for name in ("dark", "bright")
                                          for i in range(3)]
    assert (on_disk["source_class"] == on_disk["target_class"]).all()
    assert list(on_disk["target_label"]) == [0, 0, 0, 1, 1, 1]
    assert set(on_disk["frame_index"]) == {1} and set(on_disk["soft_label_weight"]) == {1.0}
    assert set(on_disk["stair"]) == {4} and set(on_disk["timestep"]) == {1000}
    assert all((straight / path).is_file() for path in on_disk["path"])
    pixels = np.stack([np.asarray(Image.open(straight / path))
                       for path in on_disk["path"]])
    assert pixels.shape == (6, SIZE, SIZE, 3)
    assert pixels[3:].mean() > pixels[:3].mean() + 40  # bright above dark
    summary = json.loads((straight / "generation.json").read_text())
    assert summary["outputs"] == 6 and summary["model_evaluations"] == 2 * 4 * 6
    assert summary["model_calls"] == 4 * 4  # 4 batches (2 + 1 per class) x 4 steps

    sample = latent.guided_latent_sample
    calls = {"n": 0}

    def killed_in_the_second_batch(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return sample(*args)

    monkeypatch.setattr(latent, "guided_latent_sample", killed_in_the_second_batch)
    work, out = tmp_path / "work", tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(generation_job(kind, model_folders, out, work))
    assert not out.exists() and len(list(work.rglob("*.npz"))) == 1
    calls["n"] = 10
    run(generation_job(kind, model_folders, out, work))
    assert calls["n"] == 10 + 3  # only the three batches not stored are computed
    assert not work.exists()
    assert json.loads((out / "generation.json").read_text())["batches_resumed"] == 1
    pd.testing.assert_frame_equal(pd.read_csv(out / "manifest.tsv", sep="\t"), on_disk)
    for path in on_disk["path"]:
        assert (out / path).read_bytes() == (straight / path).read_bytes()
