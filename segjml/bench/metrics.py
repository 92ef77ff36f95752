"""Metrics benchmark: one full ``SegmentationMetrics.update`` (Acc; mAcc, mIoU, mDice at the D / I / C level and the
per-image scores of the worst-case metrics; ECE, BECE, SCE, BSCE, ECE^I, SCE^I) against torchmetrics'
``MulticlassJaccardIndex.update`` alone, on the same batch, in the same run.

``python -m segjml.bench metrics [--shapes 2x19x512x1024 2x150x512x1024] [--repeats 5] [--device cpu]``
"""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassJaccardIndex

from segjml.bench.common import block_labels, median_time, parse_shape, shape_parser, start
from segjml.metrics import SegmentationMetrics


def make_batch(shape, device, seed=0):
    b, c, h, w = shape
    g = torch.Generator(device=device).manual_seed(seed)
    probs = torch.randn(b, c, h, w, generator=g, device=device).mul_(3).softmax(1)
    target = block_labels(b, c, h, w, g, device)
    target[:, :8] = 255
    return probs, target


def main(argv: list[str] | None = None) -> None:
    parser = shape_parser("python -m segjml.bench metrics", __doc__, ["2x19x512x1024", "2x150x512x1024"], 5)
    args = parser.parse_args(argv)
    device = start(args)
    print(f"{'shape':<16} {'torchmetrics mIoU (s)':>22} {'segjml all metrics (s)':>23} {'ratio':>6}")
    for shape_str in args.shapes:
        shape = parse_shape(shape_str)
        probs, target = make_batch(shape, device)
        ours = SegmentationMetrics(shape[1]).to(device)
        theirs = MulticlassJaccardIndex(shape[1], ignore_index=255).to(device)
        t_theirs = median_time(lambda m=theirs, p=probs, t=target: m.update(p, t), device, args.repeats)
        t_ours = median_time(lambda m=ours, p=probs, t=target: m.update(p, t), device, args.repeats)
        print(f"{shape_str:<16} {t_theirs:22.3f} {t_ours:23.3f} {t_ours / t_theirs:6.2f}", flush=True)


if __name__ == "__main__":
    main()
