"""Inference (whole image or sliding window, optional flip / multi-scale) and evaluation with all metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from segjml.data.transforms import BatchToDevice
from segjml.engine.report import format_table, reliability_diagram, write_json
from segjml.metrics import SegmentationMetrics


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out["out"] if isinstance(out, dict) else out


def slide_logits(
    model: nn.Module,
    image: torch.Tensor,
    crop_size: Sequence[int],
    stride: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Logits of ``image`` (B, 3, H, W) from overlapping ``crop_size`` windows, overlaps averaged.

    ``stride`` defaults to 2/3 of the crop. An image smaller than the crop is padded (zeros, i.e. the mean after
    normalisation) and the logits are cropped back.
    """
    b, _, h, w = image.shape
    ch, cw = crop_size
    sh, sw = stride if stride is not None else (max(1, ch * 2 // 3), max(1, cw * 2 // 3))
    pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
    H, W = image.shape[-2:]
    rows = max(math.ceil((H - ch) / sh), 0) + 1
    cols = max(math.ceil((W - cw) / sw), 0) + 1
    total = count = None
    for i in range(rows):
        for j in range(cols):
            y0, x0 = min(i * sh, H - ch), min(j * sw, W - cw)
            logits = _logits(model, image[:, :, y0 : y0 + ch, x0 : x0 + cw])
            if total is None:
                total = logits.new_zeros(b, num_classes or logits.shape[1], H, W)
                count = logits.new_zeros(1, 1, H, W)
            total[:, :, y0 : y0 + ch, x0 : x0 + cw] += logits
            count[:, :, y0 : y0 + ch, x0 : x0 + cw] += 1
    return (total / count)[:, :, :h, :w]


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    image: torch.Tensor,
    mode: str = "whole",
    crop_size: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> torch.Tensor:
    """Softmax probabilities ``(B, C, H, W)`` at the input size.

    Args:
        mode: ``whole`` (one forward pass) or ``slide`` (windows of ``crop_size``).
        flip: also run the horizontally flipped image.
        scales: image scales of multi-scale testing. Probabilities of all scales and flips are averaged.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"evaluation mode must be 'whole' or 'slide', got '{mode}'")
    if mode == "slide" and crop_size is None:
        raise ValueError("sliding-window evaluation needs a crop_size")
    size = image.shape[-2:]
    probs, n = None, 0
    for scale in scales:
        x = image if scale == 1.0 else F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            logits = slide_logits(model, xi, crop_size, stride) if mode == "slide" else _logits(model, xi)
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            p = logits.float().softmax(1)
            probs = p if probs is None else probs + p
            n += 1
    return probs / n


@dataclass(frozen=True)
class InferenceMode:
    """How a model's probabilities are made (:func:`predict_probs`): whole image or sliding windows of
    ``crop_size`` (stride ``stride``, default 2/3 of the crop), with horizontal flip and image ``scales``, under
    autocast to ``autocast_dtype`` (``None``: float32)."""

    mode: str = "whole"
    crop_size: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def from_config(
        cls, cfg, crop_size: Sequence[int] | None, autocast_dtype: torch.dtype | None = None
    ) -> InferenceMode:
        """From a node with ``mode``, ``flip`` and ``scales`` (``trainer.eval``; ``eval.yaml`` / ``predict.yaml``) and
        the data set's crop size (the windows of ``mode=slide``)."""
        return cls(
            mode=cfg.mode,
            crop_size=None if crop_size is None else tuple(crop_size),
            flip=bool(cfg.flip),
            scales=tuple(cfg.scales),
            autocast_dtype=autocast_dtype,
        )

    def probs(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """:func:`predict_probs` of ``image`` ``(B, 3, H, W)`` in this mode: ``(B, C, H, W)`` float32."""
        with torch.autocast(image.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return predict_probs(model, image, self.mode, self.crop_size, self.stride, self.flip, self.scales)


WHOLE_IMAGE = InferenceMode()
"""One float32 forward pass of the whole image: the default of :func:`evaluate`."""


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    metrics: SegmentationMetrics,
    to_device: BatchToDevice,
    inference: InferenceMode = WHOLE_IMAGE,
    progress: bool = True,
) -> dict:
    """Run the model over ``loader`` and return ``metrics.compute()``; the model's train/eval mode is restored.

    ``to_device`` moves each batch to the model's device and normalises its images; ``inference`` says how the
    probabilities are made. :func:`write_report` prints and writes the result.
    """
    was_training = model.training
    model.eval()
    metrics.reset()
    metrics.to(to_device.device)
    for batch in tqdm(loader, desc="eval", leave=False, disable=not progress, dynamic_ncols=True):
        image, target = to_device(*batch)
        metrics.update(inference.probs(model, image), target)
    result = metrics.compute()
    model.train(was_training)
    return result


def write_report(
    result: dict,
    metrics: SegmentationMetrics,
    output_dir: str | Path,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> None:
    """Print the per-class table; write ``metrics.json`` and ``reliability.png`` to ``output_dir``.

    ``result`` is ``metrics.compute()``; the diagram reads the histogram that call summed over all processes
    (``SegmentationMetrics.reliability``), so under DDP one process alone may write the report."""
    names = list(class_names) if class_names is not None else [str(i) for i in range(metrics.num_classes)]
    print(format_table(result, names))
    write_json({**result, "class_names": names}, Path(output_dir) / "metrics.json")
    reliability_diagram(
        metrics.reliability(), Path(output_dir) / "reliability.png", title=f"{title}: reliability".strip(": ")
    )
