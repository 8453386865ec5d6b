"""The Snakemake workflow itself: dry runs of both shipped configs, lint, the demo data stage."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [str(BIN / "snakemake"), "--snakefile", str(REPO / "workflow" / "Snakefile"),
               "--directory", str(workdir), *args]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run or dry run, as rule -> number of jobs."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = {}
    for line in table.splitlines()[3:]:
        rule, _, count = line.rpartition(" ")
        if count.isdigit() and rule.strip() != "total":
            counts[rule.strip()] = int(count)
    return counts


def test_dry_run_of_the_demo_config(tmp_path):
    result = snakemake(tmp_path, "-n", "--configfile", str(REPO / "config" / "config.yaml"))
    assert "synthesize_dataset" in result.stdout and "prepare_data" in result.stdout


PRINTED_COMMAND_LIMIT = 600  # characters: one line of a wide terminal, or two


def test_dry_run_of_the_paper_config_names_missing_roots(tmp_path):
    result = snakemake(tmp_path, "-n", "-p", "--configfile", str(REPO / "config" / "paper.yaml"))
    log = result.stdout + result.stderr
    assert "dataset 'mhist': data root data/mhist does not exist yet" in log
    assert "results/synthetic" not in log, "the demo dataset must not leak into the paper run"
    counts = job_counts(result.stdout)
    assert counts["prepare_data"] == counts["train_diffusion"] == 7
    # every command is short: settings and long file lists are files the command names
    commands = [line.split("Shell command:", 1)[1].strip() for line in log.splitlines()
                if "Shell command:" in line]
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    assert len(commands) > counts["train_downstream"]
    longest = max(commands, key=len)
    assert len(longest) <= PRINTED_COMMAND_LIMIT, longest
    for command in commands:
        for spec in re.findall(r"--spec (\S+)", command):
            # logs/<dataset>/specs/<kind>-<digest>.json: that dataset's settings
            configured = paper["datasets"][spec.split("/")[1]]
            dataset = json.loads((tmp_path / spec).read_text())["dataset"]
            assert (dataset["kind"], dataset["classes"], dataset["resolution"]) == (
                configured["kind"], configured["classes"], configured["resolution"]), spec
        for listed in re.findall(r" @(\S+)", command):
            files = (tmp_path / listed).read_text().splitlines()
            assert files and all(name.startswith("results/") for name in files), listed
    summarize = next(c for c in commands if "downstream summarize --dataset mhist" in c)
    listed = re.search(r"--inputs @(\S+)", summarize).group(1)
    runs = counts["train_downstream"] // counts["summarize_downstream"]
    assert len((tmp_path / listed).read_text().splitlines()) == runs


def test_nested_command_line_settings_keep_their_types(tmp_path):
    result = snakemake(tmp_path, "-n", "--configfile", str(REPO / "config" / "config.yaml"),
                       "--config", 'bridge={"runtime_minutes": 30, "classifier_scale": 1.5}')
    assert "generate" in job_counts(result.stdout)
    typo = snakemake(tmp_path, "-n", "--configfile", str(REPO / "config" / "config.yaml"),
                     "--config", 'bridge={"frames": "many"}', check=False)
    assert typo.returncode != 0
    assert "bridge.frames: 'many' is not of type 'integer'" in typo.stdout + typo.stderr


def job_inputs(dry_run: str, rule: str) -> list[str]:
    """The input files of the one job of `rule` in a dry run's output."""
    block = dry_run.split(f"rule {rule}:", 1)[1].split("\n\n", 1)[0]
    line = next(line for line in block.splitlines() if line.strip().startswith("input:"))
    return line.split("input:", 1)[1].strip().split(", ")


