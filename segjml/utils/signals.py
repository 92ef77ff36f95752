"""The signals that ask a run to stop, and keeping them away from DataLoader workers.

SLURM (``scancel``, preemption, the time limit, submitit's ``--signal=USR2@...``), ``timeout``, ``docker stop``,
Kubernetes and Ctrl-C send their signal to every process of the job, DataLoader workers included. A worker killed by
it would end the run with "DataLoader worker (pid N) is killed by signal" before the main process could save; so
workers ignore these signals, and the main process saves, then shuts them down.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread while DataLoader workers are forked: a child starts with its parent
    thread's signal mask, so a signal sent to the process group cannot kill a worker before it ignores them
    (:func:`ignore_stop_signals`). A signal that arrives meanwhile is delivered to this process when unblocked."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_stop_signals() -> None:
    """In a DataLoader worker: ignore the stop signals that a cluster (``scancel``, preemption, ``timeout``, ``docker
    stop``) or Ctrl-C sends to every process of the job, so that only the main process reacts (it saves, then shuts
    the workers down)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
