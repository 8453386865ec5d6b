"""The report's front page: tables readable inline, every flag listed, figures embedded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cellflow.report import (
    collect_flags,
    front_page,
    markdown_to_html,
    missing_front_page_message,
)


def test_markdown_tables_lists_and_bold_become_html():
    text = ("Caption with **bold**.\n\n| a | b \\| c |\n| :--- | ---: |\n| **1** | x |\n\n"
            "- first\n- second\n")
    html = markdown_to_html(text)
    assert "<p>Caption with <b>bold</b>.</p>" in html
    assert "<th>a</th><th>b | c</th>" in html
    assert "<td><b>1</b></td><td>x</td>" in html
    assert html.count("<tr>") == 2  # the header and one row; the alignment line is dropped
    assert "<ul><li>first</li><li>second</li></ul>" in html
    assert "<script>" not in markdown_to_html("<script>alert(1)</script>")


def test_collect_flags_lists_every_flag_of_every_table():
    tables = {"classification": pd.DataFrame({
        "dataset": ["colon", "colon"], "backbone": ["resnet", "resnet"],
        "strategy": ["none", "cellflow"], "flags": ["baseline-at-ceiling;too-few-seeds", ""]}),
        "fidelity": pd.DataFrame({"dataset": ["colon"], "method": ["adm"], "flags": ["noise"]}),
        "runtimes": pd.DataFrame({"rule": ["x"]})}
    flags = collect_flags(tables)
    assert sorted(flags["flag"]) == ["baseline-at-ceiling", "noise", "too-few-seeds"]
    assert set(flags.loc[flags["flag"] == "noise", "what"]) == {"adm"}


def write_table(folder: Path, name: str, table: pd.DataFrame) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / f"{name}.tsv", sep="\t", index=False)
    (folder / f"{name}.md").write_text(f"{name} caption\n\n| a |\n| ---: |\n| 1 |\n")
    return folder / f"{name}.tsv"


def test_the_front_page_opens_on_tables_flags_and_figures(tmp_path: Path):
    tables = {"classification": write_table(tmp_path / "tables", "classification", pd.DataFrame(
        {"dataset": ["colon"], "strategy": ["none"], "flags": ["baseline-at-ceiling"]})),
        "runtimes": write_table(tmp_path / "tables", "runtimes", pd.DataFrame({"rule": ["x"]}))}
    png = tmp_path / "classification.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(png)
    out = tmp_path / "front_page.html"
    front_page("paper", tables, {"classification": png}, {"colon": [png]},
               ["config/paper.yaml"], out, tmp_path / "flags.tsv")
    page = out.read_text()
    assert page.index("Flagged results") < page.index("<h3>Classification</h3>")
    assert "baseline-at-ceiling" in page and "classification caption" in page
    assert page.count("data:image/png;base64,") == 2
    assert len(pd.read_csv(tmp_path / "flags.tsv", sep="\t")) == 1
    assert json.loads((tmp_path / "run.json").read_text())["config_files"] == [
        "config/paper.yaml"]


def test_the_missing_page_message_names_each_finished_run(tmp_path: Path):
    record = tmp_path / "benchmarks" / "proof" / "run.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"benchmark": "proof", "config_files": ["config/proof.yaml"]}))
    message = missing_front_page_message("demo", tmp_path)
    assert "no results of benchmark 'demo'" in message
    assert "'proof' (--configfile config/proof.yaml)" in message
    assert "Finished runs" not in missing_front_page_message("demo", tmp_path / "empty")


def test_a_dataset_table_adds_its_flags_and_is_shown_under_the_dataset(tmp_path: Path):
    tables = {"runtimes": write_table(tmp_path / "tables", "runtimes", pd.DataFrame(
        {"rule": ["x"]}))}
    memorization = write_table(tmp_path / "colon", "memorization", pd.DataFrame(
        {"dataset": ["colon"], "method": ["cellflow"], "flags": ["nearest-is-source"]}))
    out = tmp_path / "front_page.html"
    front_page("paper", tables, {}, {}, ["c.yaml"], out, tmp_path / "flags.tsv",
               {"colon": [memorization]})
    page = out.read_text()
    assert "nearest-is-source" in page and "memorization caption" in page
    assert page.index("<h3>colon</h3>") < page.index("memorization caption")
