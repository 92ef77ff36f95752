"""Loss benchmark: forward+backward time and peak extra memory of each loss, as ratios to PyTorch's own op.

``python -m segjml.bench losses [--shapes 8x21x512x512 8x150x512x512] [--repeats 3] [--device cpu] [--amp bf16]``

Every ratio is taken against the fastest PyTorch implementation of the same thing, measured in the same run, each
call of a row alternating with a call of the baseline (the ratio is of the two medians):
``F.cross_entropy`` with class-index targets (and ``ignore_index``) for hard labels and for boundary-smoothed labels
(BLS: hard labels plus a per-pixel eps, which is what CE and JML consume), ``F.cross_entropy`` with probability
targets for dense soft targets (a distribution per pixel, as a teacher's or an SSL pseudo-label). SMP's
``JaccardLoss`` (multiclass, from logits) is the peer library's hard-label Jaccard loss. BLS rows time the loss on a
target built beforehand ("bls target" times the construction alone). Peak extra memory is the peak resident set
size above what was live before the call on CPU, ``max_memory_allocated`` on CUDA. Each row times the loss on the
logits themselves; ``--amp bf16`` first casts them to bf16 under autocast, as a model's output would be (the losses
themselves run in fp32, as in training).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from segjml.bench.common import (
    block_labels,
    fmt_bytes,
    median_time,
    paired_median_times,
    parse_shape,
    peak_extra_memory,
    shape_parser,
    start,
)
from segjml.labels import boundary_label_smoothing
from segjml.losses import CrossEntropyLoss, JaccardMetricLoss, LovaszSoftmaxLoss

# target kind -> (baseline, rows)
ROWS = {
    "hard": ("torch CE", ["segjml CE", "segjml JML-1", "segjml JML-2", "segjml SJL-L1", "smp JaccardLoss", "lovasz"]),
    "bls": ("torch CE", ["segjml CE", "segjml JML-1", "bls target"]),
    "soft": ("torch CE", ["segjml CE", "segjml JML-1", "segjml JML-2", "segjml SJL-L1"]),
}


def make_inputs(shape, kind: str, device: torch.device, seed: int = 0):
    b, c, h, w = shape
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g, device=device)
    labels = block_labels(b, c, h, w, g, device)
    if kind == "hard":
        return logits, labels, labels
    if kind == "bls":
        return logits, boundary_label_smoothing(labels, c, eps=0.5, kernel_size=3), labels
    target = torch.rand(b, c, h, w, generator=g, device=device)
    target.exp_()
    target /= target.sum(1, keepdim=True)  # in place: no second (B, C, H, W) tensor
    return logits, target, labels


def loss_fn(name: str, kind: str, target, labels):
    """``f(logits) -> scalar`` for one row."""
    if name == "torch CE":
        if kind == "soft":
            return lambda x: F.cross_entropy(x, target)
        return lambda x: F.cross_entropy(x, labels, ignore_index=255)
    if name == "smp JaccardLoss":
        from segmentation_models_pytorch.losses import JaccardLoss

        smp_loss = JaccardLoss("multiclass", from_logits=True, ignore_index=255)
        return lambda x: smp_loss(x, labels)
    module = {"segjml CE": CrossEntropyLoss(), "lovasz": LovaszSoftmaxLoss()}.get(name)
    if module is None:
        module = JaccardMetricLoss(variant=name.split()[-1].lower().replace("-", "").replace("sjll1", "sjl_l1"))
    return lambda x: module(x, target)


def make_step(name: str, kind: str, logits, target, labels, amp: torch.dtype | None):
    c = logits.shape[1]
    if name == "bls target":
        return lambda: boundary_label_smoothing(labels, c, eps=0.5, kernel_size=3)
    f = loss_fn(name, kind, target, labels)

    def step():
        x = logits.detach().requires_grad_(True)
        y = x
        if amp is not None:
            with torch.autocast(logits.device.type, dtype=amp):
                y = x.to(amp)  # the model's output: under autocast, a low-precision tensor as in training
        f(y.float()).backward()
        return x.grad

    return step


def main(argv: list[str] | None = None) -> None:
    parser = shape_parser("python -m segjml.bench losses", __doc__, ["8x21x512x512", "8x150x512x512"], 3)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory column")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast the forward pass")
    parser.add_argument("--kinds", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = parser.parse_args(argv)
    device = start(args)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    print(f"{'shape':<16} {'target':<6} {'loss':<18} {'time (s)':>9} {'ratio':>6} {'peak extra':>12} {'ratio':>6}")
    for shape_str in args.shapes:
        shape = parse_shape(shape_str)
        for kind in args.kinds:
            baseline, rows = ROWS[kind]
            logits, target, labels = make_inputs(shape, kind, device)
            base_step = make_step(baseline, kind, logits, target, labels, amp)
            base_m = float("nan") if args.no_memory else peak_extra_memory(base_step, device)
            label = f"{baseline} ({'prob' if kind == 'soft' else 'index'})"
            base_t = median_time(base_step, device, args.repeats)
            print(f"{shape_str:<16} {kind:<6} {label:<18} {base_t:9.3f} {1:6.2f} {fmt_bytes(base_m):>12} {1:6.2f}")
            for name in rows:
                slow = name == "lovasz"  # one class at a time over sorted pixels: tens of seconds at C = 150
                step = make_step(name, kind, logits, target, labels, amp)
                # each call of the row alternates with a call of the baseline: the ratio sees one machine state
                t, paired = paired_median_times(step, base_step, device, 1 if slow else args.repeats, 0 if slow else 1)
                m = float("nan") if args.no_memory else peak_extra_memory(step, device)
                print(
                    f"{shape_str:<16} {kind:<6} {name:<18} {t:9.3f} {t / paired:6.2f} {fmt_bytes(m):>12} "
                    f"{m / base_m if base_m else float('nan'):6.2f}",
                    flush=True,
                )
            del logits, target, labels


if __name__ == "__main__":
    main(sys.argv[1:])
