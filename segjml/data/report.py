"""The data report of ``python -m segjml.data.validate``: what a data set holds, and how to set BLS and class weights.

Gathered in the validation scan's one pass over the samples (:class:`SplitStats`, numpy ``bincount`` per sample):

- pixels and images per class, per split; the label values found; image sizes (min, median, max);
- the image mean and std per channel (0-255) of the training split, to paste into ``dataset.mean`` / ``dataset.std``;
- the boundary share: the fraction of labelled pixels that boundary label smoothing (paper section 2.4.1) smooths at
  the configured kernel, found by :func:`~segjml.labels.soft_labels.boundary_label_smoothing` itself;
- the eps that smooths as much label mass as the paper's eps = 0.5 (:func:`matched_eps`, the rule of
  docs/losses.md, "Choosing eps": our reading, not the paper's);
- class weights for ``loss.jml.class_weights`` by median frequency balancing (:func:`median_frequency_weights`).

:func:`write_report` prints it as a table and writes ``data_report.json`` and ``class_frequencies.png``
(docs/datasets.md, "The data report").
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from segjml.labels.boundary import check_kernel_size
from segjml.labels.soft_labels import boundary_label_smoothing

PAPER_EPS = 0.5
"""The paper's BLS eps (k = 3), tuned on PASCAL VOC with DL3-R18 (paper appendix L)."""

REFERENCE_SHARE = 0.01256
"""The k = 3 boundary share that stands in for the paper's data sets. It is *measured* on the synthetic set drawn at
512x512 (its first 50 validation images: 1.26%, docs/benchmarks.md, "Boundary share of the synthetic set"), which
docs/benchmarks.md takes as comparable to PASCAL VOC at the paper's 512 crops. VOC's and Cityscapes' own shares are not
measured (their label maps are not available here); ``reference_share=`` replaces it, e.g. with this report's
``bls.boundary_share`` of ``dataset=voc``."""

REFERENCE_SOURCE = (
    "measured on the synthetic set at 512x512 (50 val images, k = 3; docs/benchmarks.md), a stand-in for PASCAL VOC at "
    "the paper's 512 crops: VOC's own share is not measured"
)

EPS_RULE = (
    "eps = 0.5 x reference_share / boundary_share (capped at 1): BLS moves about boundary share x eps of the label "
    "mass, so scaling eps by the ratio of the boundary shares keeps the mass of the paper's eps = 0.5 "
    "(docs/losses.md, 'Choosing eps'); our reading, not the paper's"
)

WEIGHT_FORMULA = (
    "median frequency balancing (Eigen & Fergus 2015): w_c = median_k f_k / f_c, f_c = pixels of class c / labelled "
    "pixels of the training images that contain c; rescaled to mean 1 over the classes present (weights summing to C "
    "keep the loss's size with class_weights_mode=scaled); a class absent from the training split gets 1"
)


