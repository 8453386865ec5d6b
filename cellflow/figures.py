"""Figures and tables a person looks at instead of raw result files.

Training diagnostics (loss curves, accuracy by noise level, sample grids, trajectory strips) and
the benchmark figures and tables built from the pipeline's result tables. Benchmark figures are
written as PNG (to look at) and PDF (for the paper); tables as TSV (to compute with) and
GitHub Markdown (to read). Every strategy keeps one colour and marker in every figure.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only: runs on cluster nodes without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402
from PIL import Image  # noqa: E402

from cellflow import flags  # noqa: E402
from cellflow.io import atomic_path, write_table, write_text  # noqa: E402

if TYPE_CHECKING:
    import torch

# Okabe & Ito's colours, plus three of Paul Tol's where ten strategies need more, stay apart
# under the common colour-vision deficiencies; each strategy also has its own marker so that
# colour is never the only cue. A strategy keeps its style in every figure.
_STYLES: dict[str, tuple[str, str]] = {
    "real": ("#666666", "h"),
    "none": ("#000000", "o"),
    "cutout": ("#E69F00", "s"),
    "mixup": ("#56B4E9", "^"),
    "cutmix": ("#009E73", "v"),
    "fmix": ("#332288", "<"),
    "resizemix": ("#999933", ">"),
    "saliencymix": ("#882255", "p"),
    "cellflow": ("#D55E00", "D"),
    "ddib": ("#0072B2", "P"),
    "adm": ("#CC79A7", "X"),
    "cellflow_cfg": ("#8C2D04", "d"),  # a darker Cellflow: the same bridge, other guidance
    "ldm": ("#117733", "*"),
    "dit": ("#44AA99", "8"),
}
# For names outside the registry (external generators); none is a registered method's colour.
_EXTRA_COLOURS = ("#DDCC77", "#AA4499", "#88CCEE", "#661100", "#EE7733", "#BBBBBB")
_CLASS_COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#000000",
                  "#999933", "#882255")
_BETTER, _WORSE = "#0072B2", "#E69F00"
_SOURCE_BAND, _TARGET_BAND = "#56B4E9", "#E69F00"
_METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                  "macro_f1": "macro F1", "auroc": "AUROC"}
_DPI = 150


def _style(name: str) -> tuple[str, str]:
    """Colour and marker of a strategy or method; unknown names get a fixed one from their text."""
    if name in _STYLES:
        return _STYLES[name]
    # crc32, unlike hash(), is the same in every process, so the colour is too
    return _EXTRA_COLOURS[zlib.crc32(name.encode()) % len(_EXTRA_COLOURS)], "o"


def _order(names: Iterable[str]) -> list[str]:
    """Known strategies in the registry's order (baseline first), then any others sorted."""
    present = set(names)
    known = [name for name in _STYLES if name in present]
    return known + sorted(present - set(known))


def _require(table: pd.DataFrame, columns: Iterable[str], what: str, *,
             empty_ok: bool = False) -> None:
    """Fail early, naming what is missing, instead of with a KeyError deep inside a plot."""
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{what} lacks required column(s) {', '.join(missing)} "
                         f"(it has: {', '.join(map(str, table.columns)) or 'none'})")
    if not empty_ok and table.empty:
        raise ValueError(f"{what} has no rows")


def _transition(source: str, target: str) -> str:
    return f"{source}→{target}"


def _table_paths(table_stem: Path) -> tuple[Path, Path]:
    table_stem = Path(table_stem)
    return table_stem.with_suffix(".tsv"), table_stem.with_suffix(".md")


def _mean_sd(mean: float, sd: float, fmt: str = ".2f") -> str:
    if pd.isna(mean):
        return "–"
    return f"{mean:{fmt}}" if pd.isna(sd) else f"{mean:{fmt}} ± {sd:{fmt}}"


def _duration(seconds: float) -> str:
    if pd.isna(seconds):
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _spans_decades(values: Iterable[float], ratio: float = 100) -> bool:
    positive = np.asarray([v for v in values if pd.notna(v) and v > 0], dtype=float)
    return len(positive) > 1 and positive.max() / positive.min() > ratio


def _shorten(text: str, width: int = 18) -> str:
    """A label that fits under a tile: long ids keep their distinctive end."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _note(axis: Axes, text: str) -> None:
    """Say in the panel why it is empty, rather than leave a blank a reader may misread."""
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes, fontsize=8,
              color="0.4")
    axis.set_xticks([])
    axis.set_yticks([])


def _flag_footer(figure: plt.Figure, lines: list[str]) -> None:
    """The flags of what a figure shows, printed under it (see :mod:`cellflow.flags`)."""
    if lines:
        # Below the legend that constrained layout puts at the bottom edge.
        figure.text(0.01, -0.06, "⚠ flagged: " + "; ".join(lines), fontsize=7, color="#B00000",
                    ha="left", va="top", wrap=True)


def _write_figure(figure: plt.Figure, path: Path, dpi: int) -> None:
    kind = path.suffix.lstrip(".")
    # No creation date: a rerun on the same data gives a byte-identical PDF.
    metadata = {"CreationDate": None} if kind == "pdf" else None
    # Type 42 (TrueType) keeps PDF text editable in vector editors, which journals ask for.
    with atomic_path(path) as temporary, plt.rc_context({"pdf.fonttype": 42}):
        figure.savefig(temporary, dpi=dpi, bbox_inches="tight", format=kind, metadata=metadata)


def _save(figure: plt.Figure, path: Path) -> None:
    try:
        _write_figure(figure, Path(path), dpi=120)
    finally:
        plt.close(figure)


def save_figure(figure: plt.Figure, stem: Path) -> list[Path]:
    """Write ``stem`` as .png and .pdf (replacing any suffix of ``stem``) and close the figure."""
    paths = [Path(stem).with_suffix(".png"), Path(stem).with_suffix(".pdf")]
    try:
        _write_figure(figure, paths[0], dpi=_DPI)
        if figure.get_layout_engine() is not None:
            # The layout is in points, the same for both files: keep it rather than redo it.
            figure.set_layout_engine("none")
        _write_figure(figure, paths[1], dpi=_DPI)
    finally:
        plt.close(figure)
    return paths


def _markdown_cell(value: Any, floatfmt: str) -> str:
    if value is None or value is pd.NA or (isinstance(value, float | np.floating)
                                           and np.isnan(value)):
        return "–"
    if isinstance(value, float | np.floating):
        return format(value, floatfmt)
    return str(value).replace("|", r"\|").replace("\n", " ")


def write_markdown_table(table: pd.DataFrame, path: Path, bold: pd.DataFrame | None = None,
                         floatfmt: str = ".3f", *, caption: str | None = None) -> Path:
    """A GitHub Markdown table (see markdown_table) written to ``path``."""
    write_text(path, markdown_table(table, bold, floatfmt, caption=caption))
    return Path(path)


def markdown_table(table: pd.DataFrame, bold: pd.DataFrame | None = None,
                   floatfmt: str = ".3f", *, caption: str | None = None) -> str:
    """A GitHub Markdown table; named index levels become leading columns.

    ``bold``: a boolean mask of ``table``'s shape, True where the cell is wrapped in ``**``.
    ``caption``: a paragraph written above the table.
    """
    if bold is not None and bold.shape != table.shape:
        raise ValueError(f"bold mask has shape {bold.shape}, the table {table.shape}")
    named_index = any(name is not None for name in table.index.names)
    flat = table.reset_index(drop=not named_index)
    mask = np.zeros(flat.shape, dtype=bool)
    if bold is not None:
        mask[:, flat.shape[1] - table.shape[1]:] = bold.fillna(False).to_numpy(dtype=bool)
    headers = [" / ".join(map(str, column)) if isinstance(column, tuple) else str(column)
               for column in flat.columns]
    align = ["---:" if pd.api.types.is_numeric_dtype(flat[column])
             and not pd.api.types.is_bool_dtype(flat[column]) else ":---"
             for column in flat.columns]
    lines = ["| " + " | ".join(_markdown_cell(header, floatfmt) for header in headers) + " |",
             "| " + " | ".join(align) + " |"]
    for row, values in enumerate(flat.itertuples(index=False, name=None)):
        cells = [_markdown_cell(value, floatfmt) for value in values]
        cells = [f"**{cell}**" if mask[row, column] and cell != "–" else cell
                 for column, cell in enumerate(cells)]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    return f"{caption}\n\n{text}" if caption else text


# --- 1. downstream classification -------------------------------------------------------------

_BENCHMARK_COLUMNS = ["dataset", "backbone", "strategy", "metric", "n_seeds", "mean", "ci95_low",
                      "ci95_high"]


def _classification_flags(rows: pd.DataFrame, runs: pd.DataFrame | None, metric: str
                          ) -> pd.DataFrame:
    """Clip each interval to the metric's range and name what a reader must know per row."""
    rows = rows.copy()
    per_row: list[list] = []
    for index, row in rows.iterrows():
        found = flags.seed_flags(int(row["n_seeds"]))
        low, high, clipped = flags.clip_interval(row["ci95_low"], row["ci95_high"])
        rows.loc[index, ["ci95_low", "ci95_high"]] = [low, high]
        found += clipped
        if row["strategy"] == "none" and runs is not None:
            baseline = runs[(runs["dataset"] == row["dataset"])
                            & (runs["backbone"] == row["backbone"])
                            & (runs["strategy"] == "none")]
            n_test = int(baseline["n_test"].max()) if "n_test" in baseline and len(
                baseline) else None
            found += flags.ceiling_flags(baseline[metric].to_numpy(), n_test)
        flags.warn(found, f"{row['dataset']} / {row['backbone']} / {row['strategy']}")
        per_row.append(found)
    rows["flags"] = [flags.codes(found) for found in per_row]
    rows["flag_messages"] = [" | ".join(flag.message for flag in found) for found in per_row]
    return rows


