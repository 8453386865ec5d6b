# `snakemake` in a clone runs the workflow, whose entry point is workflow/Snakefile.


include: "workflow/Snakefile"
