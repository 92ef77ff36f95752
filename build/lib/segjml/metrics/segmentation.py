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
        b, c = probs.shape[:2]
        # per-pixel sums as one batched matrix product (much faster than a strided reduction over dim 1)
        total = torch.bmm(probs.new_ones(b, 1, c), probs.reshape(b, c, -1))
        if probs.amin() < 0 or (total - 1).abs().amax() > self.tolerance:
            raise ValueError("probs are not a distribution over classes (negative, or not summing to 1 over dim 1): "
                             "pass softmax(logits, dim=1)")

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        self._check(probs, target)
        probs = probs.float().contiguous()
        b, c, h, w = probs.shape
        hw, nb = h * w, self.n_bins
        i32 = torch.int32
        keep = target != self.ignore_index
        boundary = boundary_map(target, self.boundary_kernel, self.ignore_index)
        # Region of every pixel: 0 kept and not boundary, 1 boundary, 2 ignored. Histograms get a third row for the
        # ignored pixels that is dropped, which avoids boolean indexing (a hidden nonzero) of per-pixel tensors.
        region = torch.where(keep, boundary.to(i32), 2).view(b, hw)
        label = target.clamp(0, c - 1).to(i32).view(b, hw)
        conf = probs.amax(1).view(b, hw)

        # Pairs (pixel, class) with p >= 1 / n_bins, image by image: at most n_bins per pixel. They hold every pixel's
        # top class whenever its confidence is >= 1 / n_bins, and they are all the static-calibration histogram needs
        # beyond bin 0 (bin 0 follows from per-class totals).
        pred = torch.empty(b, hw, dtype=torch.long, device=probs.device)
        pair_count = torch.zeros(3 * c * nb, dtype=torch.float64, device=probs.device)
        pair_p_sum = torch.zeros_like(pair_count)
        for i in range(b):
            x = probs[i].view(c, hw)
            cls, pix, p = _high_pairs(x, 1.0 / nb)
            top = torch.where(p == conf[i][pix], pix, hw)  # other pairs go to a spare slot
            pred[i] = torch.zeros(hw + 1, dtype=torch.long, device=probs.device).scatter_(0, top, cls)[:hw]
            idx = (region[i][pix] * c + cls) * nb + (p * nb).to(i32).clamp_(max=nb - 1)
            pair_count += torch.bincount(idx, minlength=3 * c * nb)
            pair_p_sum += torch.bincount(idx, weights=p.double(), minlength=3 * c * nb)
        low = conf < 1.0 / nb  # possible only when C > n_bins: take the argmax of those few pixels directly
        if c > nb and low.any():
            bi, pi = low.nonzero(as_tuple=True)
            pred[bi, pi] = probs.view(b, c, hw)[bi, :, pi].argmax(1)
        pred = pred.to(i32)

        # Confusion matrix per image (B, C, C), rows = ground truth, columns = prediction; ignored pixels are
        # counted in a spare slot.
        offset = torch.arange(b, device=probs.device, dtype=i32).view(b, 1) * (c * c)
        idx = torch.where(region < 2, (label * c + pred).add_(offset), b * c * c)
        per_image = torch.bincount(idx.view(-1), minlength=b * c * c + 1)[:-1].view(b, c, c)
        self.confmat += per_image.sum(0)
        inter = per_image.diagonal(dim1=1, dim2=2).double()
        union = per_image.sum(1).double() + per_image.sum(2).double() - inter
        occurs = union > 0
        iou = torch.where(occurs, inter / union.clamp_min(1), torch.zeros_like(union))
        n_occ = occurs.sum(1)
        self.image_iou_sum += (iou.sum(1) / n_occ.clamp_min(1)).sum()
        self.image_count += (n_occ > 0).sum()
        self.class_iou_sum += iou.sum(0)
        self.class_image_count += occurs.sum(0)

        # Top-label calibration per region: count, sum of confidences, number correct.
        idx = (region * nb).add_((conf * nb).to(i32).clamp_(max=nb - 1)).view(-1)
        top_hist = torch.stack([
            torch.bincount(idx, minlength=3 * nb).double(),
            torch.bincount(idx, weights=conf.view(-1).double(), minlength=3 * nb),
            torch.bincount(idx, weights=(pred == label).view(-1).double(), minlength=3 * nb),
        ], dim=-1).view(3, nb, 3)
        self.top_hist[0] += top_hist[0] + top_hist[1]
        self.top_hist[1] += top_hist[1]

        # Static calibration per region, class and bin: count, sum of p_k, number labelled k.
        count, p_sum = pair_count.view(3, c, nb), pair_p_sum.view(3, c, nb)
        p_label = probs.view(b, c, hw).gather(1, label.long().view(b, 1, hw)).view(b, hw)
        idx = ((region * c).add_(label) * nb).add_((p_label * nb).to(i32).clamp_(max=nb - 1)).view(-1)
        labelled = torch.bincount(idx, minlength=3 * c * nb).double().view(3, c, nb)  # every bin, bin 0 included
        masks = torch.stack([region == 0, region == 1], dim=-1).to(probs.dtype)  # (B, HW, 2)
        p_total = torch.bmm(probs.view(b, c, hw), masks).sum(0).T.double()  # (2, C)
        n_pix = masks.sum((0, 1)).double()  # (2,)
        hist = torch.stack([count[:2], p_sum[:2], labelled[:2]], dim=-1)  # (2, C, nb, 3)
        hist[:, :, 0, 0] += n_pix[:, None] - count[:2].sum(-1)
        hist[:, :, 0, 1] += p_total - p_sum[:2].sum(-1)
        self.class_hist[0] += hist[0] + hist[1]
        self.class_hist[1] += hist[1]

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


def _nonzero_sparse(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of a sparse bool tensor: scan it as int64 words first (8x fewer elements),
    then look only inside the words that hold a True. Same result as ``mask.reshape(-1).nonzero()``."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(torch.int64)
    hit = words.nonzero().squeeze(1)
    row, col = words[hit].view(torch.uint8).view(-1, 8).nonzero(as_tuple=True)
    return hit[row] * 8 + col


def _high_pairs(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(class, pixel, p)`` of every entry of ``x`` (C, N) with ``p >= threshold``."""
    c, n = x.shape
    mask = x >= threshold
    if c * threshold > 4:  # at most 1 / threshold pairs per pixel among c classes: sparse
        flat = _nonzero_sparse(mask)
        cls = flat // n
        return cls, flat - cls * n, x.view(-1)[flat]
    cls, pix = mask.nonzero(as_tuple=True)
    return cls, pix, x[cls, pix]


def _pct(value: torch.Tensor) -> float:
    return float(value) * 100.0
