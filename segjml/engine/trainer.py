"""The iteration-based training loop, in named steps: build, resume, one training step, periodic work, finish.

``train(cfg)`` builds everything from the composed Hydra config, trains for ``trainer.max_iters`` optimizer steps with
periodic evaluation and writes, from the main process only, to the run directory: ``metrics.json`` (final metrics),
``reliability.png``, ``checkpoints/last.pt`` and ``best.pt`` (atomic), ``log.jsonl`` (every logged value) and
Hydra's ``.hydra/config.yaml``. Under ``torchrun`` it trains with DDP. Rerunning the same command resumes from
``checkpoints/last.pt`` exactly (weights, optimiser, schedule, AMP scaler, RNG states and data position) if the
config is the same; SIGTERM / SIGUSR1 / SIGUSR2 save ``last`` at the next iteration boundary and exit cleanly.
The schedule and the loss are described in ``docs/training.md``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm import tqdm

from segjml.config import check_resumable_config, config_hash, to_plain
from segjml.data import DataError, build_dataset, build_loader, class_names_of
from segjml.data.loader import shutdown_workers
from segjml.data.transforms import BatchToDevice
from segjml.engine import distributed as D
from segjml.engine.checkpoint import CheckpointError, find_resumable, load_checkpoint, load_model_state, save_atomic
from segjml.engine.commands import dataset_palette
from segjml.engine.distillation import build_teacher, teacher_logits
from segjml.engine.inference import InferenceMode, evaluate, write_report
from segjml.engine.logger import RunLogger, figure_image, fit, overlay
from segjml.engine.optim import build_optimizer
from segjml.engine.report import reliability_diagram
from segjml.engine.ssl import SemiSupervised, build_ssl, ssl_terms, step_generator
from segjml.engine.stopping import RunLock, RunLockedError, StopSignal, annotate, deferred_worker_deaths, worker_died
from segjml.metrics import SegmentationMetrics
from segjml.ssl.splits import labeled_subset, split_training_set
from segjml.utils import build
from segjml.utils.rng import capture_rng_state, restore_rng_state
from segjml.utils.seeding import rank_seed, seed_everything

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
Micro = list[tuple[torch.Tensor, torch.Tensor]]  # the (images, labels) micro-batches of one step, on the device
LossAndBackward = tuple[dict[str, torch.Tensor], Callable[[], None]]  # loss terms ("total" included), backward pass


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm layers to SyncBatchNorm, timm's norm+activation layers (``BatchNormAct2d``, in the MobileNetV2
    encoders) included: torch's own converter turns those into a plain SyncBatchNorm that drops the activation."""
    from timm.layers import convert_sync_batchnorm as timm_convert

    return timm_convert(model)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """Learning rate of the backbone groups (``lr_mult == 1``); heads run at ``head_lr_mult`` times it."""
    return next(
        (g["lr"] for g in optimizer.param_groups if g.get("lr_mult", 1.0) == 1.0), optimizer.param_groups[0]["lr"]
    )


def batches(loader, start: int):
    """Batches forever, starting at the data position after ``start`` batches (epoch and offset)."""
    per_epoch = len(loader.sampler) // loader.batch_size
    epoch, offset = divmod(start, per_epoch)
    while True:
        loader.sampler.set_epoch(epoch, offset * loader.batch_size)
        yield from loader
        epoch, offset = epoch + 1, 0


@dataclass
class Run:
    """Everything one training run is made of, built once from the config by :func:`build_run`."""

    cfg: DictConfig
    dist: D.DistInfo
    device: torch.device
    model: nn.Module  # the bare model: saved, evaluated, given to the optimizer
    train_model: nn.Module  # the same model, wrapped in DDP and/or compiled for the training forward pass
    criterion: nn.Module
    teacher: nn.Module | None
    teacher_hash: str | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # enabled with precision=fp16 only; a no-op otherwise
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    metrics: SegmentationMetrics
    class_names: list[str]
    to_device: BatchToDevice  # a loader's uint8 batch -> normalised images (channels_last if set), int64 labels
    # the step's kind: (run, micro, unlabeled, iteration) -> (loss terms, backward); plain_loss, accumulated_loss or
    # ssl_loss, chosen by build_run
    loss_of: Callable[[Run, Micro, torch.Tensor | None, int], LossAndBackward]
    ssl: SemiSupervised | None = None  # semi-supervised runs (cfg.ssl, segjml/engine/ssl.py)
    with_aux: bool = True  # whether the training forward pass runs the auxiliary head (the loss reads it)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.cfg.trainer.precision]

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.paths.output_dir)