def classification_benchmark(benchmark: pd.DataFrame, stem: Path, table_stem: Path,
                             metric: str = "balanced_accuracy",
                             runs: pd.DataFrame | None = None) -> list[Path]:
    """Mean and 95% CI of one test metric per dataset, backbone and strategy; best per row marked.

    Writes ``table_stem``.tsv (the benchmark rows of ``metric`` plus ``is_best`` and ``flags``),
    .md (rows dataset × backbone, a column per strategy) and ``stem``.png/.pdf (a panel per
    backbone and dataset, the ``none`` baseline as a reference line). ``runs`` (one row per
    downstream run, with ``n_test``) lets the figure show the seeds themselves where there are
    too few for an interval, and flag a baseline at the metric's ceiling.
    """
    _require(benchmark, _BENCHMARK_COLUMNS, "benchmark table")
    rows = benchmark[benchmark["metric"] == metric].copy()
    if rows.empty:
        raise ValueError(f"benchmark table has no rows for metric '{metric}' (it has: "
                         f"{', '.join(map(str, benchmark['metric'].unique()))})")
    keys = ["dataset", "backbone", "strategy"]
    duplicated = rows[rows.duplicated(keys, keep=False)]
    if len(duplicated):
        raise ValueError(f"benchmark table has several '{metric}' rows for "
                         f"{duplicated[keys].drop_duplicates().to_dict('records')}")
    if runs is not None:
        _require(runs, [*keys, "seed", metric], "downstream runs table")
    order = _order(rows["strategy"])
    rank = {name: index for index, name in enumerate(order)}
    rows = (rows.assign(_rank=rows["strategy"].map(rank))
            .sort_values(["dataset", "backbone", "_rank"]).drop(columns="_rank"))
    rows = _classification_flags(rows, runs, metric)
    # Ties share the title: a reader should see that two strategies are equally good.
    rows["is_best"] = rows["mean"].eq(rows.groupby(["dataset", "backbone"])["mean"]
                                      .transform("max"))
    tsv, markdown = _table_paths(table_stem)
    write_table(tsv, rows)

    def cell(row: pd.Series) -> str:
        if pd.isna(row["mean"]):
            return "–"
        marks = f" ⚠ {row['flags']}" if row["flags"] else ""
        if (pd.isna(row["ci95_low"]) or pd.isna(row["ci95_high"])
                or row["n_seeds"] < flags.MIN_SEEDS_FOR_INTERVAL):
            return f"{row['mean']:.3f} (n={row['n_seeds']}, no CI){marks}"
        return f"{row['mean']:.3f} [{row['ci95_low']:.3f}, {row['ci95_high']:.3f}]{marks}"

    index = ["dataset", "backbone"]
    cells = (rows.assign(cell=rows.apply(cell, axis=1))
             .pivot(index=index, columns="strategy", values="cell").reindex(columns=order))
    best = (rows.assign(is_best=rows["is_best"].astype(float))
            .pivot(index=index, columns="strategy", values="is_best").reindex(columns=order)
            .fillna(0).astype(bool))
    cells.columns.name = None
    seeds = sorted(rows["n_seeds"].dropna().astype(int).unique())
    seeds_text = ("an unknown number of" if not seeds else f"{seeds[0]}" if len(seeds) == 1
                  else f"{seeds[0]}–{seeds[-1]}")
    label = _METRIC_LABELS.get(metric, metric)
    notes = sorted({message for messages in rows["flag_messages"] for message in
                    messages.split(" | ") if message})
    write_markdown_table(
        cells.fillna("–"), markdown, bold=best,
        caption=f"Test {label}: mean [95% t-interval, clipped to [0, 1]] over {seeds_text} "
                "seeds per cell. Bold: highest mean of the row. –: not run. ⚠: flagged"
                + (":\n\n" + "\n".join(f"- {note}" for note in notes) if notes else "."))
    figure = _classification_figure(rows, order, label, runs, metric)
    return [tsv, markdown, *save_figure(figure, stem)]


def _classification_figure(rows: pd.DataFrame, order: list[str], label: str,
                           runs: pd.DataFrame | None, metric: str) -> plt.Figure:
    datasets, backbones = sorted(rows["dataset"].unique()), sorted(rows["backbone"].unique())
    width = max(3.2, 0.34 * len(order) + 1.2)
    figure, axes = plt.subplots(len(backbones), len(datasets), squeeze=False, sharey="col",
                                layout="constrained",
                                figsize=(width * len(datasets), 2.9 * len(backbones) + 1.0))
    positions = {name: index for index, name in enumerate(order)}
    for (row, backbone), (column, dataset) in product(enumerate(backbones),
                                                      enumerate(datasets)):
        axis = axes[row, column]
        panel = rows[(rows["dataset"] == dataset) & (rows["backbone"] == backbone)]
        seeds = (runs[(runs["dataset"] == dataset) & (runs["backbone"] == backbone)]
                 if runs is not None else None)
        baseline = panel[panel["strategy"] == "none"]
        if len(baseline):
            base = baseline.iloc[0]
            axis.axhline(base["mean"], color=_style("none")[0], linestyle="--", linewidth=0.9)
            if pd.notna(base["ci95_low"]) and pd.notna(base["ci95_high"]) and \
                    base["n_seeds"] >= flags.MIN_SEEDS_FOR_INTERVAL:
                axis.axhspan(base["ci95_low"], base["ci95_high"], color="0.85", zorder=0)
        star = offset_copy(axis.transData, fig=figure, y=9, units="points")
        for record in panel.itertuples(index=False):
            colour, marker = _style(record.strategy)
            x = positions[record.strategy]
            if record.n_seeds < flags.MIN_SEEDS_FOR_INTERVAL:
                # Too few seeds for an interval: show each seed, and the mean as a bar.
                values = (seeds.loc[seeds["strategy"] == record.strategy, metric]
                          if seeds is not None else pd.Series([record.mean]))
                axis.plot(np.full(len(values), x), values, linestyle="", marker=marker,
                          color=colour, markersize=4, markeredgecolor="black",
                          markeredgewidth=0.4, alpha=0.8)
                axis.plot([x - 0.25, x + 0.25], [record.mean] * 2, color=colour, linewidth=2)
                top = float(np.nanmax(values)) if len(values) else record.mean
            else:
                low = record.mean - record.ci95_low if pd.notna(record.ci95_low) else 0.0
                high = record.ci95_high - record.mean if pd.notna(record.ci95_high) else 0.0
                axis.errorbar(x, record.mean, yerr=[[max(low, 0.0)], [max(high, 0.0)]],
                              color=colour, marker=marker, markersize=5, capsize=2.5,
                              linewidth=1.2, markeredgecolor="black", markeredgewidth=0.4)
                top = record.ci95_high if pd.notna(record.ci95_high) else record.mean
            if record.is_best:
                axis.plot(x, top, marker="*", color="black", markersize=8, transform=star)
        n_test = (int(seeds["n_test"].max()) if seeds is not None and "n_test" in seeds
                  and len(seeds) else None)
        n_seeds = int(panel["n_seeds"].max()) if len(panel) else 0
        axis.set_title(f"{dataset} · {backbone}\n"
                       f"n test = {n_test if n_test is not None else '?'}, seeds = {n_seeds}",
                       fontsize=9)
        ceiling = "baseline-at-ceiling" in ";".join(baseline["flags"])
        if ceiling:
            axis.text(0.5, 0.03, "⚠ baseline at ceiling: no room to improve", fontsize=7,
                      color="#B00000", ha="center", transform=axis.transAxes)
        axis.grid(axis="y", alpha=0.3)
        axis.set_xlim(-0.6, len(order) - 0.4)
        if row == len(backbones) - 1:
            axis.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=8)
            for tick, name in zip(axis.get_xticklabels(), order, strict=True):
                tick.set_color(_style(name)[0])
        else:
            axis.set_xticks(range(len(order)), [])
        if column == 0:
            axis.set_ylabel(f"test {label}\n(mean ± 95% CI, or seeds)")
        axis.margins(y=0.15)
        low, high = axis.get_ylim()
        axis.set_ylim(max(low, 0.0), min(high, 1.02))  # the metric lives in [0, 1]
    handles = [Line2D([], [], color="black", linestyle="--", label="none (baseline): mean"),
               Patch(color="0.85", label="none: 95% CI"),
               Line2D([], [], color="black", marker="*", linestyle="", markersize=8,
                      label="highest mean in panel"),
               Line2D([], [], color="0.3", marker="o", linestyle="", markersize=4,
                      label=f"one seed (under {flags.MIN_SEEDS_FOR_INTERVAL} seeds: no CI)")]
    figure.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False,
                  fontsize=8)
    figure.suptitle(f"Downstream classification: test {label} by augmentation strategy")
    return figure


# --- 2. image fidelity ------------------------------------------------------------------------

_FIDELITY_COLUMNS = ["dataset", "method", "class", "n_real", "n_generated", "kid_subset_size",
                     "feature_network", "fid_domain", "kid_domain_mean", "kid_domain_std"]
# (column stem, header name of its feature space): headers always say which features were used,
# so a domain-feature FID is never read as the usual Inception FID.
_FEATURE_SPACES = (("domain", "domain features"), ("inception", "Inception"))


def _feature_spaces(fidelity: pd.DataFrame) -> list[tuple[str, str]]:
    """Spaces with any FID value; Inception only when its weights were configured somewhere."""
    return [(space, name) for space, name in _FEATURE_SPACES
            if all(f"{kind}_{space}{part}" in fidelity.columns
                   for kind, part in (("fid", ""), ("kid", "_mean"), ("kid", "_std")))
            and fidelity[f"fid_{space}"].notna().any()]


