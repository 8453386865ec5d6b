"""Image-set and sequence metrics: FID/KID in a chosen feature space, and temporal coherence.

FID and KID are torchmetrics' implementations. The features are extracted once per image by a
:class:`FeatureSpace` and handed to torchmetrics through a pass-through module, so one forward
pass serves FID, KID and every per-class subset.

Two feature spaces, never mixed up: ``inception`` is the standard Inception-v3 pool3 space (its
weights come from a local file: nothing can be downloaded here); ``domain`` is the penultimate
layer of a network trained on the dataset's real images only. Column names carry the space
(``fid_inception``, ``fid_domain``), so one is never reported as the other.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from skimage.metrics import structural_similarity
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance

from cellflow.checkpoint import load_state_dict_file
from cellflow.downstream import create_backbone
from cellflow.io import atomic_path
from cellflow.training import to_model_range

log = logging.getLogger(__name__)

# torch-fidelity's conversion of the TF Inception graph that pytorch-fid and the FID literature use.
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")


class DomainFeatures(nn.Module):
    """Penultimate-layer features of a timm classifier, from uint8 (N, 3, H, W) images."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.num_features = int(backbone.num_features)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.forward_features(to_model_range(images))
        return self.backbone.forward_head(hidden, pre_logits=True).flatten(1)


def domain_feature_network(backbone: str, num_classes: int, resolution: int,
                           weights: Path) -> DomainFeatures:
    """The downstream network trained on real images only, as a feature extractor."""
    if not weights.is_file():
        raise FileNotFoundError(f"feature network weights not found: {weights}")
    model = create_backbone(backbone, num_classes, resolution)
    model.load_state_dict(load_file(str(weights)))
    return DomainFeatures(model)


def inception_feature_network(weights: Path) -> nn.Module:
    """Inception-v3 pool3 (2048-d) features, weights from a local file.

    torch-fidelity unpickles its weights file with ``weights_only=False``, which would run any
    code planted in it; so the file is read here with ``weights_only=True`` first, and the
    network gets a copy holding only those tensors.
    """
    if not weights.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {weights} (evaluation.inception_weights); "
            f"download {INCEPTION_WEIGHTS_URL} on a machine with network access")
    state = load_state_dict_file(weights, "evaluation.inception_weights")
    with tempfile.TemporaryDirectory(prefix="cellflow-inception-") as folder:
        tensors_only = Path(folder) / "weights.pth"
        torch.save(state, tensors_only)
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=str(tensors_only))