@dataclass
class TrainState:
    """The progress a checkpoint restores besides the modules: optimizer steps done, best mIoU, skipped steps."""

    iteration: int = 0
    best_miou: float = -1.0
    skipped: dict[str, int] = field(default_factory=lambda: {"amp": 0, "nonfinite": 0})
    saved_at: int | None = None  # the iteration of the newest last.pt (written or resumed), not saved itself
    saved_time: float = field(default_factory=lambda: time.monotonic())  # when (for trainer.ckpt_minutes)


class NonFiniteLoss(FloatingPointError):
    """A non-finite loss, found before the backward pass: the model is still that of the previous iteration."""


def check_trainer_config(tcfg: DictConfig) -> None:
    """Refuse loop settings that would fail later, in one line naming the value (types are checked by Hydra)."""
    for key in (
        "max_iters",
        "batch_size",
        "val_batch_size",
        "accumulate_steps",
        "log_interval",
        "eval_interval",
        "ckpt_interval",
    ):
        if tcfg[key] < 1:
            raise ValueError(f"trainer.{key}={tcfg[key]} must be >= 1")
    if tcfg.precision not in PRECISIONS:
        raise ValueError(f"trainer.precision={tcfg.precision} is not one of {', '.join(PRECISIONS)}")
    for key in ("ckpt_minutes", "lock_stale_minutes"):
        if tcfg[key] is not None and tcfg[key] < 0:
            raise ValueError(f"trainer.{key}={tcfg[key]} must be >= 0 (0 or null: off)")


def build_datasets(cfg: DictConfig) -> tuple[Dataset, Dataset | None, Dataset]:
    """Training set (its labeled images with ``dataset.labeled``), the unlabeled rest (or ``None``), validation set."""
    tcfg = cfg.trainer
    train_set = build_dataset(cfg.dataset, "train", tcfg.limit_train_samples)
    val_set = build_dataset(cfg.dataset, "val", tcfg.limit_val_samples)
    if cfg.dataset.get("labeled") is None:
        if cfg.get("ssl") is not None:
            raise ValueError("ssl needs a labeled split: set dataset.labeled (a count, a fraction or a split file)")
        return train_set, None, val_set
    raw = build_dataset(cfg.dataset, "train", tcfg.limit_train_samples, transform=False)
    labeled_idx, unlabeled_idx = split_training_set(cfg.dataset, raw)
    log.info("labeled split: %d labeled, %d unlabeled images", len(labeled_idx), len(unlabeled_idx))
    return labeled_subset(train_set, labeled_idx), labeled_subset(train_set, unlabeled_idx), val_set


def lock_run_dir(cfg: DictConfig, dist: D.DistInfo, device: torch.device) -> RunLock | None:
    """Rank 0 takes the run directory's lock (:class:`RunLock`); every rank stops if it cannot."""
    lock, refused = None, None
    if dist.is_main:
        lock = RunLock(Path(cfg.paths.output_dir), cfg.trainer.lock_stale_minutes or float("inf"))
        try:
            lock.acquire()
        except RunLockedError as err:
            lock, refused = None, err
    if not D.all_true(refused is None, dist, device):
        raise refused or RunLockedError("rank 0 could not lock the run directory (its message says why)")
    return lock