def test_one_dataset_can_be_selected_on_the_command_line(tmp_path):
    paper = str(REPO / "config" / "paper.yaml")
    # another dataset's finished results, from an earlier run
    finished = ["downstream/summary.tsv", "downstream/runs.tsv", "evaluation/fidelity/real.tsv",
                "benchmarks/prepare_data.tsv", "benchmarks/figures/per_class.tsv",
                "figures/side_by_side.png"]
    for name in finished:
        (tmp_path / "results" / "chaoyang" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "results" / "chaoyang" / name).write_text("finished\n")
    result = snakemake(tmp_path, "-n", "--configfile", paper, "--config", "only_datasets=[mhist]")
    assert job_counts(result.stdout)["prepare_data"] == 1
    assert "wildcards: dataset=mhist" in result.stdout
    assert "dataset=chaoyang" not in result.stdout  # nothing of it is planned
    # ... and its rows stay in the cross-dataset tables and figures
    assert "results/chaoyang/downstream/summary.tsv" in job_inputs(result.stdout,
                                                                   "benchmark_table")
    assert "results/chaoyang/downstream/runs.tsv" in job_inputs(result.stdout,
                                                                "figure_classification")
    assert "results/chaoyang/evaluation/fidelity/real.tsv" in job_inputs(result.stdout,
                                                                         "figure_fidelity")
    runtimes = job_inputs(result.stdout, "figure_runtimes")
    assert "results/chaoyang/benchmarks/prepare_data.tsv" in runtimes
    assert "results/chaoyang/benchmarks/figures/per_class.tsv" not in runtimes
    assert "results/chaoyang/figures/side_by_side.png" in job_inputs(result.stdout, "front_page")
    typo = snakemake(tmp_path, "-n", "--configfile", paper, "--config", "only_datasets=[mhsit]",
                     check=False)
    assert typo.returncode != 0
    assert "paper.yaml + --config: only_datasets: unknown dataset 'mhsit'" in typo.stdout


