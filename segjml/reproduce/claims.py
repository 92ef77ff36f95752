"""The claims check of ``make claims``: the paper's section 3 claims tested on the runs of ``claims_results.yaml``.

Every comparison is paired by seed: for a contrast such as ``mIoU(JML) - mIoU(CE)`` we take the difference of the two
runs of the same seed, then its mean ``d`` and standard error ``se = std(ddof=1) / sqrt(n)`` over the seeds. A
difference is *clear* when ``|d| > 2 se`` (about a 95% interval for a normal difference; with 3 seeds it is a rough
screen, not a test). A check holds when ``d`` has the claimed sign. A claim is

- ``reproduced`` when its checks hold (all of them, or one of them for a claim the paper words with "sometimes") and
  each of those is clear;
- ``direction only`` when they hold but not all clearly;
- ``not reproduced`` otherwise.

The table's ``mean ± std`` uses the population standard deviation, as the paper's tables (``tables.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from segjml.data.synthetic import make_sample
from segjml.labels.boundary import boundary_map
from segjml.reproduce.grid import Table, cell_runs, sweep_point_runs
from segjml.reproduce.tables import run_values

CLAIMS_RESULTS = Path(__file__).with_name("claims_results.yaml")
MAIN_TABLE = "C1"
HIGHER_IS_BETTER = {"acc": True, "miou": True, "miou_i": True, "miou_c": True}
"""Metrics not listed here are errors (lower is better)."""


@dataclass(frozen=True)
class Check:
    """``sum_k coef_k * metric(column_k)`` is claimed positive (``sign=+1``) or negative (``sign=-1``)."""

    metric: str
    terms: tuple[tuple[str, int], ...]
    sign: int

    def text(self) -> str:
        parts = []
        for i, (column, coef) in enumerate(self.terms):
            op = ("" if coef > 0 else "-") if i == 0 else (" + " if coef > 0 else " - ")
            parts.append(f"{op}{column}")
        return f"{self.metric}: {''.join(parts)} {'>' if self.sign > 0 else '<'} 0"


@dataclass(frozen=True)
class Claim:
    heading: str  # the paper's words (section 3 heading)
    checks: tuple[Check, ...]
    any_of: bool = False  # "sometimes": one check is enough


def better(metric: str, a: str, b: str) -> Check:
    """``a`` is better than ``b`` on ``metric`` (higher accuracy, lower error)."""
    return Check(metric, ((a, 1), (b, -1)), 1 if HIGHER_IS_BETTER.get(metric, False) else -1)


def worse(metric: str, a: str, b: str) -> Check:
    check = better(metric, a, b)
    return Check(check.metric, check.terms, -check.sign)


def gains_more(metric: str, soft: str, hard: str, soft_ce: str, hard_ce: str) -> Check:
    """``(soft - hard) - (soft_ce - hard_ce) > 0``: the JML pair gains more from soft labels than the CE pair."""
    return Check(metric, ((soft, 1), (hard, -1), (soft_ce, -1), (hard_ce, 1)), 1)


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "JML significantly improves accuracy (Acc and mIoU)", (better("miou", "JML", "CE"), better("acc", "JML", "CE"))
    ),
    Claim(
        "JML benefits more from soft labels (mIoU gain of JML-BLS over JML and of JML-KD over JML exceeds CE's)",
        (gains_more("miou", "JML-BLS", "JML", "CE-BLS", "CE"), gains_more("miou", "JML-KD", "JML", "CE-KD", "CE")),
    ),
    Claim(
        "Both BLS and KD consistently improve the model's accuracy (mIoU)",
        tuple(better("miou", soft, hard) for hard in ("CE", "JML") for soft in (f"{hard}-BLS", f"{hard}-KD")),
    ),
    Claim(
        "KD is more effective than BLS (mIoU)", (better("miou", "CE-KD", "CE-BLS"), better("miou", "JML-KD", "JML-BLS"))
    ),
    Claim(
        "CE-BLS and CE-KD sometimes hurt calibration (ECE)",
        (worse("ece", "CE-BLS", "CE"), worse("ece", "CE-KD", "CE")),
        any_of=True,
    ),
    Claim("CE-BLS can still improve model calibration near the boundary (BECE)", (better("bece", "CE-BLS", "CE"),)),
    Claim("JML compromises calibration (ECE)", (worse("ece", "JML", "CE"),)),
    Claim("JML achieves better multi-class calibration (SCE)", (better("sce", "JML", "CE"),)),
    Claim(
        "JML-BLS and JML-KD consistently improve calibration (ECE and BECE)",
        tuple(better(m, soft, "JML") for soft in ("JML-BLS", "JML-KD") for m in ("ece", "bece")),
    ),
    Claim(
        "Semi-supervised training with CE (AugSeg) improves over the labeled images alone (mIoU)",
        (better("miou", "CE-SSL", "Supervised"),),
    ),
    Claim("JML-SSL improves over CE-SSL (AugSeg) (mIoU, Tables 11-12)", (better("miou", "JML-SSL", "CE-SSL"),)),
)


@dataclass
class Paired:
    """Mean and standard error of per-seed differences."""

    mean: float
    se: float
    n: int

    @classmethod
    def of(cls, diffs: Sequence[float]) -> Paired | None:
        d = np.asarray([x for x in diffs if math.isfinite(x)], dtype=np.float64)
        if d.size == 0:
            return None
        se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.inf
        return cls(float(d.mean()), se, int(d.size))

    @property
    def clear(self) -> bool:
        return abs(self.mean) > 2 * self.se

    def __str__(self) -> str:
        return f"{self.mean:+.2f} ± {self.se:.2f}{'*' if self.clear else ''}"


Values = Mapping[str, Mapping[str, Sequence[float]]]
"""``values[column][metric]``: one number per seed, seeds in the same order for every column (NaN: missing)."""


def contrast(values: Values, check: Check) -> Paired | None:
    diffs = None
    for column, coef in check.terms:
        v = np.asarray(values[column][check.metric], dtype=np.float64) * coef
        diffs = v if diffs is None else diffs + v
    return Paired.of(diffs.tolist())


def judge(values: Values, claim: Claim) -> tuple[str, list[tuple[Check, Paired | None]]]:
    """The verdict on ``claim`` and each check's paired difference."""
    results = [(check, contrast(values, check)) for check in claim.checks]
    holds = [p is not None and p.mean * check.sign > 0 for check, p in results]
    clear = [h and p.clear for h, (_, p) in zip(holds, results)]
    if claim.any_of:
        verdict = "reproduced" if any(clear) else "direction only" if any(holds) else "not reproduced"
    else:
        verdict = "reproduced" if all(clear) else "direction only" if all(holds) else "not reproduced"
    return verdict, results


