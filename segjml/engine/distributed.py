"""Process-group helpers for ``torchrun`` (single node or multi-node rendezvous; NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU (``cuda:LOCAL_RANK``) if there is one, else the CPU; ``cuda``: the same GPU;
    ``cuda:N`` / ``cpu``: as written.

    Raises:
        ValueError: a device name torch does not know, or a GPU asked for on a machine without one.
    """
    try:
        device = torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' asks for a GPU but torch sees none; use device=cpu (or auto)")
        index = local_rank if device.index is None else device.index
        visible = torch.cuda.device_count()
        if index >= visible:
            source = f"LOCAL_RANK={local_rank}" if device.index is None else f"device '{name}'"
            raise ValueError(
                f"{source} asks for GPU {index} but torch sees {visible} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most {visible} "
                "process(es) per node (torchrun --nproc_per_node) or make more GPUs visible"
            )
        return torch.device("cuda", index)
    return device


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1), else run alone.

    Returns the ranks and this process's device (see :func:`resolve_device`; ``cuda:LOCAL_RANK`` on GPUs).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if info.enabled and device_name.startswith("cuda:"):
        raise ValueError(
            f"trainer.device={device_name} under torchrun puts every process on that one GPU; use trainer.device=auto "
            "(or cuda): each process takes cuda:LOCAL_RANK"
        )
    device = resolve_device(device_name, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """``flag`` of every rank combined with AND (the flag itself when running alone)."""
    if not info.enabled:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0.0


def any_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    return not all_true(not flag, info, device)


def any_each(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """Each of ``flags`` combined with OR over every rank, in one all-reduce (the flags themselves when alone)."""
    if not info.enabled:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def set_backend_policy(device: torch.device, cudnn_benchmark: bool, tf32: bool, deterministic: bool) -> None:
    """The GPU settings of a training run on ``device`` (``trainer.cudnn_benchmark``, ``trainer.tf32``,
    ``trainer.deterministic``; docs/distributed.md, "GPU settings"). They are process-wide; on the CPU only
    ``deterministic`` has an effect.

    - ``cudnn_benchmark``: cuDNN times the convolution algorithms for each new input shape and keeps the fastest (the
      training crops all have one shape; evaluation turns it off, see :func:`cudnn_benchmark_off`).
    - ``tf32``: float32 matrix products and convolutions of the model on TensorFloat-32 tensor cores (Ampere and
      later); the losses keep full float32 (:func:`full_float32_matmuls`).
    - ``deterministic``: ``torch.use_deterministic_algorithms(True, warn_only=True)``, deterministic cuDNN algorithms
      and no benchmarking, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` if it is not set. Ops without a deterministic CUDA
      kernel warn instead of failing (the backward passes of bilinear upsampling and of adaptive average pooling,
      which every architecture uses, and the weighted ``bincount`` of the metrics).
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if device.type != "cuda":  # the CPU's float32 matmuls keep their own default precision
        return
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


@contextlib.contextmanager
def full_float32_matmuls() -> Iterator[None]:
    """Within: float32 matrix products in full precision, whatever ``trainer.tf32`` says (the loss sums)."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextlib.contextmanager
def cudnn_benchmark_off() -> Iterator[None]:
    """Within: no cuDNN benchmarking (evaluation images have many sizes; each new one would be timed again)."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
