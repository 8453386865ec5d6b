"""Entry point of rule synthesize_dataset: generate a synthetic H&E class-folder dataset."""

from pathlib import Path

from cellflow.logs import log_to_file

log_to_file(snakemake.log[0])  # noqa: F821 - injected by Snakemake

from cellflow.config import DatasetConfig  # noqa: E402
from cellflow.synthetic import generate_dataset  # noqa: E402

dataset = DatasetConfig.from_dict(snakemake.wildcards.dataset, snakemake.params.dataset)  # noqa: F821
generate_dataset(
    out_dir=Path(snakemake.output.ground_truth).parent,  # noqa: F821
    class_names=dataset.classes,
    images_per_class=dataset.synthetic.images_per_class,
    size=dataset.synthetic.image_size,
    seed=snakemake.params.seed,  # noqa: F821
)
