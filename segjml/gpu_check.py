"""``make gpu-check``: what to run the first time segjml meets a GPU, in under 8 minutes.

Without a CUDA GPU it prints one line and exits 0. With one it runs, each step in its own process with its own time
limit (and all of them within :data:`BUDGET_S`):

1. ``pytest -m cuda -q``: the tests marked ``cuda`` (``tests/test_cuda.py``: losses, metrics, one step of every
   model preset under bf16 and fp16, resume, NCCL / SyncBN), from the checkout;
2. ``python -m segjml.bench train --device cuda`` with short settings (the speed card: images/s, memory, MFU);
3. ``python -m segjml.bench losses --device cuda``;

then prints one summary table (test counts, the benchmarks' figures, GPU name, torch and CUDA versions) and exits
non-zero if a step failed or ran out of time.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 450  # 7.5 minutes for every step together
STEPS = [  # (name, command, its own time limit in seconds)
    ("tests (-m cuda)", [sys.executable, "-m", "pytest", "-m", "cuda", "-q"], 270),
    (
        "bench train",
        [sys.executable, "-m", "segjml.bench", "train", "--device", "cuda", "--iters", "10", "--warmup", "3"],
        120,
    ),
    ("bench losses", [sys.executable, "-m", "segjml.bench", "losses", "--device", "cuda", "--repeats", "3"], 60),
]


def no_gpu_line() -> str:
    return f"gpu-check: no CUDA GPU visible (torch {torch.__version__}); nothing to run"


def run_step(command: list[str], limit: float) -> tuple[int | None, str, float]:
    """Exit code (``None``: out of time), the output (also printed, when the step ends) and the seconds taken."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit
        )
        code, out = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        code, out = None, out + f"\n[out of time after {limit:.0f} s]"
    print(out, flush=True)
    return code, out, time.perf_counter() - t0


def figures(name: str, output: str) -> str:
    """What the summary shows of a step's output: pytest's counts, or the benchmark's table rows."""
    if name.startswith("tests"):  # pytest's last line: "5 passed, 2 skipped in 61.2s"
        summary = re.findall(r"^.*\d+ (?:passed|failed|skipped|errors?|deselected).* in [\d.]+s.*$", output, re.M)
        return summary[-1].strip(" =") if summary else "no pytest summary"
    if name == "bench train":
        rows = [line.split("|") for line in output.splitlines() if line.startswith("| ") and "---" not in line]
        return "; ".join(f"{r[1].strip()}/{r[2].strip()}: {r[3].strip()} img/s, MFU {r[-2].strip()}" for r in rows[1:])
    rows = re.findall(r"^(\S+)\s+(hard|bls|soft)\s+segjml JML-1\s+[\d.]+\s+([\d.]+)", output, re.M)
    return "; ".join(f"JML-1 {kind} {shape}: {ratio}x F.cross_entropy" for shape, kind, ratio in rows)


def main() -> int:
    if not torch.cuda.is_available():
        print(no_gpu_line())
        return 0
    deadline = time.monotonic() + BUDGET_S
    results = []
    for name, command, limit in STEPS:
        left = deadline - time.monotonic()
        if left < 10 or (name.startswith("tests") and not (ROOT / "tests").is_dir()):
            why = "budget spent" if left < 10 else f"no {ROOT / 'tests'}: run from a checkout"
            results.append((name, f"not run ({why})", 0.0, ""))
            continue
        print(f"== gpu-check: {name}: {' '.join(command[1:])}", flush=True)
        code, output, seconds = run_step(command, min(limit, left))
        status = "ok" if code == 0 else ("out of time" if code is None else f"failed ({code})")
        results.append((name, status, seconds, figures(name, output)))
    props = torch.cuda.get_device_properties(0)
    print(
        f"\n== gpu-check summary: {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, "
        f"{torch.cuda.device_count()} visible), torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}"
    )
    print("| step | status | seconds | figures |\n| --- | --- | --- | --- |")
    for name, status, seconds, shown in results:
        print(f"| {name} | {status} | {seconds:.0f} | {shown} |")
    return 0 if all(status == "ok" for _, status, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