@dataclass(frozen=True)
class FeatureSpace:
    """A named feature extractor: ``name`` is the column suffix (``domain`` or ``inception``).

    With a ``cache`` folder (outside every job's declared outputs) the features of every chunk
    of ``chunk_size`` images are kept there, keyed by the network's ``weights_digest`` and the
    chunk's bytes: a killed or rerun evaluation job, every other job of the dataset that embeds
    the same images (the real training images, in each method's fidelity and memorization job)
    and the job that a sharded evaluation's shards computed for (:meth:`store_shard`) read them
    instead of running the network again.
    """

    name: str
    network: nn.Module
    description: str
    weights_digest: str = ""
    cache: Path | None = None

    # Images per cache file: a multiple of every batch size used, so chunking never changes the
    # batches the network sees, and a shard's chunks are the unsharded job's.
    chunk_size: int = 256

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 64,
                 device: torch.device | None = None) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float64 (N, d) on the CPU, chunk by chunk (each one read from
        the cache when a job, or a shard of one, stored it before)."""
        chunks = [self._chunk(images[first:first + self.chunk_size], batch_size, device)
                  for first in range(0, len(images), self.chunk_size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, 0, dtype=torch.float64)

    def store_shard(self, images: np.ndarray, shard: int, shards: int, batch_size: int = 64,
                    device: torch.device | None = None) -> int:
        """Compute and cache the chunks ``shard, shard + shards, ...`` of ``images``: one job's
        part of a sharded evaluation, which the evaluation job then reads. Returns the number
        of chunks."""
        if self.cache is None or not self.weights_digest:
            raise ValueError(f"{self.name} features: a sharded evaluation needs a feature cache")
        starts = range(shard * self.chunk_size, len(images), shards * self.chunk_size)
        for first in starts:
            self._chunk(images[first:first + self.chunk_size], batch_size, device)
        return len(starts)

    def _chunk(self, images: np.ndarray, batch_size: int, device: torch.device | None
               ) -> torch.Tensor:
        cached = self._cache_path(images)
        if cached is not None and cached.is_file():
            try:
                features = load_file(str(cached))["features"]
                if len(features) == len(images) and bool(torch.isfinite(features).all()):
                    return features
            except (SafetensorError, OSError, KeyError) as err:  # recomputed and replaced
                log.warning("ignoring the unreadable feature cache %s: %s", cached, err)
        device = device or torch.device("cpu")
        network = self.network.to(device)
        features = torch.cat([
            network(torch.from_numpy(images[first:first + batch_size]).to(device)).double().cpu()
            for first in range(0, len(images), batch_size)])
        if cached is not None:
            with atomic_path(cached) as temporary:
                save_file({"features": features.contiguous()}, str(temporary))
        return features

    def _cache_path(self, images: np.ndarray) -> Path | None:
        if self.cache is None or not self.weights_digest:
            return None
        digest = hashlib.sha256(self.weights_digest.encode())
        digest.update(str(images.shape).encode())
        digest.update(np.ascontiguousarray(images).tobytes())
        return Path(self.cache) / f"{self.name}-{digest.hexdigest()[:20]}.safetensors"


class _Precomputed(nn.Module):
    """Hands already extracted features to torchmetrics unchanged."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(real: torch.Tensor, generated: torch.Tensor, kid_subset_size: int,
            kid_subsets: int, seed: int) -> dict[str, float]:
    """FID and KID (mean, std over subsets) between two feature sets (N, d).

    KID subsets hold ``min(kid_subset_size, N_real, N_generated)`` samples, recorded in the result
    because KID's variance depends on it. Fewer than two samples on a side gives NaNs.
    """
    subset = min(kid_subset_size, len(real), len(generated))
    result = {"n_real": len(real), "n_generated": len(generated), "kid_subset_size": subset,
              "fid": float("nan"), "kid_mean": float("nan"), "kid_std": float("nan")}
    if subset < 2:
        return result
    extractor = _Precomputed(real.shape[1])
    fid = FrechetInceptionDistance(feature=extractor)
    with warnings.catch_warnings():
        # It warns that it buffers all features: these are already in memory, and small.
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        kid = KernelInceptionDistance(feature=extractor, subsets=kid_subsets,
                                      subset_size=subset)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(generated, real=False)
    # KID draws its subsets with torch's global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    result.update(fid=float(fid.compute()), kid_mean=float(kid_mean), kid_std=float(kid_std))
    return result


def consecutive_ssim(frames: Sequence[np.ndarray]) -> float:
    """Mean SSIM of each frame with the next: uint8 (H, W, 3) frames, higher = smoother."""
    if len(frames) < 2:
        raise ValueError(f"a sequence needs at least 2 frames, got {len(frames)}")
    side = min(frames[0].shape[:2])
    window = min(7, side if side % 2 else side - 1)
    return float(np.mean([
        structural_similarity(first, second, channel_axis=-1, data_range=255, win_size=window)
        for first, second in zip(frames[:-1], frames[1:], strict=True)]))


def second_difference(features: np.ndarray) -> float:
    """Mean norm of f[i+1] - 2 f[i] + f[i-1] over a (T, d) path: 0 for uniform straight motion."""
    if len(features) < 3:
        raise ValueError(f"second differences need at least 3 frames, got {len(features)}")
    return float(np.linalg.norm(np.diff(features, n=2, axis=0), axis=1).mean())


def shuffled_control(sequence: Sequence, statistic: Callable[[Sequence], float], draws: int,
                     rng: np.random.Generator) -> float:
    """Mean of ``statistic`` over ``draws`` random orders of the same frames (the null model)."""
    values = []
    for _ in range(draws):
        order = rng.permutation(len(sequence))
        values.append(statistic([sequence[i] for i in order] if isinstance(sequence, list)
                                else sequence[order]))
    return float(np.mean(values))
