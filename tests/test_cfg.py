"""Classifier-free guidance (the cellflow_cfg method), label dropout, and a second UNet that
decodes (the upstream's hybrid attention)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from cellflow.bridge import BridgeConfig, EvaluationCounter, StairBridge
from cellflow.classifier import NoiseAwareClassifier
from cellflow.diffusion import NoiseSchedule, UNetArchitecture, build_unet, epsilon_loss

SCHEDULE = NoiseSchedule()
SIZE = 32
TINY = UNetArchitecture((16, 32), 1, (1,), 16)


def config(**overrides) -> BridgeConfig:
    values = dict(inversion_steps=10, frames=3, classifier_scale=0.0, max_rows_per_call=64)
    return BridgeConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def null_class_unet():
    """Three classes and the null class; its null row differs from every class row."""
    torch.manual_seed(0)
    return build_unet(TINY, SIZE, 3, null_class=True).double().eval()


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(1)
    return NoiseAwareClassifier(sample_size=SIZE, num_classes=3, block_out_channels=(16, 32),
                                layers_per_block=1, attention_levels=(1,), attention_head_dim=16,
                                norm_num_groups=16).double().eval()


def images(count: int = 2) -> torch.Tensor:
    return 0.5 * torch.randn(count, 3, SIZE, SIZE, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(2))


def test_weight_zero_is_plain_conditional_ddim_at_twice_the_evaluations(null_class_unet):
    labels = torch.tensor([0, 2])
    plain = StairBridge(null_class_unet, None, SCHEDULE, config())
    free = StairBridge(null_class_unet, None, SCHEDULE, config(guidance="free", cfg_weight=0.0))
    counted = {}
    for name, bridge in (("plain", plain), ("free", free)):
        counter = EvaluationCounter()
        latents, _ = bridge.invert(images(), labels, counter)
        decoded = bridge.decode(latents[7], [7, 7], labels, 0.0, counter)
        counted[name] = (latents[-1], decoded, counter)
    torch.testing.assert_close(counted["free"][0], counted["plain"][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(counted["free"][1], counted["plain"][1], rtol=0, atol=1e-10)
    # one UNet call per step on the doubled batch
    assert counted["free"][2].unet_calls == counted["plain"][2].unet_calls
    assert counted["free"][2].unet_evaluations == 2 * counted["plain"][2].unet_evaluations


def test_guidance_moves_along_conditional_minus_unconditional(null_class_unet):
    """eps = (1 + w) eps(x, y) - w eps(x, null): linear in w, so two weights fix the third."""
    x, labels = images(), torch.tensor([1, 1])

    @torch.no_grad()
    def epsilon(weight: float) -> torch.Tensor:
        bridge = StairBridge(null_class_unet, None, SCHEDULE,
                             config(guidance="free", cfg_weight=weight))
        return bridge._epsilon(x, 4, labels, EvaluationCounter(), null_class_unet)

    zero, one, reference = epsilon(0.0), epsilon(1.0), epsilon(1.8)
    assert float((one - zero).abs().max()) > 1e-4, "the null class must change epsilon"
    torch.testing.assert_close(reference, zero + 1.8 * (one - zero), rtol=0, atol=1e-10)


class ClassGaussianDenoiser(torch.nn.Module):
    """The exact epsilon of x0 ~ N(mu_y, 0.25 I), a class mean per label and the null class
    (label 3) at 0: a smooth, label-dependent flow whose DDIM round trip is known to close."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.alphas = SCHEDULE.ddpm().alphas_cumprod.double()
        self.means = torch.tensor([0.3, -0.3, 0.1, 0.0], dtype=torch.float64)
        self.config = SimpleNamespace(num_class_embeds=4)

    def forward(self, x, t, class_labels=None):
        a = self.alphas[int(t)]
        mean = self.means[class_labels].reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=(1 - a).sqrt() * (x - a.sqrt() * mean)
                               / (0.25 * a + 1 - a))

    def eval(self):
        return self


@pytest.mark.parametrize("weight", [0.0, 1.8])
def test_inversion_then_decoding_with_the_same_label_returns_the_image(weight):
    image = images()
    labels = torch.tensor([0, 1])
    bridge = StairBridge(ClassGaussianDenoiser(), None, SCHEDULE,
                         config(inversion_steps=1000, guidance="free", cfg_weight=weight))
    latents, _ = bridge.invert(image, labels, EvaluationCounter())
    back = bridge.decode(latents[600], [600, 600], labels, 0.0, EvaluationCounter())
    # the tolerance of the plain bridge's round trip (tests/test_bridge.py)
    assert float((back - image).abs().max()) < 0.02


def test_free_guidance_refuses_a_unet_without_the_null_class(classifier):
    torch.manual_seed(0)
    plain = build_unet(TINY, SIZE, 3).double()
    with pytest.raises(ValueError, match="null class: 4 label embeddings for 3 classes, it has 3"):
        StairBridge(plain, classifier, SCHEDULE, config(guidance="free"))
    with pytest.raises(ValueError, match="unknown guidance 'cfg'"):
        StairBridge(plain, classifier, SCHEDULE, config(guidance="cfg"))


