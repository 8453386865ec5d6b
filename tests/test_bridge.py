"""The stair bridge against the literal reference loop, its accounting, and its parts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.bridge_oracle import adaptive_list, measure, reference_trajectory
from cellflow.bridge import (
    BridgeConfig,
    RespacedSchedule,
    StairBridge,
    adaptive_stairs,
    fourier_measure,
    soft_label_weight,
    stairs_from_measures,
)
from cellflow.classifier import NoiseAwareClassifier
from cellflow.diffusion import NoiseSchedule, UNetArchitecture, build_unet

SCHEDULE = NoiseSchedule()
SIZE = 32


def bridge_config(**overrides) -> BridgeConfig:
    values = dict(inversion_steps=10, frames=4, classifier_scale=2.0, decode_start="faithful",
                  stair_mapping="mirror", max_rows_per_call=64)
    values.update(overrides)
    return BridgeConfig(**values)


@pytest.fixture(scope="module")
def models():
    """Tiny random models in float64: batched and single-image results then agree to ~1e-12,
    so any difference from the reference loop is in the algorithm, not in rounding."""
    torch.manual_seed(0)
    unet = build_unet(UNetArchitecture((16, 32), 1, (1,), 16), SIZE, 3).double().eval()
    classifier = NoiseAwareClassifier(sample_size=SIZE, num_classes=3, block_out_channels=(16, 32),
                                      layers_per_block=1, attention_levels=(1,),
                                      attention_head_dim=16, norm_num_groups=16).double().eval()
    return unet, classifier


@pytest.fixture(scope="module")
def sources() -> torch.Tensor:
    from cellflow.synthetic import render_tile

    rng = np.random.default_rng(1)
    tiles = [render_tile(p, SIZE, rng).image for p in (0.1, 0.2, 0.3)]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).double() / 127.5 - 1


def test_batched_frames_equal_the_reference_loop(models, sources):
    unet, classifier = models
    config = bridge_config()
    result = StairBridge(unet, classifier, SCHEDULE, config).trajectories(
        sources, torch.zeros(3, dtype=torch.long), torch.full((3,), 2))
    alphas = SCHEDULE.ddpm().alphas_cumprod
    for b in range(3):
        oracle = reference_trajectory(unet, classifier, alphas, sources[b:b + 1], 0, 2,
                                      steps=10, amount=4, scale=2.0)
        assert list(result.stairs[b]) == oracle.stairs
        np.testing.assert_allclose(result.measures[b], oracle.measures, rtol=1e-9)
        assert (result.frames[b] - oracle.frames).abs().max() < 1e-9 * oracle.frames.abs().max()
    assert result.frames.shape == (3, 4, 3, SIZE, SIZE)
    assert torch.isfinite(result.frames).all()


def test_evaluation_counts_follow_the_batched_schedule(models, sources):
    unet, classifier = models
    config = bridge_config(max_rows_per_call=5)
    result = StairBridge(unet, classifier, SCHEDULE, config).trajectories(
        sources, torch.zeros(3, dtype=torch.long), torch.full((3,), 1))
    k = config.inversion_steps
    assert result.counter.unet_evaluations == sum(k + int(s.sum()) for s in result.stairs)
    assert result.counter.classifier_evaluations == int(result.stairs.sum())
    assert result.counter.sequential_rounds == k + int(result.stairs.max())
    one = StairBridge(unet, classifier, SCHEDULE, config).trajectories(
        sources[:1], torch.zeros(1, dtype=torch.long), torch.full((1,), 1))
    oracle = reference_trajectory(unet, classifier, SCHEDULE.ddpm().alphas_cumprod,
                                  sources[:1], 0, 1, steps=10, amount=4)
    assert oracle.unet_evaluations == k + oracle.stairs[-1] + sum(oracle.stairs)
    assert one.counter.unet_evaluations == k + sum(oracle.stairs)
    # chunking the decode rows (5 per call) changes the calls, not the frames
    assert (one.frames[0] - result.frames[0]).abs().max() < 1e-9 * one.frames.abs().max()


def test_exact_decode_start_takes_one_more_step_per_stair(models, sources):
    unet, classifier = models
    config = bridge_config(decode_start="exact")
    result = StairBridge(unet, classifier, SCHEDULE, config).trajectories(
        sources[:2], torch.zeros(2, dtype=torch.long), torch.full((2,), 1))
    expected = sum(10 + int(s.sum()) + len(s) for s in result.stairs)
    assert result.counter.unet_evaluations == expected


class GaussianDenoiser(torch.nn.Module):
    """The exact epsilon of data x0 ~ N(0, 0.25 I): an ODE with a known, smooth flow."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.alphas = SCHEDULE.ddpm().alphas_cumprod

    def forward(self, x, t, class_labels=None):
        a = self.alphas[int(t)]
        return SimpleNamespace(sample=(1 - a).sqrt() / (0.25 * a + 1 - a) * x)


