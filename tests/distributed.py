"""Run a function on several CPU processes joined in a gloo process group (for DDP tests)."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank, world)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world: int = 2, timeout: float = 120) -> list:
    """``[fn(0, world), ..., fn(world - 1, world)]``, each computed in its own process of one gloo group.

    ``fn`` must be a module-level function (it is pickled by reference for the spawned processes).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"rank process exited with code {p.exitcode}")
    return [results[r] for r in range(world)]