class SplitStats:
    """Running totals of one split, one :meth:`add` per sample.

    Args:
        num_classes: ``C``; class ids are ``0 .. C-1``.
        ignore_index: the label value that is no class.
        kernel_size: BLS's ``k`` (odd, or ``inf``).
        strict_ignore: BLS's rule next to ignored pixels (docs/losses.md).
    """

    def __init__(self, num_classes: int, ignore_index: int, kernel_size: int | float, strict_ignore: bool) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.kernel_size, self.strict_ignore = check_kernel_size(kernel_size, "loss.bls.kernel_size"), strict_ignore
        self.value_pixels = np.zeros(max(num_classes, ignore_index + 1, 1), dtype=np.int64)  # per label value
        self.class_images = np.zeros(num_classes, dtype=np.int64)  # images holding the class
        self.present_pixels = np.zeros(num_classes, dtype=np.int64)  # labelled pixels of the images holding it
        self.channel_hist = np.zeros((3, 256), dtype=np.int64)  # per channel: pixels of each value 0-255
        self.heights: list[int] = []
        self.widths: list[int] = []
        self.boundary_pixels = 0

    def add(self, image: np.ndarray, label: np.ndarray) -> None:
        """Count one sample: ``image`` ``(H, W, 3)`` uint8 RGB, ``label`` ``(H, W)`` class ids and ``ignore_index``."""
        values = np.asarray(label).ravel()
        if values.dtype.kind == "i" and values.size and values.min() < 0:  # a negative ignore value
            values = values[values >= 0]
        counts = np.bincount(values)
        if len(counts) > len(self.value_pixels):
            self.value_pixels = np.pad(self.value_pixels, (0, len(counts) - len(self.value_pixels)))
        self.value_pixels[: len(counts)] += counts
        per_class = np.zeros(self.num_classes, dtype=np.int64)
        per_class[: min(len(counts), self.num_classes)] = counts[: self.num_classes]
        present = per_class > 0
        self.class_images += present
        self.present_pixels += present * per_class.sum()
        for c in range(3):
            self.channel_hist[c] += np.bincount(image[..., c].ravel(), minlength=256)
        self.heights.append(label.shape[0])
        self.widths.append(label.shape[1])
        # The boundary pixels of BLS itself: a pixel is smoothed iff its eps is > 0.
        labels = torch.from_numpy(np.asarray(label, dtype=np.int32))[None]  # boundary_map works in int32
        smoothed = boundary_label_smoothing(
            labels, self.num_classes, 1.0, self.kernel_size, self.ignore_index, self.strict_ignore
        ).eps
        self.boundary_pixels += int((smoothed > 0).sum())

    @property
    def images(self) -> int:
        return len(self.heights)

    @property
    def class_pixels(self) -> np.ndarray:
        return self.value_pixels[: self.num_classes]

    @property
    def labelled_pixels(self) -> int:
        return int(self.class_pixels.sum())

    def boundary_share(self) -> float | None:
        """Boundary pixels / labelled pixels (``None`` without a labelled pixel)."""
        return self.boundary_pixels / self.labelled_pixels if self.labelled_pixels else None

    def mean_std(self) -> tuple[list[float], list[float]] | tuple[None, None]:
        """Per channel mean and (population) std of every pixel, 0-255, exact from the value histograms."""
        n = self.channel_hist.sum(axis=1)
        if not n.all():
            return None, None
        levels = np.arange(256, dtype=np.float64)
        mean = (self.channel_hist * levels).sum(axis=1) / n
        var = (self.channel_hist * (levels - mean[:, None]) ** 2).sum(axis=1) / n
        return mean.tolist(), np.sqrt(var).tolist()

    def summary(self) -> dict:
        """The split's part of the JSON report."""
        labelled = self.labelled_pixels
        pixels = int(sum(h * w for h, w in zip(self.heights, self.widths)))
        sizes = {}
        for name, values in (("height", self.heights), ("width", self.widths)):
            stats = (min(values), float(np.median(values)), max(values)) if values else (None, None, None)
            sizes[name] = dict(zip(("min", "median", "max"), stats))
        return {
            "images": self.images,
            "pixels": pixels,
            "labelled_pixels": labelled,
            "ignored_pixels": pixels - labelled,
            "class_pixels": self.class_pixels.tolist(),
            "class_images": self.class_images.tolist(),
            "class_frequency": (self.class_pixels / labelled).tolist() if labelled else [0.0] * self.num_classes,
            "label_values": np.flatnonzero(self.value_pixels).tolist(),
            "image_size": sizes,
            "boundary_share": self.boundary_share(),
        }


def bls_settings(cfg: DictConfig) -> dict:
    """BLS's ``kernel_size``, ``strict_ignore`` and ``eps`` from ``cfg.loss.bls``, or, where the composed loss has no
    BLS, those of ``configs/loss/bls/default.yaml`` (``loss=ce_jml_bls``: k = 3) with ``eps`` ``None``."""
    bls = OmegaConf.select(cfg, "loss.bls")
    if bls is not None:
        source, eps = "loss.bls", float(bls.eps)
    else:
        from segjml.config import CONFIG_DIR

        bls, source, eps = OmegaConf.load(CONFIG_DIR / "loss" / "bls" / "default.yaml"), "loss/bls/default.yaml", None
    return {"kernel_size": bls.kernel_size, "strict_ignore": bool(bls.strict_ignore), "eps": eps, "from": source}


def matched_eps(share: float | None, reference_share: float = REFERENCE_SHARE, paper_eps: float = PAPER_EPS):
    """The eps that smooths the label mass of ``paper_eps`` at ``reference_share``: ``EPS_RULE``; ``None`` where
    ``share`` is ``None`` or 0 (no boundary pixel: no eps smooths anything)."""
    if not share:
        return None
    return min(1.0, paper_eps * reference_share / share)


def median_frequency_weights(class_pixels: np.ndarray, present_pixels: np.ndarray) -> list[float]:
    """Per-class weights by ``WEIGHT_FORMULA`` from the training split's pixels per class and the labelled pixels of
    the images that contain each class."""
    class_pixels = np.asarray(class_pixels, dtype=np.float64)
    present = class_pixels > 0
    weights = np.ones(len(class_pixels))
    if present.any():
        freq = class_pixels[present] / np.asarray(present_pixels, dtype=np.float64)[present]
        raw = np.median(freq) / freq
        weights[present] = raw / raw.mean()
    return weights.tolist()


