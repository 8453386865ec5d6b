"""The report's front page: the results first, then what a reader must not overlook.

Snakemake's HTML report opens on the workflow description next to the rule graph; the
pipeline's description (workflow/report/workflow.rst) includes the page written here, so the
report opens on the benchmark tables, every flag raised anywhere in the run, and the headline
figures, with each dataset's side-by-side images. The page is one self-contained HTML fragment
(figures embedded), so the report stays a single file.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from cellflow.io import write_table, write_text

# The report's description column is narrow (Tailwind's max-w-lg) beside the rule graph; the
# front page needs the width of a table.
_STYLE = """<style>
.prose.max-w-lg { max-width: min(78rem, 96vw) !important; }
/* The landing view centres its content vertically; a page taller than the screen would open
   scrolled into its middle. */
.h-screen.items-center { align-items: flex-start !important;
  justify-content: flex-start !important; }
.cellflow-front table { border-collapse: collapse; font-size: 0.8rem; margin: 0.5rem 0 1rem; }
.cellflow-front th, .cellflow-front td { border: 1px solid #ccc; padding: 0.2rem 0.4rem; }
.cellflow-front th { background: #f2f2f2; }
.cellflow-front img { max-width: 100%; border: 1px solid #ddd; margin: 0.3rem 0 1rem; }
.cellflow-front .flags { border-left: 4px solid #b00000; background: #fff3f3;
  padding: 0.4rem 0.8rem; margin: 0.5rem 0 1rem; }
</style>"""


def _inline(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def markdown_to_html(text: str) -> str:
    """The Markdown the figure stage writes (paragraphs, ``- `` lists, pipe tables) as HTML."""
    blocks, table, items = [], [], []

    def flush() -> None:
        if table:
            header, *rows = [[cell.strip().replace(r"\|", "|") for cell in
                              re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in table
                             if not re.fullmatch(r"\|[\s:|-]+\|", line.strip())]
            head = "".join(f"<th>{_inline(cell)}</th>" for cell in header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row)
                           + "</tr>" for row in rows)
            blocks.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            table.clear()
        if items:
            blocks.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in items)
                          + "</ul>")
            items.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
        elif line.startswith("- "):
            items.append(line[2:])
        else:
            flush()
            if line.strip():
                blocks.append(f"<p>{_inline(line)}</p>")
    flush()
    return "\n".join(blocks)


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def collect_flags(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Every flagged row of every table: where (table, dataset, what) and which flags."""
    rows = []
    for name, table in tables.items():
        if "flags" not in table:
            continue
        for _, row in table[table["flags"].fillna("").astype(str) != ""].iterrows():
            what = " / ".join(str(row[key]) for key in
                              ("backbone", "strategy", "method", "transition", "class")
                              if key in row and pd.notna(row[key]))
            for code in str(row["flags"]).split(";"):
                rows.append({"table": name, "dataset": row.get("dataset", ""), "what": what,
                             "flag": code})
    return pd.DataFrame(rows, columns=["table", "dataset", "what", "flag"]).drop_duplicates()


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])


def front_page(benchmark: str, tables: Mapping[str, Path], figures: Mapping[str, Path],
               dataset_figures: Mapping[str, Sequence[Path]], config_files: Sequence[str],
               out: Path, flags_out: Path,
               dataset_tables: Mapping[str, Sequence[Path]] | None = None) -> None:
    """Write the front page (``out``), the run record beside it and every flag (``flags_out``).

    ``tables``: figure name -> its TSV (the Markdown beside it is what is shown);
    ``figures``: figure name -> PNG; ``dataset_figures``: dataset -> PNGs shown under it;
    ``dataset_tables``: dataset -> its own flagged tables (e.g. the memorization check), shown
    under it and searched for flags.
    """
    dataset_tables = dataset_tables or {}
    flagged = collect_flags({name: _read(path) for name, path in tables.items()}
                            | {f"{Path(path).stem} ({dataset})": _read(path)
                               for dataset, paths in dataset_tables.items()
                               for path in paths})
    write_table(flags_out, flagged)
    parts = [_STYLE, '<div class="cellflow-front">',
             f"<h2>Benchmark <code>{html.escape(benchmark)}</code></h2>",
             f"<p>Config: {', '.join(f'<code>{html.escape(f)}</code>' for f in config_files)}"
             ". Every number below is read from <code>results/</code>; the per-dataset "
             "figures and tables are in the report's categories.</p>"]
    if len(flagged):
        summary = (flagged.groupby(["flag"]).agg(where=("what", lambda w: ", ".join(
            sorted(set(w))[:6])), n=("what", "size")).reset_index())
        parts.append('<div class="flags"><b>⚠ Flagged results</b> (read these first; '
                     f'all {len(flagged)} in <code>{html.escape(str(flags_out))}</code>):<ul>'
                     + "".join(f"<li><code>{html.escape(row.flag)}</code> ({row.n}): "
                               f"{html.escape(row.where)}</li>"
                               for row in summary.itertuples(index=False)) + "</ul></div>")
    else:
        parts.append('<p>No result is flagged.</p>')
    for name, table in tables.items():
        parts.append(f"<h3>{html.escape(name.capitalize())}</h3>")
        if name in figures:
            parts.append(_image(figures[name], name))
        markdown = Path(table).with_suffix(".md")
        if markdown.is_file():
            parts.append(markdown_to_html(markdown.read_text()))
    for dataset in dict.fromkeys([*dataset_figures, *dataset_tables]):
        parts.append(f"<h3>{html.escape(dataset)}</h3>")
        parts += [_image(path, f"{dataset}: {Path(path).stem}")
                  for path in dataset_figures.get(dataset, [])]
        parts += [markdown_to_html(Path(path).with_suffix(".md").read_text())
                  for path in dataset_tables.get(dataset, [])
                  if Path(path).with_suffix(".md").is_file()]
    parts.append("</div>")
    write_text(out, "\n".join(parts) + "\n")
    write_text(Path(out).with_name("run.json"),
               json.dumps({"benchmark": benchmark, "config_files": list(config_files)},
                          indent=2) + "\n")


def missing_front_page_message(benchmark: str, results: Path) -> str:
    """Why ``snakemake --report`` cannot run for this config, and which --configfile would."""
    others = []
    for record in sorted(Path(results, "benchmarks").glob("*/run.json")):
        run = json.loads(record.read_text())
        others.append(f"'{run['benchmark']}' (--configfile {' '.join(run['config_files'])})")
    lines = [f"no results of benchmark '{benchmark}' in {results}/benchmarks/{benchmark}/: "
             "build them first (snakemake with the same --configfile), or pass the config "
             "of a finished run."]
    if others:
        lines.append("Finished runs here: " + "; ".join(others))
    return "\n".join(lines)
