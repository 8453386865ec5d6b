"""FID/KID in a feature space of our choosing, and the temporal-coherence measures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from cellflow.metrics import (
    FeatureSpace,
    consecutive_ssim,
    domain_feature_network,
    fid_kid,
    inception_feature_network,
    second_difference,
    shuffled_control,
)


def gaussian_features(seed: int, n: int = 300, d: int = 8, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator, dtype=torch.float64) + shift


def test_fid_kid_of_a_set_against_itself_is_near_zero_and_a_shift_is_far():
    real = gaussian_features(0)
    itself = fid_kid(real, real, kid_subset_size=100, kid_subsets=20, seed=0)
    same_law = fid_kid(real, gaussian_features(1), kid_subset_size=100, kid_subsets=20, seed=0)
    shifted = fid_kid(real, gaussian_features(1, shift=1.0), kid_subset_size=100,
                      kid_subsets=20, seed=0)
    assert itself["fid"] == pytest.approx(0.0, abs=1e-8)
    assert abs(itself["kid_mean"]) < 0.1 * shifted["kid_mean"]
    # a shift of 1 in each of 8 dimensions adds |mu|^2 = 8 to the FID
    assert shifted["fid"] == pytest.approx(same_law["fid"] + 8, rel=0.25)
    assert shifted["kid_mean"] > 10 * abs(same_law["kid_mean"])


def test_fid_grows_with_the_shift():
    real = gaussian_features(0)
    values = [fid_kid(real, gaussian_features(1, shift=s), 50, 10, 0)["fid"]
              for s in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values)


def test_kid_subset_is_capped_and_recorded_and_tiny_sets_give_nan():
    real, few = gaussian_features(0), gaussian_features(1, n=12)
    scores = fid_kid(real, few, kid_subset_size=1000, kid_subsets=5, seed=0)
    assert (scores["n_real"], scores["n_generated"], scores["kid_subset_size"]) == (300, 12, 12)
    single = fid_kid(real, few[:1], kid_subset_size=1000, kid_subsets=5, seed=0)
    assert np.isnan(single["fid"]) and np.isnan(single["kid_mean"])
    assert single["n_generated"] == 1


def test_kid_is_reproducible_under_a_seed():
    real, other = gaussian_features(0), gaussian_features(1, shift=0.3)
    first = fid_kid(real, other, 50, 10, seed=3)
    assert fid_kid(real, other, 50, 10, seed=3) == first
    assert fid_kid(real, other, 50, 10, seed=4)["kid_mean"] != first["kid_mean"]


def test_domain_features_come_from_the_trained_weights(tmp_path):
    model = timm.create_model("resnet10t", num_classes=3)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    network = domain_feature_network("resnet10t", 3, 32, weights)
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    features = FeatureSpace("domain", network, "test").features(images, batch_size=2)
    assert features.shape == (5, network.num_features) and features.dtype == torch.float64
    model.eval()
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(
            torch.from_numpy(images).float() / 127.5 - 1), pre_logits=True)
    torch.testing.assert_close(features.float(), expected)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        domain_feature_network("resnet10t", 3, 32, tmp_path / "missing.safetensors")


def test_inception_weights_load_from_a_local_file_only(tmp_path, monkeypatch):
    missing = tmp_path / "weights-inception.pth"
    with pytest.raises(FileNotFoundError, match="evaluation.inception_weights"):
        inception_feature_network(missing)
    # No real weights can be downloaded here: save a randomly initialised network in their
    # format and check that the local file, not a download, is what gets loaded.
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    monkeypatch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict",
                        lambda self, state, strict=True: None)
    random_net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    torch.save(random_net.state_dict(), missing)
    network = inception_feature_network(missing)
    reference = random_net.state_dict()
    for name, tensor in network.state_dict().items():
        torch.testing.assert_close(tensor, reference[name])
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    assert FeatureSpace("inception", network, "test").features(images).shape == (2, 2048)


class _Payload:
    """Unpickling this runs Path.touch: what a planted weights file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_as_inception_weights_is_refused_unrun(tmp_path):
    marker = tmp_path / "payload-ran"
    planted = tmp_path / "weights-inception.pth"
    torch.save({"conv.weight": torch.zeros(1), "extra": _Payload(marker)}, planted)
    with pytest.raises(ValueError, match="evaluation.inception_weights.*refused"):
        inception_feature_network(planted)
    assert not marker.exists()
    # the check is not vacuous: a plain unpickling of the same file runs the payload
    torch.load(planted, weights_only=False)
    assert marker.exists()


