"""Console tables, ``metrics.json`` and reliability diagrams."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

SUMMARY_KEYS = ("acc", "miou", "miou_i", "miou_c", "ece", "bece", "sce", "bsce")
"""The main metrics, one per line under the per-class table."""

SCORE_COLUMNS = (("mAcc", "acc"), ("mIoU", "iou"), ("mDice", "dice"))
"""Columns of the fine-grained block: header and the score's name in the metric keys."""


def _fine_grained_rows(metrics: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(row label, keys of the mAcc / mIoU / mDice columns) of the fine-grained block, worst-case ``q`` read from
    the keys (``iou_i_q<q>``)."""
    worst_q = sorted(int(m.group(1)) for key in metrics if (m := re.fullmatch(r"iou_i_q(\d+)", key)))
    rows = [
        ("data set (D)", tuple(f"m{s}" for _, s in SCORE_COLUMNS)),
        ("per image (I)", tuple(f"m{s}_i" for _, s in SCORE_COLUMNS)),
        ("per class (C)", tuple(f"m{s}_c" for _, s in SCORE_COLUMNS)),
    ]
    rows += [(f"worst {q}% of images", tuple(f"{s}_i_q{q}" for _, s in SCORE_COLUMNS)) for q in worst_q]
    rows.append(("worst, avg q=10..100", tuple(f"{s}_i_qavg" for _, s in SCORE_COLUMNS)))
    return rows


def format_table(metrics: dict, class_names: Sequence[str]) -> str:
    """Per-class IoU table, the main summary metrics (one per line), then the fine-grained block: mAcc / mIoU / mDice
    at the data-set, image and class level and over the worst images, and the per-image calibration errors (all in
    percent). Keys missing from ``metrics`` print as ``-``; rows without any, and the block when it would only repeat
    ``miou``, are left out (``metrics.json`` of older runs)."""
    width = max(10, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 10)]
    for name, iou in zip(class_names, metrics.get("iou_per_class", [])):
        lines.append(f"{name:<{width}}  {'   -' if math.isnan(iou) else f'{iou:7.2f}'}")
    lines.append("-" * (width + 10))
    for key in SUMMARY_KEYS:
        if key in metrics:
            lines.append(f"{key:<{width}}  {metrics[key]:7.2f}")
    rows = [(label, keys) for label, keys in _fine_grained_rows(metrics) if any(k in metrics for k in keys)]
    if any(k in metrics and k not in SUMMARY_KEYS for _, keys in rows for k in keys):  # not only `miou` again
        label_width = max(len(label) for label, _ in rows)
        lines += ["", f"{'fine-grained (%)':<{label_width}}" + "".join(f"  {h:>7}" for h, _ in SCORE_COLUMNS)]
        for label, keys in rows:
            cells = "".join(f"  {metrics[k]:7.2f}" if k in metrics else f"  {'-':>7}" for k in keys)
            lines.append(f"{label:<{label_width}}{cells}")
    calibration = [f"{key} {metrics[key]:.2f}" for key in ("ece_i", "sce_i") if key in metrics]
    if calibration:
        lines.append("per-image calibration (%): " + "  ".join(calibration))
    return "\n".join(lines)


def write_json(obj: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True))
    os.replace(tmp, path)


def reliability_diagram(bins: dict, path: str | os.PathLike, title: str = "Reliability") -> None:
    """Bar chart of accuracy per confidence bin against the diagonal; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = bins["count"].cpu().numpy()
    acc = bins["accuracy"].cpu().numpy()
    conf = bins["confidence"].cpu().numpy()
    n = len(count)
    edges = [i / n for i in range(n)]
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.bar(edges, acc, width=1 / n, align="edge", edgecolor="black", color="tab:blue", label="accuracy")
    gap_bottom = [min(a, c) for a, c in zip(acc, conf)]
    ax.bar(
        edges,
        [abs(c - a) for a, c in zip(acc, conf)],
        bottom=gap_bottom,
        width=1 / n,
        align="edge",
        color="tab:red",
        alpha=0.3,
        edgecolor="tab:red",
        label="gap",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