def build_report(
    cfg: DictConfig,
    stats: dict[str, SplitStats],
    class_names: list[str],
    bls: dict,
    reference_share: float = REFERENCE_SHARE,
    limit: int | None = None,
) -> dict:
    """The report as a JSON-able dict (keys: docs/datasets.md, "The data report")."""
    train = stats.get("train")
    mean, std = train.mean_std() if train is not None else (None, None)
    share = train.boundary_share() if train is not None else None
    kernel = check_kernel_size(bls["kernel_size"], "loss.bls.kernel_size")
    weights = median_frequency_weights(train.class_pixels, train.present_pixels) if train is not None else None
    return {
        "dataset": str(cfg.dataset.name),
        "num_classes": int(cfg.dataset.num_classes),
        "class_names": list(class_names),
        "ignore_index": int(cfg.dataset.ignore_index),
        "limit": limit,
        "splits": {split: s.summary() for split, s in stats.items()},
        "normalisation": {"split": "train", "scale": "0-255", "mean": mean, "std": std},
        "bls": {
            "kernel_size": "inf" if math.isinf(kernel) else kernel,
            "strict_ignore": bls["strict_ignore"],
            "from": bls["from"],
            "configured_eps": bls["eps"],
            "boundary_share": share,
            "paper_eps": PAPER_EPS,
            "reference_share": reference_share,
            "reference_source": REFERENCE_SOURCE if reference_share == REFERENCE_SHARE else "given as reference_share=",
            "matched_eps": matched_eps(share, reference_share),
            "rule": EPS_RULE,
        },
        "class_weights": {"formula": "median frequency balancing", "definition": WEIGHT_FORMULA, "weights": weights},
    }


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _numbers(values: list[float], digits: int) -> str:
    return "[" + ",".join(f"{v:.{digits}f}" for v in values) + "]"


def format_report(report: dict) -> str:
    """The report as the table ``validate`` prints, with the overrides to paste."""
    splits = report["splits"]
    weights = report["class_weights"]["weights"]
    head = ["class"] + [f"{s} {col}" for s in splits for col in ("pixels", "%", "images")] + ["weight"] * bool(weights)
    rows = []
    for c, name in enumerate(report["class_names"]):
        row = [name]
        for s in splits.values():
            row += [f"{s['class_pixels'][c]:,}", _percent(s["class_frequency"][c]), str(s["class_images"][c])]
        rows.append(row + ([f"{weights[c]:.3f}"] if weights else []))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        f"data report: {report['dataset']} ({report['num_classes']} classes, ignore value {report['ignore_index']})"
    ]
    for row in [head, *rows]:
        lines.append(
            "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        )
    for split, s in splits.items():
        size = " ".join(
            f"{k} {v['min']}/{v['median']:g}/{v['max']}" for k, v in s["image_size"].items() if v["min"] is not None
        )
        ignored = s["ignored_pixels"] / s["pixels"] if s["pixels"] else None
        lines.append(
            f"{split}: {s['images']} images, size (min/median/max) {size or '-'}, label values "
            f"{' '.join(map(str, s['label_values'])) or '-'}, ignored {_percent(ignored)}, boundary share "
            f"{_percent(s['boundary_share'])}"
        )
    norm = report["normalisation"]
    if norm["mean"] is not None:
        lines.append(
            f"image mean / std (0-255, train): dataset.mean={_numbers(norm['mean'], 2)} "
            f"dataset.std={_numbers(norm['std'], 2)}"
        )
    bls = report["bls"]
    lines.append(
        f"BLS (k = {bls['kernel_size']}, strict_ignore={str(bls['strict_ignore']).lower()}, from {bls['from']}): "
        f"boundary share {_percent(bls['boundary_share'])} of the labelled training pixels"
    )
    if bls["matched_eps"] is not None:
        lines.append(
            f"matched eps: loss.bls.eps={bls['matched_eps']:.3f} smooths the label mass of the paper's eps = 0.5 at a "
            f"boundary share of {_percent(bls['reference_share'])} ({bls['reference_source']})"
        )
        lines.append(f"  rule: {bls['rule']}")
    if weights:
        lines.append(
            f"class weights ({report['class_weights']['formula']}): loss.jml.class_weights={_numbers(weights, 3)}"
        )
    return "\n".join(lines)


def class_frequency_chart(report: dict, path: str | os.PathLike) -> None:
    """Bar chart of each class's share of the labelled pixels, one bar per split; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, splits = report["class_names"], report["splits"]
    x = np.arange(len(names))
    width = 0.8 / max(len(splits), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(names) + 2), 4), dpi=100)
    for i, (split, s) in enumerate(splits.items()):
        ax.bar(x + (i - (len(splits) - 1) / 2) * width, 100 * np.asarray(s["class_frequency"]), width, label=split)
    ax.set_xticks(x, names, rotation=90 if len(names) > 12 else 0)
    ax.set(ylabel="% of labelled pixels", title=f"Class frequencies: {report['dataset']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``data_report.json`` and ``class_frequencies.png`` in ``out_dir`` (created); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "data_report.json", out_dir / "class_frequencies.png"
    json_path.write_text(json.dumps(report, indent=2))
    class_frequency_chart(report, png_path)
    return json_path, png_path