def test_weights_files_must_hold_named_tensors(tmp_path):
    from cellflow.checkpoint import load_state_dict_file

    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth \\(my.key\\): expected a state dict"):
        load_state_dict_file(tmp_path / "list.pth", "my.key")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="unreadable safetensors"):
        load_state_dict_file(tmp_path / "bad.safetensors", "my.key")
    with pytest.raises(FileNotFoundError, match="my.key"):
        load_state_dict_file(tmp_path / "absent.pth", "my.key")


def smooth_sequence(frames: int = 8, size: int = 32) -> list[np.ndarray]:
    """A bright disc sliding across a textured background, one pixel step per frame."""
    rng = np.random.default_rng(0)
    background = rng.integers(60, 120, (size, size, 3)).astype(np.float64)
    rows, columns = np.mgrid[:size, :size]
    sequence = []
    for index in range(frames):
        disc = (rows - size / 2) ** 2 + (columns - 6 - 2 * index) ** 2 < 25
        frame = background.copy()
        frame[disc] = [230, 120, 200]
        sequence.append(frame.astype(np.uint8))
    return sequence


def test_ssim_ranks_a_smooth_sequence_above_its_shuffled_copies():
    sequence = smooth_sequence()
    rng = np.random.default_rng(0)
    smooth = consecutive_ssim(sequence)
    assert smooth > shuffled_control(sequence, consecutive_ssim, 20, rng)
    assert consecutive_ssim([sequence[0], sequence[0]]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2 frames"):
        consecutive_ssim(sequence[:1])


def test_second_differences_vanish_on_straight_uniform_paths_and_grow_when_shuffled():
    straight = np.linspace(0, 1, 10)[:, None] * np.array([[1.0, -2.0, 0.5]])
    assert second_difference(straight) == pytest.approx(0.0, abs=1e-12)
    curved = np.stack([np.cos(np.linspace(0, 1, 10)), np.sin(np.linspace(0, 1, 10))], 1)
    rng = np.random.default_rng(0)
    assert second_difference(curved) < shuffled_control(curved, second_difference, 20, rng)
    with pytest.raises(ValueError, match="at least 3 frames"):
        second_difference(straight[:2])


class CountingNetwork(torch.nn.Module):
    """Mean colour per image as a 3-d feature, counting the images it has seen."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        return images.float().mean(dim=(2, 3))


def test_cached_features_are_read_back_instead_of_recomputed(tmp_path):
    network = CountingNetwork()
    space = FeatureSpace("domain", network, "test", weights_digest="abc", cache=tmp_path)
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    first = space.features(images)
    assert network.seen == 5 and len(list(tmp_path.glob("domain-*.safetensors"))) == 1
    assert torch.equal(space.features(images), first) and network.seen == 5
    space.features(images[:3])  # another image set: computed, cached beside
    assert network.seen == 8 and len(list(tmp_path.glob("domain-*.safetensors"))) == 2
    # other weights never read these features
    other = FeatureSpace("domain", network, "test", weights_digest="def", cache=tmp_path)
    other.features(images)
    assert network.seen == 13


def test_a_corrupt_feature_cache_is_recomputed(tmp_path):
    network = CountingNetwork()
    space = FeatureSpace("domain", network, "test", weights_digest="abc", cache=tmp_path)
    images = np.zeros((2, 3, 8, 8), np.uint8)
    expected = space.features(images)
    for path in tmp_path.glob("*.safetensors"):
        path.write_bytes(b"not a safetensors file")
    assert torch.equal(space.features(images), expected) and network.seen == 4
    assert torch.equal(space.features(images), expected) and network.seen == 4  # rewritten


def test_shards_store_the_chunks_that_the_whole_set_then_reads(tmp_path):
    network = CountingNetwork()
    space = FeatureSpace("domain", network, "test", weights_digest="abc", cache=tmp_path,
                         chunk_size=4)
    images = np.random.default_rng(1).integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    expected = FeatureSpace("domain", CountingNetwork(), "test").features(images)
    # chunks of 4 images: shard 0 of 2 computes chunks 0 and 2, shard 1 chunk 1
    assert [space.store_shard(images, shard, 2) for shard in (0, 1)] == [2, 1]
    assert network.seen == 10
    assert torch.equal(space.features(images), expected)
    assert network.seen == 10  # every chunk was read back
    with pytest.raises(ValueError, match="needs a feature cache"):
        FeatureSpace("domain", network, "test").store_shard(images, 0, 2)
