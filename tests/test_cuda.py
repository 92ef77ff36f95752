"""On a CUDA GPU (marker ``cuda``: run by ``make gpu-check``, skipped without a GPU, left out of the default run):
every loss preset and its gradient against float64 on the CPU, the metrics against the CPU, one training step of every
model preset under bf16 and fp16, an exact resume, and NCCL with SyncBatchNorm.

Tolerances. float32 on the GPU against float64 on the CPU, at the same logits: 1e-5 relative for the loss, and for the
gradient 1e-5 relative plus 1e-5 of its largest entry (Lovasz: 1e-4 of it; its gradient is a cumulative sum over the
sorted pixels). Under autocast the logits are the model's low-precision output, as in training; the loss, computed
inside the autocast region on their float32 copy, must still be float32-exact (1e-5), and the gradient that reaches the
bf16 / fp16 logits carries their rounding: 1e-2 (bf16, 8 mantissa bits) and 2e-3 (fp16, 11 bits, with the loss scaled
by 2^16 as ``GradScaler`` does) relative, plus 1e-3 of the largest entry.
"""

from __future__ import annotations

import os
import subprocess
import time
from queue import Empty

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from segjml.engine import distributed as D
from segjml.engine import train
from segjml.engine import trainer as T
from segjml.engine.checkpoint import load_checkpoint
from segjml.metrics import SegmentationMetrics
from segjml.utils import build
from tests.distributed import _free_port
from tests.helpers import ROOT, compose_config, group_options, torchrun_train

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
]
CUDA = torch.device("cuda", 0)
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
GRAD_RTOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}
GRAD_ATOL = {"fp32": 1e-5, "bf16": 1e-3, "fp16": 1e-3}  # times the largest gradient entry
CALIBRATION = {"ece", "bece", "sce", "bsce"}


