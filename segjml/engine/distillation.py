"""The frozen teacher of knowledge distillation (paper section 2.4.2, eq. 11-13).

The teacher is a segjml checkpoint. Its architecture comes from the model config stored in that checkpoint (or an
explicit ``teacher.model`` node), it is loaded strictly, put in eval mode with ``requires_grad=False``, never
wrapped in DDP, and run under ``torch.no_grad`` (and autocast).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segjml.engine.checkpoint import CheckpointError, load_checkpoint
from segjml.utils import build


class TeacherError(RuntimeError):
    """A teacher that does not fit its checkpoint or the student's data set."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build_teacher(cfg: DictConfig, num_classes: int, device: torch.device) -> tuple[nn.Module, str]:
    """Build and load the teacher described by ``cfg`` (``checkpoint`` and optional ``model``).

    Returns the frozen teacher and the SHA-256 of its checkpoint (stored in the student's checkpoints).

    Raises:
        TeacherError: missing checkpoint, class-count or architecture mismatch.
    """
    if not cfg.get("checkpoint"):
        raise TeacherError("this loss distils from a teacher: set teacher.checkpoint=<a segjml checkpoint .pt>")
    path = Path(cfg.checkpoint)
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise TeacherError(f"teacher {err}") from err
    model_cfg = cfg.get("model") or (state.get("config") or {}).get("model")
    if model_cfg is None:
        raise TeacherError(f"teacher checkpoint {path} holds no model config; set teacher.model")
    if isinstance(model_cfg, DictConfig):  # an explicit node: resolve it against the full config first
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    model_cfg = OmegaConf.create(model_cfg)
    model_cfg.pretrained = False  # the checkpoint holds every weight
    if model_cfg.get("num_classes") != num_classes:
        raise TeacherError(f"teacher {path} predicts {model_cfg.get('num_classes')} classes but the data set has "
                           f"{num_classes}")
    teacher = build(model_cfg)
    try:
        teacher.load_state_dict(state["model"], strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise TeacherError(f"teacher checkpoint {path} does not fit the teacher model "
                           f"({model_cfg.get('arch')}/{model_cfg.get('encoder')}): {first}") from err
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, file_sha256(path)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, image: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Main-head logits of the frozen teacher (float32)."""
    with torch.autocast(image.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return teacher(image, with_aux=False)["out"].float()
