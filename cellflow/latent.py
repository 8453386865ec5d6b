"""The latent generative baselines: LDM (Rombach et al. 2022) and DiT (Peebles & Xie 2023).

Both are class-conditional epsilon-prediction diffusion models in the latent space of the
dataset's autoencoder (a diffusers ``AutoencoderKL`` in ``<autoencoder>/vae/``), trained with
the shared loop (:func:`cellflow.training.train_model`) and sampled with deterministic DDIM and
classifier-free guidance, then decoded to images:

* LDM: the ADM-style ``UNet2DModel`` of :func:`cellflow.diffusion.build_unet` on latents
  (``channels`` = the autoencoder's latent channels), with a null class;
* DiT: diffusers' ``DiTTransformer2DModel`` (adaLN-Zero blocks) with the paper's sizes
  (:data:`DIT_SIZES`) and its weight initialisation (zero adaLN modulation and output layer).

The latents are ``encode(x).latent_dist.sample() * scaling_factor``; images are
``decode(z / scaling_factor)`` clamped to [-1, 1]. Label dropout (the unconditional epsilon of
classifier-free guidance) is explicit and drawn from the step's seeded generator: the null label
is ``num_classes`` for both models. diffusers' DiT drops labels by itself in training mode
(``LabelEmbedding.token_drop``, 10 % with the global RNG, independently in every block); that
is switched off here (``dropout_prob = 0``), after building and after loading, so that only the
seeded dropout runs. The null row of its label table exists all the same: diffusers builds it
whenever the table is created with a dropout probability above 0, which its blocks always do.

Guidance follows the project's convention eps = (1 + w) eps(z, y) - w eps(z, null) (w = 0:
plain conditional DDIM; diffusers' ``guidance_scale`` is 1 + w), one model call per DDIM step
on the doubled batch.

Stage outputs (``train_ldm`` / ``train_dit``), in ``out_dir``: ``model/`` (EMA weights,
``save_pretrained``), ``scheduler/``, ``samples.png``, ``model.json`` and the common
``train_log.csv``, ``loss_curve.png``, ``training.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from cellflow.data import load_split
from cellflow.diffusion import NoiseSchedule, UNetArchitecture, build_unet
from cellflow.figures import save_sample_grid
from cellflow.generation.common import MANIFEST_COLUMNS, GenerationJob, to_uint8
from cellflow.io import save_png, staged_directory, write_table, write_text
from cellflow.resume import BatchStore, folder_digest
from cellflow.stages import StageSpec, _write_common, checkpoint_folder, require_finite
from cellflow.training import TrainConfig, TrainResult, train_model

log = logging.getLogger(__name__)

Kind = Literal["ldm", "dit"]
LatentModel = UNet2DModel | DiTTransformer2DModel

# DiT sizes of Peebles & Xie 2023, Table 1: (depth, hidden size, heads); tiny for the demo.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "tiny": (2, 64, 2),
}


# Raised whenever the code builds another network from the same ldm/dit config.
LATENT_REVISION = 1


# --- models ----------------------------------------------------------------------------------

def build_ldm_unet(model: Mapping[str, Any], latent_size: int, latent_channels: int,
                   num_classes: int) -> UNet2DModel:
    """The LDM's UNet (an ``ldm.model`` section) on ``latent_channels`` x ``latent_size``^2
    latents, with the null class ``num_classes`` of classifier-free guidance."""
    try:
        return build_unet(UNetArchitecture.from_dict(model), latent_size, num_classes,
                          null_class=True, channels=latent_channels)
    except ValueError as err:
        raise ValueError(f"ldm.model: {err} (latents of {latent_size} x {latent_size})") from err


def build_dit(model: Mapping[str, Any], latent_size: int, latent_channels: int,
              num_classes: int) -> DiTTransformer2DModel:
    """A DiT (a ``dit.model`` section: size, patch_size, num_layers, dropout) on
    ``latent_channels`` x ``latent_size``^2 latents; label ``num_classes`` is the null class."""
    size = model.get("size", "S")
    if size not in DIT_SIZES:
        raise ValueError(f"dit.model.size '{size}' is not a DiT size "
                         f"(known: {', '.join(DIT_SIZES)})")
    depth, hidden, heads = DIT_SIZES[size]
    patch = model.get("patch_size", 2)
    if latent_size % patch:
        raise ValueError(f"dit.model.patch_size {patch} does not divide the latent size "
                         f"{latent_size} (dataset resolution / autoencoder factor)")
    dit = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=latent_channels,
        out_channels=latent_channels,  # epsilon only: no learned sigma
        num_layers=model.get("num_layers") or depth,
        dropout=model.get("dropout", 0.0),
        sample_size=latent_size,
        patch_size=patch,
        num_embeds_ada_norm=num_classes,
    )
    initialize_dit(dit)
    disable_builtin_label_dropout(dit)
    return dit


@torch.no_grad()
def initialize_dit(dit: DiTTransformer2DModel) -> None:
    """DiT's ``initialize_weights`` on diffusers' modules: Xavier-uniform linear layers and
    patch projection, N(0, 0.02) label and timestep embeddings, zero adaLN modulation in every
    block and in the output layer, and a zero output projection (each block starts as the
    identity)."""
    for module in dit.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    projection = dit.pos_embed.proj
    torch.nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
    torch.nn.init.zeros_(projection.bias)
    for block in dit.transformer_blocks:
        embedding = block.norm1.emb
        torch.nn.init.normal_(embedding.class_embedder.embedding_table.weight, std=0.02)
        torch.nn.init.normal_(embedding.timestep_embedder.linear_1.weight, std=0.02)
        torch.nn.init.normal_(embedding.timestep_embedder.linear_2.weight, std=0.02)
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    for layer in (dit.proj_out_1, dit.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def disable_builtin_label_dropout(dit: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Stop diffusers' own label dropout (its ``LabelEmbedding`` drops 10 % of the labels with
    the global RNG in training mode); the null row of the table stays."""
    for module in dit.modules():
        if hasattr(module, "token_drop") and hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0
    return dit


