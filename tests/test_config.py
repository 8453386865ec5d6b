from pathlib import Path

import pytest
import yaml

from cellflow.config import ConfigError, dataset_configs, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "config" / "config.yaml"


def demo() -> dict:
    return yaml.safe_load(DEMO.read_text())


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml", "proof.yaml"])
def test_shipped_configs_are_valid(name):
    config = load_config(REPO / "config" / name)
    for dataset in dataset_configs(config).values():
        assert len(dataset.classes) >= 2
        assert all(t.source in dataset.classes and t.target in dataset.classes
                   for t in dataset.transitions)


def test_defaults_are_filled_in():
    raw = demo()
    del raw["prepare"]
    del raw["datasets"]["synthetic"]["split"]
    config = validate_config(raw)
    assert config["prepare"]["on_corrupt"] == "exclude"
    assert config["datasets"]["synthetic"]["split"] == {"val_fraction": 0.15,
                                                        "test_fraction": 0.15}
    assert config["only_datasets"] == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c.update(seeed=1), "seeed: unknown key (did you mean 'seed'?)"),
        (lambda c: c["datasets"]["synthetic"].update(resolutoin=64),
         "datasets.synthetic.resolutoin: unknown key (did you mean 'resolution'?)"),
        (lambda c: c["prepare"].update(on_corrupt="ignore"), "prepare.on_corrupt"),
        (lambda c: c["datasets"]["synthetic"].update(resolution="64"),
         "datasets.synthetic.resolution: '64' is not of type 'integer'"),
        (lambda c: c["datasets"]["synthetic"]["transitions"].append(
            {"source": "normal", "target": "tumour"}),
         "datasets.synthetic.transitions[2].target: unknown class 'tumour'"),
        (lambda c: c["datasets"]["synthetic"].update(classes=["normal"]),
         "datasets.synthetic.classes"),
        (lambda c: c["datasets"]["synthetic"].update(kind="folder"),
         "datasets.synthetic: 'root' is a required property"),
        (lambda c: c.update(only_datasets=["mhist"]), "only_datasets: unknown dataset 'mhist'"),
        (lambda c: c["datasets"].update({"bad/name": c["datasets"]["synthetic"]}), "bad/name"),
        (lambda c: c["downstream"]["strategies"].pop("none"),
         "evaluation.feature_network: needs the downstream strategy 'none'"),
        (lambda c: c.update(evaluation={"feature_network": {"backbone": "vit_small"}}),
         "evaluation.feature_network.backbone: 'vit_small' is not one of downstream.backbones"),
        (lambda c: c.update(evaluation={"cellularity": {"treshold_floor": 0.1}}),
         "evaluation.cellularity.treshold_floor: unknown key (did you mean 'threshold_floor'?)"),
        (lambda c: c["bridge"].update(stair_selection="entropy"), "bridge.stair_selection"),
        (lambda c: c["bridge"].update(inversion_steps=30),
         "bridge.inversion_steps: 30 must divide noise_schedule.num_train_timesteps"),
        (lambda c: c["bridge"].update(frames=25), "bridge.frames: 25 stairs do not fit in 20"),
        (lambda c: c["datasets"]["synthetic"].update(split={"group": {"patern": "P\\d+"}}),
         "datasets.synthetic.split.group.patern: unknown key (did you mean 'pattern'?)"),
        (lambda c: c["datasets"]["synthetic"].update(
            split={"group": {"sheet": "s.tsv", "column": "patient", "path_colum": "file"}}),
         "datasets.synthetic.split.group.path_colum: unknown key (did you mean 'path_column'?)"),
        (lambda c: c["datasets"]["synthetic"].update(
            split={"group": {"pattern": "P\\d+", "sheet": "s.tsv", "column": "patient"}}),
         "datasets.synthetic.split.group: "),
        (lambda c: c["datasets"]["synthetic"].update(split={"group": {"sheet": "s.tsv"}}),
         "datasets.synthetic.split.group: "),
    ],
)
def test_errors_name_the_file_and_the_key(edit, expected):
    config = demo()
    edit(config)
    with pytest.raises(ConfigError) as caught:
        validate_config(config, source="config/mine.yaml")
    assert "config/mine.yaml" in str(caught.value)
    assert expected in str(caught.value)


def test_group_rules_are_parsed_into_the_split_config():
    from cellflow.config import GroupRule

    config = demo()
    config["datasets"]["second"] = dict(config["datasets"]["synthetic"])
    config["datasets"]["synthetic"]["split"] = {"group": {"pattern": r"(P\d+)_"}}
    config["datasets"]["second"]["split"] = {"group": {"sheet": "s.tsv", "column": "patient"}}
    datasets = dataset_configs(validate_config(config))
    assert datasets["synthetic"].split.group == GroupRule(pattern=r"(P\d+)_")
    assert datasets["second"].split.group == GroupRule(sheet=Path("s.tsv"), column="patient",
                                                       path_column="path")
    assert datasets["second"].split.val_fraction == 0.15
    assert dataset_configs(validate_config(demo()))["synthetic"].split.group is None


