"""Benchmark figures and tables from small synthetic result tables with known answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellflow import figures

DATASETS, BACKBONES = ("colon", "lung"), ("resnet10t", "vit_tiny")
STRATEGIES = ("none", "mixup", "cellflow")
# (dataset, backbone) -> the strategy built to have the highest mean there
BEST = {("colon", "resnet10t"): "cellflow", ("colon", "vit_tiny"): "mixup",
        ("lung", "resnet10t"): "none", ("lung", "vit_tiny"): "cellflow"}


def assert_figure(paths: list[Path], stem: Path) -> None:
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    assert {png, pdf} <= set(paths)
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
    assert pdf.read_bytes().startswith(b"%PDF")
    assert not list(stem.parent.glob("*.tmp")), "a temporary file was left behind"


def markdown_rows(path: Path) -> list[list[str]]:
    """Cells of each table line (header first, the alignment line dropped)."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    assert set(lines[1].replace("|", "").split()) <= {"---:", ":---"}
    return [[cell.strip() for cell in line.strip("|").split(" | ")]
            for line in lines[:1] + lines[2:]]


def benchmark_table() -> pd.DataFrame:
    rows = []
    for (dataset, backbone), best in BEST.items():
        for strategy in STRATEGIES:
            mean = 0.90 if strategy == best else 0.80 + 0.01 * STRATEGIES.index(strategy)
            for metric in ("accuracy", "balanced_accuracy"):
                single = strategy == "mixup" and dataset == "lung"  # one seed: no CI
                rows.append({"dataset": dataset, "backbone": backbone, "strategy": strategy,
                             "metric": metric, "n_seeds": 1 if single else 3, "mean": mean,
                             "sd": np.nan if single else 0.02,
                             "ci95_low": np.nan if single else mean - 0.05,
                             "ci95_high": np.nan if single else mean + 0.05,
                             "diff_vs_none": 0.0, "diff_ci95_low": np.nan,
                             "diff_ci95_high": np.nan, "n_paired": 3})
    return pd.DataFrame(rows)


def fidelity_table(inception: bool) -> pd.DataFrame:
    # real is lowest everywhere (it is the floor) but must never be called best
    fid = {"colon": {"real": 1.0, "cellflow": 9.0, "ddib": 5.0, "adm": 12.0},
           "lung": {"real": 2.0, "cellflow": 4.0, "ddib": 8.0, "adm": 6.0}}
    rows = []
    for dataset, methods in fid.items():
        for method, value in methods.items():
            for name, scale in (("all", 1.0), ("tumour", 1.5), ("stroma", 2.0)):
                row = {"dataset": dataset, "method": method, "class": name, "n_real": 200,
                       "n_generated": 100, "kid_subset_size": 50, "feature_network": "resnet18",
                       "fid_domain": value * scale, "kid_domain_mean": value / 1000,
                       "kid_domain_std": 0.0005}
                if inception:
                    # lung has no Inception numbers: weights were configured only for colon
                    present = dataset == "colon"
                    row.update({"fid_inception": value * 10 if present else np.nan,
                                "kid_inception_mean": value / 100 if present else np.nan,
                                "kid_inception_std": 0.001 if present else np.nan})
                rows.append(row)
    return pd.DataFrame(rows)


def trajectory_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    summaries, coherence = [], []
    for dataset, source, target, count in (("colon", "A", "B", 3), ("colon", "B", "A", 2),
                                           ("lung", "A", "B", 4)):
        for index in range(count):
            key = {"dataset": dataset, "source_id": f"{dataset}{source}{index}",
                   "source_class": source, "target_class": target}
            summaries.append({**key, "frames": 8, "count_spearman": np.nan if index == 0 else 0.9,
                              "area_spearman": 0.8, "towards_target_fraction": 0.7,
                              "landing_count": rng.normal(0.9, 0.2),
                              "landing_area": rng.normal(0.8, 0.2),
                              "target_probability_first": 0.1, "target_probability_last": 0.9})
            # colon A->B: 2 of 3 smoother than shuffled in both measures
            smoother = not (dataset == "colon" and source == "A" and index == 0)
            coherence.append({**key, "ssim": 0.8 if smoother else 0.3, "ssim_shuffled": 0.5,
                              "second_difference": 1.0 if smoother else 3.0,
                              "second_difference_shuffled": 2.0})
    return pd.DataFrame(summaries), pd.DataFrame(coherence)


def write_rgb(path: Path, value: int, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)
    return path


