# The image for `snakemake --sdm apptainer` (config key `container`): Python, every runtime
# dependency of pyproject.toml and the cellflow package, nothing else. README "Containers":
#   docker build -t cellflow:0.2.0 .
#   apptainer build cellflow-0.2.0.sif docker-daemon://cellflow:0.2.0
#   snakemake --sdm apptainer --apptainer-args "--nv" --config container=cellflow-0.2.0.sif
# torch's PyPI wheels carry their CUDA libraries; --nv brings the host's driver in.
FROM python:3.11-slim

# procps: ps and free, which Snakemake and the preflight check call inside jobs
RUN apt-get update && apt-get install -y --no-install-recommends procps git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cellflow
COPY pyproject.toml README.md LICENSE ./
COPY cellflow ./cellflow
COPY workflow/schemas ./workflow/schemas
# pyproject.toml's dependencies are the one list; the package is installed, not linked, so the
# image runs the version it was built from whatever the host's clone holds.
RUN pip install --no-cache-dir . && python -m cellflow.cli --version

ENV MPLBACKEND=Agg
CMD ["cellflow", "--help"]
