# Figures stage: every figure (PNG + PDF) and table (TSV + Markdown), drawn from results/
# alone: `snakemake figures` redraws them without retraining, and a changed table redraws only
# the figures that read it. Cross-dataset ones go to results/benchmarks/{benchmark}/, one
# dataset's to results/{dataset}/figures/.


rule figure_classification:
    input:
        benchmark=f"{BENCHMARK_DIR}/benchmark.tsv",
        runs=expand(
            "results/{dataset}/downstream/runs.tsv", dataset=BENCHMARK_DATASETS
        )
        + left_out_results("results/{dataset}/downstream/runs.tsv"),
    output:
        png=report(
            f"{BENCHMARK_DIR}/figures/classification.png",
            caption="../report/figure_classification.rst",
            category="Benchmark",
            labels={"figure": "classification"},
        ),
        pdf=f"{BENCHMARK_DIR}/figures/classification.pdf",
        tsv=report(
            f"{BENCHMARK_DIR}/tables/classification.tsv",
            caption="../report/figure_classification.rst",
            category="Benchmark",
            labels={"figure": "classification table"},
        ),
        md=f"{BENCHMARK_DIR}/tables/classification.md",
    log:
        f"logs/benchmarks/{config['benchmark']}/classification.log",
    benchmark:
        f"{BENCHMARK_DIR}/jobs/figures/classification.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
    params:
        runs=listed("runs"),
        out=stem("png"),
        table=stem("tsv"),
        metric=config["figures"]["metric"],
    shell:
        "python -m cellflow.cli figures classification --inputs {input.benchmark}"
        " --runs {params.runs} --metric {params.metric}"
        " --out {params.out} --table {params.table} --log {log}"


rule figure_fidelity:
    input:
        fidelity_tables,
    output:
        png=report(
            f"{BENCHMARK_DIR}/figures/fidelity.png",
            caption="../report/figure_fidelity.rst",
            category="Benchmark",
            labels={"figure": "fidelity"},
        ),
        pdf=f"{BENCHMARK_DIR}/figures/fidelity.pdf",
        tsv=report(
            f"{BENCHMARK_DIR}/tables/fidelity.tsv",
            caption="../report/figure_fidelity.rst",
            category="Benchmark",
            labels={"figure": "fidelity table"},
        ),
        md=f"{BENCHMARK_DIR}/tables/fidelity.md",
    log:
        f"logs/benchmarks/{config['benchmark']}/fidelity.log",
    benchmark:
        f"{BENCHMARK_DIR}/jobs/figures/fidelity.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
    params:
        inputs=listed(),
        out=stem("png"),
        table=stem("tsv"),
    shell:
        "python -m cellflow.cli figures fidelity --inputs {params.inputs}"
        " --out {params.out} --table {params.table} --log {log}"


rule figure_trajectories:
    input:
        summaries=trajectory_tables("summary"),
        coherence=trajectory_tables("coherence"),
        fidelity=fidelity_tables,
    output:
        png=report(
            f"{BENCHMARK_DIR}/figures/trajectories.png",
            caption="../report/figure_trajectories.rst",
            category="Benchmark",
            labels={"figure": "trajectories"},
        ),
        pdf=f"{BENCHMARK_DIR}/figures/trajectories.pdf",
        tsv=report(
            f"{BENCHMARK_DIR}/tables/trajectories.tsv",
            caption="../report/figure_trajectories.rst",
            category="Benchmark",
            labels={"figure": "trajectories table"},
        ),
        md=f"{BENCHMARK_DIR}/tables/trajectories.md",
    log:
        f"logs/benchmarks/{config['benchmark']}/trajectories.log",
    benchmark:
        f"{BENCHMARK_DIR}/jobs/figures/trajectories.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
    params:
        summaries=listed("summaries"),
        coherence=listed("coherence"),
        fidelity=listed("fidelity"),
        out=stem("png"),
        table=stem("tsv"),
    shell:
        "python -m cellflow.cli figures trajectories --inputs {params.summaries}"
        " --coherence {params.coherence} --fidelity {params.fidelity}"
        " --out {params.out} --table {params.table} --log {log}"


