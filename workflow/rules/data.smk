# Data stage: raw dataset -> checked, resized, split images and a manifest.


rule synthesize_dataset:
    output:
        images=directory("results/{dataset}/raw/images"),
        masks=directory("results/{dataset}/raw/masks"),
        ground_truth="results/{dataset}/raw/ground_truth.tsv",
    log:
        "logs/{dataset}/synthesize_dataset.log",
    benchmark:
        "results/{dataset}/benchmarks/synthesize_dataset.tsv"
    wildcard_constraints:
        dataset=choice(SYNTHETIC_DATASETS),
    conda:
        "../../environment.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(1000),
        runtime=attempt_scaled(30),
    params:
        dataset=dataset_entry,
        seed=config["seed"],
    script:
        "../scripts/synthesize_dataset.py"


rule prepare_data:
    input:
        unpack(prepare_inputs),
    output:
        manifest="results/{dataset}/data/manifest.tsv",
        class_counts=report(
            "results/{dataset}/data/class_counts.tsv",
            caption="../report/class_counts.rst",
            category="Data",
            labels={"dataset": "{dataset}", "table": "class counts"},
        ),
        group_counts=report(
            "results/{dataset}/data/group_counts.tsv",
            caption="../report/group_counts.rst",
            category="Data",
            labels={"dataset": "{dataset}", "table": "group counts"},
        ),
        excluded="results/{dataset}/data/excluded.tsv",
        images=directory("results/{dataset}/data/images"),
        contact_sheets=report(
            directory("results/{dataset}/data/contact_sheets"),
            patterns=["{name}.png"],
            caption="../report/contact_sheet.rst",
            category="Data",
            labels={"dataset": "{dataset}", "class": "{name}"},
        ),
    log:
        "logs/{dataset}/prepare_data.log",
    benchmark:
        "results/{dataset}/benchmarks/prepare_data.tsv"
    conda:
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(4000),
        runtime=attempt_scaled(60),
    params:
        dataset=dataset_entry,
        raw_root=raw_root,
        listing=raw_listing,
        prepare=canonical(config["prepare"]),
        seed=config["seed"],
    script:
        "../scripts/prepare_data.py"
