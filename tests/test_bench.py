"""``python -m segjml.bench data`` and ``train`` on tiny CPU settings, and ``make gpu-check`` on a machine without a
GPU (what it would run on one is in tests/test_cuda.py, marker ``cuda``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from segjml import gpu_check
from tests.helpers import ROOT

TINY = ["--device", "cpu", "--size", "32", "--batch", "2", "--iters", "2", "--warmup", "1", "--modes", "eager"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env or os.environ.copy()
    )


def test_bench_data_prints_each_pipeline_against_decoding_alone():
    proc = run("-m", "segjml.bench", "data", "--images", "1", "--samples", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        if m := re.fullmatch(r"(.+?)\s+([\d.]+)\s+([\d.]+)", line):
            rows[m[1]] = (float(m[2]), float(m[3]))
    assert list(rows) == [
        "decode PNG pair only (baseline)",
        "train sample, raw labelIds",
        "train sample, prepared labelTrainIds",
        "whole-image pipeline, prepared labelTrainIds",
    ]
    base = rows["decode PNG pair only (baseline)"][0]
    for rate, ratio in rows.values():
        assert rate > 0 and ratio == pytest.approx(rate / base, abs=0.01)


@pytest.mark.slow
def test_bench_train_prints_a_row_per_loss_with_throughput_ratio_and_phases():
    proc = run("-m", "segjml.bench", "train", *TINY, "--losses", "ce,ce_jml_bls")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines() if line.startswith("|")
    ]
    header, body = rows[0], rows[2:]
    assert header[:4] == ["mode", "loss", "images/s", "x bare"] and header[-1] == "MFU"
    assert [(r[0], r[1]) for r in body] == [("eager", "ce"), ("eager", "ce_jml_bls")]
    for row in body:
        values = dict(zip(header, row))
        assert float(values["images/s"]) > 0 and float(values["x bare"]) > 0
        shares = [float(values[f"{p} %"]) for p in ("data", "forward", "loss", "backward", "optimizer")]
        assert abs(sum(shares) - 100) <= 3  # rounded to whole percents
        assert float(values["GFLOP/img"]) > 0 and values["MFU"] == "-"  # no ceiling without a GPU
    assert "peak RSS growth" in proc.stdout  # the CPU's memory column says what it is
    # what gpu-check's summary shows of this table
    assert re.fullmatch(
        r"eager/ce: [\d.]+ img/s, MFU -; eager/ce_jml_bls: [\d.]+ img/s, MFU -",
        gpu_check.figures("bench train", proc.stdout),
    )


def test_gpu_check_without_a_gpu_prints_one_line_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # also on a GPU machine: the path without one
    proc = run("-m", "segjml.gpu_check", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.fullmatch(r"gpu-check: no CUDA GPU visible \(torch \S+\); nothing to run\n", proc.stdout)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^gpu-check: .*## .+\n\t\$\(PY\) -m segjml.gpu_check$", makefile, re.M)


@pytest.mark.slow
def test_cuda_tests_are_collected_only_under_their_marker():
    marked = run("-m", "pytest", "--collect-only", "-q", "-m", "cuda", "tests/test_cuda.py")
    assert marked.returncode == 0, marked.stdout[-3000:]
    assert "test_loss_and_gradient_on_cuda_match_float64_on_the_cpu[ce-fp32]" in marked.stdout
    assert "test_one_training_step_of_every_model_preset[dl3_r18-bf16]" in marked.stdout
    default = run("-m", "pytest", "--collect-only", "-q", "tests/test_cuda.py")  # `make test`, and `-m slow` alike
    assert re.search(r"no tests collected \(\d+ deselected\)", default.stdout), default.stdout[-2000:]


def test_gpu_check_summary_reads_pytest_and_the_loss_benchmark():
    pytest_out = "....s\n==== warnings ====\n5 passed, 1 skipped, 2 warnings in 61.20s (0:01:01)\n"
    assert gpu_check.figures("tests (-m cuda)", pytest_out) == "5 passed, 1 skipped, 2 warnings in 61.20s (0:01:01)"
    losses_out = (
        "shape            target loss                time (s)  ratio   peak extra  ratio\n"
        "8x21x512x512     hard   segjml JML-1           0.223   0.85      336 MiB   0.66\n"
        "8x21x512x512     bls    segjml JML-1           0.321   1.06      336 MiB   0.67\n"
    )
    assert gpu_check.figures("bench losses", losses_out) == (
        "JML-1 hard 8x21x512x512: 0.85x F.cross_entropy; JML-1 bls 8x21x512x512: 1.06x F.cross_entropy"
    )