def load_ldm(folder: Path) -> UNet2DModel:
    return UNet2DModel.from_pretrained(folder)


def load_dit(folder: Path) -> DiTTransformer2DModel:
    return disable_builtin_label_dropout(DiTTransformer2DModel.from_pretrained(folder))


def load_vae(autoencoder_dir: Path) -> AutoencoderKL:
    """The autoencoder of ``autoencoder_dir`` (its ``vae/`` folder), frozen, in eval mode."""
    vae = AutoencoderKL.from_pretrained(Path(autoencoder_dir) / "vae").eval()
    vae.requires_grad_(False)
    return vae


def autoencoder_factor(vae: AutoencoderKL) -> int:
    """How much the autoencoder shrinks each side: 2 per level after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_geometry(vae: AutoencoderKL, resolution: int, dataset: str = "") -> tuple[int, int]:
    """(latent size, latent channels) of ``resolution`` px images."""
    factor = autoencoder_factor(vae)
    if resolution % factor:
        raise ValueError(f"datasets.{dataset or '<name>'}.resolution {resolution} is not "
                         f"divisible by the autoencoder's factor {factor}")
    return resolution // factor, vae.config.latent_channels


def latent_shape(model: LatentModel) -> tuple[int, int, int]:
    """(channels, size, size) of the latents ``model`` denoises."""
    size = model.config.sample_size
    return model.config.in_channels, size, size


def null_label(model: LatentModel) -> int:
    """The null (unconditional) label: ``num_classes``, the last row of the label table."""
    if isinstance(model, DiTTransformer2DModel):
        return model.config.num_embeds_ada_norm
    return model.config.num_class_embeds - 1


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# --- loss and sampling -----------------------------------------------------------------------

def latent_epsilon(model: LatentModel, z: torch.Tensor, t: torch.Tensor | int,
                   labels: torch.Tensor) -> torch.Tensor:
    """The predicted epsilon of latents ``z`` at timestep(s) ``t`` (a scalar is broadcast:
    diffusers' DiT embeds a (B,) tensor only)."""
    t = torch.as_tensor(t, device=z.device)
    if t.ndim == 0:
        t = t.expand(z.shape[0])
    if isinstance(model, DiTTransformer2DModel):
        return model(hidden_states=z, timestep=t, class_labels=labels).sample
    return model(z, t, class_labels=labels).sample[:, :z.shape[1]]


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None
           ) -> torch.Tensor:
    """Scaled latents of images in [-1, 1], sampled from the posterior with ``generator``."""
    posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return posterior.sample(generator=generator) * vae.config.scaling_factor


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] of scaled latents."""
    latents = latents.to(vae.device, vae.dtype)
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


def latent_loss(model: LatentModel, vae: AutoencoderKL, scheduler: DDPMScheduler,
                images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                label_dropout: float = 0.0) -> torch.Tensor:
    """Epsilon MSE on the latents of ``images`` (in [-1, 1]) at t ~ U{0..T-1}.

    Every draw comes from ``generator``, in this order: the posterior sample of the encoding,
    t, the noise, and which labels become the null class (probability ``label_dropout``).
    """
    parameter = next(model.parameters())
    latents = encode(vae, images, generator).to(parameter.device, parameter.dtype)
    batch = latents.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,),
                              generator=generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    labels = labels.to(latents.device)
    if label_dropout:
        dropped = (torch.rand(batch, generator=generator) < label_dropout).to(latents.device)
        labels = torch.where(dropped, torch.full_like(labels, null_label(model)), labels)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return F.mse_loss(latent_epsilon(model, noisy, timesteps, labels).float(), noise.float())


@torch.no_grad()
def guided_latent_sample(model: LatentModel, vae: AutoencoderKL, schedule: NoiseSchedule,
                         labels: torch.Tensor, ddim_steps: int, guidance_weight: float,
                         generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Class-conditional DDIM (eta = 0) with classifier-free guidance, decoded.

    Returns images in [-1, 1], shape (len(labels), 3, H, W), and the number of model
    evaluations (images through the network: 2 x batch per step).
    """
    scheduler = schedule.ddim()
    scheduler.set_timesteps(ddim_steps)
    parameter = next(model.parameters())
    count = len(labels)
    z = torch.randn((count, *latent_shape(model)), generator=generator).to(
        parameter.device, parameter.dtype)
    labels = labels.to(parameter.device)
    both = torch.cat([labels, torch.full_like(labels, null_label(model))])
    evaluations = 0
    for t in scheduler.timesteps:
        conditional, unconditional = latent_epsilon(model, torch.cat([z, z]), t, both).chunk(2)
        epsilon = (1 + guidance_weight) * conditional - guidance_weight * unconditional
        z = scheduler.step(epsilon, t, z, eta=0.0).prev_sample
        evaluations += 2 * count
    return decode(vae, z), evaluations