@pytest.fixture(autouse=True)
def backend_flags():
    """The process-wide GPU settings a test (or a training run inside it) changes are restored after it."""
    before = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
    )
    yield
    torch.set_float32_matmul_precision(before[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:4]
    torch.use_deterministic_algorithms(before[4])


def block_target(b: int, c: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Labels in 4x4 blocks (boundaries for BLS), the top rows ignored."""
    blocks = torch.randint(0, c, (b, 1, h // 4, w // 4), generator=g).double()
    target = F.interpolate(blocks, size=(h, w), mode="nearest")[:, 0].long()
    target[:, :3] = 255
    return target


# -- losses -----------------------------------------------------------------------------------------------------------


def loss_and_grads(criterion, outputs, target, teacher, device, precision=None):
    """Total loss and its gradient with respect to each output, computed on ``device``. ``precision`` (bf16 / fp16):
    the outputs are given in that dtype, as autocast's model output, and the loss runs inside the autocast region on
    their float32 copy (fp16: scaled by 2^16 for the backward pass, as ``GradScaler`` does)."""
    dtype = LOW.get(precision)
    leaves = {k: v.detach().to(device, dtype or v.dtype).requires_grad_(True) for k, v in outputs.items()}
    soft = {k: v.to(device) for k, v in teacher.items()} if criterion.needs_teacher else None
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        total = criterion.to(device)({k: v.float() for k, v in leaves.items()}, target.to(device), soft)["total"]
    scale = 2.0**16 if precision == "fp16" else 1.0
    (total * scale).backward()
    return total.detach().double().cpu(), {k: v.grad.double().cpu() / scale for k, v in leaves.items()}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("loss", group_options("loss"))
def test_loss_and_gradient_on_cuda_match_float64_on_the_cpu(loss, precision):
    cfg = compose_config(["dataset=synthetic", f"loss={loss}"])
    criterion = build(cfg.loss)
    c, g = cfg.dataset.num_classes, torch.Generator().manual_seed(0)
    logits = {k: torch.randn(2, c, 24, 24, generator=g) * 3 for k in ("out", "aux")}
    teacher = {k: torch.randn(2, c, 24, 24, generator=g) * 3 for k in ("out", "aux")}
    target = block_target(2, c, 24, 24, g)
    dtype = LOW.get(precision, torch.float32)
    at = {k: v.to(dtype) for k, v in logits.items()}  # the point both sides evaluate: the logits as the GPU holds them
    expected, expected_grads = loss_and_grads(
        criterion,
        {k: v.double() for k, v in at.items()},
        target,
        {k: v.double() for k, v in teacher.items()},
        torch.device("cpu"),
    )
    total, grads = loss_and_grads(criterion, at, target, teacher, CUDA, None if precision == "fp32" else precision)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0.0)
    atol = GRAD_ATOL[precision] * (10 if loss == "lovasz" and precision == "fp32" else 1)
    for key, grad in grads.items():
        largest = float(expected_grads[key].abs().max())
        torch.testing.assert_close(grad, expected_grads[key], rtol=GRAD_RTOL[precision], atol=atol * largest, msg=key)


# -- metrics ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tf32", [False, True], ids=["default", "trainer_tf32"])
def test_segmentation_metrics_on_cuda_equal_the_cpu(tf32):
    """Also under the trainer's GPU settings (TF32 matmuls on): the metrics sum probabilities that TF32 would round."""
    g = torch.Generator().manual_seed(0)
    c = 7
    batches = []
    for _ in range(3):
        probs = (torch.randn(2, c, 40, 48, generator=g) * 3).softmax(1)
        batches.append((probs, block_target(2, c, 40, 48, g)))
    results = []
    for device in (torch.device("cpu"), CUDA):
        D.set_backend_policy(device, cudnn_benchmark=True, tf32=tf32 and device.type == "cuda", deterministic=False)
        metrics = SegmentationMetrics(c).to(device)
        for probs, target in batches:
            metrics.update(probs.to(device), target.to(device))
        results.append(metrics.compute())
    cpu, gpu = results
    assert cpu.keys() == gpu.keys()
    for key, value in cpu.items():  # the same float32 probabilities: the same bins and predictions on both devices
        # calibration sums chunks of float32 probabilities (a batched product) before adding them in float64
        rel = 1e-6 if key.split("_")[0] in CALIBRATION else 1e-9
        assert gpu[key] == pytest.approx(value, rel=rel, abs=1e-9), key


# -- one training step per architecture --------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model", group_options("model"))
def test_one_training_step_of_every_model_preset(model, precision, tmp_path):
    cfg = compose_config(
        ["debug=fast", f"model={model}", "pretrained=false", "trainer.device=cuda", f"trainer.precision={precision}"],
        tmp_path,
    )
    info, device = D.init_distributed(cfg.trainer.device)
    D.set_backend_policy(device, cfg.trainer.cudnn_benchmark, cfg.trainer.tf32, cfg.trainer.deterministic)
    run = T.build_run(cfg, info, device)
    seen = set()  # the dtypes the convolutions and linear layers computed in: autocast must be on
    for module in run.model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    before = [p.detach().clone() for p in run.model.parameters()]
    state, data = T.TrainState(), T.batches(run.train_loader, 0)
    for _ in range(4):  # fp16: GradScaler skips the steps whose gradients overflow at its initial scale
        terms = T.train_step(run, state, [run.to_device(*next(data))])
        assert all(torch.isfinite(v) for v in terms.values()), terms
        if state.skipped["amp"] < state.iteration:
            break
    assert state.skipped["amp"] < state.iteration, "every fp16 step was skipped: the gradients overflow"
    assert LOW[precision] in seen, seen
    assert all(p.device == device for p in run.model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, run.model.parameters())), "no weight changed"
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


# -- resume -----------------------------------------------------------------------------------------------------------

# A constant learning rate (poly power 0, no warm-up at 4 iterations), so that a run of 2 iterations extended to 4
# follows the schedule of a run of 4 from the start.
RESUME = ["debug=fast", "trainer.device=cuda", "scheduler.power=0.0", "trainer.log_interval=1"]


def test_resume_on_cuda_continues_as_an_uninterrupted_run(tmp_path, caplog):
    train(compose_config([*RESUME, "trainer.max_iters=2"], tmp_path / "resumed"))
    with caplog.at_level("INFO"):
        train(compose_config([*RESUME, "trainer.max_iters=4"], tmp_path / "resumed"))
    assert "resumed from" in caplog.text and "at iteration 2" in caplog.text
    train(compose_config([*RESUME, "trainer.max_iters=4"], tmp_path / "straight"))
    resumed, straight = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("resumed", "straight"))
    assert resumed["iteration"] == straight["iteration"] == 4
    # atomic adds (bilinear upsampling, adaptive pooling) make CUDA's backward differ in the last bits between runs
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in straight["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][key], value, rtol=1e-5, atol=1e-6)


# -- NCCL, SyncBatchNorm ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_two_processes_nccl_with_syncbn(tmp_path):
    cmd = torchrun_train(2, f"paths.log_dir={tmp_path}", "debug=fast", "trainer.device=cuda", "trainer.sync_bn=true")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(next(tmp_path.rglob("last.pt")))
    assert state["iteration"] == 4 and len(state["rng"]) == 2


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="2 GPUs: the two-process test runs instead")
def test_torchrun_one_process_on_cuda_with_syncbn(tmp_path):
    """One process is not a process group (``WORLD_SIZE=1``: no DDP, no SyncBN); the NCCL test below covers those."""
    cmd = torchrun_train(1, f"paths.log_dir={tmp_path}", "debug=fast", "trainer.device=cuda", "trainer.sync_bn=true")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(next(tmp_path.rglob("last.pt")))["iteration"] == 4


