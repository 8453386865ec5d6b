# Generation stage: one job per dataset and generation method (cellflow.generation.METHODS:
# the Cellflow bridge with classifier or classifier-free guidance, DDIB, ADM). Every method
# writes results/{dataset}/trajectories/{method}/manifest.tsv in one format.
# Finished batches wait in results/{dataset}/checkpoints/{method}/, outside the outputs, so
# a killed or timed-out job resumes; the job removes them once its outputs are complete.


rule generate:
    input:
        unpack(generation_inputs),
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
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(config["bridge"]["runtime_minutes"]),
        gpu=config["bridge"]["gpus"],
    params:
        spec=generation_spec,
        models=generation_model_arguments,
        work="results/{dataset}/checkpoints/{method}",
    shell:
        "python -m cellflow.cli generate {wildcards.method} --spec {params.spec:q}"
        " --manifest {input.manifest} {params.models} --out {output.folder}"
        " --work {params.work} --threads {threads} --log {log}"