def test_inversion_then_exact_decoding_returns_the_image():
    """DDIM inversion and decoding are inverse discretisations of one ODE: the round trip
    error is first order in the step size, so ten times the steps cut it about tenfold."""
    image = 0.5 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(2, dtype=torch.long)
    errors = {}
    for steps in (100, 1000):
        bridge = StairBridge(GaussianDenoiser(), None, SCHEDULE,
                             bridge_config(inversion_steps=steps, classifier_scale=0.0))
        latents, _ = bridge.invert(image, labels, _counter())
        assert latents[0].equal(image)
        assert (latents[-1].std() - 1).abs() < 0.15, "x_K is pure noise"
        stair = steps * 6 // 10
        back = bridge.decode(latents[stair], [stair, stair], labels, 0.0, _counter())
        errors[steps] = float((back - image).abs().max())
    assert errors[1000] < 0.02 and errors[1000] < errors[100] / 5, errors


def _counter():
    from cellflow.bridge import EvaluationCounter

    return EvaluationCounter()


def test_fourier_measure_matches_numpy_reference():
    latents = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ours = fourier_measure(latents).numpy()
    theirs = np.array([measure(x) for x in latents])
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    # the statistic sees only the column-sum profile: a horizontal-only pattern moves it,
    # a pattern constant along each row (zero horizontal frequency) does not
    columns = torch.zeros(1, 3, 32, 32)
    columns[..., ::4] = 1.0
    rows = columns.transpose(-1, -2)
    assert fourier_measure(columns).item() > 0 and fourier_measure(rows).item() == 0


@pytest.mark.parametrize("seed", range(8))
def test_adaptive_stairs_match_the_reference_and_increase(seed):
    rng = np.random.default_rng(seed)
    curve = np.sort(rng.random(100)) + 0.05 * rng.random(100)
    stairs = adaptive_stairs(curve, 10)
    assert stairs == adaptive_list(list(curve), 10)
    assert all(1 <= s <= 99 for s in stairs) and stairs == sorted(set(stairs))


def test_adaptive_stairs_edge_cases():
    assert adaptive_stairs(np.full(100, 3.0), 10) == list(range(1, 11))
    # a flat zero curve never offers an index beyond the last pick: the reference fallback
    assert adaptive_stairs(np.zeros(100), 10) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 99]
    assert adaptive_list([0.0] * 100, 10) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 99]
    falling = np.linspace(1, 0, 100)
    assert adaptive_stairs(falling, 10) == adaptive_list(list(falling), 10)


def test_crossing_mapping_mirrors_and_sorts():
    curve = np.linspace(0, 1, 100) ** 2
    mirror, rule = stairs_from_measures(curve, bridge_config(inversion_steps=100, frames=5))
    crossing, _ = stairs_from_measures(curve, bridge_config(inversion_steps=100, frames=5,
                                                            stair_mapping="crossing"))
    assert crossing == sorted(100 - s for s in mirror)
    assert rule == "fourier"
    flat, rule = stairs_from_measures(np.zeros(100), bridge_config(inversion_steps=100, frames=5))
    assert rule == "fourier-fallback" and flat == [20, 40, 60, 80, 99]


def test_decoding_step_is_the_diffusers_ddim_step(models):
    unet, _ = models
    bridge = StairBridge(unet, None, SCHEDULE, bridge_config())
    scheduler = SCHEDULE.ddim()
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(2)
    x, epsilon = torch.randn(2, 3, 8, 8, generator=generator), torch.randn(2, 3, 8, 8)
    for level in (9, 4, 0):
        ours = bridge.ddim_step(x, epsilon, level, level - 1)
        theirs = scheduler.step(epsilon, level * 100, x, eta=0.0).prev_sample
        assert (ours - theirs).abs().max() < 1e-5 * max(1.0, float(theirs.abs().max()))


