"""The typed options of the loss (``loss``, :class:`~segjml.losses.SegmentationCriterion`), of its Jaccard metric
loss (``loss.jml``), boundary label smoothing (``loss.bls``) and distillation (``loss.kd``) nodes, and of
semi-supervised training (``ssl``, :class:`~segjml.ssl.SSLLoss`).

Hydra reads them when it composes the config (:func:`register`; ``configs/loss/common/criterion.yaml`` and
``configs/ssl/augseg.yaml`` name them first in their defaults lists): a value of the wrong type, a choice that is not
one of the Enum's members and an unknown key are refused there. The losses run the same schemas on their keyword
arguments (:func:`segjml.utils.schema.checked`), with the field checks a type cannot say (weights >= 0, ``eps`` in
[0, 1], an odd kernel size) and the rules between fields (:func:`check_criterion`). ``docs/errors.md`` lists the
messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum
from numbers import Real
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from segjml.labels.boundary import check_kernel_size
from segjml.labels.soft_labels import check_smoothing_eps, check_temperature
from segjml.utils.schema import checks


def check_weight(value: Any, name: str) -> None:
    """The loss weight ``name`` (its config key) must be a real number >= 0; one-line ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
        raise ValueError(f"{name}={value!r} is not a number; loss weights must be >= 0")
    if value < 0:
        raise ValueError(f"{name}={value} is negative; loss weights must be >= 0")


def weight(default: float) -> Any:
    return checks(check_weight, default)


class IoULoss(str, Enum):
    jml = "jml"  # JaccardMetricLoss, options in loss.jml, weighted by loss.jml_weight
    lovasz = "lovasz"  # LovaszSoftmaxLoss, weighted by loss.lovasz_weight


class JMLVariant(str, Enum):
    jml1 = "jml1"  # eq. 7
    jml2 = "jml2"  # eq. 8
    sjl_l1 = "sjl_l1"  # soft Jaccard with L1 norms, eq. 2
    sjl_l2 = "sjl_l2"  # soft Jaccard with squared L2 norms, eq. 3


class ActiveClasses(str, Enum):
    PRESENT = "PRESENT"
    ALL = "ALL"
    LABEL = "LABEL"
    PROB = "PROB"
    BOTH = "BOTH"


class ClassWeightsMode(str, Enum):
    scaled = "scaled"  # each class loss times its weight, plain mean over the active classes
    normalized = "normalized"  # the weighted mean


class KDMix(str, Enum):
    """authors: the aux head also distils from the teacher's aux head, KL at the temperature; label_aux: the aux
    head takes the label CE only"""

    authors = "authors"
    label_aux = "label_aux"


class PseudoLabel(str, Enum):
    """soft: the teacher's probabilities; hard: their argmax (AugSeg)"""

    soft = "soft"
    hard = "hard"


class MeanOver(str, Enum):
    """kept: CE_U averages over the kept unlabeled pixels; all: over every unlabeled pixel, dropped ones counting 0
    (AugSeg)"""

    kept = "kept"
    all = "all"


class Evaluate(str, Enum):
    """teacher: the EMA teacher, as AugSeg reports; student: the student"""

    teacher = "teacher"
    student = "student"


@dataclass
class JMLConfig:
    """``loss.jml``: the options of :class:`~segjml.losses.JaccardMetricLoss`."""

    variant: JMLVariant = JMLVariant.jml1
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    log_loss: bool = False
    smooth: float = 1.0
    active_classes_hard: ActiveClasses = ActiveClasses.PRESENT
    active_classes_soft: ActiveClasses = ActiveClasses.ALL
    threshold: float = 0.01
    miou_d: float = 1.0
    miou_i: float = 0.0
    miou_c: float = 0.0
    sync_stats: bool = False
    class_weights: list[float] | None = None
    class_weights_mode: ClassWeightsMode = ClassWeightsMode.scaled


@dataclass
class BLSConfig:
    """``loss.bls``: boundary label smoothing of the label target (``kernel_size: inf``: plain label smoothing)."""

    kernel_size: float = checks(check_kernel_size, 3)
    eps: float = checks(check_smoothing_eps, 0.5)
    strict_ignore: bool = False


