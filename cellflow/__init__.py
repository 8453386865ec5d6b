"""Cellflow: temporal generative augmentation of pathology images.

A plain package with one module per concern; the Snakemake workflow in ``workflow/`` only wires
its functions into a DAG.
"""

__version__ = "0.2.0"
