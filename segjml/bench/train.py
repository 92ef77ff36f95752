"""Training-step benchmark: one optimizer step of DL3-R18 at 512x512 per loss, through segjml's own ``train_step``,
against a bare PyTorch loop on the same model, batch and device.

``python -m segjml.bench train [--device cuda] [--batch 8] [--size 512] [--iters 20] [--warmup 5]
[--losses ce,ce_jml,ce_jml_bls,ce_jml_kd] [--modes eager,channels_last,compile] [--amp bf16|fp16|none]``

Each row builds ``model=dl3_r18`` (``pretrained=false``, VOC's 21 classes) and ``loss=<row>`` from the configs as
``train.py`` would, and times the trainer's :func:`~segjml.engine.trainer.train_step` (autocast forward, losses in
float32, finite-loss check, AMP scaler, optimizer and schedule) plus the host-to-device copy of a pinned batch. The
KD row distils from a DL3-R50 (``model=dl3_r50``, random weights) run under ``torch.no_grad`` and autocast, as the
trainer runs its teacher. The bare loop is ``model(x)``, the same criterion, ``backward``, a plain ``torch.optim.SGD``
step (and the teacher's forward for KD), in the same mode and precision.

Columns: images/s of the step (median over ``--iters`` steps, each alternating with a bare step: the ratio ``x bare``
sees one machine state); peak memory (CUDA: ``torch.cuda.max_memory_allocated`` over one step, weights and optimizer
state included, the trainer's ``mem_gb``; CPU: the growth of the process's peak resident set size over one step,
weights and optimizer state excluded); the share of the step's time spent in the host-to-device copy, the forward
passes (student and teacher), the loss, the backward pass (with the AMP unscale and the finite-loss check) and the
optimizer (and schedule), timed over ``--iters`` more steps with a synchronisation at each phase boundary (only
there: the images/s run has none inside a step); GFLOP per image of one forward + loss + backward
(``torch.utils.flop_counter.FlopCounterMode``, teacher included); on CUDA, MFU: achieved FLOP/s over the bf16
matmul ceiling measured at the start (an 8192^3 bf16 matmul).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from segjml.bench.common import block_labels, paired_median_times, peak_extra_memory, sync
from segjml.config import compose
from segjml.data.transforms import BatchToDevice
from segjml.engine import distributed as D
from segjml.engine.distillation import teacher_logits
from segjml.engine.optim import build_optimizer
from segjml.engine.trainer import Run, TrainState, plain_loss, train_step
from segjml.utils import build

LOSSES = ["ce", "ce_jml", "ce_jml_bls", "ce_jml_kd"]
MODES = ["eager", "channels_last", "compile"]
PRECISION = {"bf16": "bf16", "fp16": "fp16", "none": "fp32"}  # --amp -> trainer.precision
PHASES = ["data", "forward", "loss", "backward", "optimizer"]


class PhaseClock:
    """Wall time per phase of a step, with a synchronisation at every boundary (only while ``on``)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.on, self.totals, self.t = device, False, defaultdict(float), 0.0

    def start(self) -> None:
        if self.on:
            sync(self.device)
            self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.on:
            sync(self.device)
            now = time.perf_counter()
            self.totals[phase] += now - self.t
            self.t = now

    def shares(self) -> list[float]:
        total = sum(self.totals.values()) or 1.0
        return [100 * self.totals[p] / total for p in PHASES]