def test_respaced_schedule_levels():
    respaced = RespacedSchedule(SCHEDULE, 100)
    alphas = SCHEDULE.ddpm().alphas_cumprod
    assert respaced.timestep(99) == 990
    assert respaced.alpha(1) == pytest.approx(float(alphas[10]))
    assert respaced.alpha(100) == 0.0
    with pytest.raises(ValueError, match="inversion_steps 7 must divide"):
        RespacedSchedule(SCHEDULE, 7)


def test_soft_label_rules():
    linear = [soft_label_weight("linear", m, 10, 5 * m, 100) for m in range(1, 11)]
    assert linear == sorted(linear) and linear[-1] == 1.0 and linear[0] == pytest.approx(0.1)
    assert soft_label_weight("timestep", 3, 10, 42, 100) == pytest.approx(0.42)
    assert soft_label_weight("hard", 1, 10, 5, 100) == 1.0
    with pytest.raises(ValueError, match="unknown soft label rule 'sigmoid'"):
        soft_label_weight("sigmoid", 1, 10, 5, 100)


def test_ddib_and_adm_baselines(models, sources):
    unet, classifier = models
    bridge = StairBridge(unet, classifier, SCHEDULE, bridge_config())
    translated, counter = bridge.ddib(sources, torch.zeros(3, dtype=torch.long),
                                      torch.full((3,), 2))
    assert translated.shape == sources.shape
    assert counter.unet_evaluations == 3 * 2 * 10 and counter.classifier_evaluations == 0
    first, _ = bridge.sample(torch.tensor([0, 1]), torch.Generator().manual_seed(5), SIZE)
    again, used = bridge.sample(torch.tensor([0, 1]), torch.Generator().manual_seed(5), SIZE)
    assert first.shape == (2, 3, SIZE, SIZE) and torch.equal(first, again)
    assert used.classifier_evaluations == 2 * 10


def _toy_generation(models, tmp_path):
    """A 3-class synthetic dataset, prepared, and the tiny models saved as generation inputs."""
    from cellflow.config import DatasetConfig, PrepareConfig, validate_config
    from cellflow.data import prepare_dataset
    from cellflow.synthetic import generate_dataset

    unet, classifier = models
    unet.save_pretrained(tmp_path / "diffusion" / "unet")
    classifier.save_pretrained(tmp_path / "classifier" / "classifier")
    config = validate_config({"datasets": {"toy": {
        "kind": "synthetic", "resolution": SIZE, "classes": ["a", "b", "c"],
        "transitions": [{"source": "a", "target": "c"}]}}})
    dataset = DatasetConfig.from_dict("toy", config["datasets"]["toy"])
    generate_dataset(tmp_path / "raw", ["a", "b", "c"], 8, SIZE, seed=0)
    prepare_dataset(dataset, PrepareConfig("exclude", "upscale", "drop", 4),
                    tmp_path / "raw" / "images", tmp_path / "data", seed=0, threads=1)
    bridge = dict(config["bridge"], inversion_steps=10, frames=3, batch_size=2,
                  sources_per_transition=3, strip_sources=2)
    return dataset, bridge, (tmp_path / "diffusion", tmp_path / "classifier")


