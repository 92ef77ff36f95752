"""How a run stops without losing work, and who may write its run directory.

- :class:`StopSignal` turns Ctrl-C (SIGINT), SIGTERM, SIGUSR1 and SIGUSR2 into a request that the loop honours at
  the next iteration boundary, after saving ``checkpoints/last.pt``. A second Ctrl-C aborts at once.
- :func:`deferred_worker_deaths` holds back PyTorch's "a DataLoader worker died" error while a step runs, so that it
  is raised between iterations, where the state is consistent and can be saved.
- :func:`annotate` adds what the loop did (saved or not) to an error's one-line message.
- :class:`RunLock` makes a run directory belong to one process group at a time (``<run dir>/run.lock``).

``docs/training.md`` ("Stopping, failures and the run lock") describes the behaviour; ``docs/errors.md`` lists the
messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from segjml.utils.signals import STOP_SIGNALS

log = logging.getLogger(__name__)


class StopSignal:
    """Records a stop signal so that the loop can save and exit at an iteration boundary.

    A handler that was installed before ours (submitit's USR2 handler requeues the SLURM job) is called after the
    checkpoint is written (:meth:`forward`). Ctrl-C is a stop request too; the second Ctrl-C raises
    ``KeyboardInterrupt`` at once, without saving.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    @property
    def interrupted(self) -> bool:
        """Ctrl-C: the process should end with code 130 (128 + SIGINT), as an interrupted shell command does."""
        return self.received == signal.SIGINT

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def forward(self) -> None:
        """Hand the received signal to the handler installed before ours, if that was a Python function (Ctrl-C is
        not handed on: the caller ends the process itself)."""
        handler = self.previous.get(self.received)
        if callable(handler) and not self.interrupted:
            handler(self.received, None)


@contextlib.contextmanager
def deferred_worker_deaths() -> Iterator[None]:
    """Hold back SIGCHLD's Python handler while a step runs, then run it.

    PyTorch's DataLoader installs a SIGCHLD handler that raises "DataLoader worker (pid N) is killed by signal" in the
    main thread wherever it happens to be, in the middle of a backward pass or an optimizer step included. Deferring
    it to the end of the step makes a worker's death an error between iterations, where the run can be saved.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    torch_handler = signal.signal(signal.SIGCHLD, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, torch_handler)
    if pending and callable(torch_handler):
        torch_handler(signal.SIGCHLD, None)


def annotate(err: BaseException, note: str) -> bool:
    """Append ``note`` to the message of ``err`` in place (its type and traceback are kept); ``False`` if its message
    is not a plain string argument (the caller logs the note instead)."""
    if err.args and isinstance(err.args[0], str):
        err.args = (f"{err.args[0].rstrip()} ({note})", *err.args[1:])
        return True
    return False


def worker_died(err: BaseException) -> bool:
    """PyTorch's error for a DataLoader worker that was killed or exited (out of memory, a signal, a crash)."""
    text = str(err)
    died = "killed by signal" in text or "exited unexpectedly" in text
    return isinstance(err, RuntimeError) and "DataLoader worker" in text and died


# ---------------------------------------------------------------------------------------------------- the run lock


class RunLockedError(RuntimeError):
    """Another live process trains in this run directory."""


def _process_start(pid: int) -> float | None:
    """Start time of process ``pid`` in seconds since the epoch (Linux ``/proc``), or ``None`` if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(float(line.split()[1]) for line in lines if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _alive(pid: int, started: float) -> bool:
    """Whether the process that wrote a lock at ``started`` still runs on this host (not a later process that reuses
    its pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    begun = _process_start(pid)
    return begun is None or begun <= started + 1.0


class RunLock:
    """``<run dir>/run.lock``: the run directory belongs to one process group at a time.

    The lock file is created with ``O_CREAT | O_EXCL`` (atomic on local file systems and on NFS v3 and later) and
    holds the holder's host, pid, start time and SLURM job id. While the run lasts, a thread touches it every
    ``stale_minutes / 4`` (at most every minute), so its modification time says the holder is alive. A lock is taken
    over with a warning when its holder is gone: on the same host, a pid that no longer runs; an attempt of the same
    SLURM job (a requeue); on another host, no touch for ``stale_minutes``. The lock is removed when the run ends.
    """

    def __init__(self, run_dir: Path, stale_minutes: float = 10.0) -> None:
        self.path = Path(run_dir) / "run.lock"
        self.stale_s = stale_minutes * 60.0
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            holder["touched"] = self.path.stat().st_mtime
            return holder
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": "?", "pid": -1, "started": 0.0, "touched": 0.0}  # unreadable: a write cut short

    def _gone(self, holder: dict) -> str | None:
        """Why ``holder`` no longer holds the directory, or ``None`` if it may still run."""
        if holder.get("pid", -1) < 0:
            return "an unreadable lock file"
        if holder.get("slurm_job") and holder["slurm_job"] == self.record["slurm_job"]:
            return f"an earlier attempt of SLURM job {holder['slurm_job']}"
        if holder.get("host") == self.record["host"]:
            return None if _alive(int(holder["pid"]), float(holder["started"])) else f"pid {holder['pid']} has ended"
        idle = time.time() - float(holder.get("touched", 0.0))
        return f"no sign of life for {idle / 60:.0f} min" if idle > self.stale_s else None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLockedError` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by us (or by another taker) leaves room for one more try
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue
                reason = self._gone(holder)
                if reason is None:
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0.0))))
                    raise RunLockedError(
                        f"run directory {self.path.parent} is in use by pid {holder['pid']} on {holder['host']} "
                        f"(since {since}); wait for it to end, stop it, or use another run directory "
                        f"(delete {self.path} if that process is gone)"
                    ) from None
                log.warning("taking over %s from pid %s on %s: %s", self.path, holder["pid"], holder["host"], reason)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
            self._thread.start()
            return
        raise RunLockedError(f"run directory {self.path.parent} is being taken by another process; retry")

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(60.0, self.stale_s / 4)):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            holder = self._holder()
            ours = (self.record["host"], self.record["pid"])
            if holder is not None and (holder.get("host"), holder.get("pid")) == ours:
                self.path.unlink(missing_ok=True)
