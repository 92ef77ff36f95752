"""The GPU code paths a CPU can run: fp16 with a gradient scaler (skipped steps counted), bf16, channels_last,
torch.compile, DDP with accumulation and compile, and a two-node torchrun on one machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
import torch

from segjml.engine import distributed as D
from segjml.engine import train
from segjml.engine import trainer as T
from segjml.engine.checkpoint import load_checkpoint
from segjml.utils import build
from tests.helpers import ROOT, compose_config, torchrun_train

FAST = ["debug=fast", "trainer.max_iters=3"]


def config(tmp_path, *extra):
    cfg = compose_config([*FAST, *extra])
    cfg.paths.output_dir = str(tmp_path)
    return cfg


def built_run(tmp_path, *extra):
    dist, device = D.init_distributed("cpu")
    return T.build_run(config(tmp_path, *extra), dist, device)


def test_fp16_with_a_gradient_scaler_counts_and_undoes_the_steps_it_skips(tmp_path):
    run = built_run(tmp_path, "trainer.precision=fp16")
    assert run.scaler.is_enabled() and run.autocast_dtype == torch.float16
    state = T.TrainState()
    data = T.batches(run.train_loader, 0)
    weight = next(run.model.parameters())
    overflow = weight.register_hook(lambda grad: grad * float("inf"))  # one step's gradients overflow
    before = {k: v.clone() for k, v in run.model.state_dict().items() if v.is_floating_point() and "running" not in k}
    scale = run.scaler.get_scale()
    T.train_step(run, state, [run.to_device(*next(data))])
    overflow.remove()
    assert state.skipped["amp"] == 1 and run.scaler.get_scale() == scale / 2  # skipped, and the scale halved
    assert all(torch.equal(run.model.state_dict()[k], v) for k, v in before.items())  # no update
    T.train_step(run, state, [run.to_device(*next(data))])
    assert state.skipped["amp"] == 1 and state.iteration == 2
    assert any(not torch.equal(run.model.state_dict()[k], v) for k, v in before.items())


def test_a_bf16_run_trains_with_finite_weights(tmp_path):
    result = train(config(tmp_path, "trainer.precision=bf16"))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert 0 <= result["miou"] <= 100 and state["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("model", ["dl3_r18", "dl3_mb2"])
def test_channels_last_is_kept_by_every_layer_in_training_and_evaluation(model):
    """The ASPP image-pool branch broadcast a 1x1 map, which has no memory format: the concatenation and every layer
    after it fell back to NCHW."""
    cfg = compose_config([f"model={model}", "pretrained=false"])
    net = build(cfg.model).to(memory_format=torch.channels_last)
    lost = []
    for name, module in net.named_modules():
        module.register_forward_hook(
            lambda m, i, out, name=name: (
                lost.append(name)
                if isinstance(out, torch.Tensor)  # the encoder returns a list of feature maps, each hooked itself
                and out.dim() == 4
                and min(out.shape[1:]) > 1
                and not out.is_contiguous(memory_format=torch.channels_last)
                else None
            )
        )
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    net.train()(x.contiguous(memory_format=torch.channels_last))  # training: the loop converts its batches
    with torch.no_grad():
        net.eval()(x)  # evaluation: images as the loader gives them
    assert lost == []


def _metrics(log_dir):
    return json.loads(next(log_dir.rglob("metrics.json")).read_text())


@pytest.mark.slow
def test_a_compiled_training_step_matches_eager(tmp_path):
    """One step from the same weights on the same batch, dropout off (inductor draws its masks from its own
    generator, so with dropout on the two steps would differ by design)."""
    steps = {}
    for mode, extra in (("eager", []), ("compiled", ["trainer.compile=true"])):
        run = built_run(tmp_path / mode, *extra)
        for module in run.model.modules():
            if isinstance(module, torch.nn.Dropout2d):
                module.p = 0.0
        state, data = T.TrainState(), T.batches(run.train_loader, 0)
        terms = T.train_step(run, state, [run.to_device(*next(data))])
        steps[mode] = ({k: float(v) for k, v in terms.items()}, run.model.state_dict())
    (eager_terms, eager_weights), (compiled_terms, compiled_weights) = steps["eager"], steps["compiled"]
    # inductor fuses and reorders float32 reductions: the losses agree to float rounding; the first layers'
    # gradients sum many terms whose order it changes (seen: weights 1e-4 apart after the step), so 1e-3 for those
    assert compiled_terms == pytest.approx(eager_terms, rel=1e-4)
    for key, value in eager_weights.items():
        if value.is_floating_point():
            assert torch.allclose(compiled_weights[key], value, rtol=1e-3, atol=1e-3), key


DDP_STEPS = """
import sys

import torch

from segjml.engine import trainer as T
from tests.helpers import compose_config

out, *overrides = sys.argv[1:]
cfg = compose_config(overrides)
cfg.paths.output_dir = out
run = T.build_run(cfg)
for module in run.model.modules():
    if isinstance(module, torch.nn.Dropout2d):
        module.p = 0.0  # inductor draws its masks from its own generator: off, the two runs can be compared
state, data = T.TrainState(), T.batches(run.train_loader, 0)
micro, _ = T.next_batch(run, data, None)
T.train_step(run, state, micro)
if run.dist.is_main:
    torch.save(run.model.state_dict(), out + "/weights.pt")
"""


@pytest.mark.slow
def test_ddp_with_accumulation_and_compile_matches_ddp_eager(tmp_path):
    """Two gloo processes, two micro-batches per step (``no_sync`` on the first), the model compiled: one step
    (dropout off) gives the weights of the same step in eager mode.

    Two images per micro-batch: with one, BatchNorm normalises the 2x2 maps of the last stage over 4 values and the
    gradients become so ill-conditioned that float reordering alone moves them by 1e-2 after a step (seen).
    """
    script = tmp_path / "steps.py"
    script.write_text(DDP_STEPS)
    common = ["debug=fast", "trainer.batch_size=2", "trainer.accumulate_steps=2"]
    torchrun = torchrun_train(2)[:-1]  # torchrun --standalone --nproc_per_node=2, without train.py
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    weights = {}
    for mode, extra in (("eager", []), ("compiled", ["trainer.compile=true"])):
        out = tmp_path / mode
        out.mkdir()
        proc = subprocess.run(
            [*torchrun, str(script), str(out), *common, *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[mode] = torch.load(out / "weights.pt", weights_only=True)
    # the same tolerance as one compiled step in one process (inductor reorders the float32 gradient sums)
    for key, value in weights["eager"].items():
        if value.is_floating_point():
            assert torch.allclose(weights["compiled"][key], value, rtol=1e-3, atol=1e-3), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_torchrun_on_one_machine_equals_one_node_with_two_processes(tmp_path):
    """Two ``torchrun --nnodes=2 --node_rank=0/1`` processes meet at a localhost rendezvous (gloo)."""
    args = ["debug=fast", "trainer.max_iters=4", "trainer.limit_val_samples=7", "trainer.val_batch_size=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float reductions in every process
    single = subprocess.run(
        torchrun_train(2, f"paths.log_dir={tmp_path / 'one'}", *args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = torchrun_train(1)[0]
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [
                torchrun,
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "train.py",
                f"paths.log_dir={tmp_path / 'two'}",
                *args,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=900) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    for key in ("acc", "miou", "miou_i", "miou_c", "ece", "sce"):
        assert two[key] == one[key], key
