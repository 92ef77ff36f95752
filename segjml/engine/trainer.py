"""The iteration-based training loop (``REFERENCE.md`` section 5), readable top to bottom.

``train(cfg)`` builds everything from the composed Hydra config, trains for ``trainer.max_iters`` iterations with
periodic evaluation, and writes to the run directory: ``metrics.json`` (final metrics), ``checkpoints/last.pt``
(and ``best.pt``), ``log.jsonl`` (every logged value), ``reliability.png``, and Hydra's ``.hydra/config.yaml``.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from segjml.data import build_dataset, build_loader
from segjml.engine.checkpoint import CheckpointError, load_checkpoint, save_atomic
from segjml.engine.distillation import build_teacher, teacher_logits
from segjml.engine.evaluator import evaluate
from segjml.engine.optim import build_optimizer
from segjml.metrics import SegmentationMetrics
from segjml.utils import build

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def infinite(loader):
    """Yield batches forever, re-seeding a ``DistributedSampler`` every epoch."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """Learning rate of the backbone groups (``lr_mult == 1``); heads run at ``head_lr_mult`` times it."""
    return next((g["lr"] for g in optimizer.param_groups if g.get("lr_mult", 1.0) == 1.0),
                optimizer.param_groups[0]["lr"])


class JsonlLogger:
    """Append one JSON object per logged step to ``log.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", buffering=1)

    def log(self, step: int, values: dict) -> None:
        import json

        self.file.write(json.dumps({"step": step, **values}) + "\n")

    def close(self) -> None:
        self.file.close()


def train(cfg: DictConfig) -> dict:
    """Train and evaluate one run; returns the final metrics."""
    run_dir = Path(cfg.paths.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    tcfg = cfg.trainer
    seed_everything(cfg.seed)
    device = resolve_device(tcfg.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    train_set = build_dataset(cfg.dataset, "train", tcfg.limit_train_samples)
    val_set = build_dataset(cfg.dataset, "val", tcfg.limit_val_samples)
    class_names = list(getattr(val_set, "class_names", [str(i) for i in range(cfg.dataset.num_classes)]))
    train_loader = build_loader(train_set, tcfg.batch_size, True, tcfg.num_workers, cfg.seed,
                                pin_memory=device.type == "cuda")
    val_loader = build_loader(val_set, tcfg.val_batch_size, False, tcfg.num_workers, cfg.seed,
                              pin_memory=device.type == "cuda")

    model = build(cfg.model).to(device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = torch.compile(model) if tcfg.compile else model  # ``model`` stays the one saved and evaluated
    criterion = build(cfg.loss).to(device)
    teacher, teacher_hash = None, None
    if criterion.needs_teacher:
        teacher, teacher_hash = build_teacher(cfg.teacher, cfg.dataset.num_classes, device)
        log.info("distilling from teacher %s (sha256 %s)", cfg.teacher.checkpoint, teacher_hash[:12])
    optimizer = build_optimizer(model, build(cfg.optimizer), tcfg.head_lr_mult, tcfg.no_decay_1d)
    scheduler = build(cfg.scheduler)(optimizer, max_iters=tcfg.max_iters)
    metrics = SegmentationMetrics(cfg.dataset.num_classes, cfg.dataset.ignore_index, **cfg.metrics)
    autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tcfg.precision]
    scaler = torch.amp.GradScaler(device.type) if tcfg.precision == "fp16" else None

    start_iter, best = 0, -1.0
    resume = tcfg.resume or (ckpt_dir / "last.pt" if (ckpt_dir / "last.pt").is_file() else None)
    if resume:
        state = load_checkpoint(resume, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_iter, best = state["iteration"], state.get("best_miou", -1.0)
        if teacher_hash is not None and state.get("teacher_sha256") not in (None, teacher_hash):
            raise CheckpointError(f"{resume} was trained with another teacher than {cfg.teacher.checkpoint}")
        log.info("resumed from %s at iteration %d", resume, start_iter)

    def save(name: str, iteration: int) -> None:
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "iteration": iteration, "best_miou": best, "teacher_sha256": teacher_hash,
                     "config": OmegaConf.to_container(cfg, resolve=True)}, ckpt_dir / f"{name}.pt")

    def run_eval(output_dir: Path | None = None) -> dict:
        return evaluate(model, val_loader, metrics, device, tcfg.eval.mode, cfg.dataset.crop_size,
                        flip=tcfg.eval.flip, scales=tcfg.eval.scales, autocast_dtype=autocast_dtype,
                        progress=tcfg.progress, output_dir=output_dir, class_names=class_names,
                        title=cfg.name)

    logger = JsonlLogger(run_dir / "log.jsonl")
    batches = infinite(train_loader)
    model.train()
    bar = tqdm(range(start_iter, tcfg.max_iters), initial=start_iter, total=tcfg.max_iters, desc="train",
               disable=not tcfg.progress, dynamic_ncols=True)
    data_time = step_time = 0.0
    t0 = time.perf_counter()
    for it in bar:
        image, target = next(batches)
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if tcfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        data_time += t1 - t0
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            outputs = train_model(image)
        soft_targets = teacher_logits(teacher, image, autocast_dtype) if teacher is not None else None
        terms = criterion({k: v.float() for k, v in outputs.items()}, target, soft_targets)
        loss = terms["total"]
        if not torch.isfinite(loss):
            names = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            raise FloatingPointError(f"non-finite loss at iteration {it + 1} ({names}); last good checkpoint kept")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        t0 = time.perf_counter()
        step_time += t0 - t1

        done = it + 1
        if done % tcfg.log_interval == 0 or done == tcfg.max_iters:
            values = {k: v.item() for k, v in terms.items()}
            values["lr"] = base_lr(optimizer)
            values["data_time"], values["step_time"] = data_time / tcfg.log_interval, step_time / tcfg.log_interval
            data_time = step_time = 0.0
            if device.type == "cuda":
                values["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            logger.log(done, values)
            bar.set_postfix(loss=f"{values['total']:.3f}", lr=f"{values['lr']:.2e}")
        if done % tcfg.eval_interval == 0 and done < tcfg.max_iters:
            result = run_eval()
            logger.log(done, {f"val/{k}": v for k, v in result.items() if k != "iou_per_class"})
            bar.write(f"iter {done}: val mIoU {result['miou']:.2f}  Acc {result['acc']:.2f}  ECE {result['ece']:.2f}")
            if result["miou"] > best:
                best = result["miou"]
                save("best", done)
        if done % tcfg.ckpt_interval == 0 and done < tcfg.max_iters:
            save("last", done)
    bar.close()

    result = run_eval(output_dir=run_dir)
    logger.log(tcfg.max_iters, {f"val/{k}": v for k, v in result.items() if k != "iou_per_class"})
    logger.close()
    if result["miou"] > best:
        best = result["miou"]
        save("best", tcfg.max_iters)
    save("last", tcfg.max_iters)
    log.info("run directory: %s", run_dir)
    return result


__all__ = ["train", "CheckpointError"]