# --- training stages -------------------------------------------------------------------------

def train_ldm(spec: StageSpec, manifest: Path, autoencoder_dir: Path, out_dir: Path,
              checkpoint_root: Path) -> TrainResult:
    """Train the LDM (``spec.settings``: the ``ldm`` section) on the autoencoder's latents."""
    return _train_latent("ldm", spec, manifest, autoencoder_dir, out_dir, checkpoint_root)


def train_dit(spec: StageSpec, manifest: Path, autoencoder_dir: Path, out_dir: Path,
              checkpoint_root: Path) -> TrainResult:
    """Train the DiT (``spec.settings``: the ``dit`` section) on the autoencoder's latents."""
    return _train_latent("dit", spec, manifest, autoencoder_dir, out_dir, checkpoint_root)


BUILDERS: dict[str, Callable[..., LatentModel]] = {"ldm": build_ldm_unet, "dit": build_dit}
LOADERS: dict[str, Callable[[Path], LatentModel]] = {"ldm": load_ldm, "dit": load_dit}


def latent_fingerprint(kind: Kind, spec: StageSpec, manifest: Path, autoencoder_dir: Path
                       ) -> dict[str, Any]:
    """The stage's fingerprint and the autoencoder's weights: a retrained autoencoder starts
    new checkpoints."""
    return {**spec.fingerprint(kind, manifest), "latent_revision": LATENT_REVISION,
            "autoencoder_sha256": folder_digest(Path(autoencoder_dir) / "vae")}


