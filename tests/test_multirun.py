"""Hydra sweeps (``python train.py -m ...``) under hydra-submitit-launcher's ``submitit_local`` launcher: every job
lands in the run directory the docs name (docs/training.md, "Run names and run directories": the directory of the same
command without ``-m``), and a job stopped by USR2 is requeued and resumes from its ``checkpoints/last.pt``.

Every ``-m`` command of README.md and docs/*.md runs here, changed as follows so that it trains two tiny jobs offline:

- ``hydra/launcher=submitit_local`` replaces the command's launcher, and its ``hydra.launcher.*`` options (SLURM's
  partition, time limit, GPUs) are dropped;
- the sweep is cut to 2 jobs: the first list on the command line keeps its first two values, any other list its first
  value (``loss=ce,ce_jml,ce_jml_bls seed=0,1,2`` -> ``loss=ce,ce_jml seed=0``);
- ``debug=fast trainer.max_iters=2 pretrained=false`` are added (CPU, no logger, no workers, no progress bar, 8
  training and 4 validation images);
- a command whose data set is not the synthetic one (the paper presets such as ``experiment=voc_dl3r18_jml_bls``:
  PASCAL VOC is not here) trains on ``dataset=synthetic`` instead, keeping the preset's model, loss and run name;
- ``<...>`` placeholders are replaced as in tests/test_docs_commands.py (``experiment=<...>`` -> ``demo``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segjml.config import compose
from tests.helpers import ROOT
from tests.test_docs_commands import COMMANDS, train_args, words

TINY = ["debug=fast", "trainer.max_iters=2", "pretrained=false"]


def _documented_not_in_dirname() -> set[str]:
    """docs/training.md, "Run names and run directories": the keys of the table in "Resuming, and a config that
    changed" (every key in backticks of its first column), plus ``experiment`` and ``name``."""
    text = (ROOT / "docs" / "training.md").read_text()
    table = text.split("nor are they part of the run directory's name):", 1)[1].split("\n\n", 2)[1]
    keys = {k for row in table.splitlines()[2:] for k in re.findall(r"`([a-z_.]+)`", row.split(" | ")[0])}
    assert {"trainer.max_iters", "paths", "logger"} <= keys, keys  # the table was found
    return keys | {"experiment", "name"}


NOT_IN_DIRNAME = _documented_not_in_dirname()
# train.yaml's defaults: the groups a run is named after when no preset is chosen
DEFAULT_GROUPS = {"dataset": "synthetic", "model": "demo", "loss": "ce_jml"}


def documented_run_dir(log_dir: Path, overrides: list[str]) -> Path:
    """``<log_dir>/<name>/<overrides>`` as docs/training.md defines it, for one run's overrides as typed."""
    given = dict(o.split("=", 1) for o in overrides)
    groups = {**DEFAULT_GROUPS, **{k: v for k, v in given.items() if k in DEFAULT_GROUPS}}
    name = given.get("experiment") or f"{groups['dataset']}_{groups['model']}_{groups['loss']}"
    kept = [o for o in overrides if not _left_out(o.split("=", 1)[0])]
    return log_dir / name / ",".join(sorted(kept))


def _left_out(key: str) -> bool:
    """A documented key, or a key under one (``paths.log_dir`` under ``paths``)."""
    return any(key == k or key.startswith(k + ".") for k in NOT_IN_DIRNAME)


def sweep_commands() -> list[str]:
    """The documented ``train.py -m`` commands, each sweep once: the same one appears in several files, and the SLURM
    command of docs/reproduce.md is the sweep of docs/training.md once its launcher is replaced (it is kept)."""
    found = {}
    for _, command in sorted(COMMANDS, key=lambda c: "hydra/launcher=" not in c[1]):
        rest = train_args(words(command))
        if rest is not None and "-m" in rest:
            found.setdefault(
                tuple(a for a in rest if not a.startswith(("hydra/launcher=", "hydra.launcher."))), command
            )
    return sorted(found.values())


def tiny_sweep(command: str, log_dir: Path) -> tuple[list[str], list[list[str]]]:
    """The arguments that run ``command`` as two tiny ``submitit_local`` jobs, and each job's overrides as the same
    command without ``-m`` would be typed (the module docstring lists what is changed)."""
    fixed, lists = [], []
    for arg in train_args(words(command)):
        if arg.startswith("-") or arg.startswith(("hydra/launcher=", "hydra.launcher.")):
            continue
        key, value = arg.split("=", 1)
        if "," in value and not value.startswith(("'", '"', "[")) and not key.startswith("hydra"):
            lists.append((key, value.split(",")))
        else:
            fixed.append(arg)
    assert lists, f"{command!r} sweeps nothing"
    (key, values), others = lists[0], lists[1:]
    fixed += [f"{k}={v[0]}" for k, v in others] + TINY
    if compose(fixed).dataset.name != "synthetic":
        fixed.append("dataset=synthetic")
    fixed.append(f"paths.log_dir={log_dir}")
    jobs = [[*fixed, f"{key}={value}"] for value in values[:2]]
    return ["-m", "hydra/launcher=submitit_local", *fixed, f"{key}={','.join(values[:2])}"], jobs