def test_a_pretrained_model_replaces_its_training_job(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    given = tmp_path / "given"
    (given / "unet").mkdir(parents=True)
    config["datasets"]["synthetic"]["pretrained"] = {"diffusion": {"path": str(given)},
                                                     "decoder": {"path": str(given)}}
    path = tmp_path / "pretrained.yaml"
    path.write_text(yaml.safe_dump(config))
    plan = snakemake(tmp_path, "-n", "-p", "--configfile", str(path))
    counts = job_counts(plan.stdout)
    assert "train_diffusion" not in counts and counts["train_classifier"] == 1
    assert counts["use_pretrained"] == 2  # the diffusion model and the decoder
    # the bridge methods decode with the decoder; ADM samples with the diffusion model alone
    commands = [line for line in plan.stdout.splitlines() if "cellflow.cli generate" in line]
    assert len(commands) == 3
    for command in commands:
        assert ("--decoder results/synthetic/models/decoder" in command) == (
            " generate adm " not in command), command


def test_the_generate_rule_plans_exactly_the_configured_methods(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["generation"] = {"methods": ["adm", "dit"]}
    config["downstream"]["strategies"] = {"none": {}, "dit": {}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(config))
    plan = snakemake(tmp_path, "-n", "--configfile", str(path))
    methods = sorted(line.split("method=")[1].split(",")[0].strip()
                     for line in plan.stdout.splitlines()
                     if "wildcards:" in line and "method=" in line and "image_set" not in line
                     and "dataset=synthetic, method=" in line)
    counts = job_counts(plan.stdout)
    assert counts["generate"] == 2 and set(methods) == {"adm", "dit"}
    # the latent models are trained because DiT needs them; the LDM is not
    assert counts["train_autoencoder"] == 1 and counts["train_latent"] == 1
    assert "model=dit" in plan.stdout and "model=ldm" not in plan.stdout


def test_misspelt_key_fails_naming_it(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["datasets"]["synthetic"]["resolutoin"] = 32
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--configfile", str(path), check=False)
    assert result.returncode != 0
    assert "datasets.synthetic.resolutoin: unknown key (did you mean 'resolution'?)" in (
        result.stdout + result.stderr)
    assert str(path) in result.stdout + result.stderr


def test_every_rule_declares_log_benchmark_threads_and_resources():
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, ResourceSettings

    with SnakemakeApi() as api:
        workflow_api = api.workflow(
            snakefile=REPO / "workflow" / "Snakefile", workdir=REPO,
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=[REPO / "config" / "config.yaml"]),
        )
        # rules that only name files to build, and the preflight check, which makes none
        targets = {"all", "figures", "doctor"}
        rules = [rule for rule in workflow_api._workflow.rules if rule.name not in targets]
    assert rules
    for rule in rules:
        assert rule.log, f"rule {rule.name} has no log"
        assert rule.benchmark, f"rule {rule.name} has no benchmark"
        assert {"mem_mb", "runtime"} <= set(rule.resources), f"rule {rule.name} resources"


def test_lint_and_format_are_clean():
    result = snakemake(REPO, "--lint", check=False)
    assert result.returncode == 0 and "Lints for" not in result.stdout + result.stderr, (
        result.stdout + result.stderr)
    fmt = subprocess.run([str(BIN / "snakefmt"), "--check", "workflow"],
                         cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr
    ruff = subprocess.run([str(BIN / "ruff"), "check", "cellflow", "tests", "benchmarks"],
                          cwd=REPO, capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout


@pytest.fixture(scope="module")
def demo_run(deployed_test_run) -> tuple[Path, Path]:
    """The tiny demo (the .test config), run once through a deployment of the workflow
    (tests/conftest.py): (working directory, config file)."""
    return deployed_test_run.folder, deployed_test_run.config


@pytest.mark.slow
def test_demo_pipeline_end_to_end(demo_run, tmp_path):
    workdir, config = demo_run
    data = workdir / "results" / "synthetic" / "data"
    manifest = pd.read_csv(data / "manifest.tsv", sep="\t", keep_default_na=False)
    assert len(manifest) == 24
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert {"progression", "nuclei_count", "nuclear_area_fraction", "mask_path"} <= set(
        manifest.columns)
    assert all((data / path).is_file() for path in manifest["path"])
    assert all((data / path).is_file() for path in manifest["mask_path"])
    # the generator's progression bands survive into the manifest, class by class
    bands = manifest.groupby("label")["progression"].agg(["min", "max"])
    assert (bands["max"].iloc[:-1].to_numpy() <= bands["min"].iloc[1:].to_numpy()).all()
    assert (workdir / "logs" / "synthetic" / "prepare_data.log").is_file()
    assert (workdir / "results" / "synthetic" / "benchmarks" / "prepare_data.tsv").is_file()
    models = workdir / "results" / "synthetic" / "models"
    assert (models / "diffusion" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (models / "classifier" / "classifier" / "config.json").is_file()
    assert len(pd.read_csv(models / "diffusion" / "train_log.csv")) == 3
    trajectories = workdir / "results" / "synthetic" / "trajectories"
    cellflow = pd.read_csv(trajectories / "cellflow" / "manifest.tsv", sep="\t")
    assert len(cellflow) == 2 * 2 * 2  # transitions x sources x frames
    assert len(pd.read_csv(trajectories / "adm" / "manifest.tsv", sep="\t")) == 3
    assert (trajectories / "cellflow" / "strips" / "normal-to-hyperplastic.png").is_file()
    # the null class: one label embedding more than classes
    unet_config = json.loads((models / "diffusion" / "unet" / "config.json").read_text())
    assert unet_config["num_class_embeds"] == 4
    summary = pd.read_csv(workdir / "results" / "synthetic" / "downstream" / "summary.tsv",
                          sep="\t")
    assert set(summary["strategy"]) == {"none", "cellflow", "elsewhere"}
    latent_manifest = pd.read_csv(trajectories / "dit" / "manifest.tsv", sep="\t")
    assert len(latent_manifest) == 3 and set(latent_manifest["method"]) == {"dit"}
    assert (models / "autoencoder" / "vae" / "config.json").is_file()
    assert len(pd.read_csv(trajectories / "elsewhere" / "manifest.tsv", sep="\t")) == 6
    benchmark = pd.read_csv(workdir / "results" / "benchmarks" / "tiny" / "benchmark.tsv",
                            sep="\t")
    assert len(benchmark) == len(summary)
    checkpoints = workdir / "results" / "synthetic" / "checkpoints" / "diffusion"
    assert sorted(p.name for p in checkpoints.glob("*/step-*")) == ["step-0000002", "step-0000003"]
    # a second run has nothing to do
    again = snakemake(workdir, "--cores", "2", "--configfile", str(config), "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    # changing a diffusion setting reruns that model only
    override = tmp_path / "faster.yaml"
    override.write_text("diffusion: {train: {learning_rate: 0.002}}\n")
    changed = snakemake(workdir, "--cores", "2", "-n", "--configfile", str(config),
                        str(override))
    rerun = job_counts(changed.stdout)
    assert "train_diffusion" in rerun
    assert "train_classifier" not in rerun and "prepare_data" not in rerun


def _reordered(value):
    """The same config with every mapping's keys in reverse order."""
    if isinstance(value, dict):
        return {key: _reordered(value[key]) for key in reversed(list(value))}
    return value


@pytest.mark.slow
def test_settings_that_do_not_change_a_result_replan_nothing(demo_run, tmp_path):
    workdir, config = demo_run
    base = yaml.safe_load(config.read_text())

    def dry_run(edit) -> dict[str, int]:
        changed = _reordered(base) if edit is None else json.loads(json.dumps(base))
        if edit is not None:
            edit(changed)
        path = tmp_path / "changed.yaml"
        path.write_text(yaml.safe_dump(changed, sort_keys=False))
        result = snakemake(workdir, "-n", "--cores", "2", "--configfile", str(path))
        if "Nothing to be done" in result.stdout + result.stderr:
            return {}
        return job_counts(result.stdout)

    def longer_time_limits(changed):
        for section in (changed["bridge"], changed["diffusion"]["train"],
                        changed["classifier"]["train"], changed["downstream"]["train"]):
            section["runtime_minutes"] = 240
        changed.setdefault("evaluation", {})["runtime_minutes"] = 240

    # The front page records which config file made it: a copied config redraws only that.
    record = {"front_page", "all"}
    assert set(dry_run(longer_time_limits)) <= record
    assert set(dry_run(None)) <= record  # the same values in another key order
    more_adm = dry_run(lambda changed: changed["baselines"]["adm"].update(per_class=2))
    assert more_adm["generate"] == 1  # ADM's job alone: Cellflow's and DDIB's stay
    assert "train_downstream" not in more_adm
    another_seed = dry_run(lambda changed: changed["downstream"].update(seeds=[0, 1]))
    assert another_seed["train_downstream"] == len(base["downstream"]["strategies"])
    assert "fidelity" not in another_seed and "generate" not in another_seed


@pytest.mark.slow
def test_demo_evaluation_tables(demo_run):
    workdir, _ = demo_run
    evaluation = workdir / "results" / "synthetic" / "evaluation"
    real = pd.read_csv(evaluation / "cellularity" / "real.tsv", sep="\t")
    assert len(real) == 24 and (real["nuclear_area_fraction"].between(0, 1)).all()
    fidelity = pd.read_csv(evaluation / "fidelity" / "cellflow.tsv", sep="\t")
    assert fidelity["class"].tolist() == ["all", "normal", "hyperplastic", "neoplastic"]
    assert {"fid_domain", "kid_domain_mean", "n_real", "n_generated", "kid_subset_size"} <= set(
        fidelity.columns)
    assert not any("inception" in column for column in fidelity.columns)
    assert fidelity.loc[0, "n_generated"] == 8
    summary = pd.read_csv(evaluation / "trajectories" / "summary.tsv", sep="\t")
    assert len(summary) == 4  # transitions x sources
    assert summary["target_probability_last"].between(0, 1).all()
    frames = pd.read_csv(evaluation / "trajectories" / "frames.tsv", sep="\t")
    assert len(frames) == 4 * 3  # the source image and two frames per trajectory
    coherence = pd.read_csv(evaluation / "coherence.tsv", sep="\t")
    assert len(coherence) == 4 and coherence["ssim"].between(-1, 1).all()
    validation = json.loads((evaluation / "cellularity_validation.json").read_text())
    assert validation["images"] == 24


SUMMARY_FIGURES = ["classification", "fidelity", "trajectories", "runtimes"]
DATASET_FIGURES = ["training_curves", "trajectory_strips", "cellularity_curves",
                   "fourier_stairs", "cellularity_validation", "side_by_side", "memorization",
                   "per_class", "closest_pairs/cellflow", "closest_pairs/adm"]


# Python started with this on its path cannot import what figures.yaml leaves out.
FIGURES_ENVIRONMENT_ONLY = """
import sys

LEFT_OUT = {"torch", "torchvision", "timm", "diffusers", "accelerate", "safetensors",
            "torchmetrics", "torch_fidelity", "skimage", "sklearn"}


class LeftOut:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in LEFT_OUT:
            raise ModuleNotFoundError(f"{name} is not in workflow/envs/figures.yaml")


sys.meta_path.insert(0, LeftOut())
"""


@pytest.mark.slow
def test_figures_are_redrawn_from_a_copied_results_tree_without_retraining(demo_run, tmp_path):
    workdir, config = demo_run
    benchmark = workdir / "results" / "benchmarks" / "tiny"
    figures = workdir / "results" / "synthetic" / "figures"
    for path in ([benchmark / "figures" / name for name in SUMMARY_FIGURES]
                 + [figures / name for name in DATASET_FIGURES]):
        for suffix in (".png", ".pdf"):
            assert path.with_suffix(suffix).is_file(), path
    for table in SUMMARY_FIGURES:
        for suffix in (".tsv", ".md"):
            assert (benchmark / "tables" / f"{table}{suffix}").is_file()
    for table in ("memorization", "per_class"):
        assert (figures / "tables" / f"{table}.md").is_file()
    # a results tree moved elsewhere (no .snakemake metadata; file times kept, as `cp -a`
    # and rsync -a keep them), two figures deleted: a fresh clone (every file of the workflow
    # newer than the results) plans those two and the pages that show them
    clone = tmp_path / "clone"
    for part in ("cellflow", "workflow", "config", "profiles"):
        shutil.copytree(REPO / part, clone / part, symlinks=True, copy_function=shutil.copy,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("environment.yaml", "pyproject.toml"):
        shutil.copy(REPO / part, clone / part)
    shutil.copytree(workdir / "results", tmp_path / "results")
    for figure in (benchmark / "figures" / "runtimes", figures / "fourier_stairs"):
        for suffix in (".png", ".pdf"):
            (tmp_path / figure.with_suffix(suffix).relative_to(workdir)).unlink()
    command = [str(BIN / "snakemake"), "--snakefile", str(clone / "workflow" / "Snakefile"),
               "--directory", str(tmp_path), "figures", "--cores", "2", "--configfile", str(config)]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    plan = subprocess.run([*command, "-n"], capture_output=True, text=True, timeout=600, env=env)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    planned = job_counts(plan.stdout + plan.stderr)
    assert set(planned) == {"figure_runtimes", "figure_fourier_stairs", "front_page",
                            "figures"}, planned
    # ... and every table and figure job, redrawn there, runs in the environment of
    # workflow/envs/figures.yaml: none of the compute packages
    blocker = tmp_path / "figures-environment"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(FIGURES_ENVIRONMENT_ONLY)
    light = [*re.findall(r"^rule (figure_\w+|front_page):", (REPO / "workflow" / "rules" /
                                                              "figures.smk").read_text(), re.M),
             "summarize_downstream", "benchmark_table"]
    redraw = subprocess.run([*command, "--forcerun", *light], capture_output=True, text=True,
                            timeout=600, env={**env, "PYTHONPATH": str(blocker)})
    assert redraw.returncode == 0, redraw.stdout + redraw.stderr
    assert set(light) <= set(job_counts(redraw.stdout + redraw.stderr))
    assert (tmp_path / "results" / "synthetic" / "figures" / "fourier_stairs.pdf").is_file()


@pytest.mark.slow
def test_the_memorization_check_covers_every_generative_method(demo_run):
    workdir, _ = demo_run
    evaluation = workdir / "results" / "synthetic" / "evaluation" / "memorization"
    for method in ("cellflow", "adm"):
        neighbours = pd.read_csv(evaluation / method / "neighbours.tsv", sep="\t")
        assert neighbours["distance_pixel"].ge(0).all()
        assert {"ratio_pixel", "ratio_domain", "nearest_id_pixel"} <= set(neighbours.columns)
    summary = pd.read_csv(workdir / "results" / "synthetic" / "figures" / "tables"
                          / "memorization.tsv", sep="\t", keep_default_na=False)
    assert set(summary["method"]) == {"real", "cellflow", "adm", "dit", "elsewhere"}
    assert "flags" in summary.columns


def rewrite_table(path: Path, column: str) -> None:
    """Change one column of a results table, as a rerun or a corrected analysis would."""
    table = pd.read_csv(path, sep="\t")
    table[column] = table[column] * 0.5
    table.to_csv(path, sep="\t", index=False)


@pytest.mark.slow
def test_a_changed_table_reruns_only_the_figures_that_read_it(demo_run):
    workdir, config = demo_run
    rewrite_table(workdir / "results" / "synthetic" / "evaluation" / "coherence.tsv", "ssim")
    plan = snakemake(workdir, "-n", "--configfile", str(config))
    assert set(job_counts(plan.stdout)) == {"figure_trajectories", "front_page", "all"}
    rewrite_table(workdir / "results" / "benchmarks" / "tiny" / "benchmark.tsv", "mean")
    plan = snakemake(workdir, "figures", "-n", "--configfile", str(config))
    assert set(job_counts(plan.stdout)) == {"figure_trajectories", "figure_classification",
                                            "front_page", "figures"}


@pytest.mark.slow
def test_the_report_command_builds_a_browsable_report(demo_run):
    workdir, config = demo_run
    report = workdir / "report.html"
    snakemake(workdir, "--configfile", str(config), "--report", str(report))
    html = report.read_text()
    assert "cellularity_curves.png" in html and "classification.png" in html
    assert "side_by_side.png" in html and "memorization.png" in html
    # the landing page is the front page: the benchmark's tables and its flags
    assert "cellflow-front" in html and "Flagged results" in html


@pytest.mark.slow
def test_the_report_of_another_config_names_the_configfile_to_pass(demo_run):
    workdir, config = demo_run
    demo = REPO / "config" / "config.yaml"
    result = snakemake(workdir, "--report", str(workdir / "wrong.html"), "--configfile",
                       str(demo), check=False)
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "no results of benchmark 'demo'" in log
    # named from the working directory, where the run and the report run
    assert f"'tiny' (--configfile {config.relative_to(workdir)})" in log


@pytest.mark.slow
def test_two_configs_keep_their_cross_dataset_outputs_apart(demo_run, tmp_path):
    workdir, config = demo_run
    tiny = workdir / "results" / "benchmarks" / "tiny"
    before = {path: path.read_bytes() for path in tiny.rglob("*") if path.is_file()}
    other = tmp_path / "other.yaml"
    other.write_text(config.read_text() + "benchmark: other\n")
    snakemake(workdir, "--cores", "2", "--configfile", str(other))
    assert (workdir / "results" / "benchmarks" / "other" / "front_page.html").is_file()
    after = {path: path.read_bytes() for path in tiny.rglob("*") if path.is_file()}
    assert after == before


def test_readme_rule_graph_shows_every_rule(tmp_path):
    result = snakemake(tmp_path, "--rulegraph", "mermaid-js", "--configfile",
                       str(REPO / "config" / "config.yaml"))
    rules = {line.split("[", 1)[1].rstrip("]") for line in result.stdout.splitlines()
             if line.strip().startswith("id") and "[" in line}
    readme = (REPO / "README.md").read_text()
    graph = readme.split("```mermaid", 1)[1].split("```", 1)[0]
    missing = sorted(rule for rule in rules if rule not in graph)
    assert not missing, f"README rule graph lacks {missing}"


def test_images_added_to_a_class_folder_rerun_the_data_stage(make_folder_dataset, tmp_path):
    root = make_folder_dataset({"a": 6, "b": 6}, size=40)
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["datasets"] = {"mine": {"kind": "folder", "root": str(root), "resolution": 32,
                                   "classes": ["a", "b"]}}
    config["downstream"]["strategies"] = {"none": {}}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "run"
    target = "results/mine/data/manifest.tsv"
    snakemake(workdir, target, "--cores", "1", "--configfile", str(path))
    unchanged = snakemake(workdir, target, "-n", "--configfile", str(path))
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr
    # new files inside a/: the root folder's own modification time does not change
    incoming = make_folder_dataset({"a": 9}, size=40, seed=1, root=tmp_path / "incoming")
    for image in (incoming / "a").iterdir():
        image.rename(root / "a" / f"new_{image.name}")
    added = snakemake(workdir, target, "-n", "--configfile", str(path))
    assert job_counts(added.stdout) == {"prepare_data": 1}
    assert "Params have changed since last execution" in added.stdout


@pytest.mark.slow
def test_a_failed_rerun_keeps_the_previous_result_and_the_next_run_redoes_it(demo_run):
    workdir, config = demo_run
    results = workdir / "results" / "synthetic"
    confusion = results / "downstream" / "confusion.tsv"
    figure = results / "figures" / "per_class.png"
    previous, good = figure.read_bytes(), confusion.read_text()
    confusion.write_text("not a table\n")  # the rerun of figure_per_class fails on it
    target = "results/synthetic/figures/per_class.png"
    failed = snakemake(workdir, "--cores", "1", target, "--configfile", str(config), check=False)
    assert failed.returncode != 0
    assert figure.read_bytes() == previous, "the failed rerun lost the previous figure"
    assert f"kept the previous {target}" in failed.stdout + failed.stderr
    assert not (workdir / "results" / ".previous").exists()
    confusion.write_text(good)
    plan = snakemake(workdir, "-n", target, "--configfile", str(config))
    assert "figure_per_class" in job_counts(plan.stdout)  # kept, but not taken as finished
    snakemake(workdir, "--cores", "1", target, "--configfile", str(config))


@pytest.mark.slow
def test_every_method_reports_the_counters_its_registry_entry_names(demo_run):
    from cellflow.generation import methods_of

    workdir, config = demo_run
    methods = methods_of(yaml.safe_load(config.read_text()))
    trajectories = workdir / "results" / "synthetic" / "trajectories"
    for name in yaml.safe_load(config.read_text())["generation"]["methods"]:
        summary = json.loads((trajectories / name / "generation.json").read_text())
        assert set(methods[name].counters) <= set(summary), name
        manifest = pd.read_csv(trajectories / name / "manifest.tsv", sep="\t")
        trajectories_made = methods[name].writes == "trajectory frames"
        assert summary["outputs"] == (manifest.groupby(["source_id", "target_class"]).ngroups
                                      if trajectories_made else len(manifest)), name


def test_an_official_layout_is_prepared_and_a_pool_fits_a_model_for_it(tmp_path):
    from tests.layouts.cpia import make_cpia
    from tests.layouts.mhist import make_mhist

    mhist = make_mhist(tmp_path / "mhist")
    pool = make_cpia(tmp_path / "cpia")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["datasets"] = {
        "mhist": {"kind": "mhist", "root": str(mhist.root), "resolution": 16,
                  "classes": ["HP", "SSA"], "transitions": [{"source": "HP", "target": "SSA"}],
                  "pretrained": {"autoencoder": {"path": "results/cpia/models/autoencoder"}}},
        "cpia": {"kind": "cpia", "root": str(pool.root), "resolution": 16},
    }
    config["generation"] = {"methods": ["cellflow", "ldm"]}
    path = tmp_path / "official.yaml"
    path.write_text(yaml.safe_dump(config))
    planned = job_counts(snakemake(tmp_path, "-n", "--configfile", str(path)).stdout)
    # the pool is only prepared and fitted on; the benchmark dataset uses what it fits
    assert planned["prepare_data"] == 2 and planned["train_autoencoder"] == 1
    assert planned["use_pretrained"] == 1 and planned["train_diffusion"] == 1
    assert planned["train_latent"] == 1 and "train_downstream" in planned

    snakemake(tmp_path, "results/mhist/data/manifest.tsv", "--cores", "1", "--configfile",
              str(path))
    manifest = pd.read_csv(tmp_path / "results" / "mhist" / "data" / "manifest.tsv", sep="\t")
    assert {"ssa_votes", "agreement"} <= set(manifest.columns)
    assert set(manifest["split"]) == {"train", "val", "test"}
    source = json.loads((tmp_path / "results" / "mhist" / "data" / "source.json").read_text())
    assert source["kind"] == "mhist" and source["published_count_mismatches"]
    # a changed annotation file prepares the dataset again; nothing else is planned for it
    # (Snakemake compares contents: a file merely touched is not a change)
    sheet = mhist.root / "annotations.csv"
    sheet.write_text(sheet.read_text().replace(",0,train", ",1,train", 1))
    replanned = job_counts(snakemake(tmp_path, "-n", "results/mhist/data/manifest.tsv",
                                     "--configfile", str(path)).stdout)
    assert replanned == {"prepare_data": 1}


def test_a_sharded_method_writes_what_one_job_wrote(demo_run, tmp_path):
    workdir, config = demo_run
    shutil.copytree(workdir / "results", tmp_path / "results")
    settings = yaml.safe_load(config.read_text())
    settings["generation"]["shards"] = 2
    sharded = tmp_path / "sharded.yaml"
    sharded.write_text(yaml.safe_dump(settings))
    target = "results/synthetic/trajectories/adm"
    shutil.rmtree(tmp_path / target)  # a copied tree has no Snakemake records to replan from
    planned = job_counts(snakemake(tmp_path, "-n", target, "--configfile", str(sharded)).stdout)
    assert planned == {"generate_shard": 2, "generate": 1}
    snakemake(tmp_path, target, "--cores", "2", "--configfile", str(sharded))
    one_job, two_shards = workdir / target, tmp_path / target
    images = sorted(p.relative_to(one_job) for p in one_job.rglob("*.png"))
    assert images == sorted(p.relative_to(two_shards) for p in two_shards.rglob("*.png"))
    assert images
    for path in images:
        assert (two_shards / path).read_bytes() == (one_job / path).read_bytes()
    assert (two_shards / "manifest.tsv").read_text() == (one_job / "manifest.tsv").read_text()
    # the shards' records are temporary: consumed by the gather and removed
    records = tmp_path / "results" / "synthetic" / "trajectories" / "shards"
    assert not list(records.rglob("*.json"))


@pytest.mark.slow
def test_a_sharded_evaluation_writes_what_one_job_wrote(demo_run, tmp_path):
    workdir, config = demo_run
    shutil.copytree(workdir / "results", tmp_path / "results")
    shutil.rmtree(tmp_path / "results" / "synthetic" / "checkpoints" / "features")
    settings = yaml.safe_load(config.read_text())
    settings["evaluation"] = {**settings.get("evaluation", {}), "shards": 2}
    sharded = tmp_path / "sharded.yaml"
    sharded.write_text(yaml.safe_dump(settings))
    tables = ["results/synthetic/evaluation/cellularity/adm.tsv",
              "results/synthetic/evaluation/fidelity/adm.tsv"]
    for table in tables:
        (tmp_path / table).unlink()
    planned = job_counts(snakemake(tmp_path, "-n", *tables, "--configfile", str(sharded)).stdout)
    assert planned == {"evaluate_shard": 2, "measure_cellularity": 1, "fidelity": 1}
    snakemake(tmp_path, *tables, "--cores", "2", "--configfile", str(sharded))
    for table in tables:
        assert (tmp_path / table).read_text() == (workdir / table).read_text(), table
    # the shards computed every feature chunk (the cache was empty); their records and rows
    # are gone
    assert list((tmp_path / "results" / "synthetic" / "checkpoints" / "features").glob("*"))
    assert not list((tmp_path / "results" / "synthetic" / "checkpoints" / "evaluation"
                     ).rglob("*.tsv"))
    assert not list((tmp_path / "results" / "synthetic" / "evaluation" / "shards").rglob("*.json"))


def test_every_job_leaves_a_complete_provenance_record(demo_run):
    from cellflow.provenance import RECORD_KEYS, read_provenance

    workdir, config = demo_run
    planned = job_counts(snakemake(workdir, "-n", "--forceall", "--configfile",
                                   str(config)).stdout)
    jobs = sum(count for rule, count in planned.items() if rule not in ("all", "figures"))
    results = workdir / "results"
    other_runs = [folder for folder in (results / "benchmarks").iterdir()
                  if folder.name != "tiny"]  # another config's, written in this folder
    records = [path for path in (*results.rglob("provenance.json"),
                                 *results.rglob(".provenance/*.json"))
               if not any(folder in path.parents for folder in other_runs)]
    assert len(records) == jobs  # one per job: its folder's, or its (first) file's
    read = [read_provenance(path) for path in records]  # every key present, or it raises
    assert all(set(RECORD_KEYS) <= set(record) for record in read)
    assert {"data prepare", "data synthesize", "train diffusion", "generate cellflow",
            "evaluate fidelity", "figures classification"} <= {r["rule"] for r in read}
    assert all(record["code"]["commit"] for record in read)  # run from this checkout


def test_a_run_with_an_unknown_backbone_stops_before_any_job(tmp_path):
    config = yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())
    config["downstream"]["backbones"] = ["resnet10tt"]
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--cores", "1", "--configfile", str(path), check=False)
    assert result.returncode != 0
    assert ("downstream.backbones[0]: unknown timm model 'resnet10tt' (did you mean "
            "resnet10t?)") in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()