def matmul_ceiling(device: torch.device, n: int = 8192, repeats: int = 50) -> float:
    """Achieved FLOP/s of an ``n x n x n`` bf16 matmul: the ceiling MFU is measured against."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def peak_memory(fn, device: torch.device) -> int:
    """CUDA: ``max_memory_allocated`` over ``fn()`` (everything live). CPU: peak RSS growth over ``fn()``."""
    if device.type != "cuda":
        return peak_extra_memory(fn, device)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def build_run(loss: str, mode: str, amp: str, device: torch.device) -> Run:
    """The pieces of segjml's ``build_run`` one step reads, without data loaders or a teacher checkpoint."""
    cfg = compose(
        [
            "dataset=voc",
            "model=dl3_r18",
            f"loss={loss}",
            "pretrained=false",
            "logger=none",
            f"trainer.precision={PRECISION[amp]}",
            f"trainer.channels_last={str(mode == 'channels_last').lower()}",
            f"trainer.compile={str(mode == 'compile').lower()}",
            "trainer.max_iters=1000000",  # the poly schedule stays near its start
        ]
    )
    D.set_backend_policy(device, cfg.trainer.cudnn_benchmark, cfg.trainer.tf32, cfg.trainer.deterministic)
    torch.manual_seed(cfg.seed)
    model = build(cfg.model).to(device)
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    criterion = build(cfg.loss).to(device)
    teacher = None
    if criterion.needs_teacher:  # random weights: the timing does not depend on them
        teacher_cfg = compose(["dataset=voc", "model=dl3_r50", "pretrained=false"])
        teacher = build(teacher_cfg.model).to(device).eval().requires_grad_(False)
    optimizer = build_optimizer(model, build(cfg.optimizer), cfg.trainer.head_lr_mult, cfg.trainer.no_decay_1d)
    return Run(
        cfg=cfg,
        dist=D.DistInfo(),
        device=device,
        model=model,
        train_model=torch.compile(model) if mode == "compile" else model,
        criterion=criterion,
        teacher=teacher,
        teacher_hash=None,
        optimizer=optimizer,
        scheduler=build(cfg.scheduler)(optimizer, max_iters=cfg.trainer.max_iters),
        scaler=torch.amp.GradScaler(device.type, enabled=amp == "fp16"),  # a no-op unless fp16, as in build_run
        train_loader=None,
        val_loader=None,
        metrics=None,
        class_names=[],
        to_device=BatchToDevice(device, cfg.dataset.mean, cfg.dataset.std, mode == "channels_last"),
        loss_of=plain_loss,
        with_aux=criterion.aux_weight > 0,
    )