def fidelity_benchmark(fidelity: pd.DataFrame, stem: Path, table_stem: Path) -> list[Path]:
    """FID and KID of each generator against real images, with real-vs-real as the noise floor.

    Writes ``table_stem``.tsv (every class, with ``is_best_fid_<space>``), .md (class ``all``;
    lowest FID per dataset, ``real`` excluded, in bold) and ``stem``.png/.pdf.
    """
    _require(fidelity, _FIDELITY_COLUMNS, "fidelity table")
    if not (fidelity["class"] == "all").any():
        raise ValueError("fidelity table has no rows for class 'all'")
    keys = ["dataset", "method", "class"]
    duplicated = fidelity[fidelity.duplicated(keys, keep=False)]
    if len(duplicated):
        raise ValueError("fidelity table has several rows for "
                         f"{duplicated[keys].drop_duplicates().to_dict('records')}")
    spaces = _feature_spaces(fidelity)
    order = _order(fidelity["method"])
    rank = {name: index for index, name in enumerate(order)}
    table = (fidelity.assign(_other=fidelity["class"] != "all",
                             _rank=fidelity["method"].map(rank))
             .sort_values(["dataset", "_other", "class", "_rank"])
             .drop(columns=["_other", "_rank"]).reset_index(drop=True))
    # The real rows measure the noise floor, not a generator: they never win.
    generated = table["method"] != "real"
    for space, _ in spaces:
        score = table[f"fid_{space}"].where(generated)
        table[f"is_best_fid_{space}"] = score.eq(
            score.groupby([table["dataset"], table["class"]]).transform("min"))
    table["flags"] = _fidelity_flags(table, spaces)
    tsv, markdown = _table_paths(table_stem)
    write_table(tsv, table)

    overall = table[table["class"] == "all"].reset_index(drop=True)
    shown = pd.DataFrame({
        "dataset": overall["dataset"], "method": overall["method"],
        "domain feature network": overall["feature_network"],
        "n real": overall["n_real"].astype("Int64"),
        "n generated": overall["n_generated"].astype("Int64"),
        "flags": overall["flags"].replace("", "–")})
    bold = pd.DataFrame(False, index=shown.index, columns=shown.columns)
    for space, name in spaces:
        shown[f"FID ({name}) ↓"] = [_mean_sd(value, np.nan) for value in overall[f"fid_{space}"]]
        shown[f"KID ×10³ ({name}) ↓"] = [
            _mean_sd(mean * 1e3, sd * 1e3) for mean, sd in
            zip(overall[f"kid_{space}_mean"], overall[f"kid_{space}_std"], strict=True)]
        bold[f"FID ({name}) ↓"] = overall[f"is_best_fid_{space}"].to_numpy()
        bold[f"KID ×10³ ({name}) ↓"] = False
    write_markdown_table(
        shown, markdown, bold=bold,
        caption="Fidelity of generated images to real training images of the same dataset "
                "(class 'all'; lower is closer). 'real' compares held-out real test images "
                "with real training images: the floor these metrics reach at that sample size. "
                "Domain features: the network in 'domain feature network', not Inception; "
                "numbers from different feature spaces are not comparable. "
                "Bold: lowest FID of the dataset among generators. Flags: noise / constant = "
                "most images are per-pixel noise or flat (FID cannot rank them); "
                "fid-*-far-above-floor = over 10x the real-vs-real value.")
    figure = _fidelity_figure(overall, spaces, order)
    return [tsv, markdown, *save_figure(figure, stem)]


def _fidelity_flags(table: pd.DataFrame, spaces: list[tuple[str, str]]) -> list[str]:
    """Each row's own image flags plus a FID far above its dataset's real-vs-real floor."""
    own = table["flags"].fillna("") if "flags" in table else pd.Series("", index=table.index)
    floors = table[table["method"] == "real"].set_index(["dataset", "class"])
    result = []
    for index, row in table.iterrows():
        beyond_floor = []
        if row["method"] != "real" and (row["dataset"], row["class"]) in floors.index:
            for space, _ in spaces:
                floor = floors.at[(row["dataset"], row["class"]), f"fid_{space}"]
                beyond_floor += flags.fid_floor_flags(row[f"fid_{space}"], floor, space)
        if row["class"] == "all":  # the image flags were logged by the fidelity job
            flags.warn(beyond_floor, f"{row['dataset']}: {row['method']}")
        result.append(";".join(filter(None, [str(own[index]), flags.codes(beyond_floor)])))
    return result


def _fidelity_figure(overall: pd.DataFrame, spaces: list[tuple[str, str]],
                     order: list[str]) -> plt.Figure:
    datasets = sorted(overall["dataset"].unique())
    methods = [name for name in order if name != "real"]
    metrics = [metric for space, name in spaces for metric in (
        (f"fid_{space}", None, f"FID ({name})\nlower = closer to real"),
        (f"kid_{space}_mean", f"kid_{space}_std", f"KID ×10³ ({name})\nmean ± std over subsets"))]
    width = max(2.8, 0.55 * len(methods) + 1.2)
    figure, axes = plt.subplots(len(metrics), len(datasets), squeeze=False, layout="constrained",
                                figsize=(width * len(datasets), 2.5 * len(metrics) + 0.9))
    for (row, (value, spread, ylabel)), (column, dataset) in product(enumerate(metrics),
                                                                     enumerate(datasets)):
        axis = axes[row, column]
        rows = overall[overall["dataset"] == dataset].set_index("method")
        scale = 1e3 if value.startswith("kid") else 1.0
        present = [name for name in methods
                   if name in rows.index and pd.notna(rows.at[name, value])]
        if not present:
            _note(axis, "not computed")
        for x, name in enumerate(present):
            colour, _ = _style(name)
            error = rows.at[name, spread] * scale if spread else None
            flagged = bool(rows.at[name, "flags"])
            axis.bar(x, rows.at[name, value] * scale, color=colour, edgecolor="black",
                     linewidth=0.5, yerr=error, capsize=3, width=0.7,
                     hatch="//" if flagged else None)

        if "real" in rows.index and pd.notna(rows.at["real", value]):
            axis.axhline(rows.at["real", value] * scale, color=_style("real")[0],
                         linestyle="--", linewidth=1.1)
        if present:
            axis.set_xticks(range(len(present)), [
                f"{name}\nn={rows.at[name, 'n_generated']:.0f}"
                + ("\n⚠ flagged" if rows.at[name, "flags"] else "") for name in present],
                fontsize=7)
            # noise can sit orders of magnitude above a real method: keep both readable
            if _spans_decades(rows.loc[present, value]):
                axis.set_yscale("log")
        axis.grid(axis="y", alpha=0.3)
        if row == 0:
            networks = ", ".join(map(str, rows["feature_network"].dropna().unique()))
            axis.set_title(f"{dataset}\n(domain features: {networks})", fontsize=10)
        if column == 0:
            axis.set_ylabel(ylabel, fontsize=9)
    handles = [Line2D([], [], color=_style("real")[0], linestyle="--",
                      label="real test vs real train (noise floor)"),
               Patch(facecolor="white", edgecolor="black", hatch="//",
                     label="⚠ flagged (see the table's flags): the number does not rank "
                           "these images")]
    figure.legend(handles=handles, loc="outside lower center", frameon=False, ncols=2)
    figure.suptitle("Image fidelity of generated vs real training images (class 'all')")
    return figure


# --- 3. trajectories --------------------------------------------------------------------------

_SUMMARY_COLUMNS = ["frames", "count_spearman", "area_spearman", "towards_target_fraction",
                    "landing_count", "landing_area", "target_probability_first",
                    "target_probability_last"]
_COHERENCE_COLUMNS = ["ssim", "ssim_shuffled", "second_difference", "second_difference_shuffled"]
_TRANSITION_KEYS = ["dataset", "source_class", "target_class"]
_TRAJECTORY_HEADERS = {
    "frames": "frames", "count_spearman": "count ρ (vs frame)",
    "area_spearman": "area ρ (vs frame)", "towards_target_fraction": "steps towards target",
    "landing_count": "landing (count)", "landing_area": "landing (area)",
    "target_probability_first": "p(target) first", "target_probability_last": "p(target) last",
    "ssim": "SSIM", "ssim_shuffled": "SSIM shuffled", "second_difference": "2nd difference",
    "second_difference_shuffled": "2nd difference shuffled"}


def _fraction(wins: pd.Series) -> float:
    return float(wins.mean()) if wins.notna().any() else float("nan")


def method_flags(fidelity: pd.DataFrame | None) -> dict[tuple[str, str], str]:
    """Each (dataset, method)'s image-set flags: those on its fidelity table's 'all' row."""
    if fidelity is None or "flags" not in fidelity:
        return {}
    rows = fidelity[fidelity["class"] == "all"]
    return dict(zip(zip(rows["dataset"], rows["method"], strict=True),
                    rows["flags"].fillna("").astype(str), strict=True))


def _trajectory_flags(table: pd.DataFrame, summaries: pd.DataFrame,
                      fidelity: pd.DataFrame | None) -> list[str]:
    """Per transition: its trajectories' flags, and the Cellflow frames' image flags (frames
    that are noise make every per-frame measure, p(target) included, meaningless)."""
    own = summaries.get("flags", pd.Series("", index=summaries.index)).fillna("")
    by_transition = own.groupby([summaries[key] for key in _TRANSITION_KEYS]).agg(
        lambda cells: ";".join(dict.fromkeys(code for cell in cells
                                             for code in str(cell).split(";") if code)))
    frames = {dataset: ";".join(f"frames-{code}" for code in codes.split(";")
                                if code in ("noise", "constant"))
              for (dataset, method), codes in method_flags(fidelity).items()
              if method == "cellflow"}
    return [";".join(filter(None, [by_transition.get(tuple(row), ""),
                                   frames.get(row.dataset, "")]))
            for row in table[_TRANSITION_KEYS].itertuples(index=False)]