def _ddp_syncbn_step(port: int, queue) -> None:
    """In a one-process NCCL group: one step of the demo model wrapped as the trainer wraps it under torchrun (timm's
    SyncBN conversion, DDP) against the same step of an unwrapped copy. With one process SyncBatchNorm runs BatchNorm's
    own kernel: this checks the conversion, DDP and NCCL on the GPU; the synchronisation needs 2 GPUs (test above)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    torch.backends.cudnn.allow_tf32 = False  # TF32 would round the two models' slightly different BN outputs apart
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build(compose_config(["debug=fast"]).model).cuda().train()
        plain = build(compose_config(["debug=fast"]).model).cuda().train()
        plain.load_state_dict(model.state_dict())
        synced = T.convert_sync_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(synced, device_ids=[0])
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).cuda()
        for m in (ddp, plain):
            torch.manual_seed(2)  # the heads' dropout draws the same masks
            out = m(x)
            (out["out"].square().mean() + out["aux"].square().mean()).backward()
        n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
        # NumPy arrays travel by value (a tensor's shared memory would be gone with this process)
        grads = [(a.grad.cpu().numpy(), b.grad.cpu().numpy()) for a, b in zip(synced.parameters(), plain.parameters())]
        buffers = [(a.cpu().numpy(), b.cpu().numpy()) for a, b in zip(synced.buffers(), plain.buffers())]
        queue.put((n_sync, grads, buffers))
    finally:
        dist.destroy_process_group()


def test_nccl_ddp_with_syncbn_equals_the_plain_step():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_ddp_syncbn_step, args=(_free_port(), queue))
    proc.start()
    deadline = time.monotonic() + 180
    while True:  # a process that died reports nothing: fail then, not after the whole timeout
        try:
            n_sync, grads, buffers = queue.get(timeout=2)
            break
        except Empty:
            assert proc.is_alive(), f"the NCCL process exited with code {proc.exitcode} (its error is above)"
            assert time.monotonic() < deadline, "the NCCL process gave no result in 180 s"
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert n_sync > 0
    for synced, plain in grads:
        torch.testing.assert_close(torch.from_numpy(synced), torch.from_numpy(plain), rtol=1e-4, atol=1e-6)
    for synced, plain in buffers:  # running statistics (SyncBN with one process: the batch's own)
        torch.testing.assert_close(torch.from_numpy(synced), torch.from_numpy(plain), rtol=1e-4, atol=1e-6)