def host_batch(batch: int, size: int, classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 image batch and block labels (some pixels ignored), as the loader gives them, pinned for a GPU."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    target = block_labels(batch, classes, size, size, g, torch.device("cpu")).to(torch.uint8)
    target[:, : size // 16] = 255
    if device.type == "cuda":
        image, target = image.pin_memory(), target.pin_memory()
    return image, target


def measure(loss: str, mode: str, args: argparse.Namespace, device: torch.device, ceiling: float | None) -> dict:
    run = build_run(loss, mode, args.amp, device)
    host_image, host_target = host_batch(args.batch, args.size, run.cfg.dataset.num_classes, device)
    amp_dtype = run.autocast_dtype
    clock, state = PhaseClock(device), TrainState()
    hooks = [
        run.criterion.register_forward_pre_hook(lambda *_: clock.lap("forward")),
        run.criterion.register_forward_hook(lambda *_: clock.lap("loss")),
        run.optimizer.register_step_pre_hook(lambda *_: clock.lap("backward")),
    ]

    def to_device() -> tuple[torch.Tensor, torch.Tensor]:
        return run.to_device(host_image, host_target)

    def step() -> None:
        clock.start()
        batch = to_device()
        clock.lap("data")
        train_step(run, state, [batch])
        clock.lap("optimizer")

    bare_optimizer = torch.optim.SGD(run.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    bare_scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    with_aux = bool(getattr(run.criterion, "needs_teacher_aux", False))

    def bare() -> None:
        image, target = to_device()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = run.train_model(image)
            soft = None
            if run.teacher is not None:
                with torch.no_grad():
                    soft = {k: v.float() for k, v in run.teacher(image, with_aux=with_aux).items()}
        loss = run.criterion({k: v.float() for k, v in outputs.items()}, target, soft)["total"]
        bare_optimizer.zero_grad(set_to_none=True)
        bare_scaler.scale(loss).backward()
        bare_scaler.step(bare_optimizer)
        bare_scaler.update()

    for _ in range(args.warmup):
        step()
    memory = peak_memory(step, device)  # before the bare optimizer holds any state
    clock.on = True
    for _ in range(args.iters):
        step()
    clock.on = False
    for hook in hooks:
        hook.remove()
    t_step, t_bare = paired_median_times(step, bare, device, args.iters, args.warmup)
    flops = count_flops(run, to_device, with_aux) / args.batch
    images_per_s = args.batch / t_step
    row = {
        "mode": mode,
        "loss": loss,
        "images/s": images_per_s,
        "ratio": t_step / t_bare,
        "memory": memory,
        "shares": clock.shares(),
        "gflop": flops / 1e9,
        "mfu": flops * images_per_s / ceiling if ceiling else None,
    }
    return row


def count_flops(run: Run, to_device, with_aux: bool) -> float:
    """FLOPs of one eager forward (teacher included) + loss + backward of the batch, by ``FlopCounterMode``."""
    image, target = to_device()
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(image.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
            outputs = run.model(image)
        soft = teacher_logits(run.teacher, image, run.autocast_dtype, with_aux) if run.teacher is not None else None
        run.criterion({k: v.float() for k, v in outputs.items()}, target, soft)["total"].backward()
    run.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m segjml.bench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 8 on a GPU, 2 on the CPU)")
    parser.add_argument("--size", type=int, default=512, help="square crop size")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default: 20 on a GPU, 3 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 5 on a GPU, 1 on the CPU)")
    parser.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, of {','.join(LOSSES)}")
    parser.add_argument("--modes", default="eager,channels_last", help=f"comma-separated, of {','.join(MODES)}")
    parser.add_argument("--amp", choices=list(PRECISION), default=None, help="default: bf16 on a GPU, none on the CPU")
    args = parser.parse_args(argv)
    device = D.resolve_device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (8 if gpu else 2)
    args.iters = args.iters or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.amp = args.amp or ("bf16" if gpu else "none")
    losses, modes = args.losses.split(","), args.modes.split(",")
    for name, values, allowed in (("--losses", losses, LOSSES), ("--modes", modes, MODES)):
        if unknown := sorted(set(values) - set(allowed)):
            parser.error(f"{name}: unknown {', '.join(unknown)}; choose from {','.join(allowed)}")
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    ceiling = matmul_ceiling(device) if gpu else None
    print(
        f"device={device} ({name}) threads={torch.get_num_threads()} torch={torch.__version__} "
        f"cuda={torch.version.cuda} amp={args.amp} batch={args.batch} size={args.size} iters={args.iters} "
        f"warmup={args.warmup}"
    )
    memory = "max_memory_allocated, weights included" if gpu else "peak RSS growth over one step, weights excluded"
    print(f"peak memory: {memory}; phases: % of a step timed with a synchronisation at each boundary")
    if ceiling:
        print(f"bf16 matmul ceiling: {ceiling / 1e12:.1f} TFLOP/s (MFU = achieved FLOP/s / ceiling)")
    columns = ["mode", "loss", "images/s", "x bare", "peak mem (MiB)", *(f"{p} %" for p in PHASES), "GFLOP/img", "MFU"]
    print(f"| {' | '.join(columns)} |")
    print(f"|{' --- |' * len(columns)}")
    for mode in modes:
        for loss in losses:
            r = measure(loss, mode, args, device, ceiling)
            gc.collect()  # the row's model, optimizer and activations go before the next row is measured
            if gpu:
                torch.cuda.empty_cache()
            shares = " | ".join(f"{s:.0f}" for s in r["shares"])
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(
                f"| {mode} | {loss} | {r['images/s']:.2f} | {r['ratio']:.3f} | {r['memory'] / 2**20:.0f} | {shares} | "
                f"{r['gflop']:.1f} | {mfu} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