def trajectory_benchmark(summaries: pd.DataFrame, coherence: pd.DataFrame, stem: Path,
                         table_stem: Path, fidelity: pd.DataFrame | None = None) -> list[Path]:
    """Per dataset and transition: cellularity monotonicity, landing, target belief, coherence.

    Writes ``table_stem``.tsv (``<column>_mean``/``<column>_sd``, the fractions of trajectories
    smoother than their shuffled control and ``flags``), .md and ``stem``.png/.pdf. ``fidelity``
    (the fidelity tables) adds the flags of Cellflow's frames as images.
    """
    _require(summaries, ["dataset", "source_id", "source_class", "target_class",
                         *_SUMMARY_COLUMNS], "trajectory summary table")
    _require(coherence, ["dataset", "source_id", "source_class", "target_class",
                         *_COHERENCE_COLUMNS], "coherence table")
    parts = []
    for table, columns, count in ((summaries, _SUMMARY_COLUMNS, "n_trajectories"),
                                  (coherence, _COHERENCE_COLUMNS, "n_coherence")):
        groups = table.groupby(_TRANSITION_KEYS)
        stats = groups[columns].agg(["mean", "std"])
        stats.columns = [f"{column}_{'sd' if kind == 'std' else kind}"
                         for column, kind in stats.columns]
        parts.append(stats.assign(**{count: groups.size()}))
    both = coherence[["ssim", "ssim_shuffled"]].notna().all(axis=1)
    ssim_wins = (coherence["ssim"] > coherence["ssim_shuffled"]).where(both)
    both = coherence[["second_difference", "second_difference_shuffled"]].notna().all(axis=1)
    smoother = (coherence["second_difference"]
                < coherence["second_difference_shuffled"]).where(both)
    groups = [coherence[key] for key in _TRANSITION_KEYS]
    parts.append(pd.DataFrame({
        "fraction_ssim_above_shuffled": ssim_wins.groupby(groups).agg(_fraction),
        "fraction_smoother_than_shuffled": smoother.groupby(groups).agg(_fraction)}))
    table = pd.concat(parts, axis=1).reset_index()
    table.insert(3, "transition", [_transition(a, b) for a, b in
                                   zip(table["source_class"], table["target_class"], strict=True)])
    for count in ("n_trajectories", "n_coherence"):
        table[count] = table[count].fillna(0).astype(int)
    table["flags"] = _trajectory_flags(table, summaries, fidelity)
    tsv, markdown = _table_paths(table_stem)
    write_table(tsv, table)

    shown = table[["dataset", "transition", "n_trajectories"]].rename(
        columns={"n_trajectories": "n"})
    for column, header in _TRAJECTORY_HEADERS.items():
        shown[header] = [_mean_sd(mean, sd, ".1f" if column == "frames" else ".2f") for mean, sd
                         in zip(table[f"{column}_mean"], table[f"{column}_sd"], strict=True)]
    for column, header in (("fraction_ssim_above_shuffled", "SSIM > shuffled"),
                           ("fraction_smoother_than_shuffled", "smoother than shuffled")):
        shown[header] = ["–" if pd.isna(value) else f"{value:.0%}" for value in table[column]]
    shown["flags"] = table["flags"].replace("", "–")
    write_markdown_table(
        shown, markdown,
        caption="Trajectories per dataset and transition (source→target class), mean ± sd over "
                "trajectories. ρ: Spearman correlation of the measure with frame order "
                "(monotonic change = ±1). Landing: the last frame between the source class's "
                "real mean (0) and the target class's (1). SSIM: of consecutive frames (higher "
                "= smoother); 2nd difference: mean norm of second differences in feature space "
                "(lower = smoother); 'shuffled': the same frames in random order, the control. "
                "Then: share of trajectories smoother than their shuffled control. Flags: "
                "landing-*-undefined = the class means are closer than their spread (landing "
                "not reported); frames-noise = the frames are per-pixel noise, so no column "
                "here describes a path.")
    figure = _trajectory_figure(summaries, coherence)
    _flag_footer(figure, [f"{row.dataset} {row.transition}: {row.flags}"
                          for row in table.itertuples(index=False) if row.flags])
    return [tsv, markdown, *save_figure(figure, stem)]


def _slope_panel(axis: Axes, rows: pd.DataFrame, actual: str, shuffled: str,
                 higher_is_better: bool, ylabel: str) -> None:
    """One line per trajectory from its shuffled control to its generated order."""
    rows = rows[[actual, shuffled]].dropna()
    if rows.empty:
        _note(axis, "no coherence data")
        return
    better = rows[actual] > rows[shuffled] if higher_is_better else rows[actual] < rows[shuffled]
    for (value, control), wins in zip(rows.itertuples(index=False, name=None), better,
                                      strict=True):
        axis.plot([0, 1], [control, value], color=_BETTER if wins else _WORSE, alpha=0.55,
                  linewidth=0.8, marker="o", markersize=2.5)
    axis.plot([0, 1], [rows[shuffled].median(), rows[actual].median()], color="black",
              linewidth=2.2, marker="_", markersize=14)
    axis.set_xticks([0, 1], ["shuffled\norder", "generated\norder"])
    axis.set_xlim(-0.35, 1.35)
    axis.set_ylabel(ylabel, fontsize=9)
    axis.text(0.5, 1.0, f"smoother than shuffled: {int(better.sum())}/{len(better)}",
              transform=axis.transAxes, ha="center", va="bottom", fontsize=8)
    axis.grid(axis="y", alpha=0.3)


def _trajectory_figure(summaries: pd.DataFrame, coherence: pd.DataFrame) -> plt.Figure:
    datasets = sorted(set(summaries["dataset"]) | set(coherence["dataset"]))
    transitions = {}
    for dataset in datasets:
        rows = summaries[summaries["dataset"] == dataset]
        transitions[dataset] = sorted(set(zip(rows["source_class"], rows["target_class"],
                                              strict=True)))
    widths = [max(3.2, 0.45 * len(transitions[dataset]) + 1.5) for dataset in datasets]
    figure, axes = plt.subplots(3, len(datasets), squeeze=False, layout="constrained",
                                width_ratios=widths, figsize=(sum(widths), 9.5))
    rng = np.random.default_rng(0)  # the same jitter on every rerun
    for column, dataset in enumerate(datasets):
        pairs = coherence[coherence["dataset"] == dataset]
        _slope_panel(axes[0, column], pairs, "ssim", "ssim_shuffled", True,
                     "consecutive-frame SSIM\n(higher = smoother)")
        _slope_panel(axes[1, column], pairs, "second_difference", "second_difference_shuffled",
                     False, "2nd-difference norm, feature space\n(lower = smoother)")
        axes[0, column].set_title(dataset, pad=14)
        axis = axes[2, column]
        rows = summaries[summaries["dataset"] == dataset]
        names = [_transition(a, b) for a, b in transitions[dataset]]
        if rows.empty:
            _note(axis, "no trajectory summaries")
            continue
        axis.axhline(0, color=_SOURCE_BAND, linestyle="--", linewidth=1)
        axis.axhline(1, color=_TARGET_BAND, linestyle="--", linewidth=1)
        for x, (source, target) in enumerate(transitions[dataset]):
            path = rows[(rows["source_class"] == source) & (rows["target_class"] == target)]
            for offset, (measure, marker, colour) in zip(
                    (-0.17, 0.17), (("landing_count", "o", "#009E73"),
                                    ("landing_area", "s", "#CC79A7")), strict=True):
                values = path[measure].dropna()
                jitter = rng.uniform(-0.07, 0.07, len(values))
                axis.scatter(x + offset + jitter, values, s=12, marker=marker, color=colour,
                             alpha=0.75, edgecolors="none")
                if len(values):
                    axis.plot([x + offset - 0.12, x + offset + 0.12], [values.median()] * 2,
                              color="black", linewidth=1.8)
        axis.set_xticks(range(len(names)), names, rotation=45 if len(names) > 3 else 0,
                        ha="right" if len(names) > 3 else "center", fontsize=8)
        axis.set_ylabel("landing of last frame\n(0 = source mean, 1 = target mean)", fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], color=_BETTER, label="generated order smoother than shuffled"),
               Line2D([], [], color=_WORSE, label="not smoother"),
               Line2D([], [], color="black", linewidth=2, label="median"),
               Line2D([], [], color="#009E73", marker="o", linestyle="", label="landing: count"),
               Line2D([], [], color="#CC79A7", marker="s", linestyle="",
                      label="landing: area fraction"),
               Line2D([], [], color=_SOURCE_BAND, linestyle="--", label="source-class real mean"),
               Line2D([], [], color=_TARGET_BAND, linestyle="--", label="target-class real mean")]
    figure.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False,
                  fontsize=8)
    figure.suptitle("Trajectories: temporal coherence against shuffled frames,\n"
                    "and where the last frame lands")
    return figure


# --- 4-6. trajectory pictures and curves ------------------------------------------------------

def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _picture(axis: Axes, picture: np.ndarray, label: str) -> None:
    """An image without ticks or frame; unlike set_axis_off, a row label stays visible."""
    axis.imshow(picture, interpolation="nearest")  # tiles are tiny: show pixels, not blur
    axis.set_title(label, fontsize=6.5)
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_visible(False)


def trajectory_strips(manifest: pd.DataFrame, frames_dir: Path, source_images: dict[str, Path],
                      target_examples: dict[str, Path], stem: Path, title: str,
                      per_transition: int = 3) -> list[Path]:
    """A row per trajectory: real source, frames (timestep t, soft-label weight w), real target.

    Shows the first ``per_transition`` trajectories (by source id) of each transition.
    """
    _require(manifest, ["source_id", "source_class", "target_class", "frame_index", "timestep",
                        "soft_label_weight", "path"], "trajectory manifest")
    if per_transition < 1:
        raise ValueError(f"per_transition must be at least 1, got {per_transition}")
    chosen = (manifest[["source_class", "target_class", "source_id"]].drop_duplicates()
              .sort_values(["source_class", "target_class", "source_id"])
              .groupby(["source_class", "target_class"]).head(per_transition))
    missing = sorted(set(map(str, chosen["source_id"])) - set(map(str, source_images)))
    if missing:
        raise ValueError(f"no source image given for source id(s) {', '.join(missing)}")
    missing = sorted(set(chosen["target_class"]) - set(target_examples))
    if missing:
        raise ValueError(f"no real example given for target class(es) {', '.join(missing)}")
    sources = {str(key): path for key, path in source_images.items()}
    trajectories = [manifest[(manifest["source_id"] == source_id)
                             & (manifest["target_class"] == target)].sort_values("frame_index")
                    for _, target, source_id in chosen.itertuples(index=False)]
    columns = 2 + max(len(frames) for frames in trajectories)
    figure, axes = plt.subplots(len(trajectories), columns, squeeze=False,
                                figsize=(0.95 * columns + 0.6, 1.15 * len(trajectories) + 0.6))
    for row, ((source, target, source_id), frames) in enumerate(
            zip(chosen.itertuples(index=False), trajectories, strict=True)):
        _picture(axes[row, 0], _read_rgb(sources[str(source_id)]), "source (real)")
        axes[row, 0].set_ylabel(f"{_transition(source, target)}\n{source_id}", fontsize=7,
                                rotation=0, ha="right", va="center")
        for column, frame in enumerate(frames.itertuples(index=False), start=1):
            _picture(axes[row, column], _read_rgb(Path(frames_dir) / frame.path),
                     f"t={frame.timestep}\nw={frame.soft_label_weight:.2f}")
        _picture(axes[row, -1], _read_rgb(target_examples[target]), f"real {target}")
        for axis in axes[row, len(frames) + 1:-1]:
            axis.set_axis_off()
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, stem)