def _stat(values: Sequence[float]) -> str:
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    return "–" if v.size == 0 else f"{v.mean():.2f} ± {v.std():.2f}"


def collect(table: Table, log_dir: Path, extra: Sequence[str] = ()) -> dict[str, dict[str, list[float]]]:
    """``values[column][metric]`` of the main table (NaN for a run that has not finished)."""
    values: dict[str, dict[str, list[float]]] = {}
    for column, cell in zip(table.columns, table.blocks[0].cells):
        runs = cell_runs(cell.experiment, cell.repeat)
        values[column] = {
            m: [math.nan if v is None else v for v in run_values(runs, m, log_dir, extra)] for m in table.metrics
        }
    return values


def sweep_values(
    sweep_table: Table, baseline: Mapping[str, Sequence[float]], log_dir: Path, metrics, extra: Sequence[str] = ()
) -> list:
    """Rows ``(k, eps, {metric: per-seed values})`` of a BLS sweep, eps = 0 being the baseline (JML)."""
    sweep = sweep_table.sweep
    (experiment,) = sweep["experiments"].values()
    rows = []
    for k in sweep["kernel_size"]:
        rows.append((k, 0.0, {m: list(baseline[m]) for m in metrics}))
        for eps in sweep["eps"]:
            runs = sweep_point_runs(experiment, sweep, eps, k)
            rows.append(
                (
                    k,
                    eps,
                    {m: [math.nan if v is None else v for v in run_values(runs, m, log_dir, extra)] for m in metrics},
                )
            )
    return rows


def boundary_share(labels: torch.Tensor, kernel_size: int = 3, ignore_index: int = 255) -> float:
    """Share of the non-ignored pixels of ``labels`` (B, H, W) that are boundary pixels (the BLS / BECE rule)."""
    valid = labels != ignore_index
    return float(boundary_map(labels, kernel_size, ignore_index).sum() / valid.sum().clamp_min(1))