def test_a_decoder_unet_decodes_while_the_first_inverts(null_class_unet):
    torch.manual_seed(5)
    other = build_unet(TINY, SIZE, 3, null_class=True).double().eval()
    labels = torch.tensor([0, 2])
    hybrid = StairBridge(null_class_unet, None, SCHEDULE, config(), decoder=other)
    single = StairBridge(null_class_unet, None, SCHEDULE, config())
    second = StairBridge(other, None, SCHEDULE, config())
    latents, _ = hybrid.invert(images(), labels, EvaluationCounter())
    torch.testing.assert_close(latents[-1], single.invert(images(), labels,
                                                          EvaluationCounter())[0][-1])
    decoded = hybrid.decode(latents[5], [5, 5], labels, 0.0, EvaluationCounter())
    torch.testing.assert_close(decoded, second.decode(latents[5], [5, 5], labels, 0.0,
                                                      EvaluationCounter()))
    assert float((decoded - single.decode(latents[5], [5, 5], labels, 0.0,
                                          EvaluationCounter())).abs().max()) > 1e-3


def test_label_dropout_trains_the_null_row_at_the_given_rate():
    torch.manual_seed(0)
    unet = build_unet(TINY, 16, 2, null_class=True)
    seen = []
    original = unet.forward

    def spy(sample, timestep, class_labels=None, **kwargs):
        seen.append(class_labels.clone())
        return original(sample, timestep, class_labels=class_labels, **kwargs)

    unet.forward = spy
    batch = torch.zeros(4000, 3, 16, 16)
    labels = torch.randint(0, 2, (4000,), generator=torch.Generator().manual_seed(1))
    epsilon_loss(unet, SCHEDULE.ddpm(), batch[:2000], labels[:2000],
                 torch.Generator().manual_seed(2), label_dropout=0.2)
    share = float((seen[0] == 2).double().mean())
    assert 0.17 < share < 0.23, share  # 2000 draws: 0.2 +- 4.7 standard errors
    # without dropout the null class is never seen, and the draws of the noise are unchanged
    epsilon_loss(unet, SCHEDULE.ddpm(), batch[:8], labels[:8], torch.Generator().manual_seed(2))
    assert not bool((seen[1] == 2).any())


def test_cellflow_cfg_generation_writes_the_common_manifest(null_class_unet, classifier,
                                                            tmp_path):
    from cellflow.config import DatasetConfig, PrepareConfig, validate_config
    from cellflow.data import prepare_dataset
    from cellflow.generation import job_settings, method
    from cellflow.generation.common import MANIFEST_COLUMNS, GenerationJob
    from cellflow.synthetic import generate_dataset

    null_class_unet.save_pretrained(tmp_path / "diffusion" / "unet")
    classifier.save_pretrained(tmp_path / "classifier" / "classifier")
    full = validate_config({
        "datasets": {"toy": {"kind": "synthetic", "resolution": SIZE, "classes": ["a", "b", "c"],
                             "transitions": [{"source": "a", "target": "c"}]}},
        "diffusion": {"label_dropout": 0.1},
        "generation": {"methods": ["cellflow", "cellflow_cfg"]},
        "bridge": {"inversion_steps": 10, "frames": 3, "batch_size": 2,
                   "sources_per_transition": 2, "strip_sources": 1}})
    dataset = DatasetConfig.from_dict("toy", full["datasets"]["toy"])
    generate_dataset(tmp_path / "raw", ["a", "b", "c"], 6, SIZE, seed=0)
    prepare_dataset(dataset, PrepareConfig("exclude", "upscale", "drop", 4),
                    tmp_path / "raw" / "images", tmp_path / "data", seed=0, threads=1)
    settings = job_settings("cellflow_cfg", full)
    assert settings["method"] == {"weight": 1.8}
    out = tmp_path / "out"
    table = method("cellflow_cfg").run(GenerationJob(
        dataset, SCHEDULE, settings["bridge"], settings["method"], 0,
        tmp_path / "data" / "manifest.tsv",
        {"diffusion": tmp_path / "diffusion", "classifier": tmp_path / "classifier"}, out))
    on_disk = pd.read_csv(out / "manifest.tsv", sep="\t")
    assert list(on_disk.columns) == MANIFEST_COLUMNS and len(on_disk) == len(table) == 2 * 3
    assert set(on_disk["method"]) == {"cellflow_cfg"}
    summary = json.loads((out / "generation.json").read_text())
    assert summary["bridge"]["guidance"] == "free" and summary["bridge"]["cfg_weight"] == 1.8
    assert summary["classifier_evaluations"] == 0  # the classifier never guides
    assert all((out / path).is_file() for path in on_disk["path"])
    assert (out / "strips" / "a-to-c.png").is_file()