rule figure_runtimes:
    input:
        job_benchmarks,
    output:
        png=report(
            f"{BENCHMARK_DIR}/figures/runtimes.png",
            caption="../report/figure_runtimes.rst",
            category="Benchmark",
            labels={"figure": "runtimes"},
        ),
        pdf=f"{BENCHMARK_DIR}/figures/runtimes.pdf",
        tsv=f"{BENCHMARK_DIR}/tables/runtimes.tsv",
        by_node=f"{BENCHMARK_DIR}/tables/runtimes_by_node.tsv",
        md=f"{BENCHMARK_DIR}/tables/runtimes.md",
    log:
        f"logs/benchmarks/{config['benchmark']}/runtimes.log",
    benchmark:
        f"{BENCHMARK_DIR}/jobs/figures/runtimes.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
    params:
        inputs=listed(),
        out=stem("png"),
        table=stem("tsv"),
        # where the provenance records of the benchmarked jobs lie
        trees=[f"results/{dataset}" for dataset in [*DATASETS, *LEFT_OUT_DATASETS]],
    shell:
        "python -m cellflow.cli figures runtimes --inputs {params.inputs}"
        " --provenance {params.trees} --out {params.out} --table {params.table} --log {log}"


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
            "results/{dataset}/figures/training_curves.png",
            caption="../report/figure_training_curves.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "training curves"},
        ),
        pdf="results/{dataset}/figures/training_curves.pdf",
    log:
        "logs/{dataset}/figures/training_curves.log",
    benchmark:
        "results/{dataset}/benchmarks/figures/training_curves.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
    params:
        downstream=listed("downstream"),
        out=stem("png"),
    shell:
        "python -m cellflow.cli figures training --diffusion {input.diffusion}"
        " --classifier {input.classifier} --inputs {params.downstream}"
        " --title {wildcards.dataset:q} --out {params.out} --log {log}"


rule figure_trajectory_strips:
    input:
        manifest="results/{dataset}/data/manifest.tsv",
        trajectories="results/{dataset}/trajectories/cellflow",
    output:
        png=report(
            "results/{dataset}/figures/trajectory_strips.png",
            caption="../report/figure_trajectory_strips.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "trajectory strips"},
        ),
        pdf="results/{dataset}/figures/trajectory_strips.pdf",
    log:
        "logs/{dataset}/figures/trajectory_strips.log",
    benchmark:
        "results/{dataset}/benchmarks/figures/trajectory_strips.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
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
            "results/{dataset}/figures/cellularity_curves.png",
            caption="../report/figure_cellularity_curves.rst",
            category="Figures per dataset",
            labels={
                "dataset": "{dataset}",
                "figure": "cellularity along trajectories",
            },
        ),
        pdf="results/{dataset}/figures/cellularity_curves.pdf",
    log:
        "logs/{dataset}/figures/cellularity_curves.log",
    benchmark:
        "results/{dataset}/benchmarks/figures/cellularity_curves.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
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
            "results/{dataset}/figures/fourier_stairs.png",
            caption="../report/figure_fourier_stairs.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "Fourier measure and stairs"},
        ),
        pdf="results/{dataset}/figures/fourier_stairs.pdf",
    log:
        "logs/{dataset}/figures/fourier_stairs.log",
    benchmark:
        "results/{dataset}/benchmarks/figures/fourier_stairs.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
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
            "results/{dataset}/figures/cellularity_validation.png",
            caption="../report/figure_cellularity_validation.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "cellularity validation"},
        ),
        pdf="results/{dataset}/figures/cellularity_validation.pdf",
    log:
        "logs/{dataset}/figures/cellularity_validation.log",
    benchmark:
        "results/{dataset}/benchmarks/figures/cellularity_validation.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
    params:
        out=stem("png"),
    shell:
        "python -m cellflow.cli figures cellularity-validation --inputs {input.table}"
        " --title {wildcards.dataset:q} --out {params.out} --log {log}"


rule figure_side_by_side:
    input:
        manifest="results/{dataset}/data/manifest.tsv",
        generated=lambda wildcards: generation_outputs(wildcards.dataset),
        fidelity=lambda wildcards: expand(
            "results/{{dataset}}/evaluation/fidelity/{method}.tsv",
            method=generative_methods(wildcards.dataset),
        ),
    output:
        png=report(
            "results/{dataset}/figures/side_by_side.png",
            caption="../report/side_by_side.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "images side by side"},
        ),
        pdf="results/{dataset}/figures/side_by_side.pdf",
    log:
        "logs/{dataset}/figures/side_by_side.log",
    benchmark:
        "results/{dataset}/benchmarks/figures/side_by_side.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
    params:
        generated=listed("generated"),
        fidelity=listed("fidelity"),
        out=stem("png"),
        per_method=config["figures"]["images_per_method"],
        classes=lambda wildcards: ",".join(DATASETS[wildcards.dataset].classes),
    shell:
        "python -m cellflow.cli figures side-by-side --manifest {input.manifest}"
        " --inputs {params.generated} --fidelity {params.fidelity} --classes {params.classes}"
        " --per-method {params.per_method} --title {wildcards.dataset:q}"
        " --out {params.out} --log {log}"