def strips_inputs(root: Path) -> tuple[pd.DataFrame, dict[str, Path], dict[str, Path]]:
    rows, sources = [], {}
    for source, target, count in (("A", "B", 3), ("B", "A", 1)):
        for index in range(count):
            source_id = f"{source}{index}"
            sources[source_id] = write_rgb(root / "real" / f"{source_id}.png", 40 * index)
            for frame in range(1, 5):
                path = f"{source}-to-{target}/{source_id}_{frame}.png"
                write_rgb(root / "frames" / path, 50 * frame)
                rows.append({"method": "cellflow", "source_id": source_id,
                             "source_class": source, "target_class": target, "source_label": 0,
                             "target_label": 1, "frame_index": frame, "stair": frame * 2,
                             "timestep": 100 * frame, "soft_label_weight": frame / 4,
                             "path": path})
    examples = {name: write_rgb(root / "real" / f"example_{name}.png", 200) for name in "AB"}
    return pd.DataFrame(rows), sources, examples


def frames_tables(transitions: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(1)
    classes = [f"C{index}" for index in range(4)]
    pairs = [(a, b) for a in classes for b in classes if a != b][:transitions]
    rows = [{"source_id": f"{a}{index}", "source_class": a, "target_class": b,
             "frame_index": frame, "stair": frame, "nuclei_count": 10 + 3 * frame + index,
             "nuclear_area_fraction": 0.1 + 0.02 * frame, "mean_nuclear_area": 30.0,
             "target_probability": frame / 5}
            for a, b in pairs for index in range(3) for frame in range(6)]
    real = pd.DataFrame([{"id": f"{name}{index}", "path": f"{name}/{index}.png",
                          "label_name": name, "split": split,
                          "nuclei_count": rng.normal(10 + 5 * number, 2),
                          "nuclear_area_fraction": rng.normal(0.1 + 0.05 * number, 0.01),
                          "mean_nuclear_area": 30.0}
                         for number, name in enumerate(classes) for index in range(10)
                         for split in ("train", "test")])
    return pd.DataFrame(rows), real


def fourier_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    fourier, stairs = [], []
    for target in ("A", "B"):
        for index in range(4):
            for level in range(1, 11):
                fourier.append({"source_id": f"s{index}", "target_class": target,
                                "level": level, "measure": np.sqrt(level) + 0.1 * index})
            for frame, stair in enumerate((2, 5, 9), start=1):
                stairs.append({"source_id": f"s{index}", "target_class": target,
                               "frame_index": frame, "stair": stair})
    return pd.DataFrame(fourier), pd.DataFrame(stairs)


def training_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame,
                               dict[str, pd.DataFrame]]:
    steps = np.arange(1, 201)
    log = pd.DataFrame({"step": steps, "loss": 1.0 / steps, "lr": 1e-4, "grad_norm": 1.0,
                        "images_per_s": 100.0, "elapsed_s": steps * 0.1})
    accuracy = pd.DataFrame({"t_start": [0, 250, 500, 750], "t_end": [250, 500, 750, 1000],
                             "accuracy": [0.95, 0.8, 0.6, 0.4], "n": 100})
    downstream = {f"resnet10t / {strategy} / seed{seed}": pd.DataFrame({
        "epoch": range(1, 6), "train_loss": 1.0, "val_accuracy": 0.8,
        "val_balanced_accuracy": np.linspace(0.5, 0.8 + 0.01 * seed, 5), "lr": 1e-3,
        "elapsed_s": 1.0}) for strategy in ("none", "cellflow", "mixup") for seed in range(2)}
    return log, log.assign(loss=0.5 / np.sqrt(log["step"])), accuracy, downstream


def benchmark_files() -> pd.DataFrame:
    rows = []
    for rule, jobs, seconds, rss in (("train_diffusion", 2, 3600.0, 4096.0),
                                     ("prepare_data", 3, 2.0, "-"),
                                     ("downstream", 4, 120.0, 2048.0)):
        for job in range(jobs):
            rows.append({"s": seconds * (job + 1), "h:m:s": "0:00:01", "max_rss": rss,
                         "max_vms": 1.0, "max_uss": 1.0, "max_pss": 1.0, "io_in": 0.0,
                         "io_out": 0.0, "mean_load": 50.0, "cpu_time": 1.0, "rule": rule,
                         "dataset": "colon", "job": f"{rule}_{job}"})
    return pd.DataFrame(rows)


def validation_inputs() -> tuple[pd.DataFrame, dict[str, float]]:
    true = np.arange(20)
    table = pd.DataFrame({"id": [f"i{k}" for k in true], "label_name": ["A", "B"] * 10,
                          "true_nuclei_count": true, "nuclei_count": true + 1,
                          "true_nuclear_area_fraction": true / 40,
                          "nuclear_area_fraction": true / 38})
    return table, {"spearman_count": 1.0, "spearman_area_fraction": 1.0, "images": 20}


