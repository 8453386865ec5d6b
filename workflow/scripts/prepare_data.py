"""Entry point of rule prepare_data: check, resize and split one dataset."""

from pathlib import Path

from cellflow.logs import log_to_file

log_to_file(snakemake.log[0])  # noqa: F821 - injected by Snakemake

from cellflow.config import DatasetConfig, PrepareConfig  # noqa: E402
from cellflow.data import prepare_dataset, read_ground_truth  # noqa: E402
from cellflow.provenance import config_digest, recorded  # noqa: E402

smk = snakemake  # noqa: F821
truth_file = getattr(smk.input, "ground_truth", None)  # synthetic datasets only
ground_truth = read_ground_truth(truth_file) if truth_file else None
with recorded([Path(smk.output.manifest)], rule=smk.rule,
              config_hash=config_digest({"dataset": smk.params.dataset,
                                         "prepare": smk.params.prepare})):
    prepare_dataset(
        dataset=DatasetConfig.from_dict(smk.wildcards.dataset, smk.params.dataset),
        prepare=PrepareConfig(**smk.params.prepare),
        raw_root=Path(smk.params.raw_root),
        out_dir=Path(smk.output.manifest).parent,
        seed=smk.params.seed,
        threads=smk.threads,
        ground_truth=ground_truth,
    )
