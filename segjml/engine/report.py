"""Console tables, ``metrics.json`` and reliability diagrams."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

SUMMARY_KEYS = ("acc", "miou", "miou_i", "miou_c", "ece", "bece", "sce", "bsce")


def format_table(metrics: dict, class_names: Sequence[str]) -> str:
    """Per-class IoU table followed by the summary metrics (percent)."""
    width = max(10, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 10)]
    for name, iou in zip(class_names, metrics.get("iou_per_class", [])):
        lines.append(f"{name:<{width}}  {'   -' if math.isnan(iou) else f'{iou:7.2f}'}")
    lines.append("-" * (width + 10))
    for key in SUMMARY_KEYS:
        if key in metrics:
            lines.append(f"{key:<{width}}  {metrics[key]:7.2f}")
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
