"""``segjml-export``: a trained checkpoint as one file for deployment, ONNX or TorchScript (docs/export.md).

What is exported is :class:`ExportedModel`: the model :meth:`~segjml.engine.segmenter.Segmenter.from_checkpoint`
builds (eval mode, float32, on the CPU) behind the data set's normalisation, from float RGB images (0-255) of any
batch size, height and width to the main head's logits. The class names, mean, std, number of classes and the source
checkpoint go into the file (ONNX ``metadata_props``; TorchScript's extra file ``segjml.json``).

Both formats are traced, at :data:`TRACE_SIZE`: a trace records one path through the Python code, and the models
take shape-dependent branches (UNet resizes a decoder map to its skip only when their sizes differ; the main head is
resized only when it is not at the input size already). At 65 x 65 every such branch resizes, and a resize to the
size a map already has is the identity, so the traced graph is exact at every size. The written file is then run at
:data:`CHECK_SHAPES` and compared with PyTorch: a graph that does not reproduce the logits is refused, not written
silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

# The formats and the file each one writes by default, in the run directory.
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
FORMATS = tuple(FILE_NAMES)

TRACE_SIZE = 65  # odd at strides 1 to 16 (65, 33, 17, 9, 5): every shape-dependent resize is taken while tracing
CHECK_SHAPES = ((1, 3, 64, 64), (2, 3, 77, 101))  # the written file against PyTorch: a multiple of 32, and odd sizes
TOLERANCE = 1e-4  # max |exported - PyTorch| of the logits, float32

INPUT = "image: float32 (B, 3, H, W), RGB, 0-255, not normalised (the graph subtracts mean and divides by std)"
OUTPUT = "logits: float32 (B, num_classes, H, W), the main head before softmax"


class ExportError(ValueError):
    """An export that cannot be done as asked: an unknown format, a missing extra, or a model the format cannot
    express (one line, exit code 2)."""


class ExportedModel(nn.Module):
    """The graph that is exported: ``(B, 3, H, W)`` float32 RGB images, 0-255 -> ``(B, C, H, W)`` float32 logits.

    The normalisation is the one :class:`~segjml.data.transforms.BatchToDevice` applies in training and evaluation,
    ``(image - mean) / std``; only the main head is computed (``model(x)["out"]`` in eval mode, no auxiliary head).

    Args:
        model: a segjml model (``forward`` returns ``{"out": logits}`` in eval mode).
        mean, std: per channel, 0-255 scale (``dataset.mean`` / ``dataset.std``).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model.float()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.eval()  # the exporters put a module back in the mode they found it in: it must be eval, all the way down

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image - self.mean) / self.std)["out"]