@dataclass(frozen=True)
class GeneratedSet:
    """One generative method's images: its generation manifest and the folder it is in."""

    method: str
    manifest: pd.DataFrame
    root: Path
    flags: str = ""


def _class_cells(generated: GeneratedSet, class_name: str, per_method: int, real_paths:
                 Mapping[str, Path]) -> list[tuple[Path, str]]:
    """What one method shows for one class: images that count as it, labelled.

    A trajectory method (several frames per source: Cellflow, either guidance) shows one whole
    trajectory into the class (real source first), so that a reader sees each stair next to
    where it started; other methods show their first images of it.
    """
    from cellflow.generation import hard_class

    table = generated.manifest
    if len(table) and int(table["frame_index"].max()) > 1:
        into = table[table["target_class"] == class_name].sort_values(["source_id",
                                                                       "frame_index"])
        if into.empty:
            return []
        first = into[into["source_id"] == into["source_id"].iloc[0]]
        source = str(first["source_id"].iloc[0])
        cells = [(real_paths[source], f"source ({first['source_class'].iloc[0]})")]
        return cells + [(generated.root / row.path,
                         f"τ={row.stair} w={row.soft_label_weight:.2f}")
                        for row in first.itertuples(index=False)]
    rows = table[hard_class(table) == class_name].sort_values("path").head(per_method)
    if "source_class" in rows and rows["source_class"].ne(rows["target_class"]).any():
        return [(generated.root / row.path, f"from {row.source_class}")
                for row in rows.itertuples(index=False)]
    return [(generated.root / path, "sample") for path in rows["path"]]


def side_by_side(data: pd.DataFrame, data_root: Path, generated: list[GeneratedSet],
                 classes: list[str], stem: Path, title: str, per_method: int = 4
                 ) -> list[Path]:
    """Per class, a row: real training images | Cellflow frames | every other method's images.

    All images are drawn at the same size, pixel for pixel, so that noise, blur and copies are
    seen for what they are; a method's flags (see :mod:`cellflow.flags`) head its column group.
    """
    _require(data, ["id", "path", "label_name", "split"], "data manifest")
    for entry in generated:
        _require(entry.manifest, ["path", "source_id", "source_class", "target_class",
                                  "soft_label_weight", "stair", "frame_index"],
                 f"{entry.method} generation manifest", empty_ok=True)
    train = data[data["split"] == "train"].sort_values("id")
    real_paths = {str(row.id): data_root / row.path for row in data.itertuples(index=False)}
    groups = [("real", "", {name: [(data_root / path, "real") for path in
                                   train.loc[train["label_name"] == name, "path"]
                                   .head(per_method)] for name in classes})]
    for entry in sorted(generated, key=lambda item: _order([g.method for g in generated])
                        .index(item.method)):
        groups.append((entry.method, entry.flags,
                       {name: _class_cells(entry, name, per_method, real_paths)
                        for name in classes}))
    blank = np.full_like(_read_rgb(data_root / train["path"].iloc[0]), 255)
    widths = [max(1, *(len(cells) for cells in per_class.values()))
              for _, _, per_class in groups]
    columns = sum(widths) + len(groups) - 1  # a blank column between methods
    figure, axes = plt.subplots(len(classes), columns, squeeze=False,
                                figsize=(0.9 * columns + 0.9, 1.1 * len(classes) + 1.1))
    for axis in axes.flat:
        axis.set_axis_off()
    start = 0
    for (method, flagged, per_class), width in zip(groups, widths, strict=True):
        header = method if not flagged else f"{method}\n⚠ {flagged}"
        axes[0, start].annotate(header, (0, 1), xycoords="axes fraction",
                                xytext=(0, 24), textcoords="offset points", fontsize=8,
                                fontweight="bold", color=_style(method)[0] if not flagged
                                else "#B00000", va="bottom")
        for row, class_name in enumerate(classes):
            cells = per_class[class_name]
            if not cells:
                # A blank tile of the same size keeps the grid (and the headers) aligned.
                _picture(axes[row, start], blank, "")
                axes[row, start].set_axis_on()
                _note(axes[row, start], "none\ngenerated")
            for offset, (path, label) in enumerate(cells):
                axis = axes[row, start + offset]
                axis.set_axis_on()
                _picture(axis, _read_rgb(path), label)
        start += width + 1
    for row, class_name in enumerate(classes):
        axes[row, 0].set_axis_on()
        axes[row, 0].set_ylabel(class_name, fontsize=8, rotation=0, ha="right", va="center")
    figure.suptitle(title, fontsize=10, y=1.1)
    return save_figure(figure, stem)


_CURVE_MEASURES = (("nuclei_count", "nuclei per image (count)"),
                   ("nuclear_area_fraction", "nuclear area fraction\n(nuclear px / all px)"),
                   ("target_probability", "classifier p(target class)"))


def _class_band(real: pd.DataFrame, name: str, measure: str) -> tuple[float, float] | None:
    values = real.loc[real["label_name"] == name, measure].dropna()
    return (float(values.quantile(0.25)), float(values.quantile(0.75))) if len(values) else None


def cellularity_curves(frames: pd.DataFrame, real: pd.DataFrame, stem: Path,
                       title: str) -> list[Path]:
    """Cellularity and target belief along each trajectory, against the real classes' IQRs.

    The bands use the real training split when ``real`` has one, as do the landing positions
    of the trajectory summary.
    """
    _require(frames, ["source_id", "source_class", "target_class", "frame_index",
                      *(measure for measure, _ in _CURVE_MEASURES)], "trajectory frames table")
    _require(real, ["label_name", "nuclei_count", "nuclear_area_fraction"],
             "real cellularity table")
    if "split" in real.columns and (real["split"] == "train").any():
        real = real[real["split"] == "train"]
    transitions = sorted(set(zip(frames["source_class"], frames["target_class"], strict=True)))
    per_row = min(6, len(transitions))
    blocks = math.ceil(len(transitions) / per_row)
    rows = len(_CURVE_MEASURES)
    figure, axes = plt.subplots(rows * blocks, per_row, squeeze=False, layout="constrained",
                                figsize=(2.7 * per_row + 0.6, 2.0 * rows * blocks + 1.0))
    for index, (source, target) in enumerate(transitions):
        block, column = divmod(index, per_row)
        path = frames[(frames["source_class"] == source) & (frames["target_class"] == target)]
        for offset, (measure, label) in enumerate(_CURVE_MEASURES):
            axis = axes[block * rows + offset, column]
            for _, trajectory in path.groupby("source_id"):
                trajectory = trajectory.sort_values("frame_index")
                axis.plot(trajectory["frame_index"], trajectory[measure], color="0.6",
                          linewidth=0.6, alpha=0.7)
            median = path.groupby("frame_index")[measure].median()
            axis.plot(median.index, median.to_numpy(), color="black", linewidth=2.2)
            if measure == "target_probability":
                axis.axhline(0.5, color="0.4", linestyle=":", linewidth=1)
                axis.set_ylim(0, 1)
            else:
                for name, colour in ((source, _SOURCE_BAND), (target, _TARGET_BAND)):
                    band = _class_band(real, name, measure)
                    if band:
                        axis.axhspan(*band, color=colour, alpha=0.25, linewidth=0, zorder=0)
            if offset == 0:
                axis.set_title(_transition(source, target), fontsize=9)
            if column == 0:
                axis.set_ylabel(label, fontsize=8)
            if offset == rows - 1:
                axis.set_xlabel("frame (0 = real source)", fontsize=8)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
    for index in range(len(transitions), blocks * per_row):
        block, column = divmod(index, per_row)
        for offset in range(rows):
            axes[block * rows + offset, column].set_visible(False)
    for offset in range(rows - 1):  # cellularity rows share a scale so transitions compare
        shown = [axis for block in range(blocks) for axis in axes[block * rows + offset]
                 if axis.get_visible()]
        low = min(axis.get_ylim()[0] for axis in shown)
        high = max(axis.get_ylim()[1] for axis in shown)
        for axis in shown:
            axis.set_ylim(low, high)
    handles = [Line2D([], [], color="0.6", linewidth=0.8, label="one trajectory"),
               Line2D([], [], color="black", linewidth=2.2, label="median over trajectories"),
               Patch(color=_SOURCE_BAND, alpha=0.25, label="real source class: IQR"),
               Patch(color=_TARGET_BAND, alpha=0.25, label="real target class: IQR"),
               Line2D([], [], color="0.4", linestyle=":", label="p = 0.5")]
    figure.legend(handles=handles, loc="outside lower center", ncols=5, frameon=False,
                  fontsize=8)
    figure.suptitle(title)
    return save_figure(figure, stem)


