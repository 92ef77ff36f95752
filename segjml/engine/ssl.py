"""Semi-supervised training (JML-SSL, paper Appendix I) inside the trainer: the labeled split, the unlabeled stream,
the EMA teacher, and the forward / backward of one step.

A run is semi-supervised when ``cfg.ssl`` is set (``ssl=augseg``; ``docs/ssl.md``). ``dataset.labeled`` chooses the
labeled images (a count, a fraction or a split file; :func:`split_training_set`); the rest of the training set is
the unlabeled stream, whose labels are never read. One step (:func:`ssl_backward`):

1. a labeled batch and an unlabeled batch, both through the training pipeline (the weak view: scale, crop, flip);
2. the EMA teacher's probabilities on the weak unlabeled view;
3. the strong view: random intensity operations on the weak images (same geometry, so the teacher's probabilities
   stay aligned with it), then AugSeg's adaptive CutMix with the labeled batch;
4. one student forward on labeled + strong images together, the loss of eq. 62-64 (:class:`segjml.ssl.SSLLoss`),
   backward. After the optimizer step the trainer updates the teacher (:meth:`SemiSupervised.after_step`).

Every random draw of steps 3-4 comes from a generator seeded by ``(seed, iteration, rank)``, so a resumed run makes
the same draws. With ``eta_u = theta_u = 0`` (the supervised baseline of Tables 11 and 12) the unlabeled stream
and the teacher are not built at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset, Subset

from segjml.data.errors import DataError
from segjml.engine.distributed import full_float32_matmuls
from segjml.ssl import EMATeacher, SSLLoss, adaptive_cutmix, strong_intensity_augment
from segjml.ssl.splits import labeled_indices, read_split_file, split_size, unlabeled_indices

log = logging.getLogger(__name__)
EVALUATE = ("teacher", "student")
LOSS_KEYS = ("eta_s", "eta_u", "theta_s", "theta_u", "confidence_threshold", "pseudo_label", "ce_u_mean_over")


def _is_count_or_fraction(value) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    try:
        Fraction(str(value))
        return True
    except ValueError:
        return False


def _base(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The data set under any ``Subset`` wrappers and the base indices of ``dataset``'s samples."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def image_ids(dataset: Dataset) -> list[str]:
    """Each image's id (its file name without suffix), in index order; a data set without files numbers them."""
    base, indices = _base(dataset)
    samples = getattr(base, "samples", None)
    if samples is None:
        return [str(i) for i in indices]
    return [Path(samples[i][0]).stem for i in indices]


def _label(base: Dataset, index: int) -> np.ndarray:
    """One raw label map; folder data sets read the label file only (not the image)."""
    if hasattr(base, "samples") and hasattr(base, "read_raw_label"):
        path = Path(base.samples[index][1])
        return base.decode_label(base.read_raw_label(path), path)
    return np.asarray(base[index][1])


def class_presence(dataset: Dataset, num_classes: int, ignore_index: int) -> np.ndarray:
    """``(N, C)`` bool: which classes each image's label holds (reads every label once, without augmentation).

    This reads the labels of the images that end up unlabeled too, as any class-balanced split does; the published
    split files (``dataset.labeled=<file>``) need no labels."""
    base, indices = _base(dataset)
    presence = np.zeros((len(indices), num_classes), dtype=bool)
    for i, index in enumerate(indices):
        label = _label(base, index).reshape(-1)
        label = label[label != ignore_index]
        presence[i, np.unique(label[label < num_classes]).astype(np.int64)] = True
    return presence


