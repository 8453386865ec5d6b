"""An image set's evaluation spread over shards (cellflow.evaluation_shards): the cellularity
table and FID/KID come out as one job computes them, and the shards' records are checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellflow.cellularity import CellularityConfig
from cellflow.evaluate import cellularity, fidelity
from cellflow.evaluation_shards import (
    EvaluationShardError,
    assemble_cellularity,
    check_records,
    run_shard,
)
from cellflow.metrics import FeatureSpace
from tests.test_cellularity import CLASSES, prepared_synthetic
from tests.test_metrics import CountingNetwork


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory) -> tuple[Path, Path]:
    """A prepared synthetic dataset and a method's images (its own test images, relabelled)."""
    root = tmp_path_factory.mktemp("evaluation")
    data = prepared_synthetic(root, raw_size=64, resolution=32, per_class=8)
    manifest = pd.read_csv(data / "manifest.tsv", sep="\t")
    generated = root / "trajectories" / "method"
    rows = []
    for index, row in enumerate(manifest.itertuples()):
        path = Path("images") / row.label_name / f"g{index:03d}.png"
        (generated / path).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(Image.open(data / row.path))
        Image.fromarray(np.roll(pixels, index, axis=1)).save(generated / path)
        rows.append({"method": "method", "source_id": row.id, "source_class": row.label_name,
                     "target_class": row.label_name, "frame_index": 1,
                     "soft_label_weight": 1.0, "path": str(path)})
    pd.DataFrame(rows).to_csv(generated / "manifest.tsv", sep="\t", index=False)
    return data / "manifest.tsv", generated


def space(cache: Path | None, network: CountingNetwork | None = None) -> FeatureSpace:
    return FeatureSpace("domain", network or CountingNetwork(), "test", weights_digest="w",
                        cache=cache, chunk_size=8)


@pytest.mark.parametrize("image_set", ["real", "method"])
def test_shards_give_the_tables_of_one_job(image_sets, tmp_path, image_set):
    manifest, generated = image_sets
    generated = generated if image_set == "method" else None
    config, work, cache = CellularityConfig(), tmp_path / "work", tmp_path / "features"
    network = CountingNetwork()
    records = [tmp_path / f"{shard}-of-3.json" for shard in range(3)]
    for shard, record in enumerate(records):
        run_shard("toy", image_set, manifest, generated, config, [space(cache, network)],
                  shard, 3, work, record)
    computed = network.seen
    assert computed > 0
    assembled = assemble_cellularity("toy", image_set, records, 3, work)
    pd.testing.assert_frame_equal(assembled, cellularity(image_set, manifest, generated, config))
    # the fidelity job reads every feature chunk the shards stored, and computes none itself
    sharded = fidelity("toy", image_set, manifest, generated, CLASSES, [space(cache, network)],
                       kid_subset_size=4, kid_subsets=5, seed=0, device=None)
    assert network.seen == computed
    alone = fidelity("toy", image_set, manifest, generated, CLASSES, [space(None)],
                     kid_subset_size=4, kid_subsets=5, seed=0, device=None)
    pd.testing.assert_frame_equal(sharded, alone)


def test_records_that_are_not_the_shards_of_one_plan_are_refused(tmp_path):
    def record(shard: int, **changes) -> Path:
        content = {"dataset": "toy", "image_set": "real", "shard": shard, "shards": 2,
                   **changes}
        path = tmp_path / f"{shard}-{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(content))
        return path

    first, second = record(0), record(1)
    assert [content["shard"] for content in check_records([second, first], 2, "toy", "real")
            ] == [0, 1]
    with pytest.raises(EvaluationShardError, match="no record of shard"):
        check_records([first], 2, "toy", "real")
    with pytest.raises(EvaluationShardError, match="shard 0 of 2 again"):
        check_records([first, record(0)], 2, "toy", "real")
    with pytest.raises(EvaluationShardError, match="another plan"):
        check_records([first, record(1, image_set="adm")], 2, "toy", "real")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(EvaluationShardError, match="broken.json: not a readable"):
        check_records([first, broken], 2, "toy", "real")


def test_a_missing_part_names_its_shard(image_sets, tmp_path):
    manifest, _ = image_sets
    work = tmp_path / "work"
    records = [tmp_path / f"{shard}.json" for shard in range(2)]
    for shard, record in enumerate(records):
        run_shard("toy", "real", manifest, None, CellularityConfig(), [], shard, 2, work, record)
    (work / "cellularity-1-of-2.tsv").unlink()
    with pytest.raises(EvaluationShardError, match="shard 1 of 2 is missing"):
        assemble_cellularity("toy", "real", records, 2, work)