def fourier_stairs(fourier: pd.DataFrame, stairs: pd.DataFrame, stem: Path, title: str,
                   per_transition: int = 3) -> list[Path]:
    """Fourier measure of the inverted latent by level, with the chosen stairs on each curve.

    Panels are per transition when ``fourier`` has ``source_class``, per target class otherwise.
    """
    _require(fourier, ["source_id", "target_class", "level", "measure"], "Fourier table")
    _require(stairs, ["source_id", "target_class", "frame_index", "stair"], "stairs table")
    if per_transition < 1:
        raise ValueError(f"per_transition must be at least 1, got {per_transition}")
    panel_keys = ["source_class", "target_class"] if "source_class" in fourier else [
        "target_class"]
    trajectory_keys = ["source_id", "target_class"]
    chosen = (fourier[[*panel_keys, "source_id"]].drop_duplicates()
              .sort_values([*panel_keys, "source_id"]).groupby(panel_keys).head(per_transition))
    panels = list(chosen.groupby(panel_keys, sort=True))
    per_row = min(4, len(panels))
    figure, axes = plt.subplots(math.ceil(len(panels) / per_row), per_row, squeeze=False,
                                layout="constrained",
                                figsize=(3.4 * per_row, 2.9 * math.ceil(len(panels) / per_row)
                                         + 0.6))
    for axis, (key, members) in zip(axes.flat, panels, strict=False):
        key = key if isinstance(key, tuple) else (key,)
        target = key[-1]
        for index, source_id in enumerate(members["source_id"]):
            colour = _CLASS_COLOURS[index % len(_CLASS_COLOURS)]
            curve = fourier[(fourier["source_id"] == source_id)
                            & (fourier["target_class"] == target)].sort_values("level")
            axis.plot(curve["level"], curve["measure"], color=colour, linewidth=1,
                      label=str(source_id))
            chosen_stairs = stairs[(stairs["source_id"] == source_id)
                                   & (stairs["target_class"] == target)].merge(
                curve, left_on=[*trajectory_keys, "stair"],
                right_on=[*trajectory_keys, "level"])
            axis.hlines(chosen_stairs["measure"], curve["level"].min(), chosen_stairs["stair"],
                        color=colour, linestyle=":", linewidth=0.7)
            axis.plot(chosen_stairs["stair"], chosen_stairs["measure"], linestyle="",
                      marker="o", markersize=4, color=colour, markeredgecolor="black",
                      markeredgewidth=0.4)
        axis.set_title(_transition(*key) if len(key) == 2 else f"→{target}", fontsize=9)
        axis.set_xlabel("inversion level k", fontsize=8)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("Fourier-magnitude measure\nof inverted latent", fontsize=8)
        axis.legend(title="source", fontsize=6, title_fontsize=7, frameon=False)
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    figure.legend(handles=[Line2D([], [], color="0.3", marker="o", linestyle=":",
                                  label="chosen stair (dotted: its target measure)")],
                  loc="outside lower center", frameon=False, fontsize=8)
    figure.suptitle(title)
    return save_figure(figure, stem)


# --- 7. training ------------------------------------------------------------------------------

