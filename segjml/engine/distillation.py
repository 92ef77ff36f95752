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

from segjml.engine.checkpoint import CheckpointError
from segjml.engine.commands import load_trained


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

    A model config stored in the checkpoint is the file's, built only through segjml's model builder
    (:func:`segjml.engine.commands.check_allowed_targets`); ``cfg.model`` is the user's own, built as given.

    Raises:
        TeacherError: missing or unreadable checkpoint, a stored model config that would build anything but segjml's
            model builder, weights that do not fit, class-count mismatch.
    """
    if not cfg.get("checkpoint"):
        raise TeacherError("this loss distils from a teacher: set teacher.checkpoint=<a segjml checkpoint .pt>")
    path = Path(cfg.checkpoint)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else None
    try:
        teacher, _ = load_trained(path, device, model_cfg)
    except CheckpointError as err:
        raise TeacherError(f"teacher {err}") from err
    if teacher.num_classes != num_classes:
        raise TeacherError(f"teacher {path} predicts {teacher.num_classes} classes but the data set has {num_classes}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, file_sha256(path)


@torch.no_grad()
def teacher_logits(
    teacher: nn.Module, image: torch.Tensor, autocast_dtype: torch.dtype | None = None, with_aux: bool = False
) -> dict[str, torch.Tensor]:
    """Logits of the frozen teacher (float32, at the input size): ``{"out": ...}``, plus ``"aux"`` (its auxiliary
    head, which an eval-mode model computes only when asked) with ``with_aux``."""
    with torch.autocast(image.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        outputs = teacher(image, with_aux=with_aux)
    keys = ("out", "aux") if with_aux else ("out",)
    return {k: outputs[k].float() for k in keys if k in outputs}
