# Model stage: per dataset, the class-conditional diffusion model and the noise-aware classifier.
# Checkpoints live in results/{dataset}/checkpoints/, outside the declared outputs: Snakemake
# deletes the outputs of a failed job, and the retry resumes from the latest checkpoint.


rule train_diffusion:
    input:
        manifest="results/{dataset}/data/manifest.tsv",
    output:
        model=report(
            directory("results/{dataset}/models/diffusion"),
            patterns=["{name}.png"],
            caption="../report/diffusion.rst",
            category="Models",
            labels={"dataset": "{dataset}", "figure": "diffusion {name}"},
        ),
    log:
        "logs/{dataset}/train_diffusion.log",
    benchmark:
        "results/{dataset}/benchmarks/train_diffusion.tsv"
    conda:
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(config["diffusion"]["train"]["runtime_minutes"]),
        gpu=config["diffusion"]["train"]["gpus"],
    params:
        spec=training_spec("diffusion"),
        launcher=python_launcher("diffusion"),
        checkpoints="results/{dataset}/checkpoints/diffusion",
    shell:
        "{params.launcher} cellflow.cli train diffusion --spec {params.spec:q}"
        " --manifest {input.manifest} --out {output.model}"
        " --checkpoints {params.checkpoints} --threads {threads} --log {log}"


rule train_classifier:
    input:
        manifest="results/{dataset}/data/manifest.tsv",
    output:
        model=report(
            directory("results/{dataset}/models/classifier"),
            patterns=["{name}.png"],
            caption="../report/classifier.rst",
            category="Models",
            labels={"dataset": "{dataset}", "figure": "classifier {name}"},
        ),
    log:
        "logs/{dataset}/train_classifier.log",
    benchmark:
        "results/{dataset}/benchmarks/train_classifier.tsv"
    conda:
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(config["classifier"]["train"]["runtime_minutes"]),
        gpu=config["classifier"]["train"]["gpus"],
    params:
        spec=training_spec("classifier"),
        launcher=python_launcher("classifier"),
        checkpoints="results/{dataset}/checkpoints/classifier",
    shell:
        "{params.launcher} cellflow.cli train classifier --spec {params.spec:q}"
        " --manifest {input.manifest} --out {output.model}"
        " --checkpoints {params.checkpoints} --threads {threads} --log {log}"
