# The two commands of the README: `make demo` and `make test`. Both set up the environment first.
SHELL := /bin/bash
VENV := .venv/bin
export PATH := $(CURDIR)/$(VENV):$(PATH)
CORES ?= 2

.PHONY: demo test proof setup lint format dag clean

demo: setup  ## run the pipeline on the built-in synthetic demo
	snakemake --cores $(CORES)

test: setup  ## run the test suite
	python -m pytest

proof: setup  ## the proof run: trained models, both stair rules, 5 seeds (~2 h on 2 CPU cores)
	python -m benchmarks.proof_run --cores $(CORES)

setup:  ## create or reuse the cached environment and link it at .venv
	@bash tools/setup-env.sh

lint: setup  ## what CI checks besides the tests
	ruff check cellflow tests benchmarks
	snakefmt --check workflow
	snakemake --lint

format: setup
	ruff check --fix cellflow tests benchmarks
	snakefmt workflow

dag: setup  ## print the rule graph as Mermaid (the README's picture of the workflow)
	@snakemake --rulegraph mermaid-js 2>/dev/null

clean:  ## remove outputs of the pipeline (not the environment)
	rm -rf results logs .snakemake
