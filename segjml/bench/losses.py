"""Loss benchmark: forward+backward time and peak extra memory of every loss, as a ratio to cross-entropy.

``python -m segjml.bench losses [--shapes 8x21x512x512 8x150x512x512] [--repeats 3] [--device cpu]``

Hard targets are compared with hard CE, soft targets (a dense distribution per pixel, as in distillation) with soft
CE. "bls target" is the construction of the boundary-label-smoothing target alone (no loss); "ce bls" / "jml1 bls"
build the BLS target and run the loss on it. Peak extra memory is the peak resident set size above what was live
before the call on CPU, ``max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import sys

import torch

from segjml.bench.common import (
    block_labels,
    fmt_bytes,
    median_time,
    parse_shape,
    peak_extra_memory,
    shape_parser,
    start,
)
from segjml.labels import boundary_label_smoothing
from segjml.losses import CrossEntropyLoss, JaccardMetricLoss, LovaszSoftmaxLoss

HARD = ["ce", "jml1", "jml2", "sjl_l1", "sjl_l2", "lovasz", "bls target", "ce bls", "jml1 bls"]
SOFT = ["ce", "jml1", "jml2", "sjl_l1", "sjl_l2"]


def make_inputs(shape, kind: str, device: torch.device, seed: int = 0):
    b, c, h, w = shape
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g, device=device)
    if kind == "hard":
        target = block_labels(b, c, h, w, g, device)
    else:
        target = torch.rand(b, c, h, w, generator=g, device=device)
        target.exp_()
        target /= target.sum(1, keepdim=True)  # in place: no second (B, C, H, W) tensor
    return logits, target


def make_step(name: str, logits: torch.Tensor, target: torch.Tensor):
    c = logits.shape[1]
    if name == "bls target":
        return lambda: boundary_label_smoothing(target, c, eps=0.5, kernel_size=3)
    loss = {"ce": CrossEntropyLoss(), "lovasz": LovaszSoftmaxLoss()}.get(name.split()[0])
    if loss is None:
        loss = JaccardMetricLoss(variant=name.split()[0])
    bls = name.endswith(" bls")

    def step():
        x = logits.detach().requires_grad_(True)
        t = boundary_label_smoothing(target, c, eps=0.5, kernel_size=3) if bls else target
        loss(x, t).backward()
        return x.grad

    return step


def main(argv: list[str] | None = None) -> None:
    parser = shape_parser("python -m segjml.bench losses", __doc__, ["8x21x512x512", "8x150x512x512"], 3)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory column")
    args = parser.parse_args(argv)
    device = start(args)
    print(f"{'shape':<16} {'target':<6} {'loss':<12} {'time (s)':>9} {'x CE':>6} {'peak extra':>12} {'x CE':>6}")
    for shape_str in args.shapes:
        shape = parse_shape(shape_str)
        for kind, names in (("hard", HARD), ("soft", SOFT)):
            logits, target = make_inputs(shape, kind, device)
            base_t = base_m = None
            for name in names:
                slow = name == "lovasz"  # one class at a time over sorted pixels: tens of seconds at C = 150
                t = median_time(make_step(name, logits, target), device, 1 if slow else args.repeats, 0 if slow else 1)
                m = float("nan") if args.no_memory else peak_extra_memory(make_step(name, logits, target), device)
                if name == "ce":
                    base_t, base_m = t, m
                print(
                    f"{shape_str:<16} {kind:<6} {name:<12} {t:9.3f} {t / base_t:6.2f} {fmt_bytes(m):>12} "
                    f"{m / base_m if base_m else float('nan'):6.2f}",
                    flush=True,
                )
            del logits, target


if __name__ == "__main__":
    main(sys.argv[1:])
