# Downstream stage: classifiers per backbone x strategy x seed, and the benchmark tables.


rule train_downstream:
    input:
        unpack(downstream_inputs),
    output:
        metrics="results/{dataset}/downstream/{backbone}/{strategy}/seed{seed}/metrics.json",
        log_table="results/{dataset}/downstream/{backbone}/{strategy}/seed{seed}/train_log.csv",
        model="results/{dataset}/downstream/{backbone}/{strategy}/seed{seed}/model.safetensors",
    log:
        "logs/{dataset}/downstream/{backbone}-{strategy}-seed{seed}.log",
    benchmark:
        "results/{dataset}/benchmarks/train_downstream/{backbone}-{strategy}-seed{seed}.tsv"
    conda:
        "../envs/cellflow.yaml"
    threads: 4
    resources:
        **cluster_limits(
            mem_mb=8000, runtime=config["downstream"]["train"]["runtime_minutes"]
        ),
        gpu=config["downstream"]["train"]["gpus"],
    params:
        spec=spec_file(downstream_spec),
        generated=downstream_generated_argument,
        folder=run_folder,
        # The per-epoch checkpoint lives outside the outputs, which a failed job loses.
        work="results/{dataset}/checkpoints/downstream/{backbone}-{strategy}-seed{seed}",
    shell:
        "python -m cellflow.cli downstream train --spec {params.spec:q}"
        " --manifest {input.manifest} {params.generated} --backbone {wildcards.backbone}"
        " --strategy {wildcards.strategy} --seed {wildcards.seed} --out {params.folder}"
        " --work {params.work} --threads {threads} --log {log} --gpus {resources.gpu}"


rule summarize_downstream:
    input:
        downstream_runs,
    output:
        summary=report(
            "results/{dataset}/downstream/summary.tsv",
            caption="../report/downstream_summary.rst",
            category="Downstream",
            labels={"dataset": "{dataset}", "table": "summary"},
        ),
        runs="results/{dataset}/downstream/runs.tsv",
        per_class="results/{dataset}/downstream/per_class.tsv",
        confusion="results/{dataset}/downstream/confusion.tsv",
    log:
        "logs/{dataset}/summarize_downstream.log",
    benchmark:
        "results/{dataset}/benchmarks/summarize_downstream.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=1000, runtime=10),
    params:
        inputs=listed(),
    shell:
        "python -m cellflow.cli downstream summarize --dataset {wildcards.dataset}"
        " --inputs {params.inputs} --out {output.summary} --log {log}"


rule benchmark_table:
    input:
        expand("results/{dataset}/downstream/summary.tsv", dataset=BENCHMARK_DATASETS)
        + left_out_results("results/{dataset}/downstream/summary.tsv"),
    output:
        report(
            f"{BENCHMARK_DIR}/benchmark.tsv",
            caption="../report/benchmark.rst",
            category="Downstream",
            labels={"table": "benchmark"},
        ),
    log:
        f"logs/benchmarks/{config['benchmark']}/benchmark_table.log",
    benchmark:
        f"{BENCHMARK_DIR}/jobs/benchmark_table.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=1000, runtime=10),
    params:
        inputs=listed(),
    shell:
        "python -m cellflow.cli downstream benchmark --inputs {params.inputs} --out {output} --log {log}"