def split_training_set(dcfg: DictConfig, raw_train: Dataset) -> tuple[list[int], list[int]]:
    """Labeled and unlabeled image indices of the training set for ``dataset.labeled``.

    ``dataset.labeled``: a count (``92``), a fraction (``0.05`` or ``"1/16"``: ``ceil(fraction * N)`` images), or the
    path of a split file (one image id per line, as the published VOC / Cityscapes lists). A count or fraction draws a
    class-balanced split, deterministic for ``dataset.labeled_seed`` (``segjml.ssl.splits.labeled_indices``).
    ``raw_train`` is the training set without its pipeline (labels are read for the balance).
    """
    labeled = dcfg.labeled
    n = len(raw_train)
    if _is_count_or_fraction(labeled):
        count = split_size(n, labeled)
        presence = class_presence(raw_train, dcfg.num_classes, dcfg.ignore_index)
        lab = labeled_indices(n, count, seed=int(dcfg.get("labeled_seed", 0)), class_presence=presence)
    else:
        path = Path(str(labeled))
        if not path.is_file():
            raise DataError(
                f"dataset.labeled={labeled}: no such split file; get the published lists (docs/ssl.md) or give a "
                "count (92) or a fraction (1/16)"
            )
        lab = read_split_file(path, image_ids(raw_train))
    return sorted(lab), unlabeled_indices(n, lab)


def labeled_subset(dataset: Dataset, indices: list[int]) -> Subset:
    """``dataset``'s samples ``indices`` as one ``Subset`` of the base data set (nested subsets are flattened, so
    ``SeededSamples`` finds the pipeline it seeds)."""
    base, base_indices = _base(dataset)
    subset = Subset(base, [base_indices[i] for i in indices])
    subset.class_names = getattr(base, "class_names", None)
    return subset


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
    """eq. 64 from ``loss`` (``ce_weight`` = lambda_CE, ``jml_weight`` = lambda_JML, ``bls``, ``jml``) and ``ssl``."""
    scfg, lcfg = cfg.ssl, cfg.loss
    if lcfg.get("kd") is not None or lcfg.get("iou_loss", "jml") != "jml":
        raise ValueError("ssl takes loss=ce, ce_bls, ce_jml or ce_jml_bls (a loss without loss.kd, with the JML)")
    plain = OmegaConf.to_container(lcfg, resolve=True)
    return SSLLoss(
        ignore_index=cfg.dataset.ignore_index,
        ce_weight=plain["ce_weight"],
        jml_weight=plain["jml_weight"],
        bls=plain.get("bls"),
        jml=plain.get("jml"),
        **{k: scfg[k] for k in LOSS_KEYS},
    )


def build_ssl(cfg: DictConfig, model: nn.Module, unlabeled: Dataset | None, make_loader, device) -> SemiSupervised:
    """The SSL parts; ``make_loader(dataset, batch_size)`` builds a training loader like the labeled one."""
    scfg = cfg.ssl
    if scfg.evaluate not in EVALUATE:
        raise ValueError(f"ssl.evaluate={scfg.evaluate} is not one of {', '.join(EVALUATE)}")
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
    return torch.Generator().manual_seed(((seed * 1_000_003 + iteration) * 65_537 + rank) % 2**63)


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
            total, terms = ssl.loss(out, label_s, out[:0], out[:0].detach())
        return {**terms, "total": total}
    probs = ssl.teacher.predict(image_u, autocast_dtype).softmax(1)
    strong = strong_intensity_augment(image_u, ssl.mean, ssl.std, generator, ssl.cfg.strong_ops)
    valid, target = None, probs
    if ssl.cfg.cutmix:
        mixed = adaptive_cutmix(strong, probs, image_s, label_s, generator, ignore_index=ssl.loss.ignore_index)
        strong, target, valid = mixed.images, mixed.probs, mixed.valid
    out = forward(torch.cat([image_s, strong]))["out"]
    b = image_s.shape[0]
    with full_float32_matmuls():  # TF32 off for the loss sums (trainer.tf32)
        total, terms = ssl.loss(out[:b], label_s, out[b:], target, valid)
    terms["u_kept"] = ssl.loss.unlabeled_keep(target, valid).float().mean()
    return {**terms, "total": total}