def export_checkpoint(cfg: DictConfig) -> Path:
    """``export.py``: the checkpoint ``cfg.ckpt`` written in ``cfg.format`` to ``cfg.output`` (default: the run
    directory's ``model.onnx`` / ``model.torchscript.pt``); returns the path written.

    Raises:
        ExportError: an unknown format, the export extra missing (checked before the checkpoint is read), or a model
            the format cannot express.
        CheckpointError: an unreadable checkpoint (as for ``eval.py``).
    """
    from segjml.engine.checkpoint import load_checkpoint
    from segjml.engine.segmenter import Segmenter

    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt} is not a format segjml exports; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        import_onnx()
    segmenter = Segmenter.from_checkpoint(cfg.ckpt, "cpu")
    model_cfg = (load_checkpoint(cfg.ckpt).get("config") or {}).get("model") or {}  # read through eval's checks
    metadata = {
        "class_names": json.dumps(segmenter.class_names),
        "num_classes": str(segmenter.num_classes),
        "mean": json.dumps(list(segmenter.mean)),
        "std": json.dumps(list(segmenter.std)),
        "checkpoint": str(Path(cfg.ckpt).resolve()),
        "model": f"{model_cfg.get('arch')} {model_cfg.get('encoder')}",
        "input": INPUT,
        "output": OUTPUT,
    }
    path = Path(str(cfg.output)) if cfg.get("output") else Path(cfg.paths.output_dir) / FILE_NAMES[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    module = ExportedModel(segmenter.model, segmenter.mean, segmenter.std)
    errors = export_model(module, fmt, path, metadata, int(cfg.opset))
    checked = ", ".join(f"{error:.1e} at {'x'.join(map(str, shape))}" for shape, error in errors.items())
    print(f"wrote {path} ({fmt}, {segmenter.num_classes} classes); max |exported - PyTorch| logits: {checked}")
    return path


def export_model(
    module: nn.Module, fmt: str, path: Path, metadata: Mapping[str, str], opset: int = 17
) -> dict[tuple[int, ...], float]:
    """Write ``module`` (an :class:`ExportedModel`) in ``fmt`` to ``path`` with ``metadata``, run the file at
    :data:`CHECK_SHAPES` and return the max abs difference of its logits from PyTorch's at each shape.

    Raises:
        ExportError: the exporter cannot express the model, or the written file fails or differs from PyTorch by
            more than :data:`TOLERANCE` at one of :data:`CHECK_SHAPES` (the file is removed).
    """
    example = torch.rand(1, 3, TRACE_SIZE, TRACE_SIZE) * 255
    # Both formats are torch's TorchScript tracer; its warnings ("converting a tensor to a Python boolean might cause
    # the trace to be incorrect", the deprecation of TorchScript) are what the check against PyTorch below answers.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            run = EXPORTERS[fmt](module, example, path, metadata, opset)
        except torch.onnx.errors.OnnxExporterError as err:
            reason = str(err).strip().splitlines()[0].split(". Please")[0]
            raise ExportError(
                f"format={fmt} cannot express this model ({metadata.get('model', type(module).__name__)}): {reason}; "
                "format=torchscript exports every segjml architecture (docs/export.md)"
            ) from err
        errors = {}
        for shape in CHECK_SHAPES:
            image = torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 255
            try:
                errors[shape] = float((run(image) - module(image)).abs().max())
            except Exception as err:  # the graph fails at a size it was not traced at
                errors[shape] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    bad = {shape: error for shape, error in errors.items() if isinstance(error, str) or error > TOLERANCE}
    if bad:
        path.unlink(missing_ok=True)
        shape, error = next(iter(bad.items()))
        raise ExportError(
            f"format={fmt} does not reproduce this model ({metadata.get('model', type(module).__name__)}) at input "
            f"{'x'.join(map(str, shape))}: {error if isinstance(error, str) else f'max |logit error| {error:.1e}'}; "
            "docs/export.md lists the formats of each architecture"
        )
    return errors


def import_onnx() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` modules (the ``export`` extra)."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError("format=onnx needs the export extra: pip install 'segjml[export]'") from err
    return onnx, onnxruntime


def _onnx(module: nn.Module, example: torch.Tensor, path: Path, metadata: Mapping[str, str], opset: int):
    # The TorchScript-based exporter (dynamo=False): torch's default, torch.export-based exporter needs onnxscript and
    # gives wrong logits for PSPNet at sizes it was not exported at (docs/export.md).
    onnx, onnxruntime = import_onnx()
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with _stderr_discarded():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": dynamic, "logits": dynamic},
            opset_version=opset,
        )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, dict(metadata))
    onnx.save(proto, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda image: torch.from_numpy(session.run(["logits"], {"image": image.numpy()})[0])


@contextlib.contextmanager
def _stderr_discarded():
    """The process's stderr (file descriptor 2) sent to /dev/null: the exporter's C++ log prints the whole graph there
    when an export fails, whatever ``verbose`` says (torch's ``setup_onnx_logging`` tests the function
    ``_jit_is_onnx_log_enabled`` instead of calling it); the failure is reported in one line instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _torchscript(module: nn.Module, example: torch.Tensor, path: Path, metadata: Mapping[str, str], opset: int):
    traced = torch.jit.trace(module, example)
    torch.jit.save(traced, str(path), _extra_files={"segjml.json": json.dumps(dict(metadata))})
    return torch.jit.load(str(path))


EXPORTERS = {"onnx": _onnx, "torchscript": _torchscript}