def test_generation_stages_write_one_manifest_format(models, tmp_path):
    from cellflow.generation.adm import generate_adm
    from cellflow.generation.cellflow import generate_cellflow
    from cellflow.generation.common import MANIFEST_COLUMNS
    from cellflow.generation.ddib import generate_ddib

    dataset, bridge, models_dirs = _toy_generation(models, tmp_path)
    data = pd.read_csv(tmp_path / "data" / "manifest.tsv", sep="\t", keep_default_na=False)

    cellflow = generate_cellflow(dataset, SCHEDULE, bridge, tmp_path / "data" / "manifest.tsv",
                                 *models_dirs, tmp_path / "out" / "cellflow")
    ddib = generate_ddib(dataset, SCHEDULE, bridge, {"sources_per_transition": 2},
                         tmp_path / "data" / "manifest.tsv", *models_dirs,
                         tmp_path / "out" / "ddib")
    adm = generate_adm(dataset, SCHEDULE, bridge, {"per_class": 2, "classifier_scale": 1.0}, 0,
                       *models_dirs, tmp_path / "out" / "adm")
    for name, table in (("cellflow", cellflow), ("ddib", ddib), ("adm", adm)):
        on_disk = pd.read_csv(tmp_path / "out" / name / "manifest.tsv", sep="\t")
        assert list(on_disk.columns) == MANIFEST_COLUMNS
        assert len(on_disk) == len(table)
        assert all((tmp_path / "out" / name / p).is_file() for p in on_disk["path"])
    assert len(cellflow) == 3 * 3 and len(ddib) == 2 and len(adm) == 3 * 2
    train_ids = set(data.loc[data["split"] == "train", "id"])
    assert set(cellflow["source_id"]) <= train_ids and set(ddib["source_id"]) <= train_ids
    weights = cellflow.groupby("source_id")["soft_label_weight"].apply(list)
    assert all(w == pytest.approx([1 / 3, 2 / 3, 1.0]) for w in weights)
    assert (tmp_path / "out" / "cellflow" / "strips" / "a-to-c.png").is_file()
    stairs = pd.read_csv(tmp_path / "out" / "cellflow" / "stairs.tsv", sep="\t")
    fourier = pd.read_csv(tmp_path / "out" / "cellflow" / "fourier.tsv", sep="\t")
    assert len(stairs) == 9 and len(fourier) == 3 * 10
    assert set(stairs["stair_rule"]) <= {"fourier", "fourier-fallback"}
    assert stairs["target_probability"].between(0, 1).all()
    assert (ddib["soft_label_weight"] == 1.0).all() and (adm["frame_index"] == 1).all()

    posterior = generate_cellflow(
        dataset, SCHEDULE, dict(bridge, stair_selection="posterior", soft_label="posterior",
                                posterior_candidates=4),
        tmp_path / "data" / "manifest.tsv", *models_dirs, tmp_path / "out" / "posterior")
    stairs = pd.read_csv(tmp_path / "out" / "posterior" / "stairs.tsv", sep="\t")
    assert set(stairs["stair_rule"]) <= {"posterior", "posterior-fallback"}
    assert (stairs.groupby("source_id")["stair"].diff().dropna() > 0).all()
    # posterior labels are the frames' calibrated target probabilities
    merged = posterior.merge(stairs, on=["source_id", "target_class", "frame_index"])
    np.testing.assert_allclose(merged["soft_label_weight"], merged["target_probability"])
    summary = json.loads((tmp_path / "out" / "posterior" / "generation.json").read_text())
    assert summary["temperature"] > 0 and summary["soft_label"] == "posterior"
    assert summary["unet_evaluations_beyond_stairs"] > 0


