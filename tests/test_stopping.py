"""Nothing lost: errors between iterations save ``last.pt`` first, errors inside a step do not, a dead DataLoader
worker is reported in one line after saving, ``trainer.ckpt_minutes``; and the run directory's lock.

Stop signals sent to the whole process group are tested in ``test_trainer.py`` (they share its uninterrupted run).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segjml.data import DataError, SyntheticSegmentation
from segjml.engine import train
from segjml.engine import trainer as T
from segjml.engine.checkpoint import load_checkpoint
from segjml.engine.distributed import DistInfo
from segjml.engine.stopping import RunLock, RunLockedError
from segjml.losses import SegmentationCriterion
from tests.distributed import run_on_ranks
from tests.helpers import ROOT, compose_config

FAST = ["debug=fast", "trainer.max_iters=6", "trainer.log_interval=1"]


class BreaksAfter(SyntheticSegmentation):
    """The synthetic training set, but its ``break_after``-th sample (in this process) is a corrupt file."""

    loaded = 0

    def __init__(self, break_after: int, **kwargs):
        super().__init__(**kwargs)
        self.break_after = break_after
        BreaksAfter.loaded = 0

    def __getitem__(self, index):
        BreaksAfter.loaded += 1
        if BreaksAfter.loaded > self.break_after:
            raise DataError(f"image sample_{index}.png is truncated; replace the file")
        return super().__getitem__(index)


def test_a_data_error_between_iterations_saves_last_first_and_says_so(tmp_path):
    # batch 2, no workers: samples 9 and 10 make iteration 5's batch, so the error comes after iteration 4
    cfg = compose_config(
        [*FAST, "dataset.train._target_=tests.test_stopping.BreaksAfter", "+dataset.train.break_after=9"]
    )
    cfg.paths.output_dir = str(tmp_path)
    expected = r"image sample_\d+\.png is truncated; replace the file \(stopped at iteration 4: saved "
    with pytest.raises(DataError, match=rf"^{expected}checkpoints/last.pt; rerun the same command to resume\)$"):
        train(cfg)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 4
    assert not (tmp_path / "run.lock").exists()


class FailsAtCall(SegmentationCriterion):
    """The demo loss; at its ``fail_call``-th call it copies ``last.pt`` aside (the state after the previous
    iteration) and then returns NaN (``nan=True``) or raises a ValueError."""

    def __init__(self, fail_call: int, nan: bool, keep: str, **kwargs):
        super().__init__(**kwargs)
        self.fail_call, self.nan, self.keep, self.calls = fail_call, nan, keep, 0

    def forward(self, outputs, target, teacher_logits=None):
        terms = super().forward(outputs, target, teacher_logits)
        self.calls += 1
        if self.calls == self.fail_call:
            last = Path(self.keep).parent / "checkpoints" / "last.pt"
            Path(self.keep).write_bytes(last.read_bytes())
            if not self.nan:
                raise ValueError("label 7 is outside the 6 classes")
            terms["total"] = terms["total"] * float("nan")
        return terms


def failing_config(tmp_path, nan: bool):
    cfg = compose_config(
        [
            *FAST,
            "trainer.ckpt_interval=2",
            "loss._target_=tests.test_stopping.FailsAtCall",
            "+loss.fail_call=3",
            f"+loss.nan={str(nan).lower()}",
            f"+loss.keep={tmp_path / 'after_2.pt'}",
        ]
    )
    cfg.paths.output_dir = str(tmp_path)
    return cfg


def test_non_finite_stop_saves_the_last_good_iteration_with_the_failed_forward_rolled_back(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss at iteration 3 .*saved checkpoints/last.pt at "):
        train(failing_config(tmp_path, nan=True))
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    before = load_checkpoint(tmp_path / "after_2.pt")  # written at iteration 2 by ckpt_interval
    assert saved["iteration"] == before["iteration"] == 2
    # the failed forward pass updated BatchNorm's running statistics and drew from the RNG: both are rolled back
    for key, value in before["model"].items():
        assert torch.equal(saved["model"][key], value), key
    assert torch.equal(saved["rng"][0]["torch"], before["rng"][0]["torch"])
    assert saved["optimizer"]["state"].keys() == before["optimizer"]["state"].keys()
    for index, value in before["optimizer"]["state"].items():
        assert all(torch.equal(saved["optimizer"]["state"][index][k], v) for k, v in value.items())


def test_an_error_inside_the_step_saves_nothing_and_says_so(tmp_path):
    with pytest.raises(ValueError) as caught:
        train(failing_config(tmp_path, nan=False))
    assert str(caught.value) == (
        "label 7 is outside the 6 classes (stopped inside iteration 3: not saved, that step's update is incomplete; "
        "checkpoints/last.pt holds iteration 2)"
    )
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 2


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_a_dataloader_worker_killed_by_sigkill_ends_in_one_line_after_saving(tmp_path):
    """The out-of-memory killer sends SIGKILL to a worker: the run saves at the next boundary and says what to do."""
    cmd = [
        sys.executable,
        "train.py",
        f"paths.log_dir={tmp_path}",
        "debug=fast",
        "trainer.max_iters=200",
        "trainer.num_workers=2",
        "trainer.log_interval=1",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        log = next(tmp_path.rglob("log.jsonl"), None)
        if log is not None and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: a data-loading worker died (DataLoader worker (pid {workers[0]}) is killed by ")
    assert "lower trainer.num_workers or trainer.batch_size" in line
    stopped = load_checkpoint(next(tmp_path.rglob("last.pt")))["iteration"]
    assert line.endswith(
        f"(stopped at iteration {stopped}: saved checkpoints/last.pt; rerun the same command to resume)"
    )
    assert len(err.strip().splitlines()) == 1, err


def test_ckpt_minutes_writes_last_when_the_time_has_passed(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(T, "save_checkpoint", lambda run, state, name: saved.append((name, state.iteration)))
    clock = iter(range(0, 10**6, 25))  # every reading of the clock is 25 s after the previous one
    monkeypatch.setattr(T.time, "monotonic", lambda: float(next(clock)))
    cfg = compose_config([*FAST, "trainer.ckpt_minutes=1"])
    cfg.paths.output_dir = str(tmp_path)
    train(cfg)
    # the clock is read when last.pt is written and at every boundary: due every third boundary (0, 25, 50, 75 s)
    assert [it for name, it in saved if name == "last"] == [2, 5, 6]
    saved.clear()
    cfg.trainer.ckpt_minutes = 0
    cfg.paths.output_dir = str(tmp_path / "off")
    train(cfg)
    assert [it for name, it in saved if name == "last"] == [6]


# --- the run lock ---------------------------------------------------------------------------------------------------
def write_lock(run_dir: Path, **fields) -> Path:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "slurm_job": None}
    record.update(fields)
    path = run_dir / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def test_a_lock_held_by_a_live_process_refuses_a_second_train_py_in_one_line(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run_dir = tmp_path / "run"
        write_lock(run_dir, pid=holder.pid)
        cmd = [sys.executable, "train.py", "debug=fast", f"hydra.run.dir={run_dir}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: run directory {run_dir} is in use by pid {holder.pid} on {socket.gethostname()} (since "
        + proc.stderr.split("(since ", 1)[1].split(")", 1)[0]
        + f"); wait for it to end, stop it, or use another run directory (delete {run_dir / 'run.lock'} if that "
        "process is gone)"
    ]
    assert not (run_dir / "checkpoints").exists()
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == holder.pid  # the holder's lock is left alone


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    "holder, reason",
    [
        (lambda: {"pid": _dead_pid()}, "has ended"),
        (lambda: {"started": 0.0}, "has ended"),  # a live pid that started after the lock: reused, not the holder
        (lambda: {"host": "elsewhere", "touched_ago": 3600}, "no sign of life for 60 min"),
        (lambda: {"host": "elsewhere", "slurm_job": "77", "env_job": "77"}, "an earlier attempt of SLURM job 77"),
    ],
    ids=["dead-pid", "reused-pid", "stale-other-host", "same-slurm-job"],
)
def test_a_lock_whose_holder_is_gone_is_taken_over_with_a_warning(tmp_path, monkeypatch, caplog, holder, reason):
    fields = holder()
    ago = fields.pop("touched_ago", 0)
    monkeypatch.setenv("SLURM_JOB_ID", fields.pop("env_job", "1"))
    path = write_lock(tmp_path, **fields)
    os.utime(path, (time.time() - ago, time.time() - ago))
    lock = RunLock(tmp_path, stale_minutes=10)
    lock.acquire()
    try:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert reason in caplog.text and "taking over" in caplog.text
    finally:
        lock.release()
    assert not path.exists()


def test_a_fresh_lock_on_another_host_is_respected_and_the_heartbeat_keeps_ours_fresh(tmp_path):
    write_lock(tmp_path / "a", host="elsewhere", pid=1234)
    with pytest.raises(RunLockedError, match="is in use by pid 1234 on elsewhere"):
        RunLock(tmp_path / "a", stale_minutes=10).acquire()
    lock = RunLock(tmp_path / "b", stale_minutes=0.002)  # touched every 0.03 s
    lock.acquire()
    try:
        os.utime(lock.path, (0, 0))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 5
    finally:
        lock.release()


def _lock_on_rank(rank, world):
    from omegaconf import OmegaConf

    run_dir = Path(os.environ["LOCK_TEST_DIR"])
    cfg = OmegaConf.create({"paths": {"output_dir": str(run_dir / "free")}, "trainer": {"lock_stale_minutes": 10}})
    lock = T.lock_run_dir(cfg, DistInfo(rank, world, rank), torch.device("cpu"))
    holder = json.loads((run_dir / "free" / "run.lock").read_text())["pid"]
    taken = lock is not None
    if lock is not None:
        torch.distributed.barrier()  # rank 1 has read the file
        lock.release()
    else:
        torch.distributed.barrier()
    cfg.paths.output_dir = str(run_dir / "held")
    try:
        T.lock_run_dir(cfg, DistInfo(rank, world, rank), torch.device("cpu"))
        refused = ""
    except RunLockedError as err:
        refused = str(err)
    return taken, holder == os.getpid(), refused


@pytest.mark.slow
def test_under_ddp_only_rank_0_takes_the_lock_and_every_rank_stops_if_it_cannot(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCK_TEST_DIR", str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(tmp_path / "held", pid=holder.pid)
        (rank0, rank1) = run_on_ranks(_lock_on_rank, world=2)
    finally:
        holder.kill()
    assert rank0[:2] == (True, True) and rank1[:2] == (False, False)
    assert f"is in use by pid {holder.pid}" in rank0[2]
    assert rank1[2] == "rank 0 could not lock the run directory (its message says why)"