def test_cellularity_defaults_of_the_schema_are_the_estimators():
    from dataclasses import asdict

    from cellflow.cellularity import CellularityConfig

    filled = validate_config(demo())["evaluation"]["cellularity"]
    assert filled == asdict(CellularityConfig())


def test_load_config_names_a_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("datasets: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)


def test_only_datasets_selects_a_subset():
    config = demo()
    config["datasets"]["second"] = dict(config["datasets"]["synthetic"])
    config["only_datasets"] = ["second"]
    assert list(dataset_configs(validate_config(config))) == ["second"]


def test_environment_yaml_mirrors_pyproject():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    environment = yaml.safe_load((REPO / "environment.yaml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert pip_section == wanted


def test_check_config_command(tmp_path, capsys):
    from cellflow.cli import main

    assert main(["check-config", str(DEMO)]) == 0
    assert "synthetic: synthetic, 3 classes, 32 px" in capsys.readouterr().out
    typo = tmp_path / "typo.yaml"
    typo.write_text(DEMO.read_text().replace("resolution:", "resolutoin:"))
    assert main(["check-config", str(typo)]) == 1
    assert "datasets.synthetic.resolutoin: unknown key" in capsys.readouterr().err


def test_the_benchmark_name_defaults_to_the_config_file_name():
    from cellflow.config import default_benchmark_name

    assert default_benchmark_name(["config/config.yaml", "config/paper.yaml"]) == "paper"
    assert default_benchmark_name(["runs/proof v2.yaml"]) == "proof-v2"
    assert default_benchmark_name([]) == "default"


def test_an_installed_wheel_ships_the_config_schema(tmp_path):
    """Built and installed without the repository, cellflow still validates configs."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(repo)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("cellflow-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, capture_output=True)
    probe = ("import cellflow.config as c; assert 'site' in c.__file__, c.__file__; "
             "print(c.load_schema()['title'])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(tmp_path / "site"),
                                            "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "Cellflow pipeline configuration" in result.stdout


def test_the_method_registry_and_the_config_check_agree():
    """Every registered strategy and generation method (and a generation.external entry) is
    valid in a config; any other name is refused, naming the known ones."""
    from cellflow.generation import METHODS
    from cellflow.strategies import STRATEGIES

    base = {"datasets": {"toy": {"kind": "synthetic", "resolution": 32, "classes": ["a", "b"],
                                 "transitions": [{"source": "a", "target": "b"}]}},
            "diffusion": {"label_dropout": 0.1}}
    external = {"stylegan_xl": {"root": "generated"}}
    names = [*METHODS, "stylegan_xl"]
    strategies = {name: {} for name in [*STRATEGIES, "stylegan_xl"]}
    config = validate_config({**base, "generation": {"methods": names, "external": external},
                              "downstream": {"strategies": strategies}})
    assert config["generation"]["methods"] == names
    assert set(STRATEGIES) - set(METHODS) == {"none", "cutout", "mixup", "cutmix", "fmix",
                                              "resizemix", "saliencymix"}
    with pytest.raises(ConfigError, match=r"generation.methods: unknown method 'stylegan'"):
        validate_config({**base, "generation": {"methods": ["stylegan"]}})
    with pytest.raises(ConfigError, match=r"downstream.strategies.mixpu: unknown strategy"):
        validate_config({**base, "downstream": {"strategies": {"none": {}, "mixpu": {}}}})
    with pytest.raises(ConfigError, match=r"generation.external.adm: the name is taken"):
        validate_config({**base, "generation": {"external": {"adm": {"root": "x"}}}})


def test_the_baselines_overlay_is_a_valid_config_over_the_demo():
    """config/demo-baselines.yaml only makes sense layered over the demo, as Snakemake merges
    --configfile files: nested keys update, everything else is replaced."""

    def merged(base: dict, overlay: dict) -> dict:
        out = dict(base)
        for key, value in overlay.items():
            out[key] = (merged(base[key], value) if isinstance(value, dict)
                        and isinstance(base.get(key), dict) else value)
        return out

    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    overlay = yaml.safe_load((REPO / "config" / "demo-baselines.yaml").read_text())
    config = validate_config(merged(demo, overlay), source="demo + demo-baselines")
    assert config["benchmark"] == "demo-baselines"
    assert {"ldm", "dit"} <= set(config["generation"]["methods"])
    assert {"ldm", "dit"} <= set(config["downstream"]["strategies"])


def official(kind: str, **entry) -> dict:
    """The demo config with one dataset of an official layout (no files needed to validate)."""
    config = demo()
    config["datasets"] = {"d": {"kind": kind, "root": "somewhere", "resolution": 32, **entry}}
    config["downstream"]["strategies"] = {"none": {}}
    return config


def test_the_dataset_kind_registry_and_the_schema_agree():
    from cellflow.config import load_schema
    from cellflow.datasets import KINDS

    schema = load_schema()
    assert schema["$defs"]["dataset"]["properties"]["kind"]["enum"] == list(KINDS)
    options = {branch["if"]["properties"]["kind"].get("const")
               for branch in schema["$defs"]["dataset"]["allOf"]
               if "options" in branch["then"].get("properties", {})}
    with_options = {name for name in KINDS if f"{name}_options" in schema["$defs"]}
    assert with_options <= options  # every options block is used by its kind


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (official("mhist", classes=["HP", "SSA"], options={"min_agreemnt": 5}),
         "datasets.d.options.min_agreemnt: unknown key (did you mean 'min_agreement'?)"),
        (official("mhist", classes=["HP", "TA"]),
         "datasets.d.classes[1]: 'TA' is not a class of kind mhist (its classes: HP, SSA)"),
        (official("chaoyang", classes=["normal", "adenoma"], options={"x": 1}),
         "datasets.d.options.x: unknown key"),
        (official("breastpathq", classes=["low", "high"], options={"bin_edges": [0.2, 0.5]}),
         "datasets.d"),
        (official("gleason2019", classes=["benign", "grade3"], options={"purity": 0.4}),
         "datasets.d.options.purity"),
        (official("mhist"), "datasets.d: 'classes' is a required property"),
        ({**official("cpia"), "datasets": {"d": {"kind": "cpia", "resolution": 32}}},
         "datasets.d: 'root' is a required property"),
    ],
)
def test_official_layouts_are_checked_naming_the_key(config, expected):
    with pytest.raises(ConfigError) as raised:
        validate_config(config, source="c.yaml")
    assert f"c.yaml: {expected}" in str(raised.value)


def test_a_pool_leaves_out_the_configured_datasets_by_default():
    config = official("mhist", classes=["HP", "SSA"])
    config["datasets"]["pool"] = {"kind": "cpia", "root": "cpia", "resolution": 32}
    config["datasets"]["folders"] = {"kind": "folder", "root": "f", "resolution": 32,
                                     "classes": ["a", "b"]}
    checked = validate_config(config)
    assert checked["datasets"]["pool"]["options"]["exclude_overlap_with"] == ["mhist"]
    assert checked["datasets"]["d"]["options"] == {"min_agreement": 4}  # defaults filled in
    config["datasets"]["pool"]["options"] = {"exclude_overlap_with": []}
    assert validate_config(config)["datasets"]["pool"]["options"]["exclude_overlap_with"] == []
    config["datasets"]["pool"]["transitions"] = [{"source": "a", "target": "b"}]
    with pytest.raises(ConfigError, match="datasets.pool.transitions: kind cpia is an "
                                          "unlabelled pool"):
        validate_config(config)



def test_environment_problems_name_the_key_and_spare_what_the_run_fits(tmp_path):
    from cellflow.config import environment_problems

    assert environment_problems(load_config(DEMO)) == []
    raw = demo()
    raw["datasets"]["pool"] = {"kind": "cpia", "root": str(tmp_path), "resolution": 32}
    raw["datasets"]["synthetic"]["pretrained"] = {
        "autoencoder": {"path": "results/pool/models/autoencoder"},  # fitted by this run
        "diffusion": {"path": str(tmp_path / "missing")}}
    problems = environment_problems(validate_config(raw), backbones=False)
    assert problems == [f"datasets.synthetic.pretrained.diffusion.path: {tmp_path / 'missing'} "
                        "not found"]


def test_config_files_merge_key_by_key_as_snakemake_merges_them(tmp_path):
    from cellflow.config import load_configs

    override = tmp_path / "override.yaml"
    override.write_text("bridge: { frames: 4 }\ndownstream: { seeds: [5] }\n")
    config = load_configs([DEMO, override])
    assert config["bridge"]["frames"] == 4
    assert config["bridge"]["inversion_steps"] == demo()["bridge"]["inversion_steps"]
    assert config["downstream"]["seeds"] == [5]  # a list is replaced, not appended to
    assert config["benchmark"] == "demo"  # the files' own name wins over the file name


def test_nested_command_line_values_get_the_types_of_the_schema():
    from cellflow.config import typed_overrides

    # what Snakemake's --config 'bridge={...}' hands over: every scalar a string
    given = {"bridge": {"runtime_minutes": "30", "classifier_scale": "1.5",
                        "decode_start": "faithful"},
             "downstream": {"seeds": ["0", "1"], "train": {"mixed_precision": "bf16"}},
             "evaluation": {"inception_weights": "null"},
             "datasets": {"prcc": {"classes": ["1", "2"], "resolution": "256"}},
             "diffusion": {"train": {"augment": "false"}}}
    typed = typed_overrides(given)
    assert typed["bridge"] == {"runtime_minutes": 30, "classifier_scale": 1.5,
                               "decode_start": "faithful"}
    assert typed["downstream"]["seeds"] == [0, 1]
    assert typed["evaluation"]["inception_weights"] is None
    assert typed["datasets"]["prcc"] == {"classes": ["1", "2"], "resolution": 256}
    assert typed["diffusion"]["train"]["augment"] is False
    # a value that is no number stays as given, for the validation to name
    assert typed_overrides({"seed": "seven"}) == {"seed": "seven"}
    assert typed_overrides({"bridge": {"frames": "true"}}) == {"bridge": {"frames": "true"}}