def build_run(cfg: DictConfig, dist: D.DistInfo | None = None, device: torch.device | None = None) -> Run:
    """Data, model (DDP, SyncBN, channels_last, compile), loss, teacher, optimizer, schedule, AMP scaler, metrics.

    ``dist`` and ``device``: the process group and device :func:`train` joined (default: join them here).
    """
    tcfg = cfg.trainer
    check_trainer_config(tcfg)
    if dist is None or device is None:
        dist, device = D.init_distributed(tcfg.device)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    train_set, unlabeled_set, val_set = build_datasets(cfg)
    class_names = class_names_of(val_set, cfg.dataset.num_classes)
    pin = device.type == "cuda"

    def train_loader_of(dataset, batch_size: int, seed: int):
        return build_loader(dataset, batch_size, True, tcfg.num_workers, seed, dist.rank, dist.world_size, pin)

    train_loader = train_loader_of(train_set, tcfg.batch_size, cfg.seed)
    val_loader = build_loader(
        val_set, tcfg.val_batch_size, False, tcfg.num_workers, cfg.seed, dist.rank, dist.world_size, pin
    )

    model = build(cfg.model).to(device)
    seed_everything(rank_seed(cfg.seed, dist.rank))  # dropout and drop-path draw other masks on every rank
    if dist.enabled and tcfg.sync_bn and device.type == "cuda":  # SyncBatchNorm runs on GPUs only
        model = convert_sync_batchnorm(model)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = build(cfg.loss).to(device)
    # The auxiliary head is run only if the loss reads it (SSL steps and loss.aux_weight=0 do not); its parameters
    # then get no gradient, which DDP must be told about.
    with_aux = cfg.get("ssl") is None and criterion.aux_weight > 0
    unused = getattr(model, "aux_head", None) is not None and not with_aux
    device_ids = [device.index] if device.type == "cuda" else None
    train_model = (
        DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused) if dist.enabled else model
    )
    if tcfg.compile:
        train_model = torch.compile(train_model)
    teacher, teacher_hash = None, None
    if criterion.needs_teacher:
        teacher, teacher_hash = build_teacher(cfg.teacher, cfg.dataset.num_classes, device)
        log.info("distilling from teacher %s (sha256 %s)", cfg.teacher.checkpoint, teacher_hash[:12])
    optimizer = build_optimizer(model, build(cfg.optimizer), tcfg.head_lr_mult, tcfg.no_decay_1d)
    scheduler = build(cfg.scheduler)(optimizer, max_iters=tcfg.max_iters)
    scaler = torch.amp.GradScaler(device.type, enabled=tcfg.precision == "fp16")
    metrics = SegmentationMetrics(cfg.dataset.num_classes, cfg.dataset.ignore_index, **cfg.metrics)
    to_device = BatchToDevice(device, cfg.dataset.mean, cfg.dataset.std, tcfg.channels_last)
    ssl, loss_of = None, accumulated_loss if tcfg.accumulate_steps > 1 else plain_loss
    if cfg.get("ssl") is not None:  # the unlabeled stream shuffles with its own seed
        ssl = build_ssl(cfg, model, unlabeled_set, lambda ds, bs: train_loader_of(ds, bs, cfg.seed + 1), device)
        loss_of = ssl_loss
    return Run(
        cfg=cfg,
        dist=dist,
        device=device,
        model=model,
        train_model=train_model,
        criterion=criterion,
        teacher=teacher,
        teacher_hash=teacher_hash,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        train_loader=train_loader,
        val_loader=val_loader,
        metrics=metrics,
        class_names=class_names,
        to_device=to_device,
        loss_of=loss_of,
        ssl=ssl,
        with_aux=with_aux,
    )


def resume(run: Run) -> TrainState:
    """Restore an explicit ``trainer.resume``, else this run directory's ``last.pt`` if it is readable.

    The checkpoint's config must equal this one, except the keys that may change between attempts
    (``segjml.config.RUN_INDEPENDENT_KEYS``); ``trainer.allow_config_change=true`` accepts a difference on purpose.
    """
    tcfg = run.cfg.trainer
    path, state = None, None
    if run.dist.is_main:  # one decision for every rank: on a lagging shared file system ranks could see other files
        if tcfg.resume:
            path = Path(tcfg.resume)
        else:  # last.pt is read here, once, if it is readable
            path, state = find_resumable(run.run_dir / "checkpoints" / "last.pt") or (None, None)
    if run.dist.enabled:
        shared = [path]
        torch.distributed.broadcast_object_list(shared, src=0)
        path = shared[0]
    if path is None:
        return TrainState()
    if state is None:
        # On the CPU: the RNG states must stay there, and load_state_dict moves every tensor where its module lives
        state = load_checkpoint(path, map_location="cpu")
    if not tcfg.allow_config_change:
        check_resumable_config(state.get("config"), to_plain(run.cfg), str(path))
    if run.teacher_hash is not None and state.get("teacher_sha256") not in (None, run.teacher_hash):
        raise CheckpointError(f"{path} was trained with another teacher than {run.cfg.teacher.checkpoint}")
    load_model_state(run.model, state["model"], str(path))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # {} (None before) when the scaler is off
        run.scaler.load_state_dict(state["scaler"])
    if run.ssl is not None and run.ssl.teacher is not None:
        if state.get("ema") is None:
            raise CheckpointError(f"{path} holds no EMA teacher; it was not written by a semi-supervised run")
        run.ssl.teacher.load_state_dict(state["ema"])
    if run.dist.rank < len(state["rng"]):
        restore_rng_state(state["rng"][run.dist.rank], run.device)
    else:  # written by fewer processes: this rank keeps its own seed (rank_seed) rather than copy another's draws
        log.warning(
            "%s holds the RNG states of %d process(es); rank %d keeps its own", path, len(state["rng"]), run.dist.rank
        )
    log.info("resumed from %s at iteration %d", path, state["iteration"])
    return TrainState(state["iteration"], state["best_miou"], state["skipped"], saved_at=state["iteration"])


