"""Streaming segmentation metrics: Acc, mIoU^D / mIoU^I / mIoU^C, ECE, boundary ECE, SCE, boundary SCE.

Definitions (``REFERENCE.md`` section 3), all reported in percent:
  - Acc: pixel accuracy over non-ignored pixels.
  - mIoU^D: IoU per class from the dataset-wide confusion matrix, averaged over classes present in the ground
    truth or the prediction.
  - mIoU^I / mIoU^C (Wang et al., NeurIPS 2023): IoU per image and class, over the classes that occur in the image
    (in its ground truth or prediction); averaged per image then over images (I), or per class over the images
    where it occurs then over classes (C).
  - ECE: top-label expected calibration error with ``n_bins`` equal-width bins,
    ``sum_b (n_b / N) |acc_b - conf_b|``.
  - SCE: static calibration error (Nixon et al. 2019), ``(1/K) sum_k sum_b (n_bk / N) |acc_bk - conf_bk|`` where
    pixels are binned by ``p_k`` and ``acc_bk`` is the share of the bin labelled ``k``. (The paper's footnote 2 says
    its first SCE code was wrong; this is the corrected definition.)
  - BECE / BSCE: the same over boundary pixels (``segjml.labels.boundary_map`` with ``boundary_kernel``).

All state is counts and sums, O(C^2 + C * n_bins), synchronised by torchmetrics with ``dist_reduce_fx="sum"``.
The SCE histogram only visits the (pixel, class) pairs with ``p_k >= 1 / n_bins`` (at most ``n_bins`` per pixel); the
first bin of every class follows from the per-class totals.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from segjml.labels.boundary import boundary_map


class SegmentationMetrics(Metric):
    """All segmentation metrics of the paper in one streaming object.

    Args:
        num_classes: ``C``.
        ignore_index: label value of ignored pixels.
        n_bins: calibration bins (10 as in the official code; torchmetrics defaults to 15).
        boundary_kernel: ``k`` of the boundary region of BECE / BSCE.
        tolerance: allowed deviation of ``probs.sum(1)`` from 1.

    ``update(probs, target)``: ``probs`` (B, C, H, W) softmax probabilities, ``target`` (B, H, W) class ids.
    ``compute()`` returns a dict of floats in percent plus ``iou_per_class`` (list, percent, NaN where a class
    never occurs).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self, num_classes: int, ignore_index: int = 255, n_bins: int = 10, boundary_kernel: int = 3,
        tolerance: float = 1e-3, **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.ignore_index, self.n_bins = num_classes, ignore_index, n_bins
        self.boundary_kernel, self.tolerance = boundary_kernel, tolerance
        c = num_classes
        self.add_state("confmat", torch.zeros(c, c, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("image_iou_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("image_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("class_iou_sum", torch.zeros(c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("class_image_count", torch.zeros(c, dtype=torch.long), dist_reduce_fx="sum")
        # top-label calibration: [region (all, boundary), bin, (count, sum conf, sum correct)]
        self.add_state("top_hist", torch.zeros(2, n_bins, 3, dtype=torch.float64), dist_reduce_fx="sum")
        # static calibration: [region, class, bin, (count, sum p_k, count label == k)]
        self.add_state("class_hist", torch.zeros(2, c, n_bins, 3, dtype=torch.float64), dist_reduce_fx="sum")

    def _check(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        if probs.ndim != 4 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must be (B, {self.num_classes}, H, W), got {tuple(probs.shape)}")
        if tuple(target.shape) != (probs.shape[0], *probs.shape[2:]):
            raise ValueError(f"target shape {tuple(target.shape)} does not match probs {tuple(probs.shape)}")
        if target.is_floating_point():
            raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= self.num_classes))
        if bad.any():
            raise ValueError(f"target holds class id {int(target[bad][0])} outside [0, {self.num_classes}) "
                             f"that is not ignore_index={self.ignore_index}")
        total = probs.sum(1)
        if probs.amin() < 0 or (total - 1).abs().amax() > self.tolerance:
            raise ValueError("probs are not a distribution over classes (negative, or not summing to 1 over dim 1): "
                             "pass softmax(logits, dim=1)")

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self._check(probs, target)
        b, c = probs.shape[:2]
        probs = probs.float()
        keep = target != self.ignore_index
        conf, pred = probs.max(1)
        boundary = boundary_map(target, self.boundary_kernel, self.ignore_index)

        # Confusion matrix per image (B, C, C): rows = ground truth, columns = prediction.
        image = torch.arange(b, device=target.device).view(b, 1, 1).expand_as(target)
        flat = (image * c + target.clamp(0, c - 1)) * c + pred
        per_image = torch.bincount(flat[keep], minlength=b * c * c).view(b, c, c)
        self.confmat += per_image.sum(0)
        inter = per_image.diagonal(dim1=1, dim2=2).double()
        union = per_image.sum(1).double() + per_image.sum(2).double() - inter
        occurs = union > 0
        iou = torch.where(occurs, inter / union.clamp_min(1), torch.zeros_like(union))
        n_occ = occurs.sum(1)
        has = n_occ > 0
        self.image_iou_sum += (iou.sum(1)[has] / n_occ[has]).sum()
        self.image_count += has.sum()
        self.class_iou_sum += iou.sum(0)
        self.class_image_count += occurs.sum(0)

        # Top-label calibration.
        nb = self.n_bins
        conf_bin = (conf * nb).long().clamp_(0, nb - 1)
        correct = (pred == target).double()
        for region, mask in enumerate((keep, boundary)):
            bins = conf_bin[mask]
            self.top_hist[region, :, 0] += torch.bincount(bins, minlength=nb).double()
            self.top_hist[region, :, 1] += torch.bincount(bins, weights=conf[mask].double(), minlength=nb)
            self.top_hist[region, :, 2] += torch.bincount(bins, weights=correct[mask], minlength=nb)

        # Static calibration: only (pixel, class) pairs with p_k >= 1 / n_bins leave the first bin.
        label = target.clamp(0, c - 1)
        for region, mask in enumerate((keep, boundary)):
            maskf = mask.to(probs.dtype)
            n = maskf.sum().double()
            p_total = torch.einsum("bchw,bhw->c", probs, maskf).double()
            y_total = torch.bincount(label[mask], minlength=c).double()
            high = (probs >= 1.0 / nb) & mask[:, None]
            bi, ci, hi, wi = high.nonzero(as_tuple=True)
            p = probs[bi, ci, hi, wi]
            pix_bin = (p * nb).long().clamp_(0, nb - 1)
            idx = ci * nb + pix_bin
            hist = torch.stack([
                torch.bincount(idx, minlength=c * nb).double(),
                torch.bincount(idx, weights=p.double(), minlength=c * nb),
                torch.bincount(idx, weights=(label[bi, hi, wi] == ci).double(), minlength=c * nb),
            ], dim=-1).view(c, nb, 3)
            first = torch.stack([n - hist[:, :, 0].sum(1), p_total - hist[:, :, 1].sum(1),
                                 y_total - hist[:, :, 2].sum(1)], dim=-1)
            hist[:, 0] += first  # pairs below 1 / n_bins all fall in bin 0
            self.class_hist[region] += hist

    def compute(self) -> dict:
        cm = self.confmat.double()
        inter = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - inter
        present = union > 0
        iou = torch.where(present, inter / union.clamp_min(1), torch.full_like(union, float("nan")))
        total = cm.sum()
        out = {
            "acc": _pct(inter.sum() / total if total > 0 else total * 0),
            "miou": _pct(iou[present].mean() if present.any() else union.new_zeros(())),
            "miou_i": _pct(self.image_iou_sum / self.image_count.clamp_min(1)),
        }
        seen = self.class_image_count > 0
        per_class = self.class_iou_sum[seen] / self.class_image_count[seen]
        out["miou_c"] = _pct(per_class.mean() if seen.any() else per_class.new_zeros(()))
        for region, name in enumerate(("ece", "bece")):
            h = self.top_hist[region]
            n = h[:, 0].sum()
            out[name] = _pct((h[:, 2] - h[:, 1]).abs().sum() / n if n > 0 else n * 0)
        for region, name in enumerate(("sce", "bsce")):
            h = self.class_hist[region]
            n = h[0, :, 0].sum()  # every pixel is binned once per class
            value = (h[:, :, 2] - h[:, :, 1]).abs().sum() / (n * self.num_classes) if n > 0 else n * 0
            out[name] = _pct(value)
        out["iou_per_class"] = [float(v) * 100 for v in iou.tolist()]
        return out

    def reliability(self, boundary: bool = False) -> dict[str, torch.Tensor]:
        """Per-bin ``count``, mean ``confidence`` and ``accuracy`` of the top-label histogram (for diagrams)."""
        h = self.top_hist[int(boundary)]
        count = h[:, 0]
        return {"count": count, "confidence": h[:, 1] / count.clamp_min(1), "accuracy": h[:, 2] / count.clamp_min(1)}


def _pct(value: torch.Tensor) -> float:
    return float(value) * 100.0
