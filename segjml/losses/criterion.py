"""The loss mix of the paper: cross-entropy + Jaccard metric loss, on labels, smoothed labels and a teacher.

``L = lambda_CE * (w_main * CE_main + w_aux * CE_aux) + lambda_JML * JML_main`` (paper eq. 10, recipe in
``docs/losses.md``), where without a teacher ``CE_main = CE(S, L)``, ``CE_aux = CE(S_aux, L)`` and
``JML_main = JML(S, L)``, and with a teacher (eq. 11-13) ``JML_main = nu_L * JML(S, L) + nu_T * JML(S, T)`` and,
by ``loss.kd.mix``,

- ``authors`` (the authors' released code): ``CE_main = mu_L * CE(S, L) + mu_T * KL_tau(S, T)`` and
  ``CE_aux = mu_L * CE(S_aux, L) + mu_T * KL_tau(S_aux, T_aux)``, where ``KL_tau`` is the KL divergence between the
  teacher's and the student's softmax at temperature ``tau``, times ``tau^2``, and ``T_aux`` comes from the
  teacher's auxiliary head;
- ``label_aux``: ``CE_main = mu_L * CE(S, L) + mu_T * CE(S, T)`` (student at temperature 1) and
  ``CE_aux = CE(S_aux, L)``.

``L`` is the hard label or its boundary-smoothed version; ``T`` the teacher's probabilities at temperature ``tau``,
computed once per step and shared by the CE / KL and JML teacher terms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from segjml.labels.soft_labels import boundary_label_smoothing, distillation_targets
from segjml.losses.cross_entropy import CrossEntropyLoss
from segjml.losses.jaccard import JaccardMetricLoss
from segjml.losses.lovasz import LovaszSoftmaxLoss
from segjml.losses.schema import CriterionConfig, check_criterion
from segjml.losses.validation import autocast_off, upcast
from segjml.utils.schema import checked


class SegmentationCriterion(nn.Module):
    """Weighted mix of CE and an IoU loss; ``forward`` returns a dict of named (unweighted) terms and ``total``.

    The arguments are the ``loss`` node, checked by its schema (:class:`~segjml.losses.schema.CriterionConfig`): a
    one-line ``ValueError`` names the config key of a refused value.

    Args:
        num_classes: ``C``.
        ignore_index: ignored label value.
        ce_weight: ``lambda_CE`` (0.25 with JML, 1.0 for CE-only baselines).
        jml_weight: ``lambda_JML`` (0.75 with JML, 0.0 for CE-only baselines); 0 with ``iou_loss: lovasz``.
        lovasz_weight: weight of the Lovasz-Softmax term, used (only) with ``iou_loss: lovasz``.
        main_weight, aux_weight: CE weights of the main and auxiliary heads (0.5 / 0.5).
        iou_loss: ``jml`` (:class:`JaccardMetricLoss`, the variant set in ``jml``, weighted by ``jml_weight``) or
            ``lovasz`` (:class:`LovaszSoftmaxLoss`, weighted by ``lovasz_weight``).
        jml: options of :class:`JaccardMetricLoss` (:class:`~segjml.losses.schema.JMLConfig`), or ``None`` for its
            defaults.
        bls: ``{kernel_size, eps, strict_ignore}`` for boundary label smoothing of the label target
            (``kernel_size: inf`` = plain label smoothing), or ``None``.
        kd: ``{temperature, ce_label, ce_teacher, jml_label, jml_teacher, active_classes, mix}`` (mu_L, mu_T, nu_L,
            nu_T; JML(S, T) uses ``active_classes``, ``LABEL`` in the paper; ``mix`` is ``authors`` or
            ``label_aux``, see the module docstring), or ``None`` without a teacher.
        unknown: no other key is taken; one given (``+loss.foo=1``) is refused with the keys the schema takes.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        ce_weight: float = 1.0,
        jml_weight: float = 0.0,
        main_weight: float = 0.5,
        aux_weight: float = 0.5,
        iou_loss: str = "jml",
        jml: Mapping[str, Any] | None = None,
        bls: Mapping[str, Any] | None = None,
        kd: Mapping[str, Any] | None = None,
        lovasz_weight: float = 0.0,
        **unknown: Any,
    ) -> None:
        super().__init__()
        # the schema of the `loss` node checks every option before any loss is built, and names it by its config key
        given = {
            "num_classes": num_classes,
            "ignore_index": ignore_index,
            "ce_weight": ce_weight,
            "jml_weight": jml_weight,
            "lovasz_weight": lovasz_weight,
            "main_weight": main_weight,
            "aux_weight": aux_weight,
            "iou_loss": iou_loss,
            "jml": jml,
            "bls": bls,
            "kd": kd,
            **unknown,  # a key added with `+loss.<key>=...`: refused by the schema with the keys it takes
        }
        options = checked(CriterionConfig, given, "loss")
        check_criterion(options)
        self.num_classes, self.ignore_index = options["num_classes"], options["ignore_index"]
        self.ce_weight, self.jml_weight = options["ce_weight"], options["jml_weight"]
        self.lovasz_weight = options["lovasz_weight"]
        self.main_weight, self.aux_weight = options["main_weight"], options["aux_weight"]
        self.bls: dict[str, Any] | None = options["bls"]  # {kernel_size, eps, strict_ignore}
        self.kd: dict[str, Any] | None = options["kd"]  # {temperature, ce_label, ..., active_classes, mix}
        self.ce = CrossEntropyLoss(self.ignore_index)
        jml_args = {"ignore_index": self.ignore_index, **(options["jml"] or {})}
        if options["iou_loss"] == "lovasz":
            self.iou, self.iou_weight = LovaszSoftmaxLoss(self.ignore_index), self.lovasz_weight
        else:
            self.iou, self.iou_weight = JaccardMetricLoss(**jml_args), self.jml_weight
        self.iou_teacher = None
        if self.kd is not None:
            self.iou_teacher = JaccardMetricLoss(**{**jml_args, "active_classes": self.kd["active_classes"]})

    @property
    def needs_teacher(self) -> bool:
        return self.kd is not None

    @property
    def needs_teacher_aux(self) -> bool:
        """Whether the teacher must also give its auxiliary head's logits (``aux``): ``loss.kd.mix=authors``."""
        return self.kd is not None and self.kd["mix"] == "authors" and self.aux_weight > 0

    def _kl_teacher(self, logits: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``tau^2 * KL(probs || softmax(logits / tau))`` summed over classes, averaged over the kept pixels.

        Computed as ``tau^2 * (CE(logits / tau, probs) - H(probs))``: the CE term is the fused soft cross-entropy,
        the teacher's entropy takes no gradient.
        """
        tau = self.kd["temperature"]
        cross = self.ce(logits if tau == 1 else logits / tau, probs, keep)
        with torch.no_grad():
            neg_entropy = torch.special.xlogy(probs, probs).sum(1)
            neg_entropy = (neg_entropy * keep).sum() / keep.sum().clamp_min(1)
        return tau * tau * (cross + neg_entropy.to(cross.dtype))

    def _teacher_output(self, teacher: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in teacher:
            raise ValueError(
                "loss.kd.mix=authors distils the auxiliary head from the teacher's auxiliary head, but the teacher "
                "gave no 'aux' logits; use a teacher with an auxiliary head, or set loss.kd.mix=label_aux or "
                "loss.aux_weight=0"
            )
        return teacher[key]

    @autocast_off
    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        teacher_logits: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Args:
        outputs: model outputs, ``out`` (B, C, H, W) and optionally ``aux``.
        target: hard labels ``(B, H, W)``.
        teacher_logits: when distilling, the teacher's outputs ``{"out": (B, C, h, w), "aux": (B, C, h, w)}``
            (``aux`` needed with :attr:`needs_teacher_aux`), or its main-head logits alone.
        """
        main = upcast(outputs["out"])
        label = target
        if self.bls is not None:
            label = boundary_label_smoothing(target, self.num_classes, ignore_index=self.ignore_index, **self.bls)
        terms: dict[str, torch.Tensor] = {"ce": self.ce(main, label)}
        ce_main = terms["ce"]
        has_aux = "aux" in outputs and self.aux_weight > 0
        authors = self.kd is not None and self.kd["mix"] == "authors"
        if self.kd is not None:
            if teacher_logits is None:
                raise ValueError("this loss distils from a teacher (loss.kd is set) but no teacher logits were given")
            teacher = teacher_logits if isinstance(teacher_logits, Mapping) else {"out": teacher_logits}
            if authors and self.aux_weight > 0 and "aux" not in outputs:
                raise ValueError(
                    "loss.kd.mix=authors distils the student's auxiliary head, but the student gave no 'aux' "
                    "logits; use a model with an auxiliary head, or set loss.kd.mix=label_aux or loss.aux_weight=0"
                )
            # the teacher's probabilities at temperature tau: computed once, shared by the CE / KL and JML terms
            soft = distillation_targets(upcast(teacher["out"]), target.shape[-2:], self.kd["temperature"])
            keep = target != self.ignore_index  # the teacher is only asked about pixels that have a label
            name = "kl_teacher" if authors else "ce_teacher"
            terms[name] = self._kl_teacher(main, soft, keep) if authors else self.ce(main, soft, keep)
            ce_main = self.kd["ce_label"] * ce_main + self.kd["ce_teacher"] * terms[name]
        ce_total = ce_main
        if has_aux:
            aux = upcast(outputs["aux"])
            terms["ce_aux"] = self.ce(aux, label)
            ce_aux = terms["ce_aux"]
            if authors:
                aux_logits = self._teacher_output(teacher, "aux")
                soft_aux = distillation_targets(upcast(aux_logits), target.shape[-2:], self.kd["temperature"])
                terms["kl_aux_teacher"] = self._kl_teacher(aux, soft_aux, keep)
                del soft_aux
                ce_aux = self.kd["ce_label"] * ce_aux + self.kd["ce_teacher"] * terms["kl_aux_teacher"]
            ce_total = self.main_weight * ce_main + self.aux_weight * ce_aux
        total = self.ce_weight * ce_total
        if self.iou_weight:
            terms["iou"] = self.iou(main, label)
            iou_main = terms["iou"]
            if self.kd is not None:
                terms["iou_teacher"] = self.iou_teacher(main, soft, keep)
                iou_main = self.kd["jml_label"] * iou_main + self.kd["jml_teacher"] * terms["iou_teacher"]
            total = total + self.iou_weight * iou_main
        terms["total"] = total
        return terms