def synthetic_boundary_shares(sizes: Sequence[int] = (64, 128, 256, 512), n: int = 50, kernel_size: int = 3) -> dict:
    """``{size: share}`` over the first ``n`` validation images of the synthetic set drawn at ``size`` pixels (its
    objects scale with the image, so a larger size is the same scenes at a higher resolution)."""
    shares = {}
    for size in sizes:
        labels = np.stack([make_sample(0, "val", i, size)[1] for i in range(n)]).astype(np.int64)
        shares[size] = boundary_share(torch.from_numpy(labels), kernel_size)
    return shares


REFERENCES = {"C1": ("CE", "JML"), "C2": ("Supervised", "CE-SSL")}
"""The columns each table's other columns are compared with, seed by seed."""


def _table_lines(table: Table, values, metrics: list[str], heads: list[str]) -> list[str]:
    lines = [f"### {table.caption}", "", "| loss | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for column in table.columns:
        lines.append(f"| {column} | " + " | ".join(_stat(values[column][m]) for m in metrics) + " |")
    for ref in REFERENCES.get(table.key, table.columns[:1]):
        lines += ["", f"Paired difference to {ref} (mean ± standard error over seeds; * beyond 2 standard errors):", ""]
        lines += ["| loss | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
        for column in table.columns:
            if column != ref:
                cells = [str(contrast(values, Check(m, ((column, 1), (ref, -1)), 1)) or "–") for m in metrics]
                lines.append(f"| {column} − {ref} | " + " | ".join(cells) + " |")
    return lines


def _sweep_lines(table: Table, values, metrics, heads, log_dir: Path, extra: Sequence[str]) -> list[str]:
    lines = ["", f"### {table.caption}", "", "| k | eps | " + " | ".join(heads) + " |", "|---" * (len(heads) + 2) + "|"]
    for k, eps, row in sweep_values(table, values["JML"], log_dir, metrics, extra):
        cells = []
        for m in metrics:
            cell = _stat(row[m])
            if eps:
                diff = Paired.of((np.asarray(row[m]) - np.asarray(values["JML"][m])).tolist())
                cell += f" ({diff})" if diff else ""
            cells.append(cell)
        lines.append(f"| {k} | {eps} | " + " | ".join(cells) + " |")
    return lines + ["", "(in brackets: paired difference to JML, eps = 0)"]


def render(tables: Mapping[str, Table], log_dir: Path, extra: Sequence[str] = ()) -> str:
    """The Markdown report: the result tables with paired differences, the eps sweeps, the boundary share of the
    synthetic set, and the verdict on every claim whose columns were trained."""
    metrics = list(tables[MAIN_TABLE].metrics)
    heads = [tables[MAIN_TABLE].metrics[m] for m in metrics]
    values: dict[str, dict[str, list[float]]] = {}
    lines: list[str] = []
    for table in tables.values():
        if table.sweep is None:
            table_values = collect(table, log_dir, extra)
            values.update(table_values)
            lines += ([""] if lines else []) + _table_lines(table, table_values, metrics, heads)
    for table in tables.values():
        if table.sweep is not None:
            lines += _sweep_lines(table, values, metrics, heads, log_dir, extra)
    shares = synthetic_boundary_shares()
    lines += ["", "### Boundary share of the synthetic set (k = 3, 50 validation images)", ""]
    lines += ["| image size | " + " | ".join(f"{s}x{s}" for s in shares) + " |", "|---" * (len(shares) + 1) + "|"]
    lines.append("| boundary pixels | " + " | ".join(f"{100 * v:.2f}%" for v in shares.values()) + " |")
    lines += ["", "### The paper's claims at this scale", ""]
    for claim in CLAIMS:
        if not all(column in values for check in claim.checks for column, _ in check.terms):
            continue
        verdict, results = judge(values, claim)
        detail = "; ".join(f"{c.text()}: {p if p else '–'}" for c, p in results)
        lines.append(f"- **{verdict}**: {claim.heading}. {detail}")
    return "\n".join(lines) + "\n"


def write_report(tables: Mapping[str, Table], log_dir: Path, path: Path, extra: Sequence[str] = ()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(tables, log_dir, extra))
    return path
