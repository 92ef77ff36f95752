"""Trainer benchmark: time per iteration of ``segjml.engine.train`` against a bare PyTorch loop with the same
model, data, loss, optimiser and schedule, in the same run.

``python -m segjml.bench trainer [--iters 60] [--warmup 10] [overrides ...]``

The default is the demo (synthetic data, small UNet, CE + JML). The trainer's time per iteration comes from its own
log (``iter_time``: wall time between log points, so logging and progress-bar costs are included); evaluation and
checkpoints are pushed past the end of the measured run. The bare loop runs before and after the trainer and the
ratio is against the mean of the two. Both loops run on the trainer's device (``trainer.device``: a GPU if there is
one), with its precision and GPU settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from segjml.bench.common import sync
from segjml.config import compose
from segjml.data import build_dataset, build_loader
from segjml.data.transforms import BatchToDevice
from segjml.engine import distributed as D
from segjml.engine import train
from segjml.engine.optim import build_optimizer
from segjml.engine.trainer import PRECISIONS, batches
from segjml.utils import build
from segjml.utils.seeding import seed_everything


def bare_loop(cfg, iters: int, warmup: int) -> float:
    """Seconds per iteration of the plainest loop over the same components."""
    seed_everything(cfg.seed)
    t = cfg.trainer
    device = D.resolve_device(t.device)  # where train(cfg) runs: the bare loop must not stay on the CPU
    D.set_backend_policy(device, t.cudnn_benchmark, t.tf32, t.deterministic)
    pin = device.type == "cuda"
    loader = build_loader(build_dataset(cfg.dataset, "train"), t.batch_size, True, t.num_workers, cfg.seed, 0, 1, pin)
    model = build(cfg.model).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = build(cfg.loss).to(device)
    optimizer = build_optimizer(model, build(cfg.optimizer), t.head_lr_mult, t.no_decay_1d)
    scheduler = build(cfg.scheduler)(optimizer, max_iters=t.max_iters)
    dtype = PRECISIONS[t.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    to_device = BatchToDevice(device, cfg.dataset.mean, cfg.dataset.std, t.channels_last)
    model.train()
    data = batches(loader, 0)
    for i in range(warmup + iters):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        image, target = to_device(*next(data))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = model(image)
        loss = criterion({k: v.float() for k, v in outputs.items()}, target)["total"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    sync(device)
    return (time.perf_counter() - start) / iters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m segjml.bench trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    total = args.iters + args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "logger=none",
            f"trainer.max_iters={total}",
            f"trainer.log_interval={args.warmup}",
            f"trainer.eval_interval={10 * total}",
            f"trainer.ckpt_interval={10 * total}",
            "trainer.progress=false",
            "trainer.limit_val_samples=2",
            *args.overrides,
        ]
        cfg = compose(overrides, output_dir=tmp)
        bare_before = bare_loop(cfg, args.iters, args.warmup)
        train(cfg)
        bare_after = bare_loop(cfg, args.iters, args.warmup)  # before and after: order effects average out
        bare = (bare_before + bare_after) / 2
        lines = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
        ours = [line["iter_time"] for line in lines if "iter_time" in line and line["step"] > args.warmup]
    mean_ours = statistics.fmean(ours)
    device = D.resolve_device(cfg.trainer.device)
    print(
        f"device={device} threads={torch.get_num_threads()} iters={args.iters} (after {args.warmup} warm-up) "
        f"overrides={overrides}"
    )
    print(f"{'loop':<22} {'s/iter':>8} {'ratio':>7}")
    print(f"{'bare PyTorch (before)':<22} {bare_before:8.4f} {bare_before / bare:7.3f}")
    print(f"{'bare PyTorch (after)':<22} {bare_after:8.4f} {bare_after / bare:7.3f}")
    print(f"{'segjml trainer':<22} {mean_ours:8.4f} {mean_ours / bare:7.3f}")


if __name__ == "__main__":
    main()