# --- helpers ----------------------------------------------------------------------------------

def test_save_figure_writes_png_and_pdf_and_closes(tmp_path: Path) -> None:
    figure, axis = plt.subplots()
    axis.plot([0, 1], [0, 1])
    stem = tmp_path / "new" / "line"
    paths = figures.save_figure(figure, stem)
    assert paths == [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    assert_figure(paths, stem)
    assert not plt.fignum_exists(figure.number)


def test_write_markdown_table_shape_and_bold(tmp_path: Path) -> None:
    table = pd.DataFrame({"value": [1.23456, np.nan, 3.0], "name": ["a|b", "c", "d"]},
                         index=pd.Index(["x", "y", "z"], name="row"))
    bold = pd.DataFrame({"value": [False, False, True], "name": [True, False, False]},
                        index=table.index)
    path = figures.write_markdown_table(table, tmp_path / "t.md", bold=bold, floatfmt=".2f",
                                        caption="A caption.")
    assert path.read_text().startswith("A caption.\n\n|")
    rows = markdown_rows(path)
    assert rows[0] == ["row", "value", "name"]
    assert rows[1:] == [["x", "1.23", r"**a\|b**"], ["y", "–", "c"], ["z", "**3.00**", "d"]]
    assert all(len(row) == 3 for row in rows)

    plain = figures.write_markdown_table(table.reset_index(drop=True), tmp_path / "u.md")
    assert [len(row) for row in markdown_rows(plain)] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="shape"):
        figures.write_markdown_table(table, tmp_path / "v.md", bold=bold.iloc[:2])


# --- 1. classification ------------------------------------------------------------------------

def test_classification_benchmark(tmp_path: Path) -> None:
    stem, table_stem = tmp_path / "fig" / "classification", tmp_path / "tab" / "classification"
    paths = figures.classification_benchmark(benchmark_table(), stem, table_stem)
    assert_figure(paths, stem)

    tsv = pd.read_csv(table_stem.with_suffix(".tsv"), sep="\t")
    assert len(tsv) == len(BEST) * len(STRATEGIES)
    assert set(tsv["metric"]) == {"balanced_accuracy"}
    assert {"mean", "ci95_low", "ci95_high", "is_best"} <= set(tsv.columns)
    best = tsv[tsv["is_best"]]
    winners = {(dataset, backbone): strategy for dataset, backbone, strategy
               in best[["dataset", "backbone", "strategy"]].itertuples(index=False)}
    assert winners == BEST

    rows = markdown_rows(table_stem.with_suffix(".md"))
    header, body = rows[0], rows[1:]
    assert header == ["dataset", "backbone", *STRATEGIES]
    assert len(body) == len(BEST)
    for row in body:
        winner = BEST[(row[0], row[1])]
        bolded = [name for name, cell in zip(STRATEGIES, row[2:], strict=True)
                  if cell.startswith("**")]
        assert bolded == [winner]
        assert "[" in row[2 + STRATEGIES.index("none")]  # mean [low, high]
    lung = next(row for row in body if row[0] == "lung")
    assert "no CI" in lung[2 + STRATEGIES.index("mixup")]


def test_classification_benchmark_rejects_unknown_metric(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="auroc"):
        figures.classification_benchmark(benchmark_table(), tmp_path / "f", tmp_path / "t",
                                         metric="auroc")


# --- 2. fidelity ------------------------------------------------------------------------------

@pytest.mark.parametrize("inception", [False, True])
def test_fidelity_benchmark(tmp_path: Path, inception: bool) -> None:
    stem, table_stem = tmp_path / "fidelity", tmp_path / "fidelity_table"
    table = fidelity_table(inception)
    assert_figure(figures.fidelity_benchmark(table, stem, table_stem), stem)

    tsv = pd.read_csv(table_stem.with_suffix(".tsv"), sep="\t")
    assert len(tsv) == len(table)
    winners = tsv[tsv["is_best_fid_domain"]]
    assert "real" not in set(winners["method"])
    overall = winners[winners["class"] == "all"].set_index("dataset")["method"]
    assert overall.to_dict() == {"colon": "ddib", "lung": "cellflow"}

    rows = markdown_rows(table_stem.with_suffix(".md"))
    header, body = rows[0], rows[1:]
    assert len(body) == 8  # 2 datasets x 4 methods, class 'all' only
    fid = header.index("FID (domain features) ↓")
    for row in body:
        assert row[fid].startswith("**") == (
            (row[0], row[1]) in {("colon", "ddib"), ("lung", "cellflow")})
    assert any("KID" in name and "domain features" in name for name in header)
    for name in header:
        assert not ("domain" in name and "Inception" in name)
    inception_headers = [name for name in header if "Inception" in name]
    if inception:
        assert inception_headers == ["FID (Inception) ↓", "KID ×10³ (Inception) ↓"]
        assert tsv.loc[tsv["is_best_fid_inception"], "method"].ne("real").all()
        lung = next(row for row in body if row[:2] == ["lung", "cellflow"])
        assert lung[header.index("FID (Inception) ↓")] == "–"
    else:
        assert inception_headers == []
        assert not any("inception" in column for column in tsv.columns)


