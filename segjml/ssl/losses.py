"""The JML-SSL loss (paper Appendix I, eq. 62-64).

``L = lambda_CE * (eta_S * CE_S + eta_U * CE_U) + lambda_JML * (theta_S * JML_S + theta_U * JML_U)`` where

- ``CE_S = CE(H(A_s(x_s)), L)`` and ``JML_S = JML(H(A_s(x_s)), L)`` on the labeled images, ``L`` the hard label or,
  with ``bls``, its boundary-smoothed version (the "+BLS" row of Table 12);
- ``CE_U = CE(H(A_u(x_u)), T)`` and ``JML_U = JML(H(A_u(x_u)), T)`` on the (mixed) unlabeled images, ``T`` the EMA
  teacher's probabilities (``pseudo_label="soft"``) or their argmax (``"hard"``, optionally boundary-smoothed).

Unlabeled pixels whose target's max probability is below ``confidence_threshold`` do not count (AugSeg: 0.95 with
hard pseudo-labels). The CE and JML terms are segjml's :class:`~segjml.losses.CrossEntropyLoss` and
:class:`~segjml.losses.JaccardMetricLoss` (JML-1, smoothing 1, active classes ``PRESENT`` for hard targets and ``ALL``
for soft ones by default). Defaults: ``lambda_CE / lambda_JML = 0.25 / 0.75``, ``eta_S = eta_U = theta_S = theta_U =
0.5`` (the paper's values).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from segjml.labels.soft_labels import boundary_label_smoothing
from segjml.losses.cross_entropy import CrossEntropyLoss
from segjml.losses.jaccard import JaccardMetricLoss
from segjml.losses.schema import CriterionConfig, SSLLossConfig
from segjml.utils.schema import checked

TERMS = ("ce_s", "ce_u", "jml_s", "jml_u")


class SSLLoss(nn.Module):
    """CE + JML on labeled and unlabeled images, weighted as eq. 64.

    ``forward(student_logits_s, labels_s, student_logits_u, teacher_probs_u, valid_u=None)`` returns, as
    :class:`~segjml.losses.SegmentationCriterion` does, a dict of the unweighted terms ``ce_s``, ``ce_u``, ``jml_s``,
    ``jml_u`` (a term whose weight is 0 is neither computed nor returned) and their weighted sum ``total``. The
    options are checked by the schemas of the ``loss`` and ``ssl`` nodes (:mod:`segjml.losses.schema`).

    Args:
        ignore_index: ignored label value.
        ce_weight, jml_weight: ``lambda_CE``, ``lambda_JML`` (0.25 / 0.75).
        eta_s, eta_u: weights of ``CE_S`` and ``CE_U`` (eq. 62; 0.5 / 0.5).
        theta_s, theta_u: weights of ``JML_S`` and ``JML_U`` (eq. 63; 0.5 / 0.5).
        confidence_threshold: unlabeled pixels whose target max-probability is below it are dropped (0 keeps all;
            AugSeg uses 0.95).
        pseudo_label: ``soft`` (the teacher's probabilities are the target) or ``hard`` (their argmax).
        bls: ``{kernel_size, eps, strict_ignore}`` of boundary label smoothing for the labeled targets and, with
            ``pseudo_label="hard"``, the pseudo-labels; ``None`` for none.
        ce_u_mean_over: ``kept`` (``CE_U`` averages over the kept unlabeled pixels, as segjml's CE does) or ``all``
            (over all unlabeled pixels, dropped ones counting 0: AugSeg's normalisation).
        jml: keyword arguments of :class:`~segjml.losses.JaccardMetricLoss` (``ignore_index`` is set from above).
    """

    def __init__(
        self,
        ignore_index: int = 255,
        ce_weight: float = 0.25,
        jml_weight: float = 0.75,
        eta_s: float = 0.5,
        eta_u: float = 0.5,
        theta_s: float = 0.5,
        theta_u: float = 0.5,
        confidence_threshold: float = 0.0,
        pseudo_label: str = "soft",
        bls: Mapping[str, Any] | None = None,
        ce_u_mean_over: str = "kept",
        jml: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # lambda_CE, lambda_JML, BLS and the JML options come from `loss`, the others from `ssl`
        loss = {"ce_weight": ce_weight, "jml_weight": jml_weight, "bls": bls, "jml": jml}
        loss = checked(CriterionConfig, loss, "loss")
        ssl = {
            "eta_s": eta_s,
            "eta_u": eta_u,
            "theta_s": theta_s,
            "theta_u": theta_u,
            "confidence_threshold": confidence_threshold,
            "pseudo_label": pseudo_label,
            "ce_u_mean_over": ce_u_mean_over,
        }
        ssl = checked(SSLLossConfig, ssl, "ssl")
        # the weight of each term in the total (eq. 64 expanded)
        self.term_weights = {
            "ce_s": loss["ce_weight"] * ssl["eta_s"],
            "ce_u": loss["ce_weight"] * ssl["eta_u"],
            "jml_s": loss["jml_weight"] * ssl["theta_s"],
            "jml_u": loss["jml_weight"] * ssl["theta_u"],
        }
        if not any(self.term_weights.values()):
            raise ValueError("every SSL loss term has weight 0: nothing would be trained; set the loss weights > 0")
        self.bls = loss["bls"]
        self.ignore_index, self.confidence_threshold = ignore_index, ssl["confidence_threshold"]
        self.pseudo_label, self.ce_u_mean_over = ssl["pseudo_label"], ssl["ce_u_mean_over"]
        self.ce = CrossEntropyLoss(ignore_index)
        self.jml = JaccardMetricLoss(**{"ignore_index": ignore_index, **(loss["jml"] or {})})

    def _smooth(self, labels: torch.Tensor, num_classes: int):
        if self.bls is None:
            return labels
        return boundary_label_smoothing(labels, num_classes, ignore_index=self.ignore_index, **self.bls)

    def unlabeled_keep(self, teacher_probs_u: torch.Tensor, valid_u: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, H, W)`` bool: the unlabeled pixels that count, i.e. valid, with a target (non-zero row), and with
        ``max_c T >= confidence_threshold``. Its mean is the kept ratio AugSeg logs."""
        with torch.no_grad():
            probs = teacher_probs_u.detach()
            keep = probs.sum(1) > 0
            if valid_u is not None:
                keep = keep & valid_u.bool()
            if self.confidence_threshold > 0:
                keep = keep & (probs.amax(1) >= self.confidence_threshold)
        return keep

    def forward(
        self,
        student_logits_s: torch.Tensor,
        labels_s: torch.Tensor,
        student_logits_u: torch.Tensor,
        teacher_probs_u: torch.Tensor,
        valid_u: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Args:
        student_logits_s: ``(B_s, C, H, W)`` the student's main-head logits on the labeled images.
        labels_s: ``(B_s, H, W)`` int64 labels, ``ignore_index`` where ignored.
        student_logits_u: ``(B_u, C, H, W)`` the student's main-head logits on the (mixed, strong) unlabeled images.
        teacher_probs_u: ``(B_u, C, H, W)`` their target distribution (the teacher's probabilities, one-hot rows on
            pasted labeled pixels, zero rows where unknown); it takes no gradient.
        valid_u: optional ``(B_u, H, W)`` bool mask of the unlabeled pixels that may count.
        """
        c = student_logits_s.shape[1]
        terms: dict[str, torch.Tensor] = {}
        w = self.term_weights
        if w["ce_s"] or w["jml_s"]:
            target_s = self._smooth(labels_s, c)
            if w["ce_s"]:
                terms["ce_s"] = self.ce(student_logits_s, target_s)
            if w["jml_s"]:
                terms["jml_s"] = self.jml(student_logits_s, target_s)
        if w["ce_u"] or w["jml_u"]:
            probs = teacher_probs_u.detach().float()
            keep = self.unlabeled_keep(probs, valid_u)
            if self.pseudo_label == "soft":
                target_u = probs
            else:
                # BLS sees the whole pseudo-label map (pixels with a target); the confidence threshold only masks
                # the loss, so a boundary is smoothed even where the teacher's confidence dips along it
                known = probs.sum(1) > 0 if valid_u is None else (probs.sum(1) > 0) & valid_u.bool()
                target_u = self._smooth(torch.where(known, probs.argmax(1), self.ignore_index), c)
            if w["ce_u"]:
                ce_u = self.ce(student_logits_u, target_u, keep)
                if self.ce_u_mean_over == "all":  # dropped pixels count as 0 in the mean (AugSeg)
                    ce_u = ce_u * keep.float().mean()
                terms["ce_u"] = ce_u
            if w["jml_u"]:
                terms["jml_u"] = self.jml(student_logits_u, target_u, keep)
        terms["total"] = sum(w[name] * value for name, value in terms.items())
        return terms
