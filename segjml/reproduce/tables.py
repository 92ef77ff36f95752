"""Gather the runs' ``metrics.json`` into the paper's tables: ours (mean +- std), the paper's value, the difference.

Standard deviations are population standard deviations (ddof 0), the convention that reproduces the paper's own
mean +- std of the per-fold numbers of Table 14.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segjml.reproduce.grid import FOLDS, Cell, Run, Table, cell_runs


@dataclass
class Stat:
    mean: float
    std: float
    n: int
    expected: int

    @classmethod
    def of(cls, values: Sequence[float], expected: int) -> Stat | None:
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return None
        return cls(float(np.mean(values)), float(np.std(values)), len(values), expected)


def read_metrics(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_values(runs: Sequence[Run], metric: str, log_dir: Path, extra: Sequence[str] = ()) -> list[float | None]:
    """The metric of each run (``None`` where a run has not finished)."""
    values = []
    for run in runs:
        metrics = read_metrics(run.run_dir(log_dir, extra))
        values.append(None if metrics is None or metric not in metrics else float(metrics[metric]))
    return values


def cell_values(cell: Cell, metric: str, log_dir: Path, extra: Sequence[str] = ()) -> list[float | None]:
    return run_values(cell_runs(cell.experiment, cell.repeat), metric, log_dir, extra)


@dataclass
class Entry:
    """One rendered cell: our statistic and the paper's ``(mean, std)``."""

    ours: Stat | None
    paper: tuple[float, float | None] | None

    @property
    def diff(self) -> float | None:
        if self.ours is None or self.paper is None:
            return None
        return self.ours.mean - self.paper[0]


def table_entries(table: Table, log_dir: Path, extra: Sequence[str] = ()) -> list[tuple[list[str], str, list[Entry]]]:
    """Rows of ``table`` as ``(labels, metric, entries)``."""
    rows = []
    if table.per_fold:
        per_block: list[list[float | None]] = []
        for block in table.blocks:
            metric = next(iter(table.metrics))
            if block.diff is not None:
                a, b = (per_block[i] for i in block.diff)
                folds = [None if x is None or y is None else y - x for x, y in zip(a, b)]
            else:
                folds = cell_values(block.cells[0], metric, log_dir, extra)
            per_block.append(folds)
            entries = [Entry(Stat.of([v], 1), cell.paper[metric]) for v, cell in zip(folds, block.cells)]
            entries.append(Entry(Stat.of(folds, len(FOLDS)), block.cells[len(folds)].paper[metric]))
            rows.append((block.label, metric, entries))
        return rows
    for block in table.blocks:
        for metric in table.metrics:
            if all(c.paper.get(metric) is None and c.experiment is None for c in block.cells):
                continue
            entries = []
            for cell in block.cells:
                ours = None
                if cell.experiment is not None:
                    values = cell_values(cell, metric, log_dir, extra)
                    ours = Stat.of(values, len(values))
                entries.append(Entry(ours, cell.paper.get(metric)))
            rows.append((block.label, metric, entries))
    return rows


def _num(mean: float, std: float | None, pm: str) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f}{pm}{std:.2f}"


def format_entry(entry: Entry, latex: bool = False) -> str:
    """``ours (paper p, Δ d)``; ``[n/k]`` marks a cell with only n of its k runs finished."""
    pm = r" \pm " if latex else " ± "
    parts = []
    if entry.ours is not None:
        o = entry.ours
        text = _num(o.mean, o.std if o.expected > 1 else None, pm)
        parts.append((f"${text}$" if latex else text) + (f" [{o.n}/{o.expected}]" if o.n < o.expected else ""))
    elif entry.paper is not None:
        parts.append("--" if latex else "—")
    if entry.paper is not None:
        paper, d = _num(entry.paper[0], entry.paper[1], pm), entry.diff
        d = None if d is None else round(d, 2) + 0.0  # + 0.0: "+0.00", never "-0.00"
        if latex:
            parts.append(rf"{{\scriptsize (${paper}$" + (rf", $\Delta {d:+.2f}$" if d is not None else "") + ")}")
        else:
            parts.append(f"(paper {paper}" + (f", Δ {d:+.2f}" if d is not None else "") + ")")
    return " ".join(parts) or "-"


def render_markdown(table: Table, rows) -> str:
    multi = len(table.metrics) > 1
    head = [*table.header, *(["Metric"] if multi else []), *table.columns]
    lines = [
        f"**Table {table.key}**: {table.caption}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * len(head)) + "|",
    ]
    previous = None
    for labels, metric, entries in rows:
        shown = labels if labels != previous else [""] * len(labels)
        previous = labels
        cells = [*shown, *([table.metrics[metric]] if multi else []), *(format_entry(e) for e in entries)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_LATEX = {
    "%": r"\%",
    "_": r"\_",
    "&": r"\&",
    "#": r"\#",
    "±": r"$\pm$",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "✓": r"\checkmark",
    "μ": r"$\mu$",
    "σ": r"$\sigma$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in str(text))


def render_latex(table: Table, rows) -> str:
    multi = len(table.metrics) > 1
    head = [*table.header, *(["Metric"] if multi else []), *table.columns]
    n_labels = len(head) - len(table.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\scriptsize",
        rf"\caption{{{latex_escape(table.caption)} Ours: mean $\pm$ std; paper value and difference in "
        r"parentheses.}",
        rf"\label{{tab:segjml-{table.key}}}",
        r"\begin{tabular}{" + "l" * n_labels + "c" * len(table.columns) + "}",
        r"\toprule",
        " & ".join(latex_escape(h) for h in head) + r" \\",
        r"\midrule",
    ]
    previous = None
    for labels, metric, entries in rows:
        if previous is not None and labels[0] != previous[0]:
            lines.append(r"\midrule")
        shown = labels if labels != previous else [""] * len(labels)
        previous = labels
        cells = [
            *(latex_escape(x) for x in shown),
            *([latex_escape(table.metrics[metric])] if multi else []),
            *(format_entry(e, latex=True) for e in entries),
        ]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def build_tables(tables: Sequence[Table], log_dir: Path, out_dir: Path, extra: Sequence[str] = (), echo=print) -> dict:
    """Write ``table<key>.md`` / ``.tex``, ``tables.md`` and ``results.json`` under ``out_dir``; return the results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    combined, results = [], {}
    for table in tables:
        if table.is_figure:
            continue
        rows = table_entries(table, log_dir, extra)
        md = render_markdown(table, rows)
        (out_dir / f"table{table.key}.md").write_text(md)
        (out_dir / f"table{table.key}.tex").write_text(render_latex(table, rows))
        combined.append(md)
        results[table.key] = [
            {
                "labels": labels,
                "metric": metric,
                "column": col,
                "ours": None if e.ours is None else vars(e.ours),
                "paper": e.paper,
                "diff": e.diff,
            }
            for labels, metric, entries in rows
            for col, e in zip(table.columns, entries)
        ]
        echo(md)
    (out_dir / "tables.md").write_text("\n".join(combined))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    echo(f"# tables written to {out_dir}")
    return results
