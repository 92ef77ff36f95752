"""The iteration-based training loop (``REFERENCE.md`` section 5), readable top to bottom.

``train(cfg)`` builds everything from the composed Hydra config, trains for ``trainer.max_iters`` iterations with
periodic evaluation and writes, from the main process only, to the run directory: ``metrics.json`` (final metrics),
``reliability.png``, ``checkpoints/last.pt`` and ``best.pt`` (atomic), ``log.jsonl`` (every logged value) and
Hydra's ``.hydra/config.yaml``. Under ``torchrun`` it trains with DDP. Rerunning the same command resumes from
``checkpoints/last.pt`` exactly (weights, optimiser, schedule, AMP scaler, RNG states and data position); SIGTERM /
SIGUSR1 save ``last`` at the next iteration boundary and exit cleanly.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from segjml.data import build_dataset, build_loader
from segjml.engine import distributed as D
from segjml.engine.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_resumable,
    load_checkpoint,
    restore_rng_state,
    save_atomic,
)
from segjml.engine.distillation import build_teacher, teacher_logits
from segjml.engine.evaluator import evaluate, write_report
from segjml.engine.logger import RunLogger
from segjml.engine.optim import build_optimizer
from segjml.metrics import SegmentationMetrics
from segjml.utils import build

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """Learning rate of the backbone groups (``lr_mult == 1``); heads run at ``head_lr_mult`` times it."""
    return next((g["lr"] for g in optimizer.param_groups if g.get("lr_mult", 1.0) == 1.0),
                optimizer.param_groups[0]["lr"])


class StopSignal:
    """Records SIGTERM / SIGUSR1 / SIGUSR2 (cluster preemption, time limit) so the loop can save and exit at an
    iteration boundary. A handler that was installed before (submitit's USR2 handler requeues the SLURM job) is
    called after the checkpoint is written (:meth:`forward`)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {}
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def forward(self) -> None:
        """Hand the received signal to the handler installed before ours, if that was a Python function."""
        handler = self.previous.get(self.received)
        if callable(handler):
            handler(self.received, None)


def batches(loader, start_iter: int):
    """Batches forever, starting at the data position of iteration ``start_iter`` (epoch and offset)."""
    per_epoch = len(loader.sampler) // loader.batch_size
    epoch, offset = divmod(start_iter, per_epoch)
    while True:
        loader.sampler.set_epoch(epoch, offset * loader.batch_size)
        yield from loader
        epoch, offset = epoch + 1, 0


def train(cfg: DictConfig) -> dict:
    """Train and evaluate one run; returns the final metrics."""
    tcfg = cfg.trainer
    dist, device = D.init_distributed(tcfg.device)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    seed_everything(cfg.seed)  # the same initial weights on every rank
    autocast_dtype = PRECISIONS[tcfg.precision]

    # Data
    train_set = build_dataset(cfg.dataset, "train", tcfg.limit_train_samples)
    val_set = build_dataset(cfg.dataset, "val", tcfg.limit_val_samples)
    class_names = [str(n) for n in (getattr(val_set, "class_names", None) or range(cfg.dataset.num_classes))]
    pin = device.type == "cuda"
    train_loader = build_loader(train_set, tcfg.batch_size, True, tcfg.num_workers, cfg.seed, dist.rank,
                                dist.world_size, pin)
    val_loader = build_loader(val_set, tcfg.val_batch_size, False, tcfg.num_workers, cfg.seed, dist.rank,
                              dist.world_size, pin)

    # Model, loss, teacher, optimisation
    model = build(cfg.model).to(device)
    if dist.enabled and tcfg.sync_bn and device.type == "cuda":  # SyncBatchNorm runs on GPUs only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.enabled else model
    if tcfg.compile:
        train_model = torch.compile(train_model)
    criterion = build(cfg.loss).to(device)
    teacher, teacher_hash = None, None
    if criterion.needs_teacher:
        teacher, teacher_hash = build_teacher(cfg.teacher, cfg.dataset.num_classes, device)
        log.info("distilling from teacher %s (sha256 %s)", cfg.teacher.checkpoint, teacher_hash[:12])
    optimizer = build_optimizer(model, build(cfg.optimizer), tcfg.head_lr_mult, tcfg.no_decay_1d)
    scheduler = build(cfg.scheduler)(optimizer, max_iters=tcfg.max_iters)
    scaler = torch.amp.GradScaler(device.type) if tcfg.precision == "fp16" else None
    metrics = SegmentationMetrics(cfg.dataset.num_classes, cfg.dataset.ignore_index, **cfg.metrics)

    # Resume: an explicit trainer.resume, else this run directory's last checkpoint if it is readable
    start_iter, best, skipped = 0, -1.0, {"amp": 0, "nonfinite": 0}
    resume = Path(tcfg.resume) if tcfg.resume else find_resumable(ckpt_dir / "last.pt")
    if resume is not None:
        state = load_checkpoint(resume, map_location=device)
        if teacher_hash is not None and state.get("teacher_sha256") not in (None, teacher_hash):
            raise CheckpointError(f"{resume} was trained with another teacher than {cfg.teacher.checkpoint}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"][min(dist.rank, len(state["rng"]) - 1)])
        start_iter, best, skipped = state["iteration"], state["best_miou"], state["skipped"]
        log.info("resumed from %s at iteration %d", resume, start_iter)

    def save(name: str, iteration: int) -> None:
        rng = [capture_rng_state()]
        if dist.enabled:  # every rank's generators, gathered on rank 0
            rng = [None] * dist.world_size
            torch.distributed.all_gather_object(rng, capture_rng_state())
        if not dist.is_main:
            return
        save_atomic({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None, "iteration": iteration, "best_miou": best,
            "skipped": skipped, "rng": rng, "teacher_sha256": teacher_hash,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }, ckpt_dir / f"{name}.pt")

    def run_eval(output_dir: Path | None = None) -> dict:
        return evaluate(model, val_loader, metrics, device, tcfg.eval.mode, cfg.dataset.crop_size,
                        flip=tcfg.eval.flip, scales=tcfg.eval.scales, autocast_dtype=autocast_dtype,
                        progress=tcfg.progress and dist.is_main, output_dir=output_dir if dist.is_main else None,
                        class_names=class_names, title=cfg.name)

    logger = RunLogger(run_dir, cfg, enabled=dist.is_main)
    stop = StopSignal()
    data = batches(train_loader, start_iter)
    model.train()
    bar = tqdm(range(start_iter, tcfg.max_iters), initial=start_iter, total=tcfg.max_iters, desc="train",
               disable=not (tcfg.progress and dist.is_main), dynamic_ncols=True)
    timer = {"data": 0.0, "step": 0.0}
    t0 = t_log = time.perf_counter()
    for it in bar:
        if D.any_true(stop.received is not None, dist, device):
            save("last", it)
            log.warning("signal received: saved checkpoints/last.pt at iteration %d; rerun the command to resume", it)
            bar.close()
            logger.close()
            stop.restore()
            D.cleanup(dist)
            stop.forward()  # e.g. submitit requeues the job, which resumes from last.pt
            return {"stopped_at": it}
        image, target = next(data)
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if tcfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        timer["data"] += t1 - t0

        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs = train_model(image)
        soft = teacher_logits(teacher, image, autocast_dtype) if teacher is not None else None
        terms = criterion({k: v.float() for k, v in outputs.items()}, target, soft)  # losses in fp32
        loss = terms["total"]
        if not D.all_true(bool(torch.isfinite(loss)), dist, device):
            names = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            if not tcfg.skip_nonfinite:
                raise FloatingPointError(f"non-finite loss at iteration {it + 1} ({names}); weights and "
                                         f"checkpoints are those of the last good iteration")
            skipped["nonfinite"] += 1
            log.warning("skipping iteration %d: non-finite loss (%s)", it + 1, names)
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scale = scaler.get_scale()
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                skipped["amp"] += int(scaler.get_scale() < scale)  # the scale drops when a step was skipped
            else:
                loss.backward()
                optimizer.step()
        scheduler.step()
        t0 = time.perf_counter()
        timer["step"] += t0 - t1

        done = it + 1
        if done % tcfg.log_interval == 0 or done == tcfg.max_iters:
            values = {k: v.item() for k, v in terms.items()}
            now, n = time.perf_counter(), done - max(start_iter, done - tcfg.log_interval)
            values.update(lr=base_lr(optimizer), data_time=timer["data"] / n, step_time=timer["step"] / n,
                          iter_time=(now - t_log) / n, amp_skipped=skipped["amp"],
                          nonfinite_skipped=skipped["nonfinite"])
            t_log = now
            if device.type == "cuda":
                values["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            timer = {"data": 0.0, "step": 0.0}
            logger.log(done, values)
            postfix = {k: f"{v:.3f}" for k, v in values.items() if k in terms}
            postfix["lr"] = f"{values['lr']:.2e}"
            if "mem_gb" in values:
                postfix["mem"] = f"{values['mem_gb']:.1f}G"
            bar.set_postfix(postfix)
        if done % tcfg.eval_interval == 0 and done < tcfg.max_iters:
            result = run_eval()
            logger.log(done, {f"val/{k}": v for k, v in result.items() if k != "iou_per_class"})
            if dist.is_main:
                bar.write(f"iter {done}: val mIoU {result['miou']:.2f}  Acc {result['acc']:.2f}  "
                          f"ECE {result['ece']:.2f}")
            if result["miou"] > best:
                best = result["miou"]
                save("best", done)
        if done % tcfg.ckpt_interval == 0 and done < tcfg.max_iters:
            save("last", done)
    bar.close()
    stop.restore()

    result = run_eval()
    logger.log(tcfg.max_iters, {f"val/{k}": v for k, v in result.items() if k != "iou_per_class"})
    logger.close()
    if result["miou"] > best:
        best = result["miou"]
        save("best", tcfg.max_iters)
    save("last", tcfg.max_iters)
    if dist.is_main:
        log.info("run directory: %s", run_dir)
        write_report(result, metrics, run_dir, class_names, cfg.name)  # the table comes last on the console
    D.cleanup(dist)
    return result
