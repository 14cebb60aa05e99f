"""The study's part of the report, "The seed's table, measured", drawn from the rows' JSON alone: ``study.md``,
a self-contained ``study.html`` (figures inlined) and the figures; and the table's cells as records for MLflow
(:func:`table_cells`: one per row x column, with its claims, verdicts and the numbers behind them).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from seqvision.io import write_text
from seqvision.report import CSS, data_uri, esc, html_table, md_table
from seqvision.tracking import StudyCell
from seqvision.study.complexity import RowResult
from seqvision.study.figures import write_figures
from seqvision.study.run import ROWS, row_file

TITLE = "The seed's table, measured"
# The lecture's table, top to bottom (docs/study.md): each row of the study measures one of these.
SEED_TABLE: dict[str, dict[str, str]] = {
    "long-range dependencies": {"RNNs": "good in theory, hard in practice", "Transformers": "good in practice"},
    "parallelizability": {"RNNs": "no: sequential across time steps", "Transformers": "yes: tokens in parallel"},
    "compute & memory": {"RNNs": "O(N), O(N)", "Transformers": "O(N²), O(N)"},
    "inductive bias": {"RNNs": "strong", "Transformers": "weak: needs to learn from data"},
}
COLUMNS = ("RNNs", "Transformers", "minGRU")
INTRO = ("Each cell of the lecture's table, measured (method and verdict rules: docs/study.md). A verdict says whether "
         "the measurement bears the claim out: agrees, disagrees, depends on ..., or inconclusive.")
# What each row measures, in the table's "measured" column (a row not named here shows its name).
ROW_LABELS = {"compute": "training step", "streaming": "streaming decoding", "parallelism": "threads",
              "inductive_bias": "accuracy vs training clips", "long_range": "accuracy vs distance"}


class TableCell(NamedTuple):
    """One cell of the measured table: a row of the study (``compute``) x a column (``RNNs``), with its table
    entries ({column, quantity, claim, measured, verdict}; one per quantity, e.g. time and memory) and the numbers
    behind them (:func:`cell_metrics`)."""

    row: str
    column: str
    entries: Sequence[Mapping[str, str]]
    metrics: Mapping[str, float]

    @property
    def name(self) -> str:
        return f"{self.row}/{self.column}"


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def cell_metrics(result: RowResult, variants: Sequence[str]) -> dict[str, float]:
    """The numbers behind a cell, for ``variants``: every fitted exponent with its interval
    (``{metric}.{variant}.exponent/.low/.high``), every thread speedup (``speedup.{variant}.n{N}``, row 2) and every
    difference from the Transformer (``top_1_minus_transformer.{family}.clips{n}``, ``.low/.high/.p``, row 4) and every
    fall from the shortest to the longest distance (``top_1_longest_minus_shortest.{family}``, row 1)."""
    out: dict[str, Any] = {}
    for finding in result.findings:
        if finding.variant in variants and finding.fit is not None:
            name = f"{finding.metric}.{finding.variant}"
            out |= {f"{name}.exponent": finding.fit.exponent, f"{name}.low": finding.fit.low,
                    f"{name}.high": finding.fit.high}
    for speedup in result.extra.get("speedups", ()):
        if speedup["variant"] in variants:
            name = f"speedup.{speedup['variant']}.n{speedup['n']}"
            out |= {name: speedup["speedup"], f"{name}.low": speedup["low"], f"{name}.high": speedup["high"]}
    for family, drop in result.extra.get("drops", {}).items():  # row 1: accuracy at the longest - the shortest D
        if family in variants:
            name = f"top_1_longest_minus_shortest.{family}"
            out |= {name: drop["difference"], f"{name}.low": drop["interval"][0], f"{name}.high": drop["interval"][1],
                    f"{name}.p": drop["p_value"]}
    for family, rows in result.extra.get("comparisons", {}).items():
        if family not in variants:
            continue
        for row in rows:  # the comparison is transformer - family; the table reads family - transformer
            name = f"top_1_minus_transformer.{family}.clips{row['train_items']}"
            out |= {name: -row["difference"], f"{name}.low": -row["interval"][1], f"{name}.high": -row["interval"][0],
                    f"{name}.p": row["p_value"]}
    return _finite(out)


def table_cells(results: Mapping[str, RowResult]) -> list[TableCell]:
    """Every (row, column) of ``results`` with at least one table entry, in :data:`ROWS` and column order."""
    cells = []
    for name, result in results.items():
        for column, variants in ROWS[name].columns.items():
            entries = [t for t in result.table if t["column"] == column]
            if entries:
                cells.append(TableCell(name, column, entries, cell_metrics(result, variants)))
    return cells


def _joined(entries: Sequence[Mapping[str, str]], key: str) -> str:
    if len(entries) == 1:
        return entries[0][key]
    return "; ".join(f"{e['quantity']}: {e[key]}" for e in entries)


def mlflow_cells(results: Mapping[str, RowResult], *, figures: Mapping[str, Path], rows_dir: str | Path
                 ) -> list[StudyCell]:
    """One child run per cell of :func:`table_cells`: tagged ``claim``, ``measured`` and ``verdict`` (per quantity
    ``verdict.<quantity>`` etc. too), with its metrics; artifacts: the row's JSON (from ``rows_dir``) and the figure
    that shows it (``figures``: ``{row: PNG}``; the streaming row's is compute.png)."""
    out = []
    for cell in table_cells(results):
        tags: dict[str, str] = {"seqvision.study.row": cell.row, "seqvision.study.column": cell.column,
                                "seqvision.study.seed_row": ROWS[cell.row].seed_row}
        for key in ("claim", "measured", "verdict"):
            tags[key] = _joined(cell.entries, key)
            tags |= {f"{key}.{e['quantity'].replace(' ', '_')}": e[key] for e in cell.entries}
        figure = figures.get(cell.row) or next(
            (path for row, path in figures.items() if ROWS[row].seed_row == ROWS[cell.row].seed_row), None)
        artifacts = [row_file(rows_dir, cell.row), *([figure] if figure else [])]
        out.append(StudyCell(cell.name, tags, cell.metrics, artifacts))
    return out


def _short(claim: str) -> str:
    """The claim's head ("strong" of "strong: ahead of the Transformer ..."), for the summary table."""
    return claim.split(":")[0].strip()


def _summary_rows(results: Mapping[str, RowResult]) -> list[list[str]]:
    """[seed row, what was measured, then per column "claim: **verdict**"] for the summary table; rows of the seed's
    table with nothing measured say so ("not measured yet": no row of the study; "not run": no JSON)."""
    out = []
    for seed_row in SEED_TABLE:
        names = [n for n, row in ROWS.items() if row.seed_row == seed_row]
        measured = [n for n in names if n in results]
        if not measured:
            why = "not run" if names else "not measured yet"
            out.append([seed_row, why, *("" for _ in COLUMNS)])
            continue
        for name in measured:
            quantities = list(dict.fromkeys(t["quantity"] for t in results[name].table))
            for quantity in quantities:
                cells = []
                for column in COLUMNS:
                    entry = next((t for t in results[name].table
                                  if t["column"] == column and t["quantity"] == quantity), None)
                    cells.append("—" if entry is None else f"{_short(entry['claim'])}: **{entry['verdict']}**")
                label = ROW_LABELS.get(name, name)
                out.append([seed_row, label if quantity == seed_row else f"{label}: {quantity}",
                            *cells])
    return out


def _settings(result: RowResult, environment: Mapping[str, Any] | None) -> str:
    """One line: where the row ran and its main settings."""
    env = environment or {}
    shown = {"cpu_count": "CPUs", "load_average_1m": "load average", "torch": "torch", "cuda": "GPU"}
    where = ", ".join(f"{label} {env[k]:.2f}" if isinstance(env[k], float) else f"{label} {env[k]}"
                      for k, label in shown.items() if env.get(k))
    return (f"Run with {len(result.cells)} cells" + (f" ({where})" if where else "")
            + f"; every number: `{result.row}.json`.")


def notes(name: str, result: RowResult) -> list[str]:
    """What the row found beside its verdicts (:attr:`Row.notes`), one line each."""
    found = ROWS[name].notes
    return found(result) if found is not None else []


def render_markdown(results: Mapping[str, RowResult], *, figures: Mapping[str, str],
                    environments: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """``study.md``: the summary table, then per row of the seed's table its figure and, per cell, the claim, what
    was measured and the verdict. ``figures``: ``{row: path of its PNG relative to the Markdown file}``."""
    out = [f"# {TITLE}", "", INTRO, ""]
    rows = _summary_rows(results)
    out += md_table(["seed's table", "measured", *COLUMNS], rows)
    out.append("")
    for number, seed_row in enumerate(SEED_TABLE, start=1):
        names = [n for n, row in ROWS.items() if row.seed_row == seed_row and n in results]
        if not names:
            continue
        out += [f"## Row {number}: {seed_row}", ""]
        for name in names:
            if name in figures:
                out += [f"![{seed_row}]({figures[name]})", ""]
        for name in names:
            result = results[name]
            out += [f"### {ROW_LABELS.get(name, name)} (`{name}`)", "",
                    _settings(result, (environments or {}).get(name)), ""]
            for entry in result.table:
                out.append(f"- **{entry['column']}, {entry['quantity']}**: claim {entry['claim']}; measured "
                           f"{entry['measured']} → **{entry['verdict']}**")
            out += [f"- {line}" for line in notes(name, result)]
            out.append("")
    return "\n".join(out) + "\n"


def render_html(results: Mapping[str, RowResult], *, figures: Mapping[str, Path],
                environments: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """``study.html``: what :func:`render_markdown` says, self-contained (``figures``: ``{row: PNG file}``,
    inlined)."""
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(TITLE)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{esc(TITLE)}</h1>", f"<p>{esc(INTRO)}</p>"]
    rows = [[cell.replace("**", "") for cell in row] for row in _summary_rows(results)]
    out += html_table(["seed's table", "measured", *COLUMNS], rows)
    for number, seed_row in enumerate(SEED_TABLE, start=1):
        names = [n for n, row in ROWS.items() if row.seed_row == seed_row and n in results]
        if not names:
            continue
        out.append(f"<section><h2>Row {number}: {esc(seed_row)}</h2>")
        for name in names:
            if name in figures:
                out.append(f'<figure><img alt="{esc(name)}" src="{data_uri(Path(figures[name]).read_bytes())}">'
                           f"<figcaption>{esc(name)}.png</figcaption></figure>")
        for name in names:
            result = results[name]
            out.append(f"<h3>{esc(ROW_LABELS.get(name, name))} (<code>{esc(name)}</code>)</h3>"
                       f"<p class=\"scale\">{esc(_settings(result, (environments or {}).get(name)))}</p>"
                       '<ul class="verdict">')
            out += [f"<li><b>{esc(e['column'])}, {esc(e['quantity'])}</b>: claim {esc(e['claim'])}; measured "
                    f"{esc(e['measured'])} → <b>{esc(e['verdict'])}</b></li>" for e in result.table]
            out += [f"<li>{esc(line)}</li>" for line in notes(name, result)]
            out.append("</ul>")
        out.append("</section>")
    out.append("</body></html>\n")
    return "\n".join(out)


def read_environments(folder: str | Path, rows: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{row: environment}`` from ``folder/{row}.json`` (:meth:`RowResult.from_json` does not keep it)."""
    return {row: json.loads(row_file(folder, row).read_text()).get("environment", {}) for row in rows}


class StudyReport(NamedTuple):
    markdown: Path
    html: Path
    figures: dict[str, Path]  # {row: PNG}


def write_report(results: Mapping[str, RowResult], *, markdown: str | Path, html: str | Path,
                 figures_dir: str | Path, environments: Mapping[str, Mapping[str, Any]] | None = None) -> StudyReport:
    """Draw every figure into ``figures_dir`` and write ``markdown`` (linking them) and ``html`` (inlining them),
    atomically. A figure of an earlier run whose row is gone is removed."""
    figures_dir = Path(figures_dir)
    figures = write_figures(results, figures_dir)
    for stale in figures_dir.glob("*.png"):
        if stale not in figures.values():
            stale.unlink()
    markdown, html = Path(markdown), Path(html)
    relative = {row: Path(os.path.relpath(path, markdown.parent)).as_posix() for row, path in figures.items()}
    write_text(markdown, render_markdown(results, figures=relative, environments=environments))
    write_text(html, render_html(results, figures=figures, environments=environments))
    return StudyReport(markdown, html, figures)
