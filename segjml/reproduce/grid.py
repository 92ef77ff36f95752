"""The grid of runs behind the paper's tables and figures, and where each run lives.

A table (``paper_results.yaml``) names, cell by cell, the experiment preset that trains it; a figure sweep names
presets and the BLS values to sweep. From these we derive the runs (one per seed, DeepGlobe fold or sweep point),
their command lines and their run directories. A run directory follows Hydra's own rule (``configs/hydra/
default.yaml``): ``<log_dir>/<experiment>/<sorted overrides joined by ','>``, leaving out the excluded keys, so
``make reproduce`` and a hand-typed ``python train.py experiment=X seed=1`` share the same directory, and a finished
run (its ``metrics.json`` exists) is never trained twice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from segjml.config import CONFIG_DIR, is_run_independent, override_key

ROOT = Path(__file__).resolve().parents[2]
PAPER_RESULTS = Path(__file__).with_name("paper_results.yaml")
SMOKE_RESULTS = Path(__file__).with_name("smoke_results.yaml")

SEEDS = (0, 1, 2)
FOLDS = (0, 1, 2, 3, 4)
_VALUE = re.compile(r"^\s*(-?[\d.]+)\s*(?:±\s*([\d.]+))?\s*$")


class GridError(ValueError):
    """A table or sweep that does not describe a valid grid (bad table key, unknown experiment...)."""


def parse_value(text) -> tuple[float, float | None] | None:
    """``"75.60 ± 0.24"`` -> ``(75.60, 0.24)``; ``72.47`` -> ``(72.47, None)``; ``None`` -> ``None``."""
    if text is None:
        return None
    m = _VALUE.match(str(text))
    if m is None:
        raise GridError(f"cannot read the paper value {text!r}; write 'mean ± std' or a number")
    return float(m.group(1)), float(m.group(2)) if m.group(2) else None


@dataclass(frozen=True)
class Run:
    """One training run: an experiment preset plus its command-line overrides (seed, fold, sweep point)."""

    experiment: str
    overrides: tuple[str, ...] = ()
    teacher: Run | None = None

    @property
    def fold(self) -> int | None:
        for o in self.overrides:
            if o.startswith("dataset.fold="):
                return int(o.split("=", 1)[1])
        return None

    def dirname(self, extra: Sequence[str] = ()) -> str:
        return override_dirname([*self.overrides, *extra])

    def run_dir(self, log_dir: Path, extra: Sequence[str] = ()) -> Path:
        return Path(log_dir) / self.experiment / self.dirname(extra)

    def done(self, log_dir: Path, extra: Sequence[str] = ()) -> bool:
        return (self.run_dir(log_dir, extra) / "metrics.json").is_file()

    def train_overrides(self, log_dir: Path, extra: Sequence[str] = ()) -> list[str]:
        """Overrides of ``python train.py`` for this run (teacher checkpoint made explicit)."""
        args = [f"experiment={self.experiment}", *self.overrides, *extra]
        if self.teacher is not None:
            ckpt = self.teacher.run_dir(log_dir, extra) / "checkpoints" / "last.pt"
            args.append(f"teacher.checkpoint={quote(str(ckpt))}")
        return args

    def __str__(self) -> str:
        return " ".join([self.experiment, *self.overrides])


def quote(value: str) -> str:
    """Quote a Hydra override value that holds characters of the override grammar (``=``, ``,``, ``$``...)."""
    return f"'{value}'" if re.search(r"[=,\s$'\[\]{}()]", value) else value


def override_dirname(overrides: Iterable[str]) -> str:
    """Hydra's ``job.override_dirname``: the task overrides as typed (``hydra.*`` / ``hydra/*`` ones are Hydra's
    own), those of keys that do not define a run dropped, sorted, joined by ``,``."""
    lines = []
    for line in overrides:
        key = override_key(line)
        if not is_run_independent(key) and not key.startswith(("hydra.", "hydra/")):
            lines.append(line)
    return ",".join(sorted(lines))


def experiment_names() -> set[str]:
    return {p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")}


def teacher_of(experiment: str) -> str | None:
    """The experiment that trains ``experiment``'s KD teacher (its preset's ``teacher.experiment``), if any."""
    path = CONFIG_DIR / "experiment" / f"{experiment}.yaml"
    if not path.is_file():
        raise GridError(f"no experiment preset configs/experiment/{experiment}.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    return (data.get("teacher") or {}).get("experiment")


# ---------------------------------------------------------------------------------------------------------------
# Tables


@dataclass
class Cell:
    experiment: str | None  # None: the paper's number only
    repeat: str  # seeds | folds | single
    paper: dict[str, tuple[float, float | None] | None]  # metric -> paper value


@dataclass
class Block:
    label: list[str]
    cells: list[Cell]
    diff: tuple[int, int] | None = None  # per-fold tables: block[b] - block[a]


@dataclass
class Table:
    key: str
    caption: str
    header: list[str]
    columns: list[str]
    metrics: dict[str, str]
    blocks: list[Block]
    per_fold: bool = False
    sweep: dict | None = None  # figure sweeps: the sweep spec instead of blocks

    @property
    def is_figure(self) -> bool:
        return self.sweep is not None

    def runs(self) -> list[Run]:
        if self.sweep is not None:
            return sweep_runs(self.sweep)
        runs = []
        for block in self.blocks:
            for cell in block.cells:
                if cell.experiment is not None:
                    runs += [r for r in cell_runs(cell.experiment, cell.repeat) if r not in runs]
        return runs


def repeat_overrides(repeat: str) -> list[tuple[str, ...]]:
    if repeat == "seeds":
        return [(f"seed={s}",) for s in SEEDS]
    if repeat == "folds":
        return [(f"dataset.fold={f}",) for f in FOLDS]
    if repeat == "single":
        return [("seed=0",)]
    raise GridError(f"unknown repeat '{repeat}'; use seeds, folds or single")


def with_teacher(experiment: str, overrides: tuple[str, ...]) -> Run:
    """The run, with its teacher's run (seed 0, or the same DeepGlobe fold) attached."""
    teacher = teacher_of(experiment)
    teacher_run = None
    if teacher is not None:
        fold = [o for o in overrides if o.startswith("dataset.fold=")]
        teacher_run = with_teacher(teacher, tuple(fold) if fold else ("seed=0",))
    return Run(experiment, tuple(overrides), teacher_run)


