# Generation stage: one job per dataset and generation method, or with generation.shards
# one job per shard and a gather (cellflow.generation.METHODS:
# the Cellflow bridge with classifier or classifier-free guidance, DDIB, ADM). Every method
# writes results/{dataset}/trajectories/{method}/manifest.tsv in one format.
# Finished batches wait in results/{dataset}/checkpoints/{method}/, outside the outputs, so
# a killed or timed-out job resumes; the job removes them once its outputs are complete.


rule generate:
    input:
        unpack(generation_inputs),
        shards=shard_records,
    output:
        folder=report(
            directory("results/{dataset}/trajectories/{method}"),
            patterns=["strips/{transition}.png"],
            caption="../report/trajectories.rst",
            category="Trajectories",
            labels={
                "dataset": "{dataset}",
                "method": "{method}",
                "transition": "{transition}",
            },
        ),
    log:
        "logs/{dataset}/generate_{method}.log",
    benchmark:
        "results/{dataset}/benchmarks/generate_{method}.tsv"
    conda:
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(mem_mb=8000, runtime=config["bridge"]["runtime_minutes"]),
        gpu=generation_gpus,
    params:
        spec=spec_file(generation_spec),
        models=generation_model_arguments,
        work="results/{dataset}/checkpoints/{method}",
        gather=gather_arguments,
    shell:
        "python -m cellflow.cli generate {wildcards.method} --spec {params.spec:q}"
        " --manifest {input.manifest} {params.models} --out {output.folder}"
        " --work {params.work} {params.gather} --threads {threads} --log {log} --gpus {resources.gpu}"


# One shard of a sharded method (generation.shards > 1): it computes every shards-th batch
# into the method's work folder and records them; the gather above writes the outputs.
rule generate_shard:
    input:
        unpack(generation_inputs),
    output:
        temp("results/{dataset}/trajectories/shards/{method}/{shard}-of-{shards}.json"),
    log:
        "logs/{dataset}/generate_{method}-shard{shard}-of-{shards}.log",
    benchmark:
        "results/{dataset}/benchmarks/generate_{method}-shard{shard}-of-{shards}.tsv"
    wildcard_constraints:
        shard=r"\d+",
        shards=r"\d+",
    conda:
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(mem_mb=8000, runtime=config["bridge"]["runtime_minutes"]),
        gpu=config["bridge"]["gpus"],
    params:
        spec=spec_file(generation_spec),
        models=generation_model_arguments,
        work="results/{dataset}/checkpoints/{method}",
    shell:
        "python -m cellflow.cli generate {wildcards.method} --spec {params.spec:q}"
        " --manifest {input.manifest} {params.models} --out {output}"
        " --work {params.work} --shard {wildcards.shard} --shards {wildcards.shards}"
        " --threads {threads} --log {log} --gpus {resources.gpu}"