def test_a_killed_generation_job_resumes_to_identical_outputs(models, tmp_path, monkeypatch):
    from cellflow.generation.adm import generate_adm
    from cellflow.generation.cellflow import generate_cellflow

    dataset, bridge, models_dirs = _toy_generation(models, tmp_path)
    bridge.update(inversion_steps=4, frames=2)
    manifest = tmp_path / "data" / "manifest.tsv"
    straight = tmp_path / "straight"
    generate_cellflow(dataset, SCHEDULE, bridge, manifest, *models_dirs, straight / "cellflow")
    generate_adm(dataset, SCHEDULE, bridge, {"per_class": 3, "classifier_scale": 1.0}, 0,
                 *models_dirs, straight / "adm")

    calls = {"n": 0}
    trajectories = StairBridge.trajectories

    def killed_in_the_second_batch(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return trajectories(self, *args)

    work, out = tmp_path / "checkpoints" / "cellflow", tmp_path / "resumed" / "cellflow"
    monkeypatch.setattr(StairBridge, "trajectories", killed_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_cellflow(dataset, SCHEDULE, bridge, manifest, *models_dirs, out, work)
    assert not out.exists() and len(list(work.rglob("*.npz"))) == 1
    calls["n"] = 10  # the rerun must compute only the batch that was lost
    generate_cellflow(dataset, SCHEDULE, bridge, manifest, *models_dirs, out, work)
    assert calls["n"] == 11
    assert not work.exists() and not list(out.parent.glob(".cellflow.partial-*"))
    summary = json.loads((out / "generation.json").read_text())
    assert summary["batches_resumed"] == 1
    expected = sorted(p.relative_to(straight / "cellflow")
                      for p in (straight / "cellflow").rglob("*.png"))
    assert expected == sorted(p.relative_to(out) for p in out.rglob("*.png"))
    for path in expected:
        if path.parts[0] == "frames":
            assert (out / path).read_bytes() == (straight / "cellflow" / path).read_bytes()
    pd.testing.assert_frame_equal(pd.read_csv(out / "manifest.tsv", sep="\t"),
                                  pd.read_csv(straight / "cellflow" / "manifest.tsv", sep="\t"))

    adm_out = tmp_path / "resumed" / "adm"
    generate_adm(dataset, SCHEDULE, bridge, {"per_class": 3, "classifier_scale": 1.0}, 0,
                 *models_dirs, adm_out, tmp_path / "checkpoints" / "adm")
    for path in (straight / "adm").rglob("*.png"):
        assert (adm_out / path.relative_to(straight / "adm")).read_bytes() == path.read_bytes()


def test_sharded_generation_writes_what_one_job_writes(models, tmp_path):
    from cellflow.generation import METHODS
    from cellflow.generation.common import GenerationJob
    from cellflow.generation.shards import (
        ShardError,
        check_shard_records,
        run_gather,
        run_shard,
    )

    dataset, bridge, (diffusion, classifier) = _toy_generation(models, tmp_path)
    bridge.update(inversion_steps=4, frames=2)
    settings = {"cellflow": {}, "adm": {"per_class": 3, "classifier_scale": 1.0}}
    for name in ("cellflow", "adm"):
        method = METHODS[name]

        def job(out, work=None, method_settings=settings[name]):
            return GenerationJob(dataset, SCHEDULE, bridge, method_settings, 0,
                                 tmp_path / "data" / "manifest.tsv",
                                 {"diffusion": diffusion, "classifier": classifier}, out, work)

        straight, sharded = tmp_path / "straight" / name, tmp_path / "sharded" / name
        method.run(job(straight))
        work = tmp_path / "checkpoints" / name
        # three shards for 2 (cellflow) or 6 (adm) batches: one cellflow shard has none
        records = [tmp_path / "records" / name / f"{i}-of-3.json" for i in range(3)]
        stored = [run_shard(method, job(sharded, work), i, 3, record)
                  for i, record in enumerate(records)]
        assert sum(map(len, stored)) == (2 if name == "cellflow" else 6)
        record = json.loads(records[1].read_text())
        assert record["batches"] == stored[1] and record["provenance"]["shard"] == "1 of 3"
        assert not sharded.exists()  # a shard writes only its record and its batches
        with pytest.raises(ShardError, match=r"no record of shard\(s\) 1 of 3"):
            run_gather(method, job(sharded, work), [records[0], records[2]], 3)
        with pytest.raises(ShardError, match="shard 0 of 3 again"):
            check_shard_records([records[0], records[0], records[2]], 3, name, "toy")
        run_gather(method, job(sharded, work), records, 3)
        assert not work.exists()
        pngs = sorted(p.relative_to(straight) for p in straight.rglob("*.png"))
        assert pngs == sorted(p.relative_to(sharded) for p in sharded.rglob("*.png"))
        for path in pngs:  # byte for byte, whatever the number of shards
            assert (sharded / path).read_bytes() == (straight / path).read_bytes()
        pd.testing.assert_frame_equal(pd.read_csv(sharded / "manifest.tsv", sep="\t"),
                                      pd.read_csv(straight / "manifest.tsv", sep="\t"))

    # a shard whose batches are gone (its job failed after writing its record) is named
    work, records = tmp_path / "lost", [tmp_path / "lost-records" / f"{i}.json" for i in (0, 1)]
    adm = METHODS["adm"]
    lost_job = GenerationJob(dataset, SCHEDULE, bridge, settings["adm"], 0,
                             tmp_path / "data" / "manifest.tsv",
                             {"diffusion": diffusion, "classifier": classifier},
                             tmp_path / "lost-out", work)
    for i, record in enumerate(records):
        run_shard(adm, lost_job, i, 2, record)
    next(work.rglob("*.npz")).unlink()
    with pytest.raises(ShardError, match="shard [01] of 2 did not store it"):
        run_gather(adm, lost_job, records, 2)
