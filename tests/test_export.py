"""``segjml-export``: a checkpoint as ONNX (run with onnxruntime) or TorchScript gives PyTorch's logits at any batch
size, height and width, and carries its class names and normalisation (docs/export.md)."""

import functools
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from omegaconf import OmegaConf

from segjml.cli import guarded
from segjml.config import CONFIG_DIR, compose
from segjml.data.synthetic import CLASS_NAMES
from segjml.data.transforms import BatchToDevice
from segjml.engine import train
from segjml.engine.export import FORMATS, ExportedModel, ExportError, export_checkpoint, export_model
from segjml.engine.segmenter import Segmenter
from segjml.models import build_model
from tests.helpers import ROOT, compose_config, group_options
from tests.test_docs_commands import collect

# (B, 3, H, W): a multiple of 32, a batch of two at sizes that are not, and odd sizes (no model needs a multiple of 32
# in the exported graph: the trace takes every resize, see segjml/engine/export.py)
SIZES = [(1, 3, 64, 64), (2, 3, 96, 80), (1, 3, 77, 101)]
TOLERANCE = 1e-4
DOC = ROOT / "docs" / "export.md"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(compose_config(["debug=fast", "trainer.max_iters=2"], out))
    return out / "checkpoints" / "last.pt"


def export_config(checkpoint, out, *overrides):
    return compose([f"ckpt={checkpoint}", *overrides], "export", output_dir=out)


def documented_exports() -> list[str]:
    """The export command lines of docs/export.md (not the bare names in its text)."""
    return [c for c in collect(DOC) if c.startswith(("segjml-export", "python export.py")) and "ckpt=" in c]


@pytest.fixture(scope="module")
def documented(checkpoint, tmp_path_factory):
    """Every export command of docs/export.md, run as the command runs it: {format: the file it wrote}."""
    out = tmp_path_factory.mktemp("export")
    written = {}
    for command in documented_exports():
        args = command.split("#")[0].split()[1 if command.startswith("segjml-") else 2 :]
        overrides = [a.replace("<checkpoint>", str(checkpoint)) for a in args]
        overrides = [f"output={out / a.split('=')[1]}" if a.startswith("output=") else a for a in overrides]
        cfg = compose(overrides, "export", output_dir=out / f"run{len(written)}")
        written[command] = (cfg, export_checkpoint(cfg))
    return written


@pytest.fixture(scope="module")
def onnx_file(documented):
    return next(path for cfg, path in documented.values() if cfg.format == "onnx")


def images(shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(sum(shape)))


@functools.cache
def segmenter_of(checkpoint) -> Segmenter:
    return Segmenter.from_checkpoint(checkpoint, "cpu")


def pytorch_logits(checkpoint, batch):
    """The main head's logits as `eval.py` computes them: the checkpoint's model on the normalised uint8 batch."""
    segmenter = segmenter_of(checkpoint)
    with torch.no_grad():
        return segmenter.model(BatchToDevice("cpu", segmenter.mean, segmenter.std).images(batch))["out"]


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_onnx_logits_equal_pytorch_at_any_size(checkpoint, onnx_file, shape):
    batch = images(shape)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": batch.float().numpy()})
    expected = pytorch_logits(checkpoint, batch).numpy()
    assert logits.dtype == np.float32 and logits.shape == (shape[0], 6, *shape[2:])
    error = float(np.abs(logits - expected).max())
    print(f"max |onnxruntime - PyTorch| at {shape}: {error:.1e}")
    assert error <= TOLERANCE


def test_onnx_metadata_and_dynamic_axes_read_back_with_onnx(checkpoint, onnx_file):
    model = onnx.load(str(onnx_file))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    stored = OmegaConf.create(torch.load(checkpoint, weights_only=True)["config"])
    assert json.loads(props["class_names"]) == list(CLASS_NAMES) and props["num_classes"] == "6"
    assert json.loads(props["mean"]) == pytest.approx(list(stored.dataset.mean))
    assert json.loads(props["std"]) == pytest.approx(list(stored.dataset.std))
    assert props["checkpoint"] == str(checkpoint.resolve()) and props["model"] == "unet mobilenetv2_050"
    assert "0-255, not normalised" in props["input"]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    (image,), (logits,) = model.graph.input, model.graph.output
    assert (image.name, dims(image), image.type.tensor_type.elem_type) == (
        "image",
        ["batch", 3, "height", "width"],
        onnx.TensorProto.FLOAT,
    )
    # the class dimension of the output is symbolic (the exporter's shape inference stops at the final Resize)
    assert logits.name == "logits" and [dims(logits)[i] for i in (0, 2, 3)] == ["batch", "height", "width"]


def test_torchscript_logits_and_metadata(checkpoint, documented):
    path = next(path for cfg, path in documented.values() if cfg.format == "torchscript")
    extra = {"segjml.json": ""}
    with pytest.warns(FutureWarning):  # torch deprecates TorchScript (docs/export.md)
        module = torch.jit.load(str(path), _extra_files=extra)
    props = json.loads(extra["segjml.json"])
    assert json.loads(props["class_names"]) == list(CLASS_NAMES) and props["num_classes"] == "6"
    for shape in SIZES:
        batch = images(shape)
        with torch.no_grad():
            error = float((module(batch.float()) - pytorch_logits(checkpoint, batch)).abs().max())
        print(f"max |TorchScript - PyTorch| at {shape}: {error:.1e}")
        assert error <= TOLERANCE


