# Generation stage: Cellflow trajectories and the DDIB and ADM baselines, per dataset.
# All three write results/{dataset}/trajectories/{method}/manifest.tsv in one format.
# Finished batches wait in results/{dataset}/checkpoints/{method}/, outside the outputs, so
# a killed or timed-out job resumes; the job removes them once its outputs are complete.


rule trajectories:
    input:
        unpack(generation_inputs),
    output:
        folder=report(
            directory("results/{dataset}/trajectories/cellflow"),
            patterns=["strips/{transition}.png"],
            caption="../report/trajectories.rst",
            category="Trajectories",
            labels={"dataset": "{dataset}", "transition": "{transition}"},
        ),
    log:
        "logs/{dataset}/trajectories.log",
    benchmark:
        "results/{dataset}/benchmarks/trajectories.tsv"
    conda:
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(config["bridge"]["runtime_minutes"]),
        gpu=config["bridge"]["gpus"],
    params:
        spec=generation_spec("cellflow"),
        work=generation_work,
    shell:
        "python -m cellflow.cli generate cellflow --spec {params.spec:q}"
        " --manifest {input.manifest} --diffusion {input.diffusion}"
        " --classifier {input.classifier} --out {output.folder} --work {params.work}"
        " --threads {threads} --log {log}"


rule baseline_ddib:
    input:
        unpack(generation_inputs),
    output:
        folder=directory("results/{dataset}/trajectories/ddib"),
    log:
        "logs/{dataset}/baseline_ddib.log",
    benchmark:
        "results/{dataset}/benchmarks/baseline_ddib.tsv"
    conda:
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(config["bridge"]["runtime_minutes"]),
        gpu=config["bridge"]["gpus"],
    params:
        spec=generation_spec("ddib"),
        work=generation_work,
    shell:
        "python -m cellflow.cli generate ddib --spec {params.spec:q}"
        " --manifest {input.manifest} --diffusion {input.diffusion}"
        " --classifier {input.classifier} --out {output.folder} --work {params.work}"
        " --threads {threads} --log {log}"


rule baseline_adm:
    input:
        unpack(generation_inputs),
    output:
        folder=directory("results/{dataset}/trajectories/adm"),
    log:
        "logs/{dataset}/baseline_adm.log",
    benchmark:
        "results/{dataset}/benchmarks/baseline_adm.tsv"
    conda:
        "../../environment.yaml"
    threads: 4
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(config["bridge"]["runtime_minutes"]),
        gpu=config["bridge"]["gpus"],
    params:
        spec=generation_spec("adm"),
        work=generation_work,
    shell:
        "python -m cellflow.cli generate adm --spec {params.spec:q}"
        " --manifest {input.manifest} --diffusion {input.diffusion}"
        " --classifier {input.classifier} --out {output.folder} --work {params.work}"
        " --threads {threads} --log {log}"