def _loss_panel(axis: Axes, log: pd.DataFrame, ylabel: str, title: str) -> None:
    """Per-step loss (faint) with a moving average, on a log scale when it spans decades.
    An empty log is a pretrained model used as it is: the panel says so."""
    colour = _style("ddib")[0]
    if log.empty:
        axis.set_title(title)
        _note(axis, "pretrained model, not trained here")
        return
    axis.plot(log["step"], log["loss"], color=colour, alpha=0.25, linewidth=0.8,
              label="per step")
    window = max(1, len(log) // 25)
    axis.plot(log["step"], log["loss"].rolling(window, min_periods=1).mean(), color=colour,
              label=f"mean of {window} steps")
    if _spans_decades(log["loss"], ratio=30):
        axis.set_yscale("log")
    axis.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    axis.legend(frameon=False, fontsize=8)
    axis.grid(alpha=0.3)


def _run_strategy(key: str) -> str:
    """The strategy named in a run key such as 'resnet10t / cellflow / seed0'."""
    parts = [part.strip() for part in key.split("/")]
    return next((part for part in parts if part in _STYLES),
                parts[1] if len(parts) > 1 else parts[0])


def training_curves(diffusion_log: pd.DataFrame, classifier_log: pd.DataFrame,
                    accuracy_by_t: pd.DataFrame, downstream_logs: Mapping[str, pd.DataFrame],
                    stem: Path, title: str) -> list[Path]:
    """Diffusion and classifier losses, classifier accuracy by timestep, downstream validation."""
    _require(diffusion_log, ["step", "loss"], "diffusion training log")
    _require(classifier_log, ["step", "loss"], "classifier training log")
    _require(accuracy_by_t, ["t_start", "t_end", "accuracy"], "classifier accuracy-by-t table")
    for key, log in downstream_logs.items():
        _require(log, ["epoch", "val_balanced_accuracy"], f"downstream log '{key}'")
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    _loss_panel(axes[0, 0], diffusion_log, "noise-prediction MSE", "diffusion model")
    _loss_panel(axes[0, 1], classifier_log, "cross-entropy", "noise-aware classifier")
    axis = axes[1, 0]
    centres = (accuracy_by_t["t_start"] + accuracy_by_t["t_end"]) / 2
    axis.errorbar(centres, accuracy_by_t["accuracy"], xerr=(accuracy_by_t["t_end"]
                                                            - accuracy_by_t["t_start"]) / 2,
                  marker="o", color=_style("ddib")[0], capsize=0)
    axis.set(xlabel="diffusion timestep t (noise grows →)", ylabel="validation accuracy",
             ylim=(0, 1.02), title="classifier accuracy by timestep band")
    axis.grid(alpha=0.3)
    axis = axes[1, 1]
    axis.set_title("downstream classifiers")
    if not downstream_logs:
        _note(axis, "no downstream runs given")
    else:
        for key, log in sorted(downstream_logs.items()):
            colour, _ = _style(_run_strategy(key))
            axis.plot(log["epoch"], log["val_balanced_accuracy"], color=colour, linewidth=1,
                      alpha=0.8)
        strategies = _order(_run_strategy(key) for key in downstream_logs)
        axis.legend(handles=[Line2D([], [], color=_style(name)[0], label=name)
                             for name in strategies], title="strategy", fontsize=7,
                    title_fontsize=8, frameon=False, ncols=2)
        axis.set(xlabel="epoch", ylabel="validation balanced accuracy")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    return save_figure(figure, stem)


# --- 8. runtime -------------------------------------------------------------------------------

def runtime_table(benchmarks: pd.DataFrame, stem: Path, table_stem: Path, machine: str,
                  provenance: pd.DataFrame | None = None) -> list[Path]:
    """Wall time and peak memory per Snakemake rule, and per node and GPU model.

    A job benchmarked with repeats counts once, with its mean wall time and largest RSS. The
    node panel and `<table>_by_node.tsv` come from the jobs' provenance records
    (`cellflow.provenance.provenance_table`): where each job ran, on which GPUs; without any
    record, every job counts as run on `machine`.
    """
    _require(benchmarks, ["rule", "job", "s", "max_rss"], "Snakemake benchmark table")
    # Snakemake writes '-' for memory it could not sample in a very short job.
    numeric = benchmarks.assign(s=pd.to_numeric(benchmarks["s"], errors="coerce"),
                                max_rss=pd.to_numeric(benchmarks["max_rss"], errors="coerce"))
    jobs = numeric.groupby(["rule", "job"]).agg(s=("s", "mean"), max_rss=("max_rss", "max"))
    per_rule = jobs.groupby(level="rule").agg(
        jobs=("s", "size"), total_s=("s", "sum"), median_s=("s", "median"), max_s=("s", "max"),
        max_rss_gib=("max_rss", "max"))
    per_rule["max_rss_gib"] /= 1024
    per_rule = per_rule.sort_values("total_s", ascending=False).reset_index()
    per_rule["machine"] = machine
    per_node = _runtime_by_node(provenance, machine)
    tsv, markdown = _table_paths(table_stem)
    by_node_tsv = tsv.with_name(f"{tsv.stem}_by_node.tsv")
    write_table(tsv, per_rule)
    write_table(by_node_tsv, per_node)
    shown = pd.DataFrame({
        "rule": per_rule["rule"], "jobs": per_rule["jobs"],
        "total wall time": per_rule["total_s"].map(_duration),
        "median per job": per_rule["median_s"].map(_duration),
        "max per job": per_rule["max_s"].map(_duration),
        "max RSS (GiB)": per_rule["max_rss_gib"]})
    nodes_shown = pd.DataFrame({
        "host": per_node["host"], "GPU model": per_node["gpu_model"], "jobs": per_node["jobs"],
        "total wall time": per_node["total_s"].map(_duration),
        "GPU hours": per_node["gpu_hours"], "stages": per_node["stages"]})
    write_text(markdown, markdown_table(
        shown, floatfmt=".2f",
        caption=f"Runtime per rule: {len(jobs)} jobs, {_duration(per_rule['total_s'].sum())} "
                "wall time in total (summed over jobs, whether or not they ran in parallel). "
                "RSS: peak resident memory of one job.") + "\n" + markdown_table(
        nodes_shown, floatfmt=".2f",
        caption="Where the jobs ran (their provenance records): wall time and GPU hours per "
                "node and GPU model."))

    height = 0.32 * max(len(per_rule), len(per_node)) + 1.6
    figure, (axis, node_axis) = plt.subplots(1, 2, figsize=(12, height), layout="constrained",
                                             width_ratios=(3, 2))
    _runtime_bars(axis, per_rule["rule"], per_rule["total_s"], per_rule["jobs"])
    axis.set(xlabel="total wall-clock time over the rule's jobs (s)", ylabel="Snakemake rule")
    axis.set_title(f"Wall time per rule ({len(jobs)} jobs)", fontsize=10)
    labels = per_node["host"] + "\n" + per_node["gpu_model"]
    _runtime_bars(node_axis, labels, per_node["total_s"], per_node["jobs"])
    node_axis.set(xlabel="total wall-clock time of its jobs (s)", ylabel="node, GPU model")
    node_axis.set_title("Wall time per node and GPU model", fontsize=10)
    figure.suptitle(f"Runtimes (drawn on {machine})", fontsize=10)
    return [tsv, by_node_tsv, markdown, *save_figure(figure, stem)]


def _runtime_by_node(provenance: pd.DataFrame | None, machine: str) -> pd.DataFrame:
    columns = ["host", "gpu_model", "jobs", "total_s", "gpu_hours", "stages"]
    if provenance is None or provenance.empty:
        return pd.DataFrame([[machine, "unrecorded", 0, 0.0, 0.0, ""]], columns=columns)
    runs = provenance.drop_duplicates("run_id")  # a job of several outputs counts once
    runs = runs.assign(gpu_s=runs["duration_s"] * runs["gpu_count"],
                       stage=runs["rule"].str.split().str[0])
    per_node = runs.groupby(["host", "gpu_model"]).agg(
        jobs=("run_id", "size"), total_s=("duration_s", "sum"), gpu_s=("gpu_s", "sum"),
        stages=("stage", lambda names: ", ".join(sorted(set(names)))))
    per_node["gpu_hours"] = per_node.pop("gpu_s") / 3600
    return per_node.sort_values("total_s", ascending=False).reset_index()[columns]


def _runtime_bars(axis: Axes, labels: pd.Series, totals: pd.Series, counts: pd.Series) -> None:
    """Horizontal bars, longest at the top, each annotated with its job count and total."""
    labels, totals, counts = labels.iloc[::-1], totals.iloc[::-1], counts.iloc[::-1]
    axis.barh(labels, totals, color=_style("ddib")[0])
    if _spans_decades(totals):
        axis.set_xscale("log")
    for y, (total, count) in enumerate(zip(totals, counts, strict=True)):
        axis.annotate(f" {count} job{'s' if count != 1 else ''}, {_duration(total)}",
                      (total if pd.notna(total) else 0, y), va="center", fontsize=7)
    axis.margins(x=0.25)
    axis.grid(axis="x", alpha=0.3)


# --- 9. cellularity validation ----------------------------------------------------------------

def cellularity_validation(table: pd.DataFrame, summary: Mapping[str, Any], stem: Path,
                           title: str) -> list[Path]:
    """Estimated against ground-truth nuclei count and area fraction, coloured by class.

    ``table`` and ``summary`` are what ``cellularity.validate_against_ground_truth`` returns.
    """
    _require(table, ["label_name", "true_nuclei_count", "nuclei_count",
                     "true_nuclear_area_fraction", "nuclear_area_fraction"],
             "cellularity validation table")
    missing = [key for key in ("spearman_count", "spearman_area_fraction") if key not in summary]
    if missing:
        raise ValueError(f"cellularity validation summary lacks {', '.join(missing)}")
    classes = sorted(table["label_name"].unique())
    figure, axes = plt.subplots(1, 2, figsize=(9.5, 4.6), layout="constrained")
    for axis, (true, estimated, label, rho) in zip(axes, (
            ("true_nuclei_count", "nuclei_count", "nuclei count per image", "spearman_count"),
            ("true_nuclear_area_fraction", "nuclear_area_fraction", "nuclear area fraction",
             "spearman_area_fraction")), strict=True):
        for index, name in enumerate(classes):
            rows = table[table["label_name"] == name]
            axis.scatter(rows[true], rows[estimated], s=14, alpha=0.75, edgecolors="none",
                         color=_CLASS_COLOURS[index % len(_CLASS_COLOURS)], label=name)
        values = pd.concat([table[true], table[estimated]]).dropna()
        low, high = float(values.min()), float(values.max())
        pad = 0.05 * (high - low or 1.0)
        axis.plot([low - pad, high + pad], [low - pad, high + pad], color="black",
                  linestyle="--", linewidth=0.8, label="identity (y = x)")
        axis.set(xlim=(low - pad, high + pad), ylim=(low - pad, high + pad), aspect="equal",
                 xlabel=f"ground truth: {label}", ylabel=f"estimated: {label}",
                 title=f"{label}: Spearman ρ = {summary[rho]:.3f}")
        axis.grid(alpha=0.3)
    axes[0].legend(title="class", fontsize=7, title_fontsize=8, frameon=False)
    figure.suptitle(f"{title} (n = {len(table)} images)")
    return save_figure(figure, stem)


# --- training diagnostics, written by the pipeline's stages ------------------------------------

def plot_loss_curve(log: pd.DataFrame, path: Path, title: str) -> None:
    """Per-step loss (faint) with a moving average, on a log scale when it spans decades."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    _loss_panel(axis, log, "loss", title)
    _save(figure, path)


def plot_accuracy_by_timestep(table: pd.DataFrame, chance: float, path: Path, title: str) -> None:
    """Validation accuracy per band of diffusion timesteps, against chance."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    centres = (table["t_start"] + table["t_end"]) / 2
    axis.plot(centres, table["accuracy"], marker="o", label="validation accuracy")
    axis.axhline(chance, color="grey", linestyle="--", label=f"chance ({chance:.2f})")
    axis.set(xlabel="diffusion timestep t (noise grows →)", ylabel="accuracy", ylim=(0, 1.02),
             title=title)
    axis.legend(frameon=False)
    axis.grid(alpha=0.3)
    _save(figure, path)


def save_sample_grid(samples: torch.Tensor, classes: list[str], path: Path, title: str) -> None:
    """Images in [-1, 1], one row per class (in ``classes`` order), each row labelled.

    Pixels are drawn as squares at a size a person can judge (a 32 px tile is not), and the
    title carries what the reader needs to weigh them, e.g. how long the model trained.
    """
    pictures = ((samples.float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    pictures = pictures.permute(0, 2, 3, 1).numpy()
    per_row = len(pictures) // len(classes)
    figure, axes = plt.subplots(len(classes), per_row, squeeze=False,
                                figsize=(1.1 * per_row + 1.0, 1.15 * len(classes) + 0.5))
    for index, picture in enumerate(pictures):
        row, column = divmod(index, per_row)
        _picture(axes[row, column], picture, "")
    for row, name in enumerate(classes):
        axes[row, 0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    figure.suptitle(title, fontsize=8)
    _save(figure, path)


def save_trajectory_strip(sources: list[np.ndarray], frames: list[np.ndarray],
                          stairs: list[list[int]], target_example: np.ndarray, path: Path,
                          title: str) -> None:
    """One row per source: the source, its frames (stair timestep above each), a real target."""
    rows, columns = len(sources), len(frames[0]) + 2
    figure, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.25 * rows + 0.4),
                                squeeze=False)
    for row in range(rows):
        pictures = [sources[row], *frames[row], target_example]
        labels = ["source", *(f"τ={s}" for s in stairs[row]), "real target"]
        for column, (picture, label) in enumerate(zip(pictures, labels, strict=True)):
            _picture(axes[row, column], picture, label)
    figure.suptitle(title, fontsize=9)
    _save(figure, path)


# --- 10. per-class metrics --------------------------------------------------------------------

_PER_CLASS_COLUMNS = ["dataset", "backbone", "strategy", "class_index", "class", "metric", "mean",
                      "sd", "n_seeds", "support"]
_CONFUSION_COLUMNS = ["dataset", "backbone", "strategy", "true_index", "true_class",
                      "predicted_index", "predicted_class", "fraction", "n_seeds", "n_test"]
_PER_CLASS_LABELS = {"precision": "precision", "recall": "recall", "f1": "F1"}


def _seeds_text(counts: Iterable[int]) -> str:
    seeds = sorted({int(count) for count in counts if pd.notna(count)})
    if not seeds:
        return "an unknown number of"
    return f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"


def per_class_figure(per_class: pd.DataFrame, confusion: pd.DataFrame, stem: Path,
                     table_stem: Path, title: str) -> list[Path]:
    """Per-class test precision, recall and F1 per strategy, and where each class's images go.

    A mean over classes hides a strategy that helps the common classes and hurts a rare one;
    these show it. ``per_class`` and ``confusion``: what ``aggregate.per_class_summary`` and
    ``aggregate.mean_confusion`` return. Writes ``table_stem``.tsv (the per-class rows), .md (a
    row per dataset, backbone, class and metric, a column per strategy, mean ± SD over seeds,
    the highest mean bold) and ``stem``.png/.pdf: per dataset and backbone a row-normalised
    confusion matrix per strategy, all on one colour scale, then every strategy's per-class F1.
    """
    _require(per_class, _PER_CLASS_COLUMNS, "per-class table")
    _require(confusion, _CONFUSION_COLUMNS, "confusion table")
    unknown = sorted(set(per_class["metric"]) - set(_PER_CLASS_LABELS))
    if unknown:
        raise ValueError(f"per-class table has unknown metric(s) {', '.join(unknown)} "
                         f"(expected: {', '.join(_PER_CLASS_LABELS)})")
    order = _order([*per_class["strategy"], *confusion["strategy"]])
    rank = {name: index for index, name in enumerate(order)}
    metric_rank = {name: index for index, name in enumerate(_PER_CLASS_LABELS)}
    rows = (per_class.assign(_strategy=per_class["strategy"].map(rank),
                             _metric=per_class["metric"].map(metric_rank))
            .sort_values(["dataset", "backbone", "class_index", "_metric", "_strategy"])
            .drop(columns=["_strategy", "_metric"]))
    tsv, markdown = _table_paths(table_stem)
    write_table(tsv, rows)

    index = ["dataset", "backbone", "class", "n test", "metric"]
    # One test split for all strategies and seeds: the largest support guards a malformed row.
    support = rows.groupby(["dataset", "backbone", "class_index"])["support"].transform("max")
    shown = rows.assign(**{"n test": support, "metric": rows["metric"].map(
        _PER_CLASS_LABELS), "cell": [_mean_sd(mean, sd, ".3f") for mean, sd
                                     in zip(rows["mean"], rows["sd"], strict=True)]})
    keys = pd.MultiIndex.from_frame(shown[index].drop_duplicates())
    by_strategy = shown.set_index([*index, "strategy"])
    cells = by_strategy["cell"].unstack("strategy").reindex(index=keys, columns=order)
    means = by_strategy["mean"].unstack("strategy").reindex(index=keys, columns=order)
    cells.columns.name = None
    write_markdown_table(
        cells.fillna("–"), markdown, bold=means.eq(means.max(axis=1), axis=0),
        caption=f"Test precision, recall and F1 per class: mean ± SD over "
                f"{_seeds_text(rows['n_seeds'])} seeds per cell. n test: test images of the "
                "class. Bold: highest mean of the row. –: not run.")
    figure = _per_class_figure(rows, confusion, order)
    figure.suptitle(title)
    return [tsv, markdown, *save_figure(figure, stem)]


def _confusion_panel(axis: Axes, cells: pd.DataFrame) -> matplotlib.image.AxesImage:
    """A row-normalised confusion matrix, each cell's value written in it."""
    fractions = cells.pivot(index="true_index", columns="predicted_index", values="fraction")
    names = (cells.drop_duplicates("true_index").sort_values("true_index")["true_class"]
             .tolist())
    image = axis.imshow(fractions.to_numpy(), cmap="Blues", vmin=0, vmax=1)
    size = max(5.0, 9.0 - 0.4 * len(names))
    for (true, predicted), value in np.ndenumerate(fractions.to_numpy()):
        axis.text(predicted, true, "–" if np.isnan(value) else f"{value:.2f}", ha="center",
                  va="center", fontsize=size, color="white" if value > 0.6 else "black")
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    axis.set_yticks(range(len(names)), names, fontsize=7)
    axis.set_xlabel("predicted class", fontsize=8)
    return image


def _per_class_figure(rows: pd.DataFrame, confusion: pd.DataFrame,
                      order: list[str]) -> plt.Figure:
    panels = list(confusion[["dataset", "backbone"]].drop_duplicates()
                  .sort_values(["dataset", "backbone"]).itertuples(index=False))
    classes = int(confusion["true_index"].nunique())
    side = max(2.0, 0.4 * classes + 1.0)
    f1_width = max(3.0, 0.3 * classes * len(order) ** 0.5 + 1.5)
    figure, axes = plt.subplots(
        len(panels), len(order) + 1, squeeze=False, layout="constrained",
        figsize=(side * len(order) + f1_width, side * len(panels) + 1.2),
        gridspec_kw={"width_ratios": [side] * len(order) + [f1_width]})
    image = None
    for row, (dataset, backbone) in enumerate(panels):
        here = confusion[(confusion["dataset"] == dataset) & (confusion["backbone"] == backbone)]
        for column, name in enumerate(order):
            axis = axes[row, column]
            cells = here[here["strategy"] == name]
            heading = f"{name}\n{dataset} · {backbone}"
            if cells.empty:
                axis.set_title(heading, fontsize=8, color=_style(name)[0])
                _note(axis, "not run")
                continue
            image = _confusion_panel(axis, cells)
            axis.set_title(f"{heading}\nn = {cells['n_test'].iloc[0]:g} test images, "
                           f"{cells['n_seeds'].iloc[0]} seed(s)", fontsize=8,
                           color=_style(name)[0])
            if column == 0:
                axis.set_ylabel("true class", fontsize=8)
        _f1_panel(axes[row, -1], rows[(rows["dataset"] == dataset)
                                      & (rows["backbone"] == backbone)
                                      & (rows["metric"] == "f1")], order)
    if image is not None:
        figure.colorbar(image, ax=axes[:, :len(order)].ravel().tolist(), shrink=0.8,
                        label="fraction of the true class's test images\n(each row sums to 1)")
    handles = [Line2D([], [], color=_style(name)[0], marker=_style(name)[1], linestyle="",
                      markeredgecolor="black", markeredgewidth=0.4, label=name)
               for name in order]
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(order), 6),
                  frameon=False)
    return figure