def test_fidelity_benchmark_ignores_all_nan_inception(tmp_path: Path) -> None:
    table = fidelity_table(True).assign(fid_inception=np.nan)
    figures.fidelity_benchmark(table, tmp_path / "f", tmp_path / "t")
    assert not any("Inception" in name for name in markdown_rows(tmp_path / "t.md")[0])


# --- 3. trajectory benchmark ------------------------------------------------------------------

def test_trajectory_benchmark(tmp_path: Path) -> None:
    summaries, coherence = trajectory_tables()
    stem, table_stem = tmp_path / "trajectories", tmp_path / "trajectory_table"
    assert_figure(figures.trajectory_benchmark(summaries, coherence, stem, table_stem), stem)

    tsv = pd.read_csv(table_stem.with_suffix(".tsv"), sep="\t").set_index(
        ["dataset", "transition"])
    assert len(tsv) == 3
    colon = tsv.loc[("colon", "A→B")]
    assert colon["n_trajectories"] == 3
    assert colon["fraction_ssim_above_shuffled"] == pytest.approx(2 / 3)
    assert colon["fraction_smoother_than_shuffled"] == pytest.approx(2 / 3)
    assert colon["count_spearman_mean"] == pytest.approx(0.9)  # the NaN one is skipped
    assert tsv.loc[("lung", "A→B"), "fraction_ssim_above_shuffled"] == 1.0
    for column in ("frames", "landing_count", "ssim", "second_difference_shuffled"):
        assert {f"{column}_mean", f"{column}_sd"} <= set(tsv.columns)

    rows = markdown_rows(table_stem.with_suffix(".md"))
    assert len(rows) == 4 and len({len(row) for row in rows}) == 1
    assert rows[1][:3] == ["colon", "A→B", "3"]
    assert "67%" in rows[1]


# --- 4-6. trajectory pictures -----------------------------------------------------------------

def test_trajectory_strips(tmp_path: Path) -> None:
    manifest, sources, examples = strips_inputs(tmp_path)
    stem = tmp_path / "out" / "strips"
    paths = figures.trajectory_strips(manifest, tmp_path / "frames", sources, examples, stem,
                                      "colon: Cellflow trajectories", per_transition=2)
    assert_figure(paths, stem)

    del sources["A0"]
    with pytest.raises(ValueError, match="A0"):
        figures.trajectory_strips(manifest, tmp_path / "frames", sources, examples, stem, "t")


@pytest.mark.parametrize("transitions", [2, 7])
def test_cellularity_curves(tmp_path: Path, transitions: int) -> None:
    frames, real = frames_tables(transitions)
    stem = tmp_path / "curves"
    assert_figure(figures.cellularity_curves(frames, real, stem, "colon: cellularity"), stem)


def test_fourier_stairs(tmp_path: Path) -> None:
    fourier, stairs = fourier_tables()
    stem = tmp_path / "fourier"
    assert_figure(figures.fourier_stairs(fourier, stairs, stem, "colon: stairs"), stem)
    with_source = fourier.assign(source_class="A")
    assert_figure(figures.fourier_stairs(with_source, stairs, stem, "colon: stairs", 1), stem)


# --- 7-9. training, runtime, validation -------------------------------------------------------

@pytest.mark.parametrize("with_downstream", [True, False])
def test_training_curves(tmp_path: Path, with_downstream: bool) -> None:
    diffusion, classifier, accuracy, downstream = training_tables()
    stem = tmp_path / "training"
    paths = figures.training_curves(diffusion, classifier, accuracy,
                                    downstream if with_downstream else {}, stem, "colon")
    assert_figure(paths, stem)


