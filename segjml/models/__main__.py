"""``python -m segjml.models``: every ``configs/model`` preset with its parameters (M) at 19 classes, the paper's
Table 9 value, the difference, and GFLOPs at 512x1024 (``--flops``, counted with ``torch.utils.flop_counter``)."""

from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf

from segjml.config import CONFIG_DIR, compose
from segjml.models import build_model

TABLE9 = {
    "dl3p_r101": 62.58,
    "dl3_r101": 87.10,
    "dl3_r50": 68.11,
    "dl3_r18": 13.98,
    "dl3_mb2": 3.79,
    "psp_r18": 12.79,
    "unet_r50": 76.07,
    "unet_r18": 14.49,
    "unet_mb2": 4.06,
    "segformer_b5": 83.77,
    "segformer_b3": 46.40,
    "segformer_b1": 15.48,
    "segformer_b0": 5.01,
}


def preset_kwargs(name: str, num_classes: int) -> dict:
    """The keyword arguments of :func:`build_model` that ``model=<name>`` composes to (random init)."""
    node = compose([f"model={name}", "pretrained=false"]).model
    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    kwargs.update(num_classes=num_classes, pretrained_path=None)
    return kwargs


def gflops(model: torch.nn.Module, size: tuple[int, int]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *size))
    return counter.get_total_flops() / 2e9  # multiply-accumulates, as papers report "FLOPs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--flops", action="store_true", help="also count GFLOPs at 512x1024 (slow on CPU)")
    args = parser.parse_args()
    header = f"{'preset':<14} {'arch':<14} {'encoder':<16} {'params (M)':>10} {'Table 9':>8} {'diff %':>7}"
    print(header + (f" {'GFLOPs':>8}" if args.flops else ""))
    print("-" * (len(header) + (9 if args.flops else 0)))
    for path in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        kwargs = preset_kwargs(path.stem, args.classes)
        model = build_model(**kwargs)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        paper = TABLE9.get(path.stem)
        diff = f"{100 * (params - paper) / paper:+7.2f}" if paper else f"{'-':>7}"
        row = f"{path.stem:<14} {kwargs['arch']:<14} {kwargs['encoder']:<16} {params:10.2f} "
        row += (f"{paper:8.2f}" if paper else f"{'-':>8}") + f" {diff}"
        if args.flops:
            row += f" {gflops(model, (512, 1024)):8.1f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
