"""Entry point of rule synthesize_dataset: generate a synthetic H&E class-folder dataset."""

from pathlib import Path

from cellflow.logs import log_to_file

log_to_file(snakemake.log[0])  # noqa: F821 - injected by Snakemake

from cellflow.config import DatasetConfig  # noqa: E402
from cellflow.provenance import config_digest, recorded  # noqa: E402
from cellflow.synthetic import generate_dataset  # noqa: E402

smk = snakemake  # noqa: F821
dataset = DatasetConfig.from_dict(smk.wildcards.dataset, smk.params.dataset)
with recorded([Path(smk.output.ground_truth)], rule=smk.rule,
              config_hash=config_digest(smk.params.dataset)):
    generate_dataset(
        out_dir=Path(smk.output.ground_truth).parent,
        class_names=dataset.classes,
        images_per_class=dataset.synthetic.images_per_class,
        size=dataset.synthetic.image_size,
        seed=smk.params.seed,
    )