def test_runtime_table(tmp_path: Path) -> None:
    stem, table_stem = tmp_path / "runtime", tmp_path / "runtime_table"
    machine = "2x AMD EPYC 7742, 1x A100 40GB"
    assert_figure(figures.runtime_table(benchmark_files(), stem, table_stem, machine), stem)

    tsv = pd.read_csv(table_stem.with_suffix(".tsv"), sep="\t").set_index("rule")
    assert list(tsv.index) == ["train_diffusion", "downstream", "prepare_data"]
    assert tsv.loc["train_diffusion", "jobs"] == 2
    assert tsv.loc["train_diffusion", "total_s"] == pytest.approx(3 * 3600)
    assert tsv.loc["train_diffusion", "max_rss_gib"] == pytest.approx(4.0)  # 4096 MiB
    assert np.isnan(tsv.loc["prepare_data", "max_rss_gib"])  # '-' for short jobs
    assert (tsv["machine"] == machine).all()
    text = table_stem.with_suffix(".md").read_text()
    assert machine in text  # no provenance records: every job counts as run on this machine
    rule_table = text.split("\n\n| host")[0]
    assert rule_table.count("\n| ") == 2 + 3  # header, alignment, three rules
    by_node = pd.read_csv(tmp_path / "runtime_table_by_node.tsv", sep="\t")
    assert by_node[["host", "gpu_model", "jobs"]].values.tolist() == [[machine, "unrecorded", 0]]


def provenance_rows() -> pd.DataFrame:
    """Three jobs: two on a GPU node (one of them wrote two outputs), one on a CPU node."""
    rows = [("a", "gpu01", "NVIDIA A100", 2, 3600.0, "train diffusion"),
            ("a", "gpu01", "NVIDIA A100", 2, 3600.0, "train diffusion"),
            ("b", "gpu01", "NVIDIA A100", 1, 1800.0, "generate cellflow"),
            ("c", "cpu07", "no GPU", 0, 60.0, "prepare")]
    return pd.DataFrame(rows, columns=["run_id", "host", "gpu_model", "gpu_count",
                                       "duration_s", "rule"])


def test_runtime_table_groups_jobs_by_node_and_gpu_model(tmp_path: Path) -> None:
    stem, table_stem = tmp_path / "runtime", tmp_path / "runtime_table"
    paths = figures.runtime_table(benchmark_files(), stem, table_stem, "login node",
                                  provenance_rows())
    assert_figure(paths, stem)
    by_node = pd.read_csv(tmp_path / "runtime_table_by_node.tsv", sep="\t").set_index("host")
    assert list(by_node.index) == ["gpu01", "cpu07"]  # longest first
    assert by_node.loc["gpu01", "jobs"] == 2  # job a counts once for its two outputs
    assert by_node.loc["gpu01", "total_s"] == pytest.approx(5400)
    assert by_node.loc["gpu01", "gpu_hours"] == pytest.approx(2 + 0.5)
    assert by_node.loc["gpu01", "stages"] == "generate, train"
    assert by_node.loc["cpu07", "gpu_hours"] == 0
    assert "| gpu01 | NVIDIA A100 |" in table_stem.with_suffix(".md").read_text()


def test_cellularity_validation(tmp_path: Path) -> None:
    table, summary = validation_inputs()
    stem = tmp_path / "validation"
    assert_figure(figures.cellularity_validation(table, summary, stem, "synthetic"), stem)
    with pytest.raises(ValueError, match="spearman_area_fraction"):
        figures.cellularity_validation(table, {"spearman_count": 1.0}, stem, "synthetic")


# --- bad inputs -------------------------------------------------------------------------------