def fails_in_one_line(cfg, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        guarded(cfg, lambda: export_checkpoint(cfg))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_a_missing_export_extra_names_the_pip_command(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    line = fails_in_one_line(export_config(checkpoint, tmp_path), capsys)
    assert line == "error: format=onnx needs the export extra: pip install 'segjml[export]'"
    assert not list(tmp_path.glob("*.onnx"))


def test_the_export_extra_and_the_command_are_declared():
    requires = metadata.requires("segjml")
    for package in ("onnx", "onnxruntime"):
        for extra in ("export", "dev"):
            assert any(r.startswith(f"{package}>") and f'extra == "{extra}"' in r for r in requires), (package, extra)
    scripts = {e.name: e.value for e in metadata.distribution("segjml").entry_points if e.group == "console_scripts"}
    assert scripts["segjml-export"] == "segjml.cli:export_main"


def test_export_py_refuses_an_unknown_format_in_one_line(checkpoint, tmp_path):
    proc = subprocess.run(
        [sys.executable, "export.py", f"ckpt={checkpoint}", "format=tflite", f"paths.log_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: format=tflite is not a format segjml exports; choose one of onnx, torchscript"
    ]


def test_onnx_refuses_pspnet_in_one_line_naming_the_operator(tmp_path):
    model = build_model("pspnet", "mobilenetv2_050", num_classes=3, channels=8, aux_channels=8, output_stride=8)
    with pytest.raises(ExportError) as caught:
        export_model(ExportedModel(model, (0, 0, 0), (1, 1, 1)), "onnx", tmp_path / "m.onnx", {"model": "pspnet"})
    assert str(caught.value) == (
        "format=onnx cannot express this model (pspnet): Unsupported: ONNX export of operator adaptive_avg_pool2d, "
        "input size not accessible; format=torchscript exports every segjml architecture (docs/export.md)"
    )
    assert not (tmp_path / "m.onnx").exists()


def test_every_documented_export_command_writes_the_file_the_text_names(documented):
    assert len(documented) == 3
    for command, (cfg, path) in documented.items():
        named = command.split("#")[1].strip()  # "<run dir>/model.onnx" or "a file of your choice"
        if named.startswith("<run dir>/"):
            assert path == Path(cfg.paths.output_dir) / named.removeprefix("<run dir>/"), command
        else:
            assert path == Path(cfg.output), command
        assert path.exists() and path.suffix == (".onnx" if cfg.format == "onnx" else ".pt"), command


def test_the_docs_onnxruntime_example_runs(onnx_file, capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    scope = {}
    exec(code.replace("model.onnx", str(onnx_file)), scope)
    assert scope["labels"].shape == (1, 77, 101) and scope["class_names"] == list(CLASS_NAMES)
    assert "classes:" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ every architecture


def architecture_table() -> dict[str, dict[str, str]]:
    """The table in docs/export.md: model preset -> {format: "yes" / "no ..."}."""
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", DOC.read_text(), re.M)
    return {row[0]: dict(zip(("onnx", "torchscript", "torch_export"), map(str.strip, row[2:]))) for row in rows}


def test_the_architecture_table_names_every_model_preset():
    presets = [p for p in group_options("model") if p != "custom"]
    assert sorted(architecture_table()) == presets


def torch_export_errors(module: torch.nn.Module) -> list[str]:
    """torch.export with dynamic batch, height and width (Dim.AUTO; a batch of 2, else it is specialised to 1) at
    64 x 64, run at every size of SIZES."""
    from torch.export import Dim

    auto = {"image": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}}
    program = torch.export.export(module, (torch.rand(2, 3, 64, 64) * 255,), dynamic_shapes=auto).module()
    errors = []
    for shape in SIZES:
        image = images(shape).float()
        try:
            with torch.no_grad():
                assert float((program(image) - module(image)).abs().max()) <= TOLERANCE
        except Exception as err:
            errors.append(f"{shape}: {type(err).__name__}: {str(err)[:200]}")
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in group_options("model") if p != "custom"])
def test_every_model_preset_exports_as_the_table_says(preset, tmp_path):
    node = OmegaConf.load(CONFIG_DIR / "model" / f"{preset}.yaml")
    model = build_model(node.arch, node.encoder, 6, node.channels, node.aux_channels, node.output_stride, False)
    module = ExportedModel(model, (123.7, 116.3, 103.5), (58.4, 57.1, 57.4))
    table = architecture_table()[preset]
    for fmt in FORMATS:
        try:
            export_model(module, fmt, tmp_path / f"model.{fmt}", {"model": preset})
            outcome = "yes"
        except ExportError as err:
            outcome = f"no: {err}"
        assert outcome.split(":")[0] == table[fmt].split(" ")[0].rstrip(":"), (fmt, outcome)
    errors = torch_export_errors(module)
    assert ("yes" if not errors else "no") == table["torch_export"].split(" ")[0].rstrip(":"), errors
