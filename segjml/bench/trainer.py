"""Trainer benchmark: time per iteration of ``segjml.engine.train`` against a bare PyTorch loop with the same
model, data, loss, optimiser and schedule, in the same run.

``python -m segjml.bench trainer [--iters 60] [--warmup 10] [overrides ...]``

The default is the demo (synthetic data, small UNet, CE + JML). The trainer's time per iteration comes from its own
log (``iter_time``: wall time between log points, so logging and progress-bar costs are included); evaluation and
checkpoints are pushed past the end of the measured run. The bare loop runs before and after the trainer and the
ratio is against the mean of the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from segjml.config import compose
from segjml.data import build_dataset, build_loader
from segjml.engine import train
from segjml.engine.optim import build_optimizer
from segjml.engine.trainer import batches, seed_everything
from segjml.utils import build


def bare_loop(cfg, iters: int, warmup: int) -> float:
    """Seconds per iteration of the plainest loop over the same components."""
    seed_everything(cfg.seed)
    t = cfg.trainer
    loader = build_loader(build_dataset(cfg.dataset, "train"), t.batch_size, True, t.num_workers, cfg.seed)
    model = build(cfg.model)
    criterion = build(cfg.loss)
    optimizer = build_optimizer(model, build(cfg.optimizer), t.head_lr_mult, t.no_decay_1d)
    scheduler = build(cfg.scheduler)(optimizer, max_iters=t.max_iters)
    model.train()
    data = batches(loader, 0)
    for i in range(warmup + iters):
        if i == warmup:
            start = time.perf_counter()
        image, target = next(data)
        loss = criterion(model(image), target)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
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
    print(f"threads={torch.get_num_threads()} iters={args.iters} (after {args.warmup} warm-up) overrides={overrides}")
    print(f"{'loop':<22} {'s/iter':>8} {'ratio':>7}")
    print(f"{'bare PyTorch (before)':<22} {bare_before:8.4f} {bare_before / bare:7.3f}")
    print(f"{'bare PyTorch (after)':<22} {bare_after:8.4f} {bare_after / bare:7.3f}")
    print(f"{'segjml trainer':<22} {mean_ours:8.4f} {mean_ours / bare:7.3f}")


if __name__ == "__main__":
    main()
