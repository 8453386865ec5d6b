# Figures stage: every benchmark figure (PNG + PDF) and table (TSV + Markdown) in
# results/figures/, drawn from results/ alone: `snakemake figures` redraws them without
# retraining, and a changed table redraws only the figures that read it.


rule figure_classification:
    input:
        "results/benchmark.tsv",
    output:
        png=report(
            "results/figures/classification.png",
            caption="../report/figure_classification.rst",
            category="Benchmark",
            labels={"figure": "classification"},
        ),
        pdf="results/figures/classification.pdf",
        tsv=report(
            "results/figures/tables/classification.tsv",
            caption="../report/figure_classification.rst",
            category="Benchmark",
            labels={"figure": "classification table"},
        ),
        md="results/figures/tables/classification.md",
    log:
        "logs/figures/classification.log",
    benchmark:
        "results/benchmarks/figures/classification.tsv"
    conda:
        "../../environment.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(2000),
        runtime=attempt_scaled(10),
    params:
        out=stem("png"),
        table=stem("tsv"),
        metric=config["figures"]["metric"],
    shell:
        "python -m cellflow.cli figures classification --inputs {input} --metric {params.metric}"
        " --out {params.out} --table {params.table} --log {log}"


rule figure_fidelity:
    input:
        lambda wildcards: [
            f"results/{dataset}/evaluation/fidelity/{image_set}.tsv"
            for dataset in DATASETS
            for image_set in image_sets(dataset)
        ],
    output:
        png=report(
            "results/figures/fidelity.png",
            caption="../report/figure_fidelity.rst",
            category="Benchmark",
            labels={"figure": "fidelity"},
        ),
        pdf="results/figures/fidelity.pdf",
        tsv=report(
            "results/figures/tables/fidelity.tsv",
            caption="../report/figure_fidelity.rst",
            category="Benchmark",
            labels={"figure": "fidelity table"},
        ),
        md="results/figures/tables/fidelity.md",
    log:
        "logs/figures/fidelity.log",
    benchmark:
        "results/benchmarks/figures/fidelity.tsv"
    conda:
        "../../environment.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(2000),
        runtime=attempt_scaled(10),
    params:
        out=stem("png"),
        table=stem("tsv"),
    shell:
        "python -m cellflow.cli figures fidelity --inputs {input}"
        " --out {params.out} --table {params.table} --log {log}"


rule figure_trajectories:
    input:
        summaries=lambda wildcards: expand(
            "results/{dataset}/evaluation/trajectories/summary.tsv",
            dataset=trajectory_datasets(),
        ),
        coherence=lambda wildcards: expand(
            "results/{dataset}/evaluation/coherence.tsv", dataset=trajectory_datasets()
        ),
    output:
        png=report(
            "results/figures/trajectories.png",
            caption="../report/figure_trajectories.rst",
            category="Benchmark",
            labels={"figure": "trajectories"},
        ),
        pdf="results/figures/trajectories.pdf",
        tsv=report(
            "results/figures/tables/trajectories.tsv",
            caption="../report/figure_trajectories.rst",
            category="Benchmark",
            labels={"figure": "trajectories table"},
        ),
        md="results/figures/tables/trajectories.md",
    log:
        "logs/figures/trajectories.log",
    benchmark:
        "results/benchmarks/figures/trajectories.tsv"
    conda:
        "../../environment.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(2000),
        runtime=attempt_scaled(10),
    params:
        out=stem("png"),
        table=stem("tsv"),
    shell:
        "python -m cellflow.cli figures trajectories --inputs {input.summaries}"
        " --coherence {input.coherence} --out {params.out} --table {params.table} --log {log}"


rule figure_runtimes:
    input:
        job_benchmarks,
    output:
        png=report(
            "results/figures/runtimes.png",
            caption="../report/figure_runtimes.rst",
            category="Benchmark",
            labels={"figure": "runtimes"},
        ),
        pdf="results/figures/runtimes.pdf",
        tsv="results/figures/tables/runtimes.tsv",
        md="results/figures/tables/runtimes.md",
    log:
        "logs/figures/runtimes.log",
    benchmark:
        "results/benchmarks/figures/runtimes.tsv"
    conda:
        "../../environment.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(2000),
        runtime=attempt_scaled(10),
    params:
        out=stem("png"),
        table=stem("tsv"),
    shell:
        "python -m cellflow.cli figures runtimes --inputs {input}"
        " --out {params.out} --table {params.table} --log {log}"