def run_train(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def assert_finished(run_dir: Path) -> dict:
    found = sorted(run_dir.parent.parent.rglob("metrics.json"))
    assert (run_dir / "metrics.json").is_file(), f"no metrics.json in {run_dir}; found {found}"
    return json.loads((run_dir / "metrics.json").read_text())


def test_sweep_commands_were_found():
    commands = sweep_commands()
    assert len(commands) >= 3, commands
    assert any("hydra/launcher=submitit_slurm" in c for c in commands)


@pytest.mark.slow  # each launches two jobs; make test launches the demo sweep below
@pytest.mark.parametrize("command", sweep_commands(), ids=lambda c: re.sub(r"\s+#.*$", "", c))
def test_documented_sweep_runs_with_submitit_local(command, tmp_path):
    args, jobs = tiny_sweep(command, tmp_path)
    run_train(args)
    for job in jobs:
        assert 0 <= assert_finished(documented_run_dir(tmp_path, job))["miou"] <= 100
    assert len(list(tmp_path.rglob("metrics.json"))) == 2
    assert (tmp_path / ".submitit").is_dir()  # submitit's own files stay beside the runs, out of their directories


def test_demo_sweep_with_submitit_local_writes_both_runs(tmp_path):
    """The command of issue 25, as typed (plus where the runs go and the settings left out of the run directory)."""
    run_train(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "experiment=demo",
            "trainer.max_iters=3",
            "seed=0,1",
            f"paths.log_dir={tmp_path}",
            "trainer.num_workers=0",
            "trainer.progress=false",
        ]
    )
    for seed in (0, 1):
        metrics = assert_finished(tmp_path / "demo" / f"seed={seed}")  # max_iters does not name the run
        assert 0 <= metrics["miou"] <= 100
    assert len(list(tmp_path.rglob("metrics.json"))) == 2


@pytest.mark.slow
def test_sweep_job_directory_spells_booleans_as_the_single_run_does(tmp_path):
    """Hydra's sweeper hands a job ``pretrained=False``; its directory is the one of ``pretrained=false`` typed
    without ``-m`` (the basic launcher: the sweep directories do not depend on the launcher)."""
    run_train(["-m", "loss=ce,ce_jml", *TINY, f"paths.log_dir={tmp_path}"])
    for loss in ("ce", "ce_jml"):
        assert_finished(documented_run_dir(tmp_path, [*TINY, f"loss={loss}"]))


def _task_pid(controller: int) -> int | None:
    """The pid of the task a submitit_local controller (the job id) started, if it has started one."""
    try:
        children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job's process in /proc")
def test_usr2_requeues_the_submitit_local_job_which_resumes_from_last_pt(tmp_path):
    """docs/reproduce.md, SLURM: the trainer catches USR2 at the next iteration, writes checkpoints/last.pt, then
    hands the signal to submitit's handler, which requeues the job; the new attempt resumes from last.pt. The signal
    reaches the DataLoader workers too, as SLURM sends it to every process of the job step.

    submitit's local executor requeues as SLURM does: its handler exits the task with code 144 and the controller
    process (whose pid is the job id, ``.submitit/<id>``) starts the task again, which loads the checkpointed
    submission (the same overrides, so the same run directory)."""
    overrides = [
        "experiment=demo",
        "trainer.max_iters=400",
        "trainer.log_interval=1",
        "trainer.limit_val_samples=4",
        "trainer.num_workers=2",
        "trainer.progress=false",
        f"paths.log_dir={tmp_path}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen(
        [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", *overrides, "seed=0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    run_dir = documented_run_dir(tmp_path, [*overrides, "seed=0"])
    try:
        deadline, task = time.time() + 240, None
        while time.time() < deadline and task is None:
            assert sweep.poll() is None, sweep.stdout.read()[-3000:]
            log = run_dir / "log.jsonl"
            jobs = [p for p in (tmp_path / ".submitit").glob("[0-9]*") if p.is_dir()]
            if jobs and log.is_file() and len(log.read_text().splitlines()) >= 3:  # a few iterations done
                task = _task_pid(int(jobs[0].name))
            time.sleep(0.2)
        assert task is not None, "the job showed no progress"
        # SLURM signals every process of the job step: the task and its DataLoader workers
        workers = Path(f"/proc/{task}/task/{task}/children").read_text().split()
        for pid in [task, *map(int, workers)]:
            os.kill(pid, signal.SIGUSR2)
        out, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, out[-3000:]
    job_logs = "".join(p.read_text() for p in (tmp_path / ".submitit").rglob("*_log.*"))
    train_log = (run_dir / "train.log").read_text()
    assert "Requeued job" in job_logs, job_logs[-3000:]
    saved = re.search(r"saved checkpoints/last\.pt at iteration (\d+)", train_log)
    resumed = re.search(r"resumed from \S+/checkpoints/last\.pt at iteration (\d+)", train_log)
    assert saved and resumed, train_log[-3000:]
    assert 0 < int(saved[1]) == int(resumed[1]) < 400
    assert 0 <= assert_finished(run_dir)["miou"] <= 100