def cell_runs(experiment: str, repeat: str) -> list[Run]:
    return [with_teacher(experiment, o) for o in repeat_overrides(repeat)]


def _format_value(v) -> str:
    return "inf" if str(v).lower() in ("inf", "infinity") or (isinstance(v, float) and math.isinf(v)) else str(v)


def sweep_point_runs(experiment: str, sweep: dict, eps, kernel_size) -> list[Run]:
    """The runs (one per seed) of one sweep point; the preset's own values need no override."""
    preset = sweep.get("preset", {"eps": 0.5, "kernel_size": 3})
    point = []
    if float(eps) != float(preset["eps"]):
        point.append(f"loss.bls.eps={_format_value(eps)}")
    if str(kernel_size) != str(preset["kernel_size"]):
        point.append(f"loss.bls.kernel_size={_format_value(kernel_size)}")
    return [
        with_teacher(experiment, tuple(sorted([*point, *o]))) for o in repeat_overrides(sweep.get("repeat", "seeds"))
    ]


def sweep_runs(sweep: dict) -> list[Run]:
    """Runs of a BLS sweep: every preset x kernel size x eps x seed, plus the eps = 0 baselines."""
    runs = []
    for experiment in sweep["experiments"].values():
        for k in sweep["kernel_size"]:
            for eps in sweep["eps"]:
                runs += sweep_point_runs(experiment, sweep, eps, k)
    for baseline in (sweep.get("baseline") or {}).values():
        runs += cell_runs(baseline, sweep.get("repeat", "seeds"))
    return runs


