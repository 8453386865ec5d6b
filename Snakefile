# Cellflow: temporal generative augmentation of pathology images.
# This file is the table of contents of the workflow; the rules live in workflow/rules/.


from snakemake.utils import min_version

# the version the SLURM retries were verified with (resource functions given `rulename`)
min_version("9.27")


# The demo config is the default only: Snakemake would otherwise merge it into a
# --configfile given on the command line, adding the demo dataset to every run.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/downstream.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/figures.smk"


onstart:
    keep_previous_outputs()


onerror:
    restore_missing(PREVIOUS_OUTPUTS)


onsuccess:
    discard(PREVIOUS_OUTPUTS)


# Light jobs (tables, figures, the front page) run where Snakemake runs: on a cluster each
# would otherwise wait in the queue longer than it computes.
localrules:
    all,
    figures,
    doctor,
    summarize_downstream,
    benchmark_table,
    figure_classification,
    figure_fidelity,
    figure_trajectories,
    figure_runtimes,
    figure_training_curves,
    figure_trajectory_strips,
    figure_cellularity_curves,
    figure_fourier_stairs,
    figure_cellularity_validation,
    figure_side_by_side,
    figure_per_class,
    figure_memorization,
    figure_closest_pairs,
    front_page,


rule all:
    default_target: True
    input:
        final_outputs(),


# Preflight check before a long run: `snakemake doctor` (with --profile slurm, also the
# cluster set-up). It makes no file, so it runs every time it is asked for.
rule doctor:
    log:
        "logs/doctor.log",
    conda:
        "environment.yaml"
    params:
        configfiles=CONFIG_FILES or ["config/config.yaml"],
        executor=lambda wildcards: getattr(workflow.executor_plugin, "name", "local"),
    shell:
        "python -m cellflow.cli doctor --configfile {params.configfiles:q}"
        " --profile {params.executor} 2>&1 | tee {log}; exit ${{PIPESTATUS[0]}}"
