"""Run a grid: skip finished runs, train teachers before their students, on one of three back ends.

- ``local``: one ``python train.py ...`` process per run, one after the other (a workstation or one GPU node); with
  ``jobs > 1``, that many runs of a stage side by side, each given ``cpu_count // jobs`` threads (small CPU runs use
  two cores better as two one-thread processes than as one two-thread process).
- ``inprocess``: the same runs composed with Hydra's compose API and trained in this process (no interpreter start-up
  per run; used by ``make reproduce-smoke``).
- any Hydra launcher (``submitit_slurm``, ``submitit_local``, ``basic``...): ``python train.py -m
  hydra/launcher=<name>`` sweeps, one per stage and group of runs that share overrides; the run directories are the
  same as above (``hydra.sweep.dir=<log_dir>``; the default sweep subdir is ``<name>/<override_dirname>``).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from segjml.reproduce.grid import ROOT, Grid, Run, quote

log = logging.getLogger(__name__)
TRAIN = ROOT / "train.py"


def _log_dir_override(log_dir: Path) -> list[str]:
    return [] if Path(log_dir) == Path("outputs") else [f"paths.log_dir={quote(str(log_dir))}"]


def local_command(run: Run, log_dir: Path, extra: Sequence[str]) -> list[str]:
    return [sys.executable, str(TRAIN), *run.train_overrides(log_dir, extra), *_log_dir_override(log_dir)]


def sweep_commands(runs: Sequence[Run], launcher: str, log_dir: Path, extra: Sequence[str]) -> list[list[str]]:
    """Hydra multirun commands covering exactly ``runs``: runs that differ only by seed and experiment share one."""
    groups: dict[tuple, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for run in runs:
        seeds = [o for o in run.overrides if o.startswith("seed=")]
        rest = tuple(o for o in run.overrides if not o.startswith("seed="))
        teacher = tuple(a for a in run.train_overrides(log_dir, extra) if a.startswith("teacher.checkpoint="))
        groups[(rest, teacher)][run.experiment].update(s.split("=", 1)[1] for s in seeds)
    commands = []
    for (rest, teacher), experiments in groups.items():
        by_seeds: dict[tuple, list[str]] = defaultdict(list)
        for exp, seeds in experiments.items():
            by_seeds[tuple(sorted(seeds, key=int))].append(exp)
        for seeds, exps in by_seeds.items():
            cmd = [
                sys.executable,
                str(TRAIN),
                "-m",
                f"hydra/launcher={launcher}",
                f"experiment={','.join(sorted(exps))}",
                *rest,
            ]
            if seeds:
                cmd.append(f"seed={','.join(seeds)}")
            cmd += [
                *teacher,
                *extra,
                *_log_dir_override(log_dir),
                f"hydra.sweep.dir={quote(str(log_dir))}",
            ]
            commands.append(cmd)
    return commands


def plan(stage: Sequence[Run], launcher: str, log_dir: Path, extra: Sequence[str]) -> list[tuple[str, list, list]]:
    """``(status, runs, command)`` for one stage: ``done`` runs, then the commands of the others (``todo``)."""
    done = [r for r in stage if r.done(log_dir, extra)]
    todo = [r for r in stage if r not in done]
    steps = [("done", [run], local_command(run, log_dir, extra)) for run in done]
    if launcher in ("local", "inprocess"):
        return steps + [("todo", [run], local_command(run, log_dir, extra)) for run in todo]
    for cmd in sweep_commands(todo, launcher, log_dir, extra) if todo else []:
        exps = next(a for a in cmd if a.startswith("experiment=")).split("=", 1)[1].split(",")
        steps.append(("todo", [r for r in todo if r.experiment in exps and _covers(cmd, r)], cmd))
    return steps


def _covers(cmd: Sequence[str], run: Run) -> bool:
    """Whether the sweep ``cmd`` includes ``run`` (same non-seed overrides, seed in its list)."""
    for o in run.overrides:
        key, value = o.split("=", 1)
        if key == "seed":
            seeds = next((a.split("=", 1)[1].split(",") for a in cmd if a.startswith("seed=")), [])
            if value not in seeds:
                return False
        elif o not in cmd:
            return False
    return True


def _shell(arg: str) -> str:
    if re.fullmatch(r"[\w@%+=:,./-]+", arg):
        return arg
    if not re.search(r'["$`\\!]', arg):
        return f'"{arg}"'  # key='value with = or ,' reads best in double quotes
    return shlex.quote(arg)


def show(command: Sequence[str]) -> str:
    """The command as one would type it in a shell at the repository root."""
    args = list(command)
    if args and args[0] == sys.executable:
        args[0] = "python"
    if len(args) > 1 and Path(args[1]) == TRAIN:
        args[1] = "train.py"
    return " ".join(_shell(a) for a in args)


def run_inprocess(run: Run, log_dir: Path, extra: Sequence[str]) -> None:
    """Compose the run's config exactly as ``train.py`` would and train it in this process."""
    from segjml.config import compose
    from segjml.engine import train

    overrides = [*run.train_overrides(log_dir, extra), *_log_dir_override(log_dir)]
    run_dir = run.run_dir(log_dir, extra)
    cfg = compose(overrides, output_dir=run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = train(cfg)
    if "stopped_at" in result:  # SIGTERM / SIGUSR1: the run saved last.pt; stop the whole grid, as a process would
        raise KeyboardInterrupt(f"{run} stopped by a signal at iteration {result['stopped_at']}")


def _thread_env(jobs: int) -> dict[str, str] | None:
    """Environment of one of ``jobs`` side-by-side processes: an equal share of the cores (``None``: inherit)."""
    if jobs <= 1:
        return None
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def execute(
    grid: Grid,
    launcher: str,
    log_dir: Path,
    extra: Sequence[str] = (),
    dry_run: bool = False,
    echo=print,
    jobs: int = 1,
) -> list[Run]:
    """Run (or with ``dry_run`` list) every unfinished run of ``grid``; returns the runs that did not finish (none
    for a dry run).

    ``jobs``: with the ``local`` launcher, how many runs of a stage train side by side.
    """
    if jobs < 1 or (jobs > 1 and launcher != "local"):
        raise ValueError(f"jobs={jobs}: use a positive number, and more than 1 only with the local launcher")
    runs = grid.runs
    n_done = sum(r.done(log_dir, extra) for r in runs)
    echo(
        f"# {len(runs)} runs in {len(grid.stages)} stage(s): {n_done} finished, {len(runs) - n_done} to run "
        f"(launcher: {launcher}, log_dir: {log_dir})"
    )
    if dry_run:
        list_grid(grid, launcher, log_dir, extra, echo)
        return []
    t_start = time.perf_counter()
    start = starter(launcher, jobs, log_dir, extra, echo)
    failed: list[Run] = []
    for stage in grid.stages:
        failed += run_stage(stage, launcher, log_dir, extra, echo, jobs, start, failed)
    echo(f"# grid finished in {time.perf_counter() - t_start:.0f} s; {len(failed)} run(s) did not finish")
    for run in failed:
        echo(f"#   {run}")
    return failed


def list_grid(grid: Grid, launcher: str, log_dir: Path, extra: Sequence[str], echo=print) -> None:
    """Print every stage's commands, finished runs marked ``# done:``."""
    for i, stage in enumerate(grid.stages):
        teachers_first = ": KD teachers come first" if i == 0 and len(grid.stages) > 1 else ""
        echo(f"# stage {i + 1}/{len(grid.stages)}{teachers_first}")
        for status, _, cmd in plan(stage, launcher, log_dir, extra):
            echo(("# done: " if status == "done" else "") + show(cmd))


Start = Callable[[list[Run], list[str]], subprocess.Popen | None]
"""Starts one step (its runs, its command): its process if the step is left running, ``None`` once it is over."""


def starter(launcher: str, jobs: int, log_dir: Path, extra: Sequence[str], echo=print) -> Start:
    """How ``launcher`` starts a step: ``inprocess`` trains the step's run in this process; a submitit launcher's
    sweep exits once its jobs are queued and ``local`` with ``jobs > 1`` runs side by side with a share of the cores
    (both left running: the stage waits for them at its end); otherwise (``local``, another Hydra launcher) the step's
    command runs to its end before the next one starts."""
    if launcher == "inprocess":
        return lambda step_runs, cmd: _train_here(step_runs[0], log_dir, extra, echo)
    if launcher.startswith("submitit") or jobs > 1:
        return lambda step_runs, cmd: subprocess.Popen(cmd, cwd=ROOT, env=_thread_env(jobs))
    return lambda step_runs, cmd: _run_to_end(cmd)


def _train_here(run: Run, log_dir: Path, extra: Sequence[str], echo) -> None:
    try:
        run_inprocess(run, log_dir, extra)
    except Exception as err:  # one failed run must not stop the grid
        log.exception("run %s failed", run)
        echo(f"# failed {run}: {err}")


def _run_to_end(cmd: Sequence[str]) -> None:
    subprocess.run(cmd, cwd=ROOT)


def run_stage(
    stage: Sequence[Run],
    launcher: str,
    log_dir: Path,
    extra: Sequence[str],
    echo,
    jobs: int,
    start: Start,
    failed: Sequence[Run] = (),
) -> list[Run]:
    """Train a stage's unfinished runs; the runs of the stage that did not finish and are not in ``failed`` already.

    A run whose KD teacher did not finish is skipped (a sweep still runs for its other runs)."""
    skipped: list[Run] = []
    pending: list[tuple[list[Run], subprocess.Popen]] = []
    for status, step_runs, cmd in plan(stage, launcher, log_dir, extra):
        if status == "done":
            continue
        blocked = [r for r in step_runs if r.teacher is not None and not r.teacher.done(log_dir, extra)]
        if blocked:
            echo(f"# skip {', '.join(map(str, blocked))}: teacher run did not finish")
            skipped += blocked
            step_runs = [r for r in step_runs if r not in blocked]
            if not step_runs:
                continue
        while jobs > 1 and len(pending) >= jobs:  # wait for a free slot, so each line is printed as it starts
            pending = _wait_any(pending)
        echo(show(cmd))
        proc = start(step_runs, cmd)
        if proc is not None:
            pending.append((step_runs, proc))
    for _, proc in pending:
        proc.wait()
    known = [*failed, *skipped]
    return skipped + [r for r in stage if r not in known and not r.done(log_dir, extra)]


def _wait_any(pending: list[tuple[list[Run], subprocess.Popen]]) -> list[tuple[list[Run], subprocess.Popen]]:
    """Block until one of ``pending``'s processes exits; the ones still running."""
    while True:
        running = [(runs, proc) for runs, proc in pending if proc.poll() is None]
        if len(running) < len(pending):
            return running
        time.sleep(0.5)