rule figure_training_curves:
    input:
        diffusion="results/{dataset}/models/diffusion",
        classifier="results/{dataset}/models/classifier",
        downstream=lambda wildcards: [
            path.replace("metrics.json", "train_log.csv")
            for path in downstream_runs(wildcards)
        ],
    output:
        png=report(
            "results/figures/{dataset}/training_curves.png",
            caption="../report/figure_training_curves.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "training curves"},
        ),
        pdf="results/figures/{dataset}/training_curves.pdf",
    log:
        "logs/figures/{dataset}/training_curves.log",
    benchmark:
        "results/benchmarks/figures/{dataset}/training_curves.tsv"
    conda:
        "../../environment.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(2000),
        runtime=attempt_scaled(10),
    params:
        out=stem("png"),
    shell:
        "python -m cellflow.cli figures training --diffusion {input.diffusion}"
        " --classifier {input.classifier} --inputs {input.downstream}"
        " --title {wildcards.dataset:q} --out {params.out} --log {log}"


rule figure_trajectory_strips:
    input:
        manifest="results/{dataset}/data/manifest.tsv",
        trajectories="results/{dataset}/trajectories/cellflow",
    output:
        png=report(
            "results/figures/{dataset}/trajectory_strips.png",
            caption="../report/figure_trajectory_strips.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "trajectory strips"},
        ),
        pdf="results/figures/{dataset}/trajectory_strips.pdf",
    log:
        "logs/figures/{dataset}/trajectory_strips.log",
    benchmark:
        "results/benchmarks/figures/{dataset}/trajectory_strips.tsv"
    conda:
        "../../environment.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(2000),
        runtime=attempt_scaled(10),
    params:
        out=stem("png"),
        per_transition=config["figures"]["strips_per_transition"],
    shell:
        "python -m cellflow.cli figures strips --manifest {input.manifest}"
        " --generated {input.trajectories} --per-transition {params.per_transition}"
        " --title {wildcards.dataset:q} --out {params.out} --log {log}"


rule figure_cellularity_curves:
    input:
        frames="results/{dataset}/evaluation/trajectories/frames.tsv",
        real="results/{dataset}/evaluation/cellularity/real.tsv",
    output:
        png=report(
            "results/figures/{dataset}/cellularity_curves.png",
            caption="../report/figure_cellularity_curves.rst",
            category="Figures per dataset",
            labels={
                "dataset": "{dataset}",
                "figure": "cellularity along trajectories",
            },
        ),
        pdf="results/figures/{dataset}/cellularity_curves.pdf",
    log:
        "logs/figures/{dataset}/cellularity_curves.log",
    benchmark:
        "results/benchmarks/figures/{dataset}/cellularity_curves.tsv"
    conda:
        "../../environment.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(2000),
        runtime=attempt_scaled(10),
    params:
        out=stem("png"),
    shell:
        "python -m cellflow.cli figures cellularity --frames {input.frames} --real {input.real}"
        " --title {wildcards.dataset:q} --out {params.out} --log {log}"


rule figure_fourier_stairs:
    input:
        trajectories="results/{dataset}/trajectories/cellflow",
    output:
        png=report(
            "results/figures/{dataset}/fourier_stairs.png",
            caption="../report/figure_fourier_stairs.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "Fourier measure and stairs"},
        ),
        pdf="results/figures/{dataset}/fourier_stairs.pdf",
    log:
        "logs/figures/{dataset}/fourier_stairs.log",
    benchmark:
        "results/benchmarks/figures/{dataset}/fourier_stairs.tsv"
    conda:
        "../../environment.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(2000),
        runtime=attempt_scaled(10),
    params:
        out=stem("png"),
        per_transition=config["figures"]["strips_per_transition"],
    shell:
        "python -m cellflow.cli figures fourier --generated {input.trajectories}"
        " --per-transition {params.per_transition}"
        " --title {wildcards.dataset:q} --out {params.out} --log {log}"


rule figure_cellularity_validation:
    input:
        table="results/{dataset}/evaluation/cellularity_validation.tsv",
        summary="results/{dataset}/evaluation/cellularity_validation.json",
    output:
        png=report(
            "results/figures/{dataset}/cellularity_validation.png",
            caption="../report/figure_cellularity_validation.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "cellularity validation"},
        ),
        pdf="results/figures/{dataset}/cellularity_validation.pdf",
    log:
        "logs/figures/{dataset}/cellularity_validation.log",
    benchmark:
        "results/benchmarks/figures/{dataset}/cellularity_validation.tsv"
    conda:
        "../../environment.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(2000),
        runtime=attempt_scaled(10),
    params:
        out=stem("png"),
    shell:
        "python -m cellflow.cli figures cellularity-validation --inputs {input.table}"
        " --title {wildcards.dataset:q} --out {params.out} --log {log}"


rule figures:
    input:
        figure_outputs(),
