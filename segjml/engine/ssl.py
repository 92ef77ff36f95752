"""Semi-supervised training (JML-SSL, paper Appendix I) inside the trainer: the unlabeled stream, the EMA teacher,
and the loss terms of one step.

A run is semi-supervised when ``cfg.ssl`` is set (``ssl=augseg``; ``docs/ssl.md``). ``dataset.labeled`` chooses the
labeled images (a count, a fraction or a split file; :func:`segjml.ssl.splits.split_training_set`); the rest of the
training set is the unlabeled stream, whose labels are never read. One step (the trainer's SSL step, with
:func:`ssl_terms`):

1. a labeled batch and an unlabeled batch, both through the training pipeline (the weak view: scale, crop, flip);
2. the EMA teacher's probabilities on the weak unlabeled view;
3. the strong view: random intensity operations on the weak images (same geometry, so the teacher's probabilities
   stay aligned with it), then AugSeg's adaptive CutMix with the labeled batch;
4. one student forward on labeled + strong images together, the loss of eq. 62-64 (:class:`segjml.ssl.SSLLoss`),
   backward. After the optimizer step the trainer updates the teacher (:meth:`SemiSupervised.after_step`).

Every random draw of steps 3-4 comes from a generator seeded by ``(seed, iteration, rank)`` (:func:`step_generator`),
so a resumed run makes the same draws. With ``eta_u = theta_u = 0`` (the supervised baseline of Tables 11 and 12)
the unlabeled stream and the teacher are not built at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from segjml.engine.distributed import full_float32_matmuls
from segjml.losses.schema import SSL_LOSS_KEYS
from segjml.ssl import EMATeacher, SSLLoss, adaptive_cutmix, strong_intensity_augment
from segjml.utils.seeding import SSL_STEP, derive_seed

log = logging.getLogger(__name__)


@dataclass
class SemiSupervised:
    """The SSL parts of a run: the loss, and (when an unlabeled term has weight) the teacher and unlabeled loader."""

    cfg: DictConfig
    loss: SSLLoss
    teacher: EMATeacher | None
    unlabeled_loader: torch.utils.data.DataLoader | None
    mean: list[float]
    std: list[float]

    @property
    def uses_unlabeled(self) -> bool:
        return self.teacher is not None

    def eval_model(self, student: nn.Module) -> nn.Module:
        """The model evaluated during training: the EMA teacher (as AugSeg reports) or the student."""
        return self.teacher.model if self.cfg.evaluate == "teacher" and self.teacher is not None else student

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        if self.teacher is not None:
            self.teacher.update(student)


def build_loss(cfg: DictConfig) -> SSLLoss:
    """eq. 64 from ``loss`` (``ce_weight`` = lambda_CE, ``jml_weight`` = lambda_JML, ``bls``, ``jml``) and ``ssl``
    (its keys :data:`~segjml.losses.schema.SSL_LOSS_KEYS`)."""
    scfg, lcfg = cfg.ssl, cfg.loss
    if lcfg.kd is not None or lcfg.iou_loss != "jml":
        raise ValueError("ssl takes loss=ce, ce_bls, ce_jml or ce_jml_bls (a loss without loss.kd, with the JML)")
    return SSLLoss(
        ignore_index=cfg.dataset.ignore_index,
        ce_weight=lcfg.ce_weight,
        jml_weight=lcfg.jml_weight,
        bls=lcfg.bls,
        jml=lcfg.jml,
        **{k: scfg[k] for k in SSL_LOSS_KEYS},
    )


def build_ssl(cfg: DictConfig, model: nn.Module, unlabeled: Dataset | None, make_loader, device) -> SemiSupervised:
    """The SSL parts; ``make_loader(dataset, batch_size)`` builds a training loader like the labeled one."""
    scfg = cfg.ssl
    if cfg.trainer.accumulate_steps != 1:
        raise ValueError("ssl does not support trainer.accumulate_steps > 1; set trainer.accumulate_steps=1")
    loss = build_loss(cfg).to(device)
    teacher, loader = None, None
    if scfg.eta_u > 0 or scfg.theta_u > 0:
        if unlabeled is None or len(unlabeled) == 0:
            raise ValueError("ssl needs unlabeled images: set dataset.labeled to fewer images than the training set")
        teacher = EMATeacher(model, scfg.ema_decay, scfg.ema_warmup).to(device)
        loader = make_loader(unlabeled, scfg.unlabeled_batch_size)
    return SemiSupervised(scfg, loss, teacher, loader, list(cfg.dataset.mean), list(cfg.dataset.std))


def step_generator(seed: int, iteration: int, rank: int) -> torch.Generator:
    """The generator of one step's strong view and CutMix draws: a pure function of seed, iteration and rank."""
    return torch.Generator().manual_seed(derive_seed(seed, SSL_STEP, iteration, rank))


def ssl_terms(
    ssl: SemiSupervised,
    forward,
    labeled: tuple[torch.Tensor, torch.Tensor],
    image_u: torch.Tensor | None,
    generator: torch.Generator,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The loss terms of one SSL step (``total`` included); ``forward(images)`` is the student's float32 outputs."""
    image_s, label_s = labeled
    if not ssl.uses_unlabeled:
        out = forward(image_s)["out"]
        with full_float32_matmuls():
            return ssl.loss(out, label_s, out[:0], out[:0].detach())
    probs = ssl.teacher.predict(image_u, autocast_dtype).softmax(1)
    strong = strong_intensity_augment(image_u, ssl.mean, ssl.std, generator, ssl.cfg.strong_ops)
    valid, target = None, probs
    if ssl.cfg.cutmix:
        mixed = adaptive_cutmix(strong, probs, image_s, label_s, generator, ignore_index=ssl.loss.ignore_index)
        strong, target, valid = mixed.images, mixed.probs, mixed.valid
    out = forward(torch.cat([image_s, strong]))["out"]
    b = image_s.shape[0]
    with full_float32_matmuls():  # TF32 off for the loss sums (trainer.tf32)
        terms = ssl.loss(out[:b], label_s, out[b:], target, valid)
    terms["u_kept"] = ssl.loss.unlabeled_keep(target, valid).float().mean()
    return terms