def _train_latent(kind: Kind, spec: StageSpec, manifest: Path, autoencoder_dir: Path,
                  out_dir: Path, checkpoint_root: Path) -> TrainResult:
    images, labels = load_split(manifest, "train")
    torch.manual_seed(spec.seed)
    vae = load_vae(autoencoder_dir)
    latent_size, channels = latent_geometry(vae, spec.dataset.resolution, spec.dataset.name)
    classes = list(spec.dataset.classes)
    model = BUILDERS[kind](spec.settings["model"], latent_size, channels, len(classes))
    label_dropout = spec.settings.get("label_dropout", 0.0)
    if not label_dropout:
        log.warning("%s.label_dropout is 0: the null class is never trained, so classifier-free "
                    "guidance (guidance_weight > 0) reads an untrained label", kind)
    scheduler = spec.noise_schedule.ddpm()
    fingerprint = latent_fingerprint(kind, spec, manifest, autoencoder_dir)

    def loss(network, batch, batch_labels, generator):
        if vae.device != batch.device:
            vae.to(batch.device)
        return latent_loss(network, vae, scheduler, batch, batch_labels, generator,
                           label_dropout)

    result = train_model(
        model, loss, torch.from_numpy(images), torch.from_numpy(labels),
        TrainConfig.from_dict(spec.settings["train"]), spec.seed,
        checkpoint_folder(checkpoint_root, fingerprint), fingerprint,
        description=f"{kind} {spec.dataset.name}",
    )
    if not result.is_main_process:
        return result  # the main process samples and writes the outputs
    ema = result.ema.eval()
    require_finite(ema, f"{kind} model of {spec.dataset.name}")
    vae.to(next(ema.parameters()).device)
    grid = spec.settings["samples"]
    grid_labels = torch.arange(len(classes)).repeat_interleave(grid["per_class"])
    sampled, _ = guided_latent_sample(ema, vae, spec.noise_schedule, grid_labels,
                                      grid["ddim_steps"], grid["guidance_weight"],
                                      torch.Generator().manual_seed(spec.seed))
    description = {
        "kind": kind,
        "latent_shape": list(latent_shape(ema)),
        "parameters": parameter_count(ema),
        "null_label": null_label(ema),
        "autoencoder_factor": autoencoder_factor(vae),
        "scaling_factor": vae.config.scaling_factor,
        "image_resolution": spec.dataset.resolution,
    }
    with staged_directory(out_dir) as staging:
        ema.save_pretrained(staging / "model")
        scheduler.save_pretrained(staging / "scheduler")
        save_sample_grid(
            sampled, classes, staging / "samples.png",
            f"{spec.dataset.name}: {kind.upper()} samples, DDIM {grid['ddim_steps']} steps, "
            f"guidance w = {grid['guidance_weight']}, after {spec.settings['train']['steps']} "
            "training steps")
        write_text(staging / "model.json", json.dumps(description, indent=2))
        _write_common(staging, result, spec, fingerprint, kind)
    return result


# --- generation ------------------------------------------------------------------------------