rule figure_per_class:
    input:
        per_class="results/{dataset}/downstream/per_class.tsv",
        confusion="results/{dataset}/downstream/confusion.tsv",
    output:
        png=report(
            "results/{dataset}/figures/per_class.png",
            caption="../report/per_class.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "per-class metrics"},
        ),
        pdf="results/{dataset}/figures/per_class.pdf",
        tsv=report(
            "results/{dataset}/figures/tables/per_class.tsv",
            caption="../report/per_class.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "per-class metrics table"},
        ),
        md="results/{dataset}/figures/tables/per_class.md",
    log:
        "logs/{dataset}/figures/per_class.log",
    benchmark:
        "results/{dataset}/benchmarks/figures/per_class.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
    params:
        out=stem("png"),
        table=stem("tsv"),
    shell:
        "python -m cellflow.cli figures per-class --inputs {input.per_class}"
        " --confusion {input.confusion} --title {wildcards.dataset:q}"
        " --out {params.out} --table {params.table} --log {log}"


rule figure_memorization:
    input:
        lambda wildcards: expand(
            "results/{{dataset}}/evaluation/memorization/{method}/neighbours.tsv",
            method=generative_methods(wildcards.dataset),
        ),
    output:
        png=report(
            "results/{dataset}/figures/memorization.png",
            caption="../report/memorization.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "memorization"},
        ),
        pdf="results/{dataset}/figures/memorization.pdf",
        tsv=report(
            "results/{dataset}/figures/tables/memorization.tsv",
            caption="../report/memorization.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "memorization table"},
        ),
        md="results/{dataset}/figures/tables/memorization.md",
    log:
        "logs/{dataset}/figures/memorization.log",
    benchmark:
        "results/{dataset}/benchmarks/figures/memorization.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
    params:
        inputs=listed(),
        out=stem("png"),
        table=stem("tsv"),
    shell:
        "python -m cellflow.cli figures memorization --inputs {params.inputs}"
        " --title {wildcards.dataset:q} --out {params.out} --table {params.table} --log {log}"


rule figure_closest_pairs:
    input:
        memorization="results/{dataset}/evaluation/memorization/{method}/neighbours.tsv",
        manifest="results/{dataset}/data/manifest.tsv",
        generated="results/{dataset}/trajectories/{method}",
    output:
        png=report(
            "results/{dataset}/figures/closest_pairs/{method}.png",
            caption="../report/memorization.rst",
            category="Figures per dataset",
            labels={"dataset": "{dataset}", "figure": "closest pairs: {method}"},
        ),
        pdf="results/{dataset}/figures/closest_pairs/{method}.pdf",
    log:
        "logs/{dataset}/figures/closest_pairs-{method}.log",
    benchmark:
        "results/{dataset}/benchmarks/figures/closest_pairs/{method}.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
    params:
        out=stem("png"),
    shell:
        "python -m cellflow.cli figures closest-pairs --inputs {input.memorization}"
        " --manifest {input.manifest} --generated {input.generated}"
        " --title '{wildcards.dataset}: {wildcards.method}' --out {params.out} --log {log}"


rule front_page:
    input:
        tables=summary_tables(),
        figures=summary_figure_outputs(),
        side_by_side=expand(
            "results/{dataset}/figures/side_by_side.png", dataset=BENCHMARK_DATASETS
        )
        + left_out_results("results/{dataset}/figures/side_by_side.png"),
        memorization=expand(
            "results/{dataset}/figures/tables/memorization.tsv",
            dataset=BENCHMARK_DATASETS,
        )
        + left_out_results("results/{dataset}/figures/tables/memorization.tsv"),
    output:
        page=report(
            FRONT_PAGE,
            caption="../report/front_page.rst",
            category="Benchmark",
            labels={"figure": "front page"},
        ),
        flags=report(
            f"{BENCHMARK_DIR}/flags.tsv",
            caption="../report/front_page.rst",
            category="Benchmark",
            labels={"figure": "flags"},
        ),
        run=f"{BENCHMARK_DIR}/run.json",
    log:
        f"logs/benchmarks/{config['benchmark']}/front_page.log",
    benchmark:
        f"{BENCHMARK_DIR}/jobs/figures/front_page.tsv"
    conda:
        "../envs/figures.yaml"
    threads: 1
    resources:
        **cluster_limits(mem_mb=2000, runtime=10),
    params:
        tables=listed("tables"),
        figures=listed("figures"),
        side_by_side=listed("side_by_side"),
        memorization=listed("memorization"),
        benchmark=config["benchmark"],
        config_files=",".join(CONFIG_FILES),
    shell:
        "python -m cellflow.cli figures front-page --inputs {params.tables}"
        " --figures {params.figures} --side-by-side {params.side_by_side}"
        " --dataset-tables {params.memorization}"
        " --title {params.benchmark:q} --configs {params.config_files:q}"
        " --out {output.page} --table {output.flags} --log {log}"


rule figures:
    input:
        figure_outputs(),
        FRONT_PAGE,
