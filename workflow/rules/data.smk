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
        "../envs/cellflow.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=1000, runtime=30),
    params:
        spec=spec_file(data_spec),
    shell:
        "python -m cellflow.cli data synthesize --spec {params.spec:q}"
        " --out {output.ground_truth} --threads {threads} --log {log}"


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
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(mem_mb=4000, runtime=60),
    params:
        spec=spec_file(data_spec),
        raw_root=raw_root,
        # a folder dataset's file listing: added or changed images prepare it again
        listing=raw_listing,
        ground_truth=lambda wildcards, input: (
            f"--ground-truth {input.ground_truth}"
            if "ground_truth" in input.keys()
            else ""
        ),
    shell:
        "python -m cellflow.cli data prepare --spec {params.spec:q}"
        " --raw-root {params.raw_root:q} {params.ground_truth} --out {output.manifest}"
        " --threads {threads} --log {log}"