def _calls(tmp_path: Path) -> dict[str, tuple[Callable[..., object], list[object], int, str]]:
    """name -> (function, arguments, index of the table to break, one of its columns)."""
    summaries, coherence = trajectory_tables()
    manifest, sources, examples = strips_inputs(tmp_path)
    frames, real = frames_tables()
    fourier, stairs = fourier_tables()
    diffusion, classifier, accuracy, downstream = training_tables()
    table, summary = validation_inputs()
    out, tab = tmp_path / "f", tmp_path / "t"
    return {
        "classification": (figures.classification_benchmark, [benchmark_table(), out, tab], 0,
                           "ci95_high"),
        "fidelity": (figures.fidelity_benchmark, [fidelity_table(False), out, tab], 0,
                     "kid_domain_std"),
        "summaries": (figures.trajectory_benchmark, [summaries, coherence, out, tab], 0,
                      "landing_area"),
        "coherence": (figures.trajectory_benchmark, [summaries, coherence, out, tab], 1,
                      "ssim_shuffled"),
        "strips": (figures.trajectory_strips,
                   [manifest, tmp_path / "frames", sources, examples, out, "t"], 0, "timestep"),
        "curves": (figures.cellularity_curves, [frames, real, out, "t"], 0,
                   "target_probability"),
        "real": (figures.cellularity_curves, [frames, real, out, "t"], 1, "label_name"),
        "fourier": (figures.fourier_stairs, [fourier, stairs, out, "t"], 0, "measure"),
        "stairs": (figures.fourier_stairs, [fourier, stairs, out, "t"], 1, "stair"),
        "diffusion": (figures.training_curves,
                      [diffusion, classifier, accuracy, downstream, out, "t"], 0, "loss"),
        "accuracy": (figures.training_curves,
                     [diffusion, classifier, accuracy, downstream, out, "t"], 2, "t_end"),
        "runtime": (figures.runtime_table, [benchmark_files(), out, tab, "m"], 0, "max_rss"),
        "validation": (figures.cellularity_validation, [table, summary, out, "t"], 0,
                       "true_nuclei_count"),
    }


@pytest.mark.parametrize("name", ["classification", "fidelity", "summaries", "coherence",
                                  "strips", "curves", "real", "fourier", "stairs", "diffusion",
                                  "accuracy", "runtime", "validation"])
def test_missing_column_or_rows_is_named(tmp_path: Path, name: str) -> None:
    function, arguments, position, column = _calls(tmp_path)[name]
    broken = list(arguments)
    broken[position] = arguments[position].drop(columns=column)
    with pytest.raises(ValueError, match=column):
        function(*broken)
    empty = list(arguments)
    empty[position] = arguments[position].iloc[0:0]
    with pytest.raises(ValueError, match="no rows"):
        function(*empty)
    assert not list(tmp_path.glob("f.*")) and not list(tmp_path.glob("t.*"))


def test_bad_downstream_log_is_named(tmp_path: Path) -> None:
    diffusion, classifier, accuracy, downstream = training_tables()
    downstream["resnet10t / cutout / seed0"] = pd.DataFrame({"epoch": [1]})
    with pytest.raises(ValueError, match="cutout.*val_balanced_accuracy"):
        figures.training_curves(diffusion, classifier, accuracy, downstream, tmp_path / "f", "t")


# --- diagnostics the pipeline stages write ----------------------------------------------------