def save_checkpoint(run: Run, state: TrainState, name: str) -> None:
    """``checkpoints/<name>.pt`` with everything :func:`resume` needs (collective: every rank must call it)."""
    mine = capture_rng_state(run.device)
    rng = [mine]
    if run.dist.enabled:  # every rank's generators, gathered on rank 0
        rng = [None] * run.dist.world_size
        torch.distributed.all_gather_object(rng, mine)
    if not run.dist.is_main:
        return
    config = to_plain(run.cfg)
    save_atomic(
        {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "iteration": state.iteration,
            "best_miou": state.best_miou,
            "skipped": state.skipped,
            "rng": rng,
            "teacher_sha256": run.teacher_hash,
            "ema": run.ssl.teacher.state_dict() if run.ssl is not None and run.ssl.teacher is not None else None,
            "config": config,
            "config_sha256": config_hash(config),
        },
        run.run_dir / "checkpoints" / f"{name}.pt",
    )


def save_last(run: Run, state: TrainState) -> None:
    """``checkpoints/last.pt`` (collective), remembering when and at which iteration it was written."""
    save_checkpoint(run, state, "last")
    state.saved_at, state.saved_time = state.iteration, time.monotonic()


def _student(run: Run, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The student's outputs (main head, and the auxiliary head if :attr:`Run.with_aux`), in float32 for the loss."""
    with torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
        # a model of one's own need not take with_aux=True: the argument is passed only to turn the head off
        outputs = run.train_model(image) if run.with_aux else run.train_model(image, with_aux=False)
    return {k: v.float() for k, v in outputs.items()}


def _forward(run: Run, image: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Student outputs (float32) and the teacher's logits (``out``, and ``aux`` if the loss asks), if distilling."""
    outputs = _student(run, image)
    if run.teacher is None:
        return outputs, None
    with_aux = bool(getattr(run.criterion, "needs_teacher_aux", False))
    return outputs, teacher_logits(run.teacher, image, run.autocast_dtype, with_aux)


def plain_loss(run: Run, micro: Micro, unlabeled: torch.Tensor | None, iteration: int) -> LossAndBackward:
    """The loss terms of one batch and its backward pass (the step of a run without accumulation or SSL)."""
    ((image, target),) = micro
    outputs, soft = _forward(run, image)
    with D.full_float32_matmuls():  # losses in fp32, TF32 off
        terms = run.criterion(outputs, target, soft)
    return terms, lambda: run.scaler.scale(terms["total"]).backward()


def loss_is_finite(run: Run, terms: dict[str, torch.Tensor], iteration: int) -> bool:
    """``True`` if the loss is finite on every rank; otherwise stop (default) or report a skipped step."""
    if D.all_true(bool(torch.isfinite(terms["total"])), run.dist, run.device):
        return True
    names = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
    if not run.cfg.trainer.skip_nonfinite:
        raise NonFiniteLoss(f"non-finite loss at iteration {iteration} ({names})")
    log.warning("skipping iteration %d: non-finite loss (%s)", iteration, names)
    return False


def optimizer_step(run: Run, state: TrainState) -> bool:
    """``optimizer.step()`` through the AMP scaler (a plain step unless fp16); ``False`` if fp16 skipped it."""
    scale = run.scaler.get_scale()  # 1.0 when the scaler is off
    run.scaler.step(run.optimizer)
    run.scaler.update()
    stepped = run.scaler.get_scale() >= scale  # the scale drops when a step was skipped
    state.skipped["amp"] += int(not stepped)
    return stepped


def train_step(run: Run, state: TrainState, micro: Micro, unlabeled: torch.Tensor | None = None) -> dict:
    """One optimizer step on the batch made of the micro-batches ``micro`` (and, in SSL runs, the unlabeled images
    ``unlabeled``); returns the loss terms. ``run.loss_of`` is the step's kind, chosen once by :func:`build_run`:
    :func:`plain_loss`, :func:`accumulated_loss` or :func:`ssl_loss`."""
    iteration = state.iteration + 1
    run.optimizer.zero_grad(set_to_none=True)
    terms, backward = run.loss_of(run, micro, unlabeled, iteration)
    stepped = False
    if loss_is_finite(run, terms, iteration):
        backward()
        stepped = optimizer_step(run, state)
    else:
        state.skipped["nonfinite"] += 1
    if stepped and run.ssl is not None:
        run.ssl.after_step(run.model)  # the EMA teacher follows the student (not over a skipped step)
    run.scheduler.step()
    state.iteration = iteration
    return {k: v.detach() for k, v in terms.items()}


def accumulated_loss(run: Run, micro: Micro, unlabeled: torch.Tensor | None, iteration: int) -> LossAndBackward:
    """Loss of the whole batch ``micro`` (several micro-batches) and its backward pass, with one micro-batch of
    activations at a time.

    The loss is computed once on the logits of the whole batch, so every term is exactly that of the full batch:
    the Jaccard statistics are summed over all micro-batches before the dataset-level mIoU^D loss (the same rule as
    ``sync_stats`` across processes), and CE is averaged over all pixels. Pass 1 runs the model without gradients
    to collect the logits; pass 2 (the backward pass) reruns each micro-batch (same RNG state, so the same dropout)
    and back-propagates the loss's gradient with respect to its logits. BatchNorm running statistics are updated by
    pass 2 only. The cost is one extra forward pass per micro-batch.
    """
    model, devices = run.model, [run.device] if run.device.type == "cuda" else []

    def rng_state():
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]

    def set_rng_state(state) -> None:
        torch.set_rng_state(state[0])
        for d, s in zip(devices, state[1]):
            torch.cuda.set_rng_state(s, d)

    running = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    rng, outputs, teacher = [], [], []
    with torch.no_grad():
        for image, _ in micro:
            rng.append(rng_state())
            out, soft = _forward(run, image)
            outputs.append(out)
            teacher.append(soft)
    model.load_state_dict(running, strict=False)
    full = {k: torch.cat([o[k] for o in outputs]).requires_grad_() for k in outputs[0]}
    target = torch.cat([t for _, t in micro])
    soft = {k: torch.cat([t[k] for t in teacher]) for k in teacher[0]} if run.teacher is not None else None
    with D.full_float32_matmuls():
        terms = run.criterion(full, target, soft)

    def backward() -> None:
        after = rng_state()
        keys = list(full)  # an output the loss does not read gets no gradient (allow_unused) and no surrogate term
        grads = torch.autograd.grad(terms["total"], [full[k] for k in keys], allow_unused=True)
        keys, grads = [k for k, g in zip(keys, grads) if g is not None], [g for g in grads if g is not None]
        start = 0
        for i, (image, _) in enumerate(micro):
            set_rng_state(rng[i])
            last = i == len(micro) - 1
            sync = run.train_model.no_sync() if run.dist.enabled and not last else contextlib.nullcontext()
            with sync:
                out = _student(run, image)
                end = start + image.shape[0]
                surrogate = sum((out[k] * g[start:end]).sum() for k, g in zip(keys, grads))
                run.scaler.scale(surrogate).backward()
            start = end
        set_rng_state(after)

    return terms, backward


def ssl_loss(run: Run, micro: Micro, unlabeled: torch.Tensor | None, iteration: int) -> LossAndBackward:
    """Loss terms of one semi-supervised step (``segjml/engine/ssl.py``; the student's main head only: SSL runs
    have :attr:`Run.with_aux` off) and their backward pass."""
    generator = step_generator(run.cfg.seed, iteration, run.dist.rank)
    terms = ssl_terms(run.ssl, lambda x: _student(run, x), micro[0], unlabeled, generator, run.autocast_dtype)
    return terms, lambda: run.scaler.scale(terms["total"]).backward()


def evaluate_run(run: Run, output_dir: Path | None = None) -> dict:
    """Evaluate the model on the validation split (every process takes its shard; metrics are all-reduced), in
    float32 as ``eval.py`` does, so the logged validation metrics are those ``eval.py`` gives for the checkpoint."""
    tcfg = run.cfg.trainer
    model = run.ssl.eval_model(run.model) if run.ssl is not None else run.model
    # float32 whatever trainer.precision (no autocast_dtype): the number eval.py reports for the checkpoint
    inference = InferenceMode.from_config(tcfg.eval, run.cfg.dataset.crop_size)
    progress = tcfg.progress and run.dist.is_main
    with D.cudnn_benchmark_off():
        result = evaluate(model, run.val_loader, run.metrics, run.to_device, inference, progress)
    if output_dir is not None and run.dist.is_main:
        write_report(result, run.metrics, output_dir, run.class_names, run.cfg.name)
    return result


def evaluate_and_keep_best(run: Run, state: TrainState, logger: RunLogger) -> dict:
    """Evaluate, log ``val/*`` and write ``best.pt`` when the mIoU improves."""
    result = evaluate_run(run)
    if run.device.type == "cuda":  # the training peak logged next excludes the evaluation's
        torch.cuda.reset_peak_memory_stats(run.device)
    logger.log(state.iteration, {f"val/{k}": v for k, v in result.items() if k != "iou_per_class"})
    if logger.overlays is not None:  # logger=tensorboard (rank 0's logger only: the others take no images)
        logger.images(state.iteration, evaluation_images(run, logger.overlays))
    if result["miou"] > state.best_miou:
        state.best_miou = result["miou"]
        save_checkpoint(run, state, "best")
    return result


def evaluation_images(run: Run, count: int) -> dict[str, np.ndarray]:
    """The reliability diagram of the evaluation just run and the first ``count`` validation images, each as its
    prediction overlaid (left) beside its label overlaid (right), predicted as the evaluation predicts them.

    One process calls it alone: no collective."""
    model = run.ssl.eval_model(run.model) if run.ssl is not None else run.model
    inference = InferenceMode.from_config(run.cfg.trainer.eval, run.cfg.dataset.crop_size)
    palette = np.array(dataset_palette(run.cfg.dataset), dtype=np.uint8)
    ignore = run.cfg.dataset.ignore_index
    images = {"val/reliability": figure_image(lambda f: reliability_diagram(run.metrics.reliability(), f))}
    dataset = run.val_loader.dataset
    was_training = model.training
    model.eval()
    for i in range(min(count, len(dataset))):
        image, label = dataset[i]
        pred = inference.probs(model, run.to_device.images(image[None])).argmax(1)[0].cpu().numpy()
        hwc, label = image.permute(1, 2, 0).numpy(), label.numpy()
        pair = np.concatenate([overlay(hwc, pred, palette, ignore), overlay(hwc, label, palette, ignore)], axis=1)
        images[f"val/prediction_{i}"] = fit(pair, 1024)
    model.train(was_training)
    return images


class Meter:
    """Data / step / iteration times averaged over the iterations since the last log line.

    On a GPU the steps run asynchronously: ``sync`` (``torch.cuda.synchronize``) is called only when the times are
    read, so ``iter_time`` counts every queued kernel while the iterations between log lines never wait; the split
    into ``data_time`` and ``step_time`` is then the host's.
    """

    def __init__(self, start: int, sync=None) -> None:
        self.last, self.data, self.step, self.sync = start, 0.0, 0.0, sync
        self.t_log = self.t = time.perf_counter()

    def lap(self, key: str | None = None) -> None:
        """Add the time since the previous lap to ``key`` (``None``: periodic work, counted in iter_time only)."""
        now = time.perf_counter()
        if key is not None:
            setattr(self, key, getattr(self, key) + now - self.t)
        self.t = now

    def read(self, iteration: int) -> dict[str, float]:
        if self.sync is not None:
            self.sync()
        n, now = max(iteration - self.last, 1), time.perf_counter()
        values = {"data_time": self.data / n, "step_time": self.step / n, "iter_time": (now - self.t_log) / n}
        self.last, self.data, self.step, self.t_log = iteration, 0.0, 0.0, now
        return values


def log_step(run: Run, state: TrainState, terms: dict, meter: Meter, logger: RunLogger, bar: tqdm) -> None:
    values = {k: v.item() for k, v in terms.items()}
    values.update(
        lr=base_lr(run.optimizer),
        **meter.read(state.iteration),
        amp_skipped=state.skipped["amp"],
        nonfinite_skipped=state.skipped["nonfinite"],
    )
    if run.device.type == "cuda":  # the peak since the previous log line (evaluations excluded, see below)
        values["mem_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        torch.cuda.reset_peak_memory_stats(run.device)
    logger.log(state.iteration, values)
    postfix = {k: f"{v:.3f}" for k, v in values.items() if k in terms}
    postfix["lr"] = f"{values['lr']:.2e}"
    if "mem_gb" in values:
        postfix["mem"] = f"{values['mem_gb']:.1f}G"
    bar.set_postfix(postfix)


def periodic(run: Run, state: TrainState, terms: dict, meter: Meter, logger: RunLogger, bar: tqdm) -> None:
    """Logging, evaluation and checkpointing due after the step that made ``state.iteration``."""
    tcfg, done = run.cfg.trainer, state.iteration
    if done % tcfg.log_interval == 0 or done == tcfg.max_iters:
        log_step(run, state, terms, meter, logger, bar)
    if done % tcfg.eval_interval == 0 and done < tcfg.max_iters:
        result = evaluate_and_keep_best(run, state, logger)
        if run.dist.is_main:
            bar.write(f"iter {done}: val mIoU {result['miou']:.2f}  Acc {result['acc']:.2f}  ECE {result['ece']:.2f}")
    if done % tcfg.ckpt_interval == 0 and done < tcfg.max_iters:
        save_last(run, state)


def next_batch(run: Run, data, unlabeled) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """The micro-batches of the next step on the device (and the unlabeled images of an SSL step, or ``None``)."""
    micro = [run.to_device(*next(data)) for _ in range(run.cfg.trainer.accumulate_steps)]
    # the unlabeled images only: their labels are never read
    image_u = run.to_device.images(next(unlabeled)[0]) if unlabeled is not None else None
    return micro, image_u


def checkpoint_due(run: Run, state: TrainState) -> bool:
    """``trainer.ckpt_minutes`` have passed since ``last.pt`` was written (rank 0's clock decides for all)."""
    minutes = run.cfg.trainer.ckpt_minutes
    return bool(minutes) and run.dist.is_main and time.monotonic() - state.saved_time >= 60.0 * minutes


def _where_saved(state: TrainState) -> str:
    if state.saved_at is None:
        return "no checkpoint was written yet"
    return f"checkpoints/last.pt holds iteration {state.saved_at}"


def stopped_on_error(run: Run, state: TrainState, err: BaseException | None) -> BaseException:
    """The error to raise after an error between iterations was agreed on and ``last.pt`` saved."""
    note = f"stopped at iteration {state.iteration}: saved checkpoints/last.pt; rerun the same command to resume"
    if err is None:
        return RuntimeError(f"another process of this run stopped on an error (its message says which); {note}")
    if worker_died(err):  # the OOM killer sends SIGKILL
        first = str(err).strip().splitlines()[0].rstrip(". ")
        return DataError(
            f"a data-loading worker died ({first}; the out-of-memory killer sends SIGKILL: lower "
            f"trainer.num_workers or trainer.batch_size, or ask for more memory) ({note})"
        )
    if not annotate(err, note):
        log.error("%s", note)
    return err


def guarded_step(run: Run, state: TrainState, micro: list, image_u: torch.Tensor | None) -> dict:
    """:func:`train_step`, saving ``last.pt`` on a non-finite loss (the model is still that of the previous
    iteration: the BatchNorm statistics and RNG states of the failed forward pass are rolled back first); any other
    error inside the step leaves the half-done update unsaved, and its message says so."""
    buffers = list(run.model.buffers())
    before = [b.clone() for b in buffers] if buffers else []
    rng = torch.get_rng_state()
    try:
        return train_step(run, state, micro, image_u)
    except NonFiniteLoss as err:
        if buffers:
            torch._foreach_copy_(buffers, before)
        torch.set_rng_state(rng)
        save_last(run, state)
        annotate(err, f"saved checkpoints/last.pt at iteration {state.iteration}, the last good one")
        raise
    except Exception as err:
        note = f"stopped inside iteration {state.iteration + 1}: not saved, that step's update is incomplete"
        if not annotate(err, f"{note}; {_where_saved(state)}"):
            log.error("%s", note)
        raise


def train_loop(run: Run, state: TrainState, stop: StopSignal, logger: RunLogger) -> dict:
    """Optimizer steps from ``state.iteration`` to ``max_iters``, then the final evaluation and checkpoints.

    Every iteration boundary is agreed on by all ranks (one all-reduce): a stop signal, an error since the last
    boundary (loading data, a worker's death, logging, evaluation) or ``trainer.ckpt_minutes`` make every rank save
    ``last.pt`` at the same iteration; a signal or an error then ends the run.
    """
    tcfg = run.cfg.trainer
    data = batches(run.train_loader, state.iteration * tcfg.accumulate_steps)
    unlabeled = None
    if run.ssl is not None and run.ssl.uses_unlabeled:
        unlabeled = batches(run.ssl.unlabeled_loader, state.iteration)
    run.model.train()
    bar = tqdm(
        total=tcfg.max_iters,
        initial=state.iteration,
        desc="train",
        dynamic_ncols=True,
        disable=not (tcfg.progress and run.dist.is_main),
    )
    meter = Meter(state.iteration, sync=torch.cuda.synchronize if run.device.type == "cuda" else None)
    failed: BaseException | None = None  # an error between iterations, raised once last.pt is saved
    try:
        while True:
            batch = None
            if failed is None and state.iteration < tcfg.max_iters:
                try:
                    batch = next_batch(run, data, unlabeled)
                except Exception as err:
                    failed = err
            signalled, error, due = D.any_each(
                [stop.received is not None, failed is not None, checkpoint_due(run, state)], run.dist, run.device
            )
            if signalled or error or due:
                save_last(run, state)
            if error:
                raise stopped_on_error(run, state, failed)
            if signalled:
                if stop.interrupted:
                    message = f"interrupted at iteration {state.iteration}: saved checkpoints/last.pt"
                else:
                    message = f"{stop.name} received: saved checkpoints/last.pt at iteration {state.iteration}"
                log.warning("%s; rerun the same command to resume", message)
                return {"stopped_at": state.iteration, "signal": stop.name}
            if state.iteration >= tcfg.max_iters:
                break
            meter.lap("data")
            done = False
            try:
                with deferred_worker_deaths():  # a worker's death is raised after the step, not inside it
                    terms = guarded_step(run, state, *batch)
                    done = True
                meter.lap("step")
                periodic(run, state, terms, meter, logger, bar)
            except Exception as err:
                if not done:
                    raise
                failed = err
            meter.lap()
            bar.update(1)
    finally:
        bar.close()
    try:
        return finish(run, state, logger)
    except Exception as err:
        if isinstance(err, CheckpointError) or run.dist.enabled:  # cannot save / other ranks may be elsewhere
            raise
        save_last(run, state)
        raise stopped_on_error(run, state, err) from None


def finish(run: Run, state: TrainState, logger: RunLogger) -> dict:
    """Final evaluation, ``best.pt`` / ``last.pt``, ``metrics.json``, the per-class table on the console."""
    result = evaluate_and_keep_best(run, state, logger)
    save_last(run, state)
    if run.dist.is_main:
        log.info("run directory: %s", run.run_dir)
        write_report(result, run.metrics, run.run_dir, run.class_names, run.cfg.name)  # the table comes last
        logger.artifacts(run.run_dir)
    return result


def train(cfg: DictConfig) -> dict:
    """Train and evaluate one run; returns the final metrics (``{"stopped_at": it, "signal": name}`` after a stop
    signal: the caller ends with code 130 after Ctrl-C).

    The run directory is locked (``run.lock``) for the duration. Signal handlers, the lock, the log file, the
    tracker (``logger=``) and the process group are released whatever happens, so a caller that trains several runs
    in one process (``make reproduce-smoke``) starts each from a clean state.
    """
    check_trainer_config(cfg.trainer)
    dist, device = D.init_distributed(cfg.trainer.device)
    D.set_backend_policy(device, cfg.trainer.cudnn_benchmark, cfg.trainer.tf32, cfg.trainer.deterministic)
    lock, logger, stop = None, None, None
    try:
        lock = lock_run_dir(cfg, dist, device)
        run = build_run(cfg, dist, device)
        state = resume(run)
        logger = RunLogger(run.run_dir, cfg, enabled=run.dist.is_main, start=state.iteration)
        stop = StopSignal()
        result = train_loop(run, state, stop, logger)
    finally:
        if stop is not None:
            stop.restore()
        if logger is not None:
            logger.close()
        shutdown_workers()  # the loaders' workers ignore SIGTERM: end them here (also after an error)
        if lock is not None:
            lock.release()
        D.cleanup(dist)
    if "stopped_at" in result:
        stop.forward()  # e.g. submitit requeues the job, which resumes from last.pt
    return result