def _f1_panel(axis: Axes, f1: pd.DataFrame, order: list[str]) -> None:
    """Every strategy's per-class test F1 (mean ± SD over seeds), side by side per class."""
    names = f1.drop_duplicates("class_index").sort_values("class_index")["class"].tolist()
    positions = {index: x for x, index in enumerate(sorted(f1["class_index"].unique()))}
    step = 0.8 / len(order)
    for offset, name in enumerate(order):
        rows = f1[f1["strategy"] == name]
        colour, marker = _style(name)
        x = rows["class_index"].map(positions) - 0.4 + step * (offset + 0.5)
        axis.errorbar(x, rows["mean"], yerr=rows["sd"].fillna(0.0), color=colour,
                      marker=marker, linestyle="", markersize=4, capsize=2, linewidth=1.0,
                      markeredgecolor="black", markeredgewidth=0.4)
    axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    axis.set(ylim=(0, 1.05), ylabel="test F1 (mean ± SD over seeds)")
    axis.set_title("per-class F1", fontsize=8)
    axis.grid(axis="y", alpha=0.3)


# --- 11. memorization -------------------------------------------------------------------------

def _distance_name(space: str) -> str:
    return "pixel MSE" if space == "pixel" else f"{space} L2"


def closest_pairs_figure(pairs: pd.DataFrame, generated_root: Path, real_root: Path, stem: Path,
                         title: str, n: int = 8, space: str = "pixel") -> list[Path]:
    """The ``n`` generated images closest to a training image, each above that real image.

    ``pairs`` is the generated table of ``memorization.nearest_real_neighbours`` (one method or
    several). Looking is the check that a small distance is a copy and not two plain images;
    the label gives the distance, its ratio to the real test images' median and 'own source'.
    """
    distance, ratio = f"distance_{space}", f"ratio_{space}"
    nearest_id, nearest_path = f"nearest_id_{space}", f"nearest_path_{space}"
    own = f"nearest_is_source_{space}"
    _require(pairs, ["method", "frame_index", "path", nearest_id, nearest_path, distance, ratio,
                     own], "memorization table")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    closest = pairs.sort_values(distance, kind="stable").head(n).to_dict("records")
    figure, axes = plt.subplots(2, len(closest), squeeze=False,
                                figsize=(1.3 * len(closest) + 0.8, 3.6))
    for column, row in enumerate(closest):
        _picture(axes[0, column], _read_rgb(Path(generated_root) / row["path"]),
                 f"{row['method']} frame {row['frame_index']}")
        _picture(axes[1, column], _read_rgb(Path(real_root) / row[nearest_path]),
                 f"{_shorten(str(row[nearest_id]))}\n{_distance_name(space)} "
                 f"{row[distance]:.3g}\nratio {row[ratio]:.2f}"
                 + ("\nown source" if row[own] else ""))
    axes[0, 0].set_ylabel("generated", fontsize=7)
    axes[1, 0].set_ylabel("nearest real\ntraining image", fontsize=7)
    figure.suptitle(f"{title}: the {len(closest)} generated images closest to a training "
                    f"image ({_distance_name(space)})", fontsize=9)
    return save_figure(figure, stem)


def memorization_ratios(neighbours: pd.DataFrame, reference: pd.DataFrame, stem: Path,
                        title: str, quantile: float = 0.05) -> list[Path]:
    """Per space, each method's ratio distribution against the real test images' (about 1).

    The dashed line is the copy threshold (the ``quantile`` of the real test ratios); each
    legend entry gives the share of images at or below it, ``quantile`` for a non-copier.
    """
    from cellflow.memorization import thresholds

    limits = thresholds(reference, quantile)
    if not limits:
        raise ValueError("memorization reference has no distance_* column")
    _require(neighbours, ["method", *(f"ratio_{space}" for space in limits)],
             "memorization table")
    figure, axes = plt.subplots(1, len(limits), squeeze=False, layout="constrained",
                                figsize=(4.6 * len(limits), 3.6))
    for axis, space in zip(axes[0], limits, strict=True):
        column, limit = f"ratio_{space}", limits[space]
        values = pd.concat([neighbours[column], reference[column]]).to_numpy(float)
        upper = max(2.0, float(np.quantile(values, 0.99)))
        bins = np.linspace(0, upper, 41)
        real = reference[column].to_numpy(float)
        axis.hist(np.clip(real, 0, upper), bins, density=True, color="0.82",
                  label=f"real test (n = {len(real)}, {np.mean(real <= limit):.0%})")
        for method in _order(neighbours["method"]):
            ratios = neighbours.loc[neighbours["method"] == method, column].to_numpy(float)
            axis.hist(np.clip(ratios, 0, upper), bins, density=True, histtype="step",
                      linewidth=1.4, color=_style(method)[0],
                      label=f"{method} (n = {len(ratios)}, {np.mean(ratios <= limit):.0%})")
        axis.axvline(limit, color="black", linestyle="--", linewidth=0.9,
                     label=f"copy threshold {limit:.2f}\n({quantile:.0%} quantile of real test)")
        axis.set(xlabel=f"{_distance_name(space)} to nearest training image\n÷ real test median "
                        f"(values above {upper:.1f} in the last bin)",
                 ylabel="density", title=f"{space} space")
        axis.legend(fontsize=7, frameon=False, title="share at or below threshold",
                    title_fontsize=7)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{title}: distance to the training set (≪ 1: copies)")
    return save_figure(figure, stem)


def memorization_table(summary: pd.DataFrame, table_stem: Path, quantile: float = 0.05
                       ) -> list[Path]:
    """``memorization.memorization_summary`` as TSV and Markdown, with how to read it."""
    _require(summary, ["method", "frame_index", "n_images"], "memorization summary")
    tsv, markdown = _table_paths(table_stem)
    write_table(tsv, summary)
    caption = ("Nearest real training image of each generated image. ratio: distance over the "
               "median distance of the real test images (about 1 for new images, ≪ 1 for "
               f"copies); share_below_threshold: ratio at or below the threshold, the "
               f"{quantile:.0%} quantile of the real test ratios (about {quantile:.0%} for a "
               f"method that does not copy); share_own_source: the nearest training image is "
               f"the image's own source.")
    write_markdown_table(summary, markdown, floatfmt=".3g", caption=caption)
    return [tsv, markdown]
