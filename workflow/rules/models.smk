# Model stage: per dataset, the class-conditional diffusion model and the noise-aware classifier,
# trained here or given as pretrained (datasets.<name>.pretrained: then use_pretrained checks
# and writes it in their place, and the training rule is never planned for that dataset).
# Checkpoints live in results/{dataset}/checkpoints/, outside the declared outputs: Snakemake
# deletes the outputs of a failed job, and the retry resumes from the latest checkpoint.


# A training rule only ever matches datasets that train this model (its constraint); where
# both could make a path, training wins.
ruleorder: train_diffusion > use_pretrained
ruleorder: train_classifier > use_pretrained
ruleorder: train_autoencoder > use_pretrained


rule train_diffusion:
    input:
        unpack(training_inputs("diffusion")),
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
    wildcard_constraints:
        dataset=choice(trained_datasets("diffusion")),
    conda:
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(
            mem_mb=8000 * max(1, config["diffusion"]["train"]["gpus"]),
            runtime=config["diffusion"]["train"]["runtime_minutes"],
        ),
        gpu=config["diffusion"]["train"]["gpus"],
        nodes=1,  # accelerate starts its processes in the one task of a single node
    params:
        spec=spec_file(training_spec("diffusion")),
        launcher=python_launcher("diffusion"),
        checkpoints="results/{dataset}/checkpoints/diffusion",
    shell:
        "{params.launcher} cellflow.cli train diffusion --spec {params.spec:q}"
        " --manifest {input.manifest} --out {output.model}"
        " --checkpoints {params.checkpoints} --threads {threads} --log {log} --gpus {resources.gpu}"


rule train_classifier:
    input:
        unpack(training_inputs("classifier")),
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
    wildcard_constraints:
        dataset=choice(trained_datasets("classifier")),
    conda:
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(
            mem_mb=8000 * max(1, config["classifier"]["train"]["gpus"]),
            runtime=config["classifier"]["train"]["runtime_minutes"],
        ),
        gpu=config["classifier"]["train"]["gpus"],
        nodes=1,  # accelerate starts its processes in the one task of a single node
    params:
        spec=spec_file(training_spec("classifier")),
        launcher=python_launcher("classifier"),
        checkpoints="results/{dataset}/checkpoints/classifier",
    shell:
        "{params.launcher} cellflow.cli train classifier --spec {params.spec:q}"
        " --manifest {input.manifest} --out {output.model}"
        " --checkpoints {params.checkpoints} --threads {threads} --log {log} --gpus {resources.gpu}"


rule train_autoencoder:
    input:
        unpack(training_inputs("autoencoder")),
    output:
        model=report(
            directory("results/{dataset}/models/autoencoder"),
            patterns=["{name}.png"],
            caption="../report/autoencoder.rst",
            category="Models",
            labels={"dataset": "{dataset}", "figure": "autoencoder {name}"},
        ),
    log:
        "logs/{dataset}/train_autoencoder.log",
    benchmark:
        "results/{dataset}/benchmarks/train_autoencoder.tsv"
    wildcard_constraints:
        dataset=choice(trained_datasets("autoencoder")),
    conda:
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(
            mem_mb=8000 * max(1, config["autoencoder"]["train"]["gpus"]),
            runtime=config["autoencoder"]["train"]["runtime_minutes"],
        ),
        gpu=config["autoencoder"]["train"]["gpus"],
        nodes=1,  # accelerate starts its processes in the one task of a single node
    params:
        spec=spec_file(training_spec("autoencoder")),
        launcher=python_launcher("autoencoder"),
        checkpoints="results/{dataset}/checkpoints/autoencoder",
    shell:
        "{params.launcher} cellflow.cli train autoencoder --spec {params.spec:q}"
        " --manifest {input.manifest} --out {output.model}"
        " --checkpoints {params.checkpoints} --threads {threads} --log {log} --gpus {resources.gpu}"


# The latent baselines' generators (LDM, DiT), in the autoencoder's latent space.
rule train_latent:
    input:
        unpack(training_inputs(None)),
    output:
        model=report(
            directory("results/{dataset}/models/{model}"),
            patterns=["{name}.png"],
            caption="../report/latent_model.rst",
            category="Models",
            labels={"dataset": "{dataset}", "figure": "{model} {name}"},
        ),
    log:
        "logs/{dataset}/train_{model}.log",
    benchmark:
        "results/{dataset}/benchmarks/train_{model}.tsv"
    wildcard_constraints:
        model="ldm|dit",
    conda:
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(mem_mb=8000, runtime=latent_runtime),
        gpu=latent_gpus,
        nodes=1,
    params:
        spec=spec_file(latent_training_spec),
        launcher=latent_launcher,
        checkpoints="results/{dataset}/checkpoints/{model}",
    shell:
        "{params.launcher} cellflow.cli train {wildcards.model} --spec {params.spec:q}"
        " --manifest {input.manifest} --autoencoder {input.autoencoder} --out {output.model}"
        " --checkpoints {params.checkpoints} --threads {threads} --log {log} --gpus {resources.gpu}"


rule use_pretrained:
    input:
        unpack(pretrained_inputs),
    output:
        model=directory("results/{dataset}/models/{model}"),
    log:
        "logs/{dataset}/use_pretrained_{model}.log",
    benchmark:
        "results/{dataset}/benchmarks/use_pretrained_{model}.tsv"
    wildcard_constraints:
        model="diffusion|classifier|decoder|autoencoder",
    conda:
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(mem_mb=8000, runtime=60),
        gpu=config["bridge"]["gpus"],
    params:
        spec=spec_file(pretrained_spec),
    shell:
        "python -m cellflow.cli use-pretrained --spec {params.spec:q}"
        " --manifest {input.manifest} --out {output.model} --threads {threads} --log {log} --gpus {resources.gpu}"