def load_tables(path: Path = PAPER_RESULTS) -> dict[str, Table]:
    data = yaml.safe_load(Path(path).read_text())
    return {str(key): _parse_table(str(key), spec) for key, spec in data.items()}


def _parse_table(key: str, spec: dict) -> Table:
    if "sweep" in spec:
        return Table(key, spec["caption"], [], [], {}, [], sweep=spec["sweep"])
    columns, metrics = [str(c) for c in spec["columns"]], dict(spec["metrics"])
    blocks = []
    for b in spec["blocks"]:
        repeat = b.get("repeat", spec.get("repeat", "seeds"))
        label = b["label"] if isinstance(b["label"], list) else [b["label"]]
        paper = {m: b.get(m) for m in metrics}
        for m, values in paper.items():
            if values is not None and len(values) != len(columns):
                raise GridError(f"table {key}, block {label}: {len(values)} {m} values for {len(columns)} columns")
        if spec.get("per_fold"):
            exp = b.get("experiment")
            cells = [
                Cell(exp, repeat, {m: parse_value(paper[m][i]) if paper[m] else None for m in metrics})
                for i in range(len(columns))
            ]
            blocks.append(Block([str(x) for x in label], cells, tuple(b["diff"]) if "diff" in b else None))
            continue
        if "prefix" in b:
            exps = []
            for i, col in enumerate(spec["column_keys"]):
                has_value = any(paper[m] is not None and paper[m][i] is not None for m in metrics)
                exps.append(f"{b['prefix']}_{col}" if has_value else None)
        else:
            exps = list(b["experiments"])
        if len(exps) != len(columns):
            raise GridError(f"table {key}, block {label}: {len(exps)} experiments for {len(columns)} columns")
        cells = [
            Cell(e, repeat, {m: parse_value(paper[m][i]) if paper[m] else None for m in metrics})
            for i, e in enumerate(exps)
        ]
        blocks.append(Block([str(x) for x in label], cells))
    return Table(
        key,
        " ".join(str(spec["caption"]).split()),
        [str(h) for h in spec["header"]],
        columns,
        metrics,
        blocks,
        per_fold=bool(spec.get("per_fold")),
    )


def select_tables(tables: dict[str, Table], selection: str) -> list[Table]:
    """``"all"`` or a comma list of table keys (``2,4``, ``fig5``; ``table2`` and ``Table 2`` work too)."""
    if selection.strip().lower() == "all":
        return list(tables.values())
    chosen = []
    for item in selection.split(","):
        key = re.sub(r"^(table|tab\.?)\s*", "", item.strip().lower())
        if key not in tables:
            raise GridError(f"no table '{item.strip()}'; choose from {', '.join(tables)} or all")
        chosen.append(tables[key])
    return chosen


@dataclass
class Grid:
    """Runs in dependency order: a run's stage is its KD depth (0: no teacher), so teachers finish first."""

    stages: list[list[Run]] = field(default_factory=list)

    @property
    def runs(self) -> list[Run]:
        return [r for stage in self.stages for r in stage]


def build_grid(tables: Sequence[Table]) -> Grid:
    """Every run of ``tables``, each once, teachers in earlier stages than their students."""
    depth: dict[Run, int] = {}

    def visit(run: Run) -> int:
        key = Run(run.experiment, run.overrides)
        if key not in depth:
            depth[key] = 0 if run.teacher is None else visit(run.teacher) + 1
            order.append(run)
        return depth[key]

    order: list[Run] = []
    for table in tables:
        for run in table.runs():
            visit(run)
    levels = max(depth.values(), default=-1) + 1
    stages: list[list[Run]] = [[] for _ in range(levels)]
    seen = set()
    for run in order:
        key = Run(run.experiment, run.overrides)
        if key in seen:
            continue
        seen.add(key)
        stages[depth[key]].append(run)
    return Grid([s for s in stages if s])
