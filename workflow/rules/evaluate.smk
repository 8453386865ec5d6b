# Evaluation stage, per dataset: cellularity of real and generated images (and its validation
# on synthetic ground truth), FID/KID per method, trajectory analysis, temporal coherence and
# the memorization check (each generated image's nearest real training image).


rule measure_cellularity:
    input:
        unpack(image_set_inputs),
    output:
        "results/{dataset}/evaluation/cellularity/{image_set}.tsv",
    log:
        "logs/{dataset}/measure_cellularity-{image_set}.log",
    benchmark:
        "results/{dataset}/benchmarks/measure_cellularity/{image_set}.tsv"
    conda:
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(4000),
        runtime=attempt_scaled(config["evaluation"]["runtime_minutes"]),
    params:
        spec=evaluation_spec,
        generated=generated_argument,
    shell:
        "python -m cellflow.cli evaluate cellularity --spec {params.spec:q}"
        " --manifest {input.manifest} --image-set {wildcards.image_set} {params.generated}"
        " --out {output} --threads {threads} --log {log}"


rule validate_cellularity:
    input:
        manifest="results/{dataset}/data/manifest.tsv",
    output:
        table="results/{dataset}/evaluation/cellularity_validation.tsv",
        summary="results/{dataset}/evaluation/cellularity_validation.json",
    log:
        "logs/{dataset}/validate_cellularity.log",
    benchmark:
        "results/{dataset}/benchmarks/validate_cellularity.tsv"
    conda:
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(4000),
        runtime=attempt_scaled(config["evaluation"]["runtime_minutes"]),
    params:
        spec=evaluation_spec,
    shell:
        "python -m cellflow.cli evaluate validate-cellularity --spec {params.spec:q}"
        " --manifest {input.manifest} --out {output.table} --threads {threads} --log {log}"


rule fidelity:
    input:
        unpack(image_set_inputs),
        features=feature_network_weights,
    output:
        "results/{dataset}/evaluation/fidelity/{image_set}.tsv",
    log:
        "logs/{dataset}/fidelity-{image_set}.log",
    benchmark:
        "results/{dataset}/benchmarks/fidelity/{image_set}.tsv"
    conda:
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(config["evaluation"]["runtime_minutes"]),
        gpu=config["evaluation"]["gpus"],
    params:
        spec=evaluation_spec,
        generated=generated_argument,
    shell:
        "python -m cellflow.cli evaluate fidelity --spec {params.spec:q}"
        " --manifest {input.manifest} --image-set {wildcards.image_set} {params.generated}"
        " --features {input.features} --out {output} --threads {threads} --log {log} --gpus {resources.gpu}"


rule analyse_trajectories:
    input:
        manifest="results/{dataset}/data/manifest.tsv",
        real="results/{dataset}/evaluation/cellularity/real.tsv",
        frames="results/{dataset}/evaluation/cellularity/cellflow.tsv",
        trajectories="results/{dataset}/trajectories/cellflow",
        classifier="results/{dataset}/models/classifier",
    output:
        frames="results/{dataset}/evaluation/trajectories/frames.tsv",
        summary="results/{dataset}/evaluation/trajectories/summary.tsv",
    log:
        "logs/{dataset}/analyse_trajectories.log",
    benchmark:
        "results/{dataset}/benchmarks/analyse_trajectories.tsv"
    conda:
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(config["evaluation"]["runtime_minutes"]),
        gpu=config["evaluation"]["gpus"],
    params:
        spec=evaluation_spec,
        folder=lambda wildcards, output: os.path.dirname(output.summary),
    shell:
        "python -m cellflow.cli evaluate trajectories --spec {params.spec:q}"
        " --manifest {input.manifest} --generated {input.trajectories}"
        " --classifier {input.classifier} --real-cellularity {input.real}"
        " --generated-cellularity {input.frames} --out {params.folder}"
        " --threads {threads} --log {log} --gpus {resources.gpu}"


rule temporal_coherence:
    input:
        manifest="results/{dataset}/data/manifest.tsv",
        trajectories="results/{dataset}/trajectories/cellflow",
        features=feature_network_weights,
    output:
        "results/{dataset}/evaluation/coherence.tsv",
    log:
        "logs/{dataset}/temporal_coherence.log",
    benchmark:
        "results/{dataset}/benchmarks/temporal_coherence.tsv"
    conda:
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(config["evaluation"]["runtime_minutes"]),
        gpu=config["evaluation"]["gpus"],
    params:
        spec=evaluation_spec,
    shell:
        "python -m cellflow.cli evaluate coherence --spec {params.spec:q}"
        " --manifest {input.manifest} --generated {input.trajectories}"
        " --features {input.features} --out {output} --threads {threads} --log {log} --gpus {resources.gpu}"


rule memorization:
    input:
        manifest="results/{dataset}/data/manifest.tsv",
        generated="results/{dataset}/trajectories/{method}",
        features=feature_network_weights,
    output:
        neighbours="results/{dataset}/evaluation/memorization/{method}/neighbours.tsv",
        reference="results/{dataset}/evaluation/memorization/{method}/reference.tsv",
    log:
        "logs/{dataset}/memorization-{method}.log",
    benchmark:
        "results/{dataset}/benchmarks/memorization/{method}.tsv"
    conda:
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(config["evaluation"]["runtime_minutes"]),
        gpu=config["evaluation"]["gpus"],
    params:
        spec=evaluation_spec,
        folder=lambda wildcards, output: os.path.dirname(output.neighbours),
    shell:
        "python -m cellflow.cli evaluate memorization --spec {params.spec:q}"
        " --manifest {input.manifest} --generated {input.generated}"
        " --features {input.features} --out {params.folder} --threads {threads} --log {log} --gpus {resources.gpu}"
