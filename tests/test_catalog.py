"""The workflow catalog's standard layout, and the catalog file's flags held to what the
workflow does: conda environments per rule, an image for apptainer, a report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

import cellflow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def rules():
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, ResourceSettings

    with SnakemakeApi() as api:
        workflow_api = api.workflow(
            snakefile=REPO / "workflow" / "Snakefile", workdir=REPO,
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=[REPO / "config" / "config.yaml"]))
        workflow = workflow_api._workflow
        yield workflow, list(workflow.rules)


def environment_of(rule) -> Path | None:
    """The conda environment file a rule names, wherever it names it from."""
    if rule.conda_env is None:
        return None
    path = rule.conda_env if isinstance(rule.conda_env, str) else \
        rule.conda_env.get_path_or_uri(secret_free=True)
    return (Path(rule.snakefile).parent / path).resolve()


def requirement_lines(environment: Path) -> list[str]:
    spec = yaml.safe_load(environment.read_text())
    return next(item["pip"] for item in spec["dependencies"] if isinstance(item, dict))


def test_the_catalog_files_exist_and_parse():
    for name in ("workflow/Snakefile", "config/README.md", "config/config.yaml", "LICENSE",
                 "CHANGELOG.md", ".test/config/config.yaml", "profiles/default/profile.yaml"):
        assert (REPO / name).is_file(), name
    assert "MIT License" in (REPO / "LICENSE").read_text()
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert set(catalog["usage"]) == {"mandatory-flags", "software-stack-deployment", "report"}
    assert set(catalog["usage"]["software-stack-deployment"]) <= {
        "conda", "apptainer", "apptainer+conda"}
    from cellflow.config import load_config

    load_config(REPO / ".test" / "config" / "config.yaml")


def test_the_version_is_declared_once_and_released_in_the_changelog():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "cellflow.__version__"}
    newest = re.search(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.M).group(1)
    assert newest == cellflow.__version__
    printed = subprocess.run([sys.executable, "-m", "cellflow.cli", "--version"],
                             capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == f"cellflow {cellflow.__version__}"


def test_conda_flag_every_job_rule_has_an_environment_drawn_from_pyproject(rules):
    workflow, all_rules = rules
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert catalog["usage"]["software-stack-deployment"]["conda"] is True
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = set(pyproject["dependencies"])
    jobs = [rule for rule in all_rules if rule.shellcmd]
    assert jobs
    for rule in jobs:
        environment = environment_of(rule)
        assert environment is not None, f"rule {rule.name} has no conda environment"
        assert environment.is_file(), (rule.name, environment)
        assert set(requirement_lines(environment)) <= declared, (
            f"{environment.name} names a requirement pyproject.toml does not")


def test_tables_and_figures_have_an_environment_without_torch(rules):
    _, all_rules = rules
    light = REPO / "workflow" / "envs" / "figures.yaml"
    names = {re.split(r"[<>=!;\s]", line, maxsplit=1)[0] for line in requirement_lines(light)}
    assert not names & {"torch", "torchvision", "timm", "diffusers", "accelerate"}
    on_light = {rule.name for rule in all_rules if environment_of(rule) == light}
    assert {"front_page", "figure_classification", "summarize_downstream",
            "benchmark_table"} <= on_light
    assert "train_diffusion" not in on_light


def test_apptainer_flag_the_workflow_names_the_configured_image(rules):
    workflow, all_rules = rules
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert catalog["usage"]["software-stack-deployment"]["apptainer"] is True
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "pip install --no-cache-dir ." in dockerfile
    for needed in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (REPO / needed).exists(), f"the Dockerfile copies {needed}, which is missing"
    assert all(rule.container_img is None for rule in all_rules)  # the demo names none

    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, ResourceSettings

    with SnakemakeApi() as api:
        imaged = api.workflow(
            snakefile=REPO / "workflow" / "Snakefile", workdir=REPO,
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=[REPO / "config" / "config.yaml"],
                                           config={"container": "cellflow-0.2.0.sif"}))
        assert {rule.container_img for rule in imaged._workflow.rules if rule.shellcmd} == {
            "cellflow-0.2.0.sif"}


def test_report_flag_every_caption_exists(rules):
    workflow, all_rules = rules
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert catalog["usage"]["report"] is True
    assert workflow.report_text is not None
    captions = re.findall(r'caption="([^"]+)"',
                          "".join(path.read_text()
                                  for path in (REPO / "workflow" / "rules").glob("*.smk")))
    assert captions
    for caption in captions:
        assert (REPO / "workflow" / "rules" / caption).resolve().is_file(), caption


def test_the_config_readme_key_reference_is_current():
    from cellflow.config_docs import README, key_reference, with_reference

    text = README.read_text()
    assert with_reference(text, key_reference()) == text, (
        "config/README.md is out of date: python -m cellflow.config_docs")
    for key in ("`bridge.inversion_steps`", "`datasets.<name>.kind`",
                "`downstream.backbones`", "`container`"):
        assert key in text


def test_the_key_reference_lists_every_key_of_the_schema():
    from cellflow.config import load_schema
    from cellflow.config_docs import key_rows

    schema = load_schema()
    keys = [row[0] for row in key_rows(schema, schema)]
    assert len(keys) == len(set(keys))
    assert set(schema["properties"]) <= set(keys)
    assert "datasets.<name>.options.min_agreement" in keys  # a kind's own option
    assert "bridge.classifier_scale" in keys
