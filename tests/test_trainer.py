"""Trainer robustness: exact resume after kill -9, SIGTERM, bad checkpoints, non-finite losses, DDP, sync_stats."""

import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from segjml.engine import train
from segjml.engine.checkpoint import CheckpointError, load_checkpoint
from segjml.losses import JaccardMetricLoss, SegmentationCriterion
from tests.distributed import run_on_ranks
from tests.helpers import ROOT, compose_config, torchrun_train

RUN = [
    "debug=fast",
    "trainer.max_iters=12",
    "trainer.ckpt_interval=1",
    "trainer.num_workers=1",
    "trainer.limit_train_samples=16",
    "dataset.scale_range=[0.5,2.0]",
    "trainer.progress=false",
]


def command(log_dir, *extra):
    return [sys.executable, "train.py", f"paths.log_dir={log_dir}", *RUN, *extra]


def run_dir_of(log_dir):
    return next(log_dir.rglob("checkpoints")).parent


def wait_for_iteration(proc, log_dir, at_least, timeout=120):
    """Poll the run's last.pt until it holds ``at_least`` iterations."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        path = next(log_dir.rglob("last.pt"), None)
        if path is not None:
            try:
                if load_checkpoint(path)["iteration"] >= at_least:
                    return
            except CheckpointError:
                pass
        time.sleep(0.05)
    raise TimeoutError


def final_weights(log_dir):
    return load_checkpoint(run_dir_of(log_dir) / "checkpoints" / "last.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run."""
    log_dir = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(command(log_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return final_weights(log_dir)


def assert_same_weights(a, b):
    assert a["iteration"] == b["iteration"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_kill_9_then_rerun_gives_bitwise_identical_weights(tmp_path, reference):
    at = random.Random(9).randint(2, 9)  # an arbitrary iteration, the same in every run of the suite
    proc = subprocess.Popen(command(tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_iteration(proc, tmp_path, at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(command(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout + rerun.stderr
    assert_same_weights(final_weights(tmp_path), reference)


def test_usr2_saves_last_then_hands_the_signal_to_the_previous_handler(tmp_path):
    """submitit requeues a SLURM job from its USR2 handler: that handler must run after last.pt is written."""
    import threading

    seen = []
    cfg = compose_config(
        [*RUN, "trainer.max_iters=100000", "trainer.ckpt_interval=100000", "trainer.log_interval=1"], tmp_path
    )
    last = tmp_path / "checkpoints" / "last.pt"
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append((signum, last.is_file())))

    def signal_when_ready():  # the first log line is written inside the loop, after the handlers are installed
        log = tmp_path / "log.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (log.is_file() and log.read_text().strip()):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGUSR2)

    watcher = threading.Thread(target=signal_when_ready, daemon=True)
    try:
        watcher.start()
        result = train(cfg)
    finally:
        watcher.join(timeout=130)
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2, True)]
    assert result["stopped_at"] == load_checkpoint(last)["iteration"] > 0


def wait_for_logged_iteration(proc, log_dir, at_least, timeout=120):
    """Poll the run's log.jsonl (``trainer.log_interval=1``) until it holds ``at_least`` iterations."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        path = next(log_dir.rglob("log.jsonl"), None)
        if path is not None and len(path.read_text().splitlines()) >= at_least:
            return
        time.sleep(0.05)
    raise TimeoutError


STOPS = {"SIGTERM": 0, "SIGINT": 130, "SIGUSR1": 0, "SIGUSR2": 0}  # the exit code after each signal


@pytest.mark.parametrize(
    "name", ["SIGINT", *(pytest.param(n, marks=pytest.mark.slow) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2"))]
)
def test_a_stop_signal_to_the_process_group_saves_last_and_the_rerun_ends_bitwise_equal(tmp_path, reference, name):
    """A cluster (scancel, preemption, timeout, docker stop) and Ctrl-C signal every process of the job, DataLoader
    workers included: the workers must not die of it, and the main process saves at the next iteration boundary."""
    stop = ["trainer.num_workers=2", "trainer.ckpt_interval=1000", "trainer.log_interval=1"]
    proc = subprocess.Popen(
        command(tmp_path, *stop),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_logged_iteration(proc, tmp_path, 3)
    os.killpg(proc.pid, getattr(signal, name))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == STOPS[name], err[-3000:]
    stopped = final_weights(tmp_path)["iteration"]
    assert 3 <= stopped < 12
    if name == "SIGINT":
        expected = f"interrupted at iteration {stopped}: saved checkpoints/last.pt; rerun the same command to resume"
    else:
        expected = f"{name} received: saved checkpoints/last.pt at iteration {stopped}; rerun the same command"
    assert expected in out + err and "Traceback" not in out + err
    assert not next(tmp_path.rglob("run.lock"), None)  # released
    rerun = subprocess.run(command(tmp_path, *stop), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and f"at iteration {stopped}" in rerun.stdout + rerun.stderr
    assert_same_weights(final_weights(tmp_path), reference)


@pytest.mark.slow
def test_sigterm_to_the_process_group_of_a_torchrun_run_stops_every_rank_at_one_iteration_and_resumes_bitwise(tmp_path):
    """torchrun, its two ranks and their DataLoader workers all get the signal (as from scancel or a time limit)."""

    def cmd(log_dir):
        args = [*RUN[1:], "trainer.num_workers=2", "trainer.ckpt_interval=1000", "trainer.log_interval=1"]
        return torchrun_train(2, f"paths.log_dir={log_dir}", "debug=fast", *args)

    reference = subprocess.run(cmd(tmp_path / "ref"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    proc = subprocess.Popen(
        cmd(tmp_path / "run"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_logged_iteration(proc, tmp_path / "run", 3, timeout=300)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    stopped = final_weights(tmp_path / "run")["iteration"]
    assert 3 <= stopped < 12
    saved = re.findall(r"SIGTERM received: saved checkpoints/last.pt at iteration (\d+)", out + err)
    assert saved and set(saved) == {str(stopped)}  # every rank that reports, the same iteration
    rerun = subprocess.run(cmd(tmp_path / "run"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and f"at iteration {stopped}" in rerun.stdout + rerun.stderr
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(tmp_path / "ref"))


def test_truncated_checkpoint_is_never_resumed_and_explicit_path_fails_in_one_line(tmp_path, reference):
    log_dir = tmp_path / "logs"
    proc = subprocess.run(command(log_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    last = run_dir_of(log_dir) / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a half-written file
    rerun = subprocess.run(command(log_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "resumed from" not in rerun.stdout + rerun.stderr  # started afresh
    assert_same_weights(final_weights(log_dir), reference)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[:1000])
    explicit = subprocess.run(
        command(tmp_path / "other", f"trainer.resume={broken}"), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert explicit.returncode == 2
    assert explicit.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {broken} cannot be read")


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    payload = _RunsCode()
    payload.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": payload}, f)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(path)
    assert not payload.marker.exists()


class NanAtCall(SegmentationCriterion):
    """The demo loss, but NaN at its ``nan_call``-th call."""

    def __init__(self, nan_call: int, **kwargs):
        super().__init__(**kwargs)
        self.nan_call, self.calls = nan_call, 0

    def forward(self, outputs, target, teacher_logits=None):
        terms = super().forward(outputs, target, teacher_logits)
        self.calls += 1
        if self.calls == self.nan_call:
            terms["total"] = terms["total"] * float("nan")
        return terms


def nan_config(tmp_path, *extra):
    return compose_config(
        [
            "debug=fast",
            "trainer.max_iters=6",
            "trainer.ckpt_interval=2",
            "loss=ce_jml",
            "+loss.nan_call=3",
            "loss._target_=tests.test_trainer.NanAtCall",
            *extra,
        ],
        tmp_path,
    )


def test_nan_loss_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss at iteration 3 \(ce=.*total=nan"):
        train(nan_config(tmp_path))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_loss_can_skip_the_batch(tmp_path):
    result = train(nan_config(tmp_path, "trainer.skip_nonfinite=true", "trainer.log_interval=1"))
    assert 0 <= result["miou"] <= 100
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert max(line.get("nonfinite_skipped", 0) for line in lines) == 1
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# --- distributed ----------------------------------------------------------------------------------------------------
def _sync_stats_on_rank(rank, world):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (4, 8, 8), generator=g)
    mine = logits[rank * 2 : (rank + 1) * 2].clone().requires_grad_(True)
    loss = JaccardMetricLoss(sync_stats=True)(mine, labels[rank * 2 : (rank + 1) * 2])
    loss.backward()
    return loss.item(), mine.grad


def test_sync_stats_on_two_processes_equals_one_process_on_the_whole_batch():
    results = run_on_ranks(_sync_stats_on_rank, world=2)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 8, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.randint(0, 5, (4, 8, 8), generator=g)
    loss = JaccardMetricLoss()(logits, labels)
    loss.backward()
    for rank, (value, grad) in enumerate(results):
        assert value == pytest.approx(loss.item(), abs=1e-12)
        # Every rank's loss is the global loss, and the all-reduce's backward sums both ranks' upstream gradients:
        # each rank holds twice the single-process gradient of its logits, which DDP's mean over 2 ranks turns into
        # exactly the single-process parameter gradient.
        assert torch.allclose(grad, 2 * logits.grad[rank * 2 : (rank + 1) * 2], atol=1e-12)


@pytest.mark.slow
def test_torchrun_two_processes_train_and_evaluation_matches_the_checkpoint(tmp_path):
    cmd = torchrun_train(
        2,
        f"paths.log_dir={tmp_path}",
        "debug=fast",
        "trainer.max_iters=4",
        "trainer.limit_val_samples=7",
        "trainer.val_batch_size=1",
    )
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_dir_of(tmp_path)
    ddp_metrics = json.loads((run / "metrics.json").read_text())
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from segjml.data import build_dataset, build_loader
    from segjml.data.transforms import BatchToDevice
    from segjml.engine import evaluate
    from segjml.metrics import SegmentationMetrics

    cfg = OmegaConf.create(state["config"])
    model = instantiate(cfg.model)
    model.load_state_dict(state["model"])
    loader = build_loader(build_dataset(cfg.dataset, "val", 7), 1, False, 0)  # per-image forwards, as under DDP
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun runs each process with OMP_NUM_THREADS=1: the same float reductions
    try:
        to_device = BatchToDevice(torch.device("cpu"), cfg.dataset.mean, cfg.dataset.std)
        single = evaluate(model, loader, SegmentationMetrics(6), to_device, progress=False)
    finally:
        torch.set_num_threads(threads)
    for key in ("acc", "miou", "miou_i", "miou_c"):  # argmax-based: identical
        assert single[key] == pytest.approx(ddp_metrics[key], abs=1e-9), key
    # Calibration sums float32 probabilities; two processes' kernels may differ in the last bit, which can move a
    # pixel whose confidence sits on a bin edge to the next bin: at most one pixel's share, 100 / N percent.
    n_pixels = 7 * 64 * 64
    for key in ("ece", "sce"):
        assert single[key] == pytest.approx(ddp_metrics[key], abs=100 / n_pixels), key


def test_log_timings_are_averaged_over_the_iterations_since_the_last_log(monkeypatch):
    """The last log line of a run whose length is not a multiple of log_interval covers fewer iterations."""
    from segjml.engine import trainer as T

    # the loop's sequence: start; per iteration lap("data"), lap("step"), maybe read() at a log point, lap()
    clock = iter([0.0, 1.0, 3.0, 3.0, 3.0, 4.0, 9.0, 10.0])
    monkeypatch.setattr(T.time, "perf_counter", lambda: next(clock))
    meter = T.Meter(0)
    meter.lap("data"), meter.lap("step")
    assert meter.read(3) == pytest.approx({"data_time": 1 / 3, "step_time": 2 / 3, "iter_time": 3 / 3})
    meter.lap()
    meter.lap("data"), meter.lap("step")
    # the final log at iteration 5 covers 2 iterations, not log_interval = 3
    assert meter.read(5) == pytest.approx({"data_time": 1 / 2, "step_time": 5 / 2, "iter_time": 7 / 2})
