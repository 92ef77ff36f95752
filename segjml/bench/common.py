"""Timing and peak-memory helpers shared by the benchmarks."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_median_times(
    fn: Callable[[], object], baseline: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1
) -> tuple[float, float]:
    """Median wall times of ``fn()`` and ``baseline()`` called alternately, ``repeats`` times each after ``warmup``
    calls of each: their ratio compares the two under the same machine state, which drifts by 10-30% over minutes on
    a shared CPU machine."""
    for _ in range(warmup):
        fn()
        baseline()
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats):
        for which, f in enumerate((fn, baseline)):
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[which].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    # Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated by ``fn()`` at its peak beyond what was live before it.

    CUDA: ``max_memory_allocated``. CPU: the peak resident set size (VmHWM, reset just before the call), which sees
    every large tensor since the allocator returns them to the system when freed.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _reset_peak_rss()
    before = current_rss()
    fn()
    return max(_peak_rss() - before, 0)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:8.0f} MiB"


def shape_parser(prog: str, doc: str | None, shapes: list[str], repeats: int) -> argparse.ArgumentParser:
    """The options every tensor benchmark takes: ``--shapes BxCxHxW ...``, ``--repeats``, ``--device``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=shapes)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x"))


def block_labels(b: int, c: int, h: int, w: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``(B, H, W)`` labels made of 16x16 blocks of random classes: realistic boundaries, every class likely."""
    blocks = torch.randint(0, c, (b, 1, max(h // 16, 1), max(w // 16, 1)), generator=generator, device=device)
    return torch.nn.functional.interpolate(blocks.float(), size=(h, w), mode="nearest")[:, 0].long()


def start(args: argparse.Namespace) -> torch.device:
    """The benchmark's device, after printing what the figures depend on (device, threads, repeats, torch)."""
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} repeats={args.repeats} torch={torch.__version__}")
    return device