def generate_latent(job: GenerationJob, kind: Kind,
                    load_model: Callable[[Path], LatentModel] | None = None) -> pd.DataFrame:
    """``per_class`` guided samples of every class (``job.settings``: the ``baselines.ldm`` or
    ``baselines.dit`` section), PNGs and ``manifest.tsv`` in ``job.out_dir``, hard labels.

    Each batch draws its noise from its own generator, seeded by (seed, class, first sample),
    and is kept in a :class:`~cellflow.resume.BatchStore` under ``job.work_dir``, so a resumed
    job's samples equal an uninterrupted job's. Manifest rows follow ADM's convention: frame 1,
    stair = ddim_steps (K), timestep = T (pure noise, where the sample started).
    """
    load_model = load_model or LOADERS[kind]
    settings = job.settings
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae_dir, model_dir = Path(job.models["autoencoder"]) / "vae", Path(job.models[kind]) / "model"
    vae = load_vae(vae_dir.parent).to(device)
    model = load_model(model_dir).to(device).eval()
    # per_class is not in the key: a batch's name holds its place (first sample, count), so
    # a job asked for more samples reuses the batches it has
    store = BatchStore(job.work_dir, {
        "method": kind, "settings": {key: value for key, value in sorted(settings.items())
                                     if key != "per_class"},
        "schedule": asdict(job.schedule), "seed": job.seed,
        "models": folder_digest(model_dir, vae_dir)}, job.sharding,
        total=len(job.dataset.classes) * -(-settings["per_class"] // settings["batch_size"]),
        desc=f"{kind} batches")
    per_class, batch_size = settings["per_class"], settings["batch_size"]
    rows: list[dict[str, Any]] = []
    evaluations = calls = 0
    started = time.perf_counter()

    def compute(labels: torch.Tensor, generator: torch.Generator) -> dict[str, np.ndarray]:
        images, used = guided_latent_sample(model, vae, job.schedule, labels,
                                            settings["ddim_steps"], settings["guidance_weight"],
                                            generator)
        return {"images": to_uint8(images.cpu()), "evaluations": np.array([used])}

    with staged_directory(job.out_dir) as staging:
        for label, name in enumerate(job.dataset.classes):
            for first in range(0, per_class, batch_size):
                count = min(batch_size, per_class - first)
                generator = torch.Generator().manual_seed(
                    int(np.random.SeedSequence([job.seed, label, first]).generate_state(1)[0]))
                result = store.get_or_compute(
                    f"{name}-{first:05d}-{count}",
                    partial(compute, torch.full((count,), label), generator))
                if result is None:
                    continue  # another shard's batch
                evaluations += int(result["evaluations"][0])
                calls += settings["ddim_steps"]
                for offset, image in enumerate(result["images"]):
                    sample_id = f"{kind}_{name}_{first + offset:04d}"
                    path = f"images/{name}/{sample_id}.png"
                    save_png(staging / path, image)
                    rows.append({
                        "method": kind, "source_id": sample_id, "source_class": name,
                        "target_class": name, "source_label": label, "target_label": label,
                        "frame_index": 1, "stair": settings["ddim_steps"],
                        "timestep": job.schedule.num_train_timesteps,
                        "soft_label_weight": 1.0, "path": path})
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        write_table(staging / "manifest.tsv", manifest)
        seconds = time.perf_counter() - started
        summary = {
            "method": kind,
            "settings": dict(settings),
            "noise_schedule": asdict(job.schedule),
            "outputs": len(rows),
            "seconds": round(seconds, 2),
            "model_evaluations": evaluations,  # latents through the LDM UNet / the DiT
            "model_calls": calls,  # batched forward calls (one per DDIM step and batch)
            "model_evaluations_per_output": evaluations / max(len(rows), 1),
            "decoder_evaluations": len(rows),  # images through the autoencoder's decoder
            "parameters": parameter_count(model),
            "latent_shape": list(latent_shape(model)),
            "batches_resumed": store.reused,
        }
        write_text(staging / "generation.json", json.dumps(summary, indent=2))
    store.clear()
    return manifest