def test_stage_diagnostics_still_write(tmp_path: Path) -> None:
    diffusion, _, accuracy, _ = training_tables()
    figures.plot_loss_curve(diffusion, tmp_path / "loss.png", "loss")
    figures.plot_accuracy_by_timestep(accuracy, 0.5, tmp_path / "accuracy.png", "accuracy")
    picture = np.zeros((8, 8, 3), dtype=np.uint8)
    figures.save_trajectory_strip([picture, picture], [[picture] * 3, [picture] * 3],
                                  [[1, 2, 3], [1, 2, 3]], picture, tmp_path / "strip.png", "s")
    for name in ("loss.png", "accuracy.png", "strip.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"


# --- 10. per-class metrics --------------------------------------------------------------------

def per_class_inputs() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-class rows and mean confusion matrices of three strategies over two seeds, in which
    cellflow has the highest recall of class A."""
    from cellflow.aggregate import mean_confusion, per_class_summary

    runs = [{"dataset": "colon", "backbone": "resnet10t", "strategy": strategy, "seed": seed,
             "classes": ["A", "B", "C"],
             "test": {"confusion_matrix": [[hits - seed, 10 - hits + seed, 0], [2, 7, 1],
                                           [0, 3, 5]]}}
            for strategy, hits in zip(STRATEGIES, (6, 6, 8), strict=True) for seed in range(2)]
    return per_class_summary(runs), mean_confusion(runs)


def test_per_class_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    per_class, confusion = per_class_inputs()
    drawn: list[plt.Figure] = []
    save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure",
                        lambda figure, stem: drawn.append(figure) or save(figure, stem))
    stem, table_stem = tmp_path / "fig" / "per_class", tmp_path / "tab" / "per_class"
    paths = figures.per_class_figure(per_class, confusion, stem, table_stem, "colon")
    assert_figure(paths, stem)
    assert {table_stem.with_suffix(".tsv"), table_stem.with_suffix(".md")} <= set(paths)

    heatmaps = [axis for axis in drawn[0].axes if axis.images]
    assert [axis.get_title().split("\n")[0] for axis in heatmaps] == list(STRATEGIES)
    assert all("n = 28 test images, 2 seed(s)" in axis.get_title() for axis in heatmaps)
    assert {axis.images[0].get_clim() for axis in heatmaps} == {(0, 1)}  # one colour scale
    # none's row A: [6, 4, 0] and [5, 5, 0] over the seeds
    assert {"0.55", "0.45", "0.00"} <= {text.get_text() for text in heatmaps[0].texts}
    assert [tick.get_text() for tick in heatmaps[0].get_yticklabels()] == ["A", "B", "C"]

    assert len(pd.read_csv(table_stem.with_suffix(".tsv"), sep="\t")) == len(per_class)
    rows = markdown_rows(table_stem.with_suffix(".md"))
    assert rows[0] == ["dataset", "backbone", "class", "n test", "metric", *STRATEGIES]
    assert [row[2:5] for row in rows[1:4]] == [["A", "10", "precision"], ["A", "10", "recall"],
                                               ["A", "10", "F1"]]
    assert len(rows) == 1 + 3 * 3
    recall = rows[2][5:]
    assert [cell.startswith("**") for cell in recall] == [False, False, True]
    assert recall[0] == "0.550 ± 0.071"


def test_per_class_figure_names_bad_input(tmp_path: Path) -> None:
    per_class, confusion = per_class_inputs()
    with pytest.raises(ValueError, match="fraction"):
        figures.per_class_figure(per_class, confusion.drop(columns="fraction"),
                                 tmp_path / "f", tmp_path / "t", "colon")
    with pytest.raises(ValueError, match="no rows"):
        figures.per_class_figure(per_class.iloc[0:0], confusion, tmp_path / "f",
                                 tmp_path / "t", "colon")
    assert not list(tmp_path.glob("f.*")) and not list(tmp_path.glob("t.*"))


# --- flags on the benchmark figures -----------------------------------------------------------

def test_classification_flags_a_ceiling_baseline_few_seeds_and_a_clipped_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, runs = [], []
    for strategy, values in (("none", [1.0, 1.0]), ("cellflow", [0.6, 1.0])):
        mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
        rows.append({"dataset": "colon", "backbone": "resnet10t", "strategy": strategy,
                     "metric": "balanced_accuracy", "n_seeds": 2, "mean": mean, "sd": sd,
                     "ci95_low": mean - 12.7 * sd / np.sqrt(2),
                     "ci95_high": mean + 12.7 * sd / np.sqrt(2)})
        runs += [{"dataset": "colon", "backbone": "resnet10t", "strategy": strategy,
                  "seed": seed, "n_test": 24, "balanced_accuracy": value}
                 for seed, value in enumerate(values)]
    drawn = {}
    monkeypatch.setattr(figures, "save_figure",
                        lambda figure, stem: drawn.setdefault("figure", figure) and [])
    figures.classification_benchmark(pd.DataFrame(rows), tmp_path / "f", tmp_path / "t",
                                     runs=pd.DataFrame(runs))
    table = pd.read_csv(tmp_path / "t.tsv", sep="\t", keep_default_na=False).set_index(
        "strategy")
    assert table.loc["none", "flags"].split(";") == ["too-few-seeds", "baseline-at-ceiling"]
    assert table.loc["cellflow", "flags"].split(";") == ["too-few-seeds", "ci-clipped"]
    assert table.loc["cellflow", ["ci95_low", "ci95_high"]].astype(float).between(0, 1).all()
    axis = drawn["figure"].axes[0]
    assert "n test = 24, seeds = 2" in axis.get_title()
    low, high = axis.get_ylim()
    assert low >= 0 and high <= 1.02
    assert any("ceiling" in text.get_text() for text in axis.texts)
    assert "⚠ too-few-seeds" in (tmp_path / "t.md").read_text()
    plt.close("all")


def test_clean_classification_rows_have_no_flags(tmp_path: Path) -> None:
    figures.classification_benchmark(benchmark_table(), tmp_path / "f", tmp_path / "t")
    table = pd.read_csv(tmp_path / "t.tsv", sep="\t", keep_default_na=False)
    assert set(table.loc[table["n_seeds"] == 3, "flags"]) == {""}


def test_fidelity_far_above_the_floor_is_flagged_in_table_and_figure(tmp_path: Path) -> None:
    table = fidelity_table(inception=False)
    noisy = (table["dataset"] == "colon") & (table["method"] == "adm")
    table.loc[noisy, "fid_domain"] = 500.0  # 500x the colon floor of 1.0
    table["flags"] = np.where(noisy, "noise", "")
    figures.fidelity_benchmark(table, tmp_path / "f", tmp_path / "t")
    out = pd.read_csv(tmp_path / "t.tsv", sep="\t", keep_default_na=False)
    flagged = out[(out["dataset"] == "colon") & (out["method"] == "adm")
                  & (out["class"] == "all")]["flags"].item()
    assert flagged == "noise;fid-domain-far-above-floor"
    assert set(out.loc[out["method"] == "real", "flags"]) == {""}
    assert "fid-domain-far-above-floor" in (tmp_path / "t.md").read_text()


def test_trajectory_table_carries_landing_and_noise_frame_flags(tmp_path: Path) -> None:
    summaries, coherence = trajectory_tables()
    summaries["flags"] = np.where(summaries["dataset"] == "lung", "landing-count-undefined", "")
    fidelity = pd.DataFrame({"dataset": ["colon", "lung"], "method": "cellflow",
                             "class": "all", "flags": ["noise", ""]})
    figures.trajectory_benchmark(summaries, coherence, tmp_path / "f", tmp_path / "t", fidelity)
    table = pd.read_csv(tmp_path / "t.tsv", sep="\t", keep_default_na=False).set_index(
        ["dataset", "transition"])
    assert table.loc[("lung", "A→B"), "flags"] == "landing-count-undefined"
    assert table.loc[("colon", "A→B"), "flags"] == "frames-noise"


# --- side by side -----------------------------------------------------------------------------

def side_by_side_inputs(root: Path) -> tuple[pd.DataFrame, list[figures.GeneratedSet]]:
    data = pd.DataFrame([{"id": f"{name}{index}", "path": f"images/{name}{index}.png",
                          "label_name": name, "split": "train"}
                         for name in ("A", "B") for index in range(3)])
    for row in data.itertuples():
        write_rgb(root / "data" / row.path, 30 + row.Index * 20)
    common = {"stair": 0, "frame_index": 1, "soft_label_weight": 1.0}
    cellflow = pd.DataFrame([{**common, "source_id": "A0", "source_class": "A",
                              "target_class": "B", "frame_index": frame, "stair": 2 * frame,
                              "soft_label_weight": frame / 3, "path": f"f{frame}.png"}
                             for frame in (1, 2, 3)])
    adm = pd.DataFrame([{**common, "source_id": f"adm_{name}_{index}", "source_class": name,
                         "target_class": name, "path": f"{name}{index}.png"}
                        for name in ("A", "B") for index in range(2)])
    for folder, table in (("cellflow", cellflow), ("adm", adm)):
        for path in table["path"]:
            write_rgb(root / folder / path, 128)
    return data, [figures.GeneratedSet("cellflow", cellflow, root / "cellflow"),
                  figures.GeneratedSet("adm", adm, root / "adm", "noise")]


def test_side_by_side_shows_every_method_per_class_and_their_flags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, generated = side_by_side_inputs(tmp_path)
    drawn = {}
    monkeypatch.setattr(figures, "save_figure",
                        lambda figure, stem: drawn.setdefault("figure", figure) and [])
    figures.side_by_side(data, tmp_path / "data", generated, ["A", "B"], tmp_path / "s",
                         "colon", per_method=2)
    figure = drawn["figure"]
    images = [axis for axis in figure.axes if axis.images]
    # per class: 2 real + 2 adm; class B also the source and 3 frames of the trajectory into
    # it; class A a blank tile where Cellflow has nothing
    assert len(images) == 2 * (2 + 2) + 4 + 1
    titles = [axis.get_title() for axis in images]
    assert "τ=2 w=0.33" in titles and "source (A)" in titles
    headers = [text.get_text() for axis in figure.axes for text in axis.texts]
    assert "adm\n⚠ noise" in headers and "cellflow" in headers
    # class A has no trajectory into it: the cell says so instead of staying blank
    assert any("none\ngenerated" in text for text in headers)
    plt.close("all")


def test_side_by_side_writes_files(tmp_path: Path) -> None:
    data, generated = side_by_side_inputs(tmp_path)
    stem = tmp_path / "out" / "side_by_side"
    assert_figure(figures.side_by_side(data, tmp_path / "data", generated, ["A", "B"], stem,
                                       "colon"), stem)


def test_sample_grid_is_labelled_per_class_and_large_enough_to_judge(tmp_path: Path) -> None:
    import torch

    samples = torch.rand(6, 3, 32, 32) * 2 - 1
    figures.save_sample_grid(samples, ["normal", "tumour"], tmp_path / "samples.png",
                             "after 3 training steps")
    with Image.open(tmp_path / "samples.png") as image:
        assert image.width >= 3 * 96 and image.height >= 2 * 96  # not 32 px tiles
