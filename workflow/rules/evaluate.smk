# Evaluation stage, per dataset: cellularity of real and generated images (and its validation
# on synthetic ground truth), FID/KID per method, trajectory analysis, temporal coherence and
# the memorization check (each generated image's nearest real training image).


rule measure_cellularity:
    input:
        unpack(image_set_inputs),
        shards=evaluation_shard_records,
    output:
        "results/{dataset}/evaluation/cellularity/{image_set}.tsv",
    log:
        "logs/{dataset}/measure_cellularity-{image_set}.log",
    benchmark:
        "results/{dataset}/benchmarks/measure_cellularity/{image_set}.tsv"
    conda:
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(mem_mb=4000, runtime=config["evaluation"]["runtime_minutes"]),
    params:
        spec=spec_file(evaluation_spec),
        generated=generated_argument,
        shards=cellularity_shard_arguments,
    shell:
        "python -m cellflow.cli evaluate cellularity --spec {params.spec:q}"
        " --manifest {input.manifest} --image-set {wildcards.image_set} {params.generated}"
        " {params.shards} --out {output} --threads {threads} --log {log}"


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
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(mem_mb=4000, runtime=config["evaluation"]["runtime_minutes"]),
    params:
        spec=spec_file(evaluation_spec),
    shell:
        "python -m cellflow.cli evaluate validate-cellularity --spec {params.spec:q}"
        " --manifest {input.manifest} --out {output.table} --threads {threads} --log {log}"


rule fidelity:
    input:
        unpack(image_set_inputs),
        features=feature_network_weights,
        # with evaluation.shards, the shards have put every feature chunk in the cache
        shards=evaluation_shard_records,
    output:
        "results/{dataset}/evaluation/fidelity/{image_set}.tsv",
    log:
        "logs/{dataset}/fidelity-{image_set}.log",
    benchmark:
        "results/{dataset}/benchmarks/fidelity/{image_set}.tsv"
    conda:
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(mem_mb=8000, runtime=config["evaluation"]["runtime_minutes"]),
        gpu=config["evaluation"]["gpus"],
    params:
        spec=spec_file(evaluation_spec),
        generated=generated_argument,
    shell:
        "python -m cellflow.cli evaluate fidelity --spec {params.spec:q}"
        " --manifest {input.manifest} --image-set {wildcards.image_set} {params.generated}"
        " --features {input.features} --out {output} --threads {threads} --log {log} --gpus {resources.gpu}"


# One shard of an image set's evaluation (evaluation.shards > 1): the cellularity of every
# shards-th image and the features of every shards-th chunk of images, for the cellularity and
# fidelity jobs above (cellflow.evaluation_shards).
rule evaluate_shard:
    input:
        unpack(image_set_inputs),
        features=feature_network_weights,
    output:
        temp("results/{dataset}/evaluation/shards/{image_set}/{shard}-of-{shards}.json"),
    log:
        "logs/{dataset}/evaluate_{image_set}-shard{shard}-of-{shards}.log",
    benchmark:
        "results/{dataset}/benchmarks/evaluate_{image_set}-shard{shard}-of-{shards}.tsv"
    wildcard_constraints:
        shard=r"\d+",
        shards=r"\d+",
    conda:
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(mem_mb=8000, runtime=config["evaluation"]["runtime_minutes"]),
        gpu=config["evaluation"]["gpus"],
    params:
        spec=spec_file(evaluation_spec),
        generated=generated_argument,
        work=EVALUATION_WORK,
    shell:
        "python -m cellflow.cli evaluate shard --spec {params.spec:q}"
        " --manifest {input.manifest} --image-set {wildcards.image_set} {params.generated}"
        " --features {input.features} --shard {wildcards.shard} --shards {wildcards.shards}"
        " --work {params.work} --out {output} --threads {threads} --log {log}"
        " --gpus {resources.gpu}"


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
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(mem_mb=8000, runtime=config["evaluation"]["runtime_minutes"]),
        gpu=config["evaluation"]["gpus"],
    params:
        spec=spec_file(evaluation_spec),
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
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(mem_mb=8000, runtime=config["evaluation"]["runtime_minutes"]),
        gpu=config["evaluation"]["gpus"],
    params:
        spec=spec_file(evaluation_spec),
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
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(mem_mb=8000, runtime=config["evaluation"]["runtime_minutes"]),
        gpu=config["evaluation"]["gpus"],
    params:
        spec=spec_file(evaluation_spec),
        folder=lambda wildcards, output: os.path.dirname(output.neighbours),
    shell:
        "python -m cellflow.cli evaluate memorization --spec {params.spec:q}"
        " --manifest {input.manifest} --generated {input.generated}"
        " --features {input.features} --out {params.folder} --threads {threads} --log {log} --gpus {resources.gpu}"
