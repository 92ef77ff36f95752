"""The augmentations of JML-SSL's unlabeled branch, as in AugSeg (Zhao et al., CVPR 2023; paper Appendix I, ``A_u``).

- :func:`strong_intensity_augment`: AugSeg's random intensity-based augmentation. Each image gets ``k`` operations
  drawn with replacement from eleven (identity, autocontrast, equalize, Gaussian blur, contrast, brightness, colour,
  sharpness, posterize, solarize, hue), ``k`` uniform in ``1..num_ops`` (AugSeg: ``num_ops=3``), each with a random
  strength. Intensity only: the strong view stays pixel-aligned with the weak view the teacher saw.
- :func:`adaptive_cutmix`: AugSeg's adaptive label-injecting CutMix. Unlabeled image ``j`` first receives, with
  probability ``1 - rho_j`` (``rho_j``: the teacher's confidence on it, :func:`image_confidence`), a box of labeled
  image ``j``; then every unlabeled image ``i`` receives a box of the (possibly label-injected) unlabeled image
  ``perm(i)``. The less the teacher trusts an image, the more ground truth its mixes carry.

Every random number comes from the ``torch.Generator`` passed in (a CPU generator: the same draws on every device);
no draw depends on image content, so the same generator state gives the same operations and boxes for any batch.
Strength ranges are AugSeg's; docs/ssl.md lists them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

# -- strong intensity augmentation ----------------------------------------------------------------------------------


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """An integer uniform in ``[low, high]`` (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _blur(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    sigma = _uniform(0.1, 2.0, g)
    # kernel 2 * ceil(3 sigma) + 1, at most 2 * side - 1 so that the reflect padding fits a tiny image
    size = min(2 * math.ceil(3 * sigma) + 1, 2 * min(img.shape[-2:]) - 1)
    return img if size == 1 else TF.gaussian_blur(img, [size, size], [sigma, sigma])


def _hue(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    shift = _uniform(0.0, 0.5, g)
    sign = -1.0 if float(torch.rand((), generator=g)) < 0.5 else 1.0
    return TF.adjust_hue(img, sign * shift)


# name -> op(image (3, H, W) in [0, 1], generator) -> image; the strengths are AugSeg's (its "narrow" ranges)
INTENSITY_OPS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "identity": lambda img, g: img,
    "autocontrast": lambda img, g: TF.autocontrast(img),
    "equalize": lambda img, g: TF.equalize(img),
    "blur": _blur,  # Gaussian blur, sigma ~ U(0.1, 2.0), kernel 2 * ceil(3 sigma) + 1, reflect padding
    "contrast": lambda img, g: TF.adjust_contrast(img, _uniform(0.05, 0.95, g)),
    "brightness": lambda img, g: TF.adjust_brightness(img, _uniform(0.05, 0.95, g)),
    "color": lambda img, g: TF.adjust_saturation(img, _uniform(0.05, 0.95, g)),
    "sharpness": lambda img, g: TF.adjust_sharpness(img, _uniform(0.05, 0.95, g)),
    "posterize": lambda img, g: TF.posterize(img, _randint(4, 7, g)),  # keep 4..7 bits
    "solarize": lambda img, g: TF.solarize(img, _randint(1, 255, g) / 255.0),  # invert values >= threshold
    "hue": _hue,  # hue shift of +-U(0, 0.5) turns
}


def _scale(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    if len(values) != like.shape[1]:
        raise ValueError(f"got {len(values)} normalisation values for images with {like.shape[1]} channels")
    return torch.as_tensor([float(v) / 255.0 for v in values], dtype=torch.float32, device=like.device)[:, None, None]


def strong_intensity_augment(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    num_ops: int = 3,
    random_num_ops: bool = True,
    ops: Sequence[str] = tuple(INTENSITY_OPS),
) -> torch.Tensor:
    """AugSeg's strong view of a batch of normalised images: intensity operations only.

    Each image is de-normalised to ``[0, 1]`` (``x * std / 255 + mean / 255``), gets ``k`` operations drawn with
    replacement from ``ops`` (``k`` uniform in ``1..num_ops`` with ``random_num_ops``, else ``num_ops``), each with
    its own random strength, and is clamped to ``[0, 1]`` and normalised again.

    Args:
        images: ``(B, 3, H, W)`` float, normalised with ``mean`` / ``std``.
        mean, std: the data set's normalisation on the 0-255 scale (``dataset.mean`` / ``dataset.std``).
        generator: source of every random draw (operations, their number and strengths).
        num_ops: the most operations per image (AugSeg: 3).
        random_num_ops: draw the number of operations per image (AugSeg: true).
        ops: names from :data:`INTENSITY_OPS` to draw from (default: all eleven).

    Returns:
        ``(B, 3, H, W)`` normalised images of the input's dtype.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    unknown = [name for name in ops if name not in INTENSITY_OPS]
    if unknown or not ops:
        raise ValueError(f"unknown intensity operation {unknown[0]!r}; choose from {', '.join(INTENSITY_OPS)}")
    if num_ops < 1:
        raise ValueError(f"num_ops={num_ops} must be >= 1")
    pool = [INTENSITY_OPS[name] for name in ops]
    m, s = _scale(mean, images), _scale(std, images)
    out = []
    for image in images.float():
        img = (image * s + m).clamp(0.0, 1.0)
        n = _randint(1, num_ops, generator) if random_num_ops else num_ops
        for i in torch.randint(len(pool), (n,), generator=generator).tolist():
            img = pool[i](img, generator).clamp(0.0, 1.0)
        out.append((img - m) / s)
    return torch.stack(out).to(images.dtype)


# -- adaptive CutMix ------------------------------------------------------------------------------------------------


def image_confidence(probs: torch.Tensor) -> torch.Tensor:
    """AugSeg's confidence of the teacher on each image, ``(B,)`` in ``[0, 1]``: the pixel mean of
    ``(1 - H(p) / log C) * max_c p``, with ``H`` the entropy of the teacher's probabilities ``probs`` (B, C, H, W)."""
    c = probs.shape[1]
    entropy = -torch.special.xlogy(probs, probs).sum(1) / math.log(c) if c > 1 else torch.zeros_like(probs[:, 0])
    return ((1.0 - entropy) * probs.amax(1)).mean((1, 2))


def _beta(a: int, b: int, generator: torch.Generator) -> float:
    """A draw of Beta(a, b) for integers a, b >= 1: the a-th smallest of a + b - 1 uniforms (an exact identity)."""
    return float(torch.rand(a + b - 1, generator=generator).sort().values[a - 1])


def _boxes(batch: int, height: int, width: int, lam: float, generator: torch.Generator) -> torch.Tensor:
    """AugSeg's CutMix boxes, ``(B, 4)`` rows ``(y1, y2, x1, x2)``: sides ``int(side * sqrt(1 - lam))`` (one ``lam``
    for the batch), centres uniform in ``[side // 8, side)`` per image, clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = torch.randint(height // 8, height, (batch,), generator=generator)
    cx = torch.randint(width // 8, width, (batch,), generator=generator)
    y1, y2 = (cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height)
    x1, x2 = (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)
    return torch.stack([y1, y2, x1, x2], dim=1)


@dataclass
class CutMixBatch:
    """The mixed unlabeled batch of :func:`adaptive_cutmix`.

    Attributes:
        images: ``(B, 3, H, W)`` the student's input.
        probs: ``(B, C, H, W)`` its target: the teacher's probabilities, the one-hot ground truth on pixels pasted
            from labeled images (all-zero rows where that label is ``ignore_index``).
        valid: ``(B, H, W)`` bool, False where the target is unknown (an ignored label, or ``valid_u`` False).
        from_labeled: ``(B, H, W)`` bool, the pixels that come from labeled images.
        boxes: ``(B, 4)`` the unlabeled CutMix box ``(y1, y2, x1, x2)`` of each image.
        sources: ``(B,)`` the unlabeled image (after label injection) whose box was pasted into each image.
        labeled_boxes: ``(B, 4)`` the box each unlabeled image received from the labeled image of the same index.
        labeled_mixed: ``(B,)`` bool, whether that labeled box was pasted (probability ``1 - confidence``).
    """

    images: torch.Tensor
    probs: torch.Tensor
    valid: torch.Tensor
    from_labeled: torch.Tensor
    boxes: torch.Tensor
    sources: torch.Tensor
    labeled_boxes: torch.Tensor
    labeled_mixed: torch.Tensor

    @property
    def confidence(self) -> torch.Tensor:
        """``(B, H, W)`` the target's max probability: the teacher's confidence, 1 on labeled pixels, 0 if unknown."""
        return self.probs.amax(1)


def _paste(dst: torch.Tensor, src: torch.Tensor, box: Sequence[int]) -> None:
    y1, y2, x1, x2 = box
    dst[..., y1:y2, x1:x2] = src[..., y1:y2, x1:x2]


def adaptive_cutmix(
    images_u: torch.Tensor,
    probs_u: torch.Tensor,
    images_l: torch.Tensor,
    labels_l: torch.Tensor,
    generator: torch.Generator,
    confidence: torch.Tensor | None = None,
    valid_u: torch.Tensor | None = None,
    ignore_index: int = 255,
    labeled_beta: tuple[int, int] = (8, 2),
    unlabeled_beta: tuple[int, int] = (4, 4),
) -> CutMixBatch:
    """AugSeg's adaptive CutMix of an unlabeled batch with a labeled batch of the same size.

    1. Label injection: unlabeled image ``j`` receives, with probability ``1 - confidence[j]``, the box
       ``labeled_boxes[j]`` of labeled image ``j`` (image and one-hot label); boxes have area about ``1 - lam`` with
       ``lam ~ Beta(8, 2)`` (small boxes).
    2. CutMix: image ``i`` receives the box ``boxes[i]`` of injected image ``sources[i]`` (a random permutation,
       which may map ``i`` to itself), ``lam ~ Beta(4, 4)``.

    Draw order from ``generator``: ``lam`` of step 1, ``lam`` of step 2, the boxes of step 1, the boxes of step 2,
    the ``B`` injection draws, the permutation.

    Args:
        images_u: ``(B, 3, H, W)`` unlabeled images (the strong view).
        probs_u: ``(B, C, H, W)`` the teacher's probabilities on the weak view (no gradient is kept).
        images_l: ``(B, 3, H, W)`` labeled images (weak view).
        labels_l: ``(B, H, W)`` int64 labels of ``images_l``, ``ignore_index`` where ignored.
        generator: source of every random draw.
        confidence: ``(B,)`` per-image confidence in ``[0, 1]``; default :func:`image_confidence` of ``probs_u``.
        valid_u: ``(B, H, W)`` bool, unlabeled pixels whose pseudo-label may be used (default all).
        ignore_index: ignored label value.
        labeled_beta, unlabeled_beta: integer Beta parameters of ``lam`` (AugSeg: (8, 2) and (4, 4)).
    """
    b, _, h, w = images_u.shape
    c = probs_u.shape[1]
    if images_l.shape != images_u.shape:
        raise ValueError(
            f"labeled images {tuple(images_l.shape)} and unlabeled images {tuple(images_u.shape)} must have one shape "
            "(AugSeg mixes batches of equal size and crop)"
        )
    if tuple(probs_u.shape) != (b, c, h, w) or tuple(labels_l.shape) != (b, h, w):
        raise ValueError(
            f"probs_u {tuple(probs_u.shape)} must be (B, C, H, W) and labels_l {tuple(labels_l.shape)} (B, H, W) "
            f"for images {tuple(images_u.shape)}"
        )
    for name, (a, bb) in (("labeled_beta", labeled_beta), ("unlabeled_beta", unlabeled_beta)):
        if int(a) != a or int(bb) != bb or a < 1 or bb < 1:
            raise ValueError(f"{name}=({a}, {bb}) must be two integers >= 1")
    probs_u = probs_u.detach().float()
    if confidence is None:
        confidence = image_confidence(probs_u)
    if tuple(confidence.shape) != (b,):
        raise ValueError(f"confidence has shape {tuple(confidence.shape)}, expected one value per image ({b},)")
    valid_u = torch.ones_like(labels_l, dtype=torch.bool) if valid_u is None else valid_u.bool()

    lam_l = _beta(int(labeled_beta[0]), int(labeled_beta[1]), generator)
    lam_u = _beta(int(unlabeled_beta[0]), int(unlabeled_beta[1]), generator)
    labeled_boxes = _boxes(b, h, w, lam_l, generator)
    boxes = _boxes(b, h, w, lam_u, generator)
    draws = torch.rand(b, generator=generator)
    sources = torch.randperm(b, generator=generator)
    labeled_mixed = draws < (1.0 - confidence.detach().float().cpu())

    valid_l = labels_l != ignore_index
    onehot_l = F.one_hot(torch.where(valid_l, labels_l, 0).long(), c).permute(0, 3, 1, 2).to(probs_u.dtype)
    onehot_l = onehot_l * valid_l[:, None]
    pool = [images_u.clone(), probs_u.clone(), valid_u.clone(), torch.zeros_like(valid_u)]
    labeled = [images_l, onehot_l, valid_l, torch.ones_like(valid_l)]
    for j in labeled_mixed.nonzero().flatten().tolist():
        for dst, src in zip(pool, labeled):
            _paste(dst[j], src[j], labeled_boxes[j].tolist())
    out = [images_u.clone(), probs_u.clone(), valid_u.clone(), torch.zeros_like(valid_u)]
    for i, source in enumerate(sources.tolist()):
        for dst, src in zip(out, pool):
            _paste(dst[i], src[source], boxes[i].tolist())
    return CutMixBatch(*out, boxes, sources, labeled_boxes, labeled_mixed)