@dataclass
class KDConfig:
    """``loss.kd``: the distillation weights (mu_L, mu_T, nu_L, nu_T), temperature and mix (paper eq. 11-13)."""

    temperature: float = checks(check_temperature, 1.0)
    ce_label: float = weight(0.5)
    ce_teacher: float = weight(0.5)
    jml_label: float = weight(0.5)
    jml_teacher: float = weight(0.5)
    active_classes: ActiveClasses = ActiveClasses.LABEL
    mix: KDMix = KDMix.authors


@dataclass
class CriterionConfig:
    """``loss``: the arguments of :class:`~segjml.losses.SegmentationCriterion` (defaults as its signature's)."""

    _target_: str = "segjml.losses.SegmentationCriterion"
    num_classes: int = MISSING
    ignore_index: int = 255
    ce_weight: float = weight(1.0)
    jml_weight: float = weight(0.0)
    lovasz_weight: float = weight(0.0)
    main_weight: float = weight(0.5)
    aux_weight: float = weight(0.5)
    iou_loss: IoULoss = IoULoss.jml
    jml: JMLConfig | None = None
    bls: BLSConfig | None = None
    kd: KDConfig | None = None


def check_criterion(options: dict[str, Any]) -> None:
    """The rules between the fields of a checked :class:`CriterionConfig`: each IoU loss has its own weight (so a
    preset never weights one loss under the other's name), something is trained, Lovasz takes hard labels only."""
    lovasz = options["iou_loss"] == IoULoss.lovasz
    jml_weight, lovasz_weight = options["jml_weight"], options["lovasz_weight"]
    if lovasz and jml_weight != 0:
        raise ValueError(
            f"loss.jml_weight={jml_weight} weights the Jaccard metric loss, unused with "
            "loss.iou_loss=lovasz: weight the Lovasz-Softmax term with loss.lovasz_weight and set "
            "loss.jml_weight=0 (or use loss=lovasz)"
        )
    if not lovasz and lovasz_weight != 0:
        raise ValueError(
            f"loss.lovasz_weight={lovasz_weight} is only used with loss.iou_loss=lovasz; weight the "
            "Jaccard metric loss with loss.jml_weight"
        )
    iou_key, iou_name = ("lovasz_weight", "Lovasz-Softmax loss") if lovasz else ("jml_weight", "Jaccard metric loss")
    if options["ce_weight"] == 0 and options[iou_key] == 0:
        raise ValueError(
            f"loss.ce_weight and loss.{iou_key} are both 0: nothing would be trained; set "
            f"loss.ce_weight > 0 (cross-entropy) and/or loss.{iou_key} > 0 ({iou_name})"
        )
    if lovasz and (options["bls"] is not None or options["kd"] is not None):
        raise ValueError("loss.iou_loss=lovasz cannot take soft labels: remove loss.bls and loss.kd")


@dataclass
class SSLLossConfig:
    """The options of ``ssl`` that :class:`~segjml.ssl.SSLLoss` takes (paper eq. 62-64; defaults as its signature's,
    ``configs/ssl/augseg.yaml`` sets AugSeg's)."""

    eta_s: float = weight(0.5)
    eta_u: float = weight(0.5)
    theta_s: float = weight(0.5)
    theta_u: float = weight(0.5)
    confidence_threshold: float = checks(check_smoothing_eps, 0.0)  # a number in [0, 1], as eps
    pseudo_label: PseudoLabel = PseudoLabel.soft
    ce_u_mean_over: MeanOver = MeanOver.kept


@dataclass
class SSLConfig(SSLLossConfig):
    """``ssl``: the SSL loss's options and the rest of AugSeg's pipeline (``docs/ssl.md``)."""

    unlabeled_batch_size: int = 8
    ema_decay: float = 0.999
    ema_warmup: bool = True
    evaluate: Evaluate = Evaluate.teacher
    strong_ops: int = 3
    cutmix: bool = True


SSL_LOSS_KEYS = tuple(f.name for f in fields(SSLLossConfig))  # the ssl keys SSLLoss takes


def register(store: ConfigStore) -> None:
    """The schemas as the defaults-list entries ``loss/common/base_criterion`` and ``ssl/base_ssl``."""
    store.store(group="loss/common", name="base_criterion", node=CriterionConfig)
    store.store(group="ssl", name="base_ssl", node=SSLConfig)
