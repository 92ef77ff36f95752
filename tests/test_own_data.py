"""docs/own-data.md, run command by command on small folders of real JPEG images and PNG masks that the tests write.

The tutorial's folder (``/data/mine``: index masks, two splits), its RGB-mask variant (``/data/rgb``) and its
reduce-zero-label variant (``/data/ade_like``) are written by ``tests.test_folder_dataset.write_folder``, which returns
the class ids each mask stands for. Every command of the tutorial is run as written, with ``/data/`` pointing at the
test's folder, ``<run dir>`` at the directory the training printed, and the test-only overrides of ``FAST`` (3
iterations, small crops, no pretrained weights, no logger). What each step promises is checked against values computed
here: the report's pixel counts from the written masks, the evaluation's mIoU from the Python API's predictions, the
predicted images against the classes' colours, the exported model against PyTorch.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, run_in_process
from tests.test_folder_dataset import CLASSES, FAST, PALETTE, SPLITS, H, W, write_folder

DOC = ROOT / "docs" / "own-data.md"
LOGS = "paths.log_dir={}"


def fenced(language: str, text: str | None = None) -> list[str]:
    """The fenced code blocks of docs/own-data.md (or of ``text``) in ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text or DOC.read_text(), re.M | re.S)


def commands(section: str) -> list[str]:
    """The ``python ...`` lines of the bash blocks before (``tutorial``) or after (``variants``) "## Variants"."""
    tutorial, variants = DOC.read_text().split("\n## Variants", 1)
    text = tutorial if section == "tutorial" else variants
    return [line.strip() for block in fenced("bash", text) for line in block.splitlines() if line.startswith("python ")]


def run(command: str, data: Path, run_dir: Path | None = None, *extra: str) -> subprocess.CompletedProcess:
    """``command`` as the tutorial writes it, its ``/data/`` in ``data`` and ``<run dir>`` the training's directory."""
    if run_dir is not None:
        command = command.replace("<run dir>", str(run_dir))
    args = [arg.replace("/data/", f"{data}/") for arg in shlex.split(command)]
    assert args[0] == "python" and "<" not in " ".join(args), command
    proc = subprocess.run([sys.executable, *args[1:], *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def printed_path(pattern: str, proc: subprocess.CompletedProcess) -> Path:
    found = re.search(pattern, proc.stdout + proc.stderr)
    assert found, (pattern, proc.stdout[-2000:], proc.stderr[-2000:])
    return Path(found.group(1))


def train(command: str, data: Path, logs: Path) -> Path:
    """Runs a documented training command for 3 iterations; returns the run directory it prints."""
    proc = run(command, data, None, *FAST, LOGS.format(logs))
    run_dir = printed_path(r"run directory: (\S+)", proc)
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    return run_dir


def mean_iou(predictions: list[np.ndarray], labels: list[np.ndarray], num_classes: int, ignore: int = 255) -> float:
    """mIoU^D in percent, as docs/metrics.md defines it: IoU of the data-set-wide confusion matrix, averaged over the
    classes present in the ground truth or the prediction of labelled pixels."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for pred, label in zip(predictions, labels, strict=True):
        keep = label != ignore
        np.add.at(confusion, (label[keep], pred[keep]), 1)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return float(100 * (tp[union > 0] / union[union > 0]).mean())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict[str, dict[str, list]]]:
    """``<data>/mine`` (index masks), ``<data>/rgb`` (RGB masks) and ``<data>/ade_like`` (0 = other), with the class
    ids of each split's masks."""
    root = tmp_path_factory.mktemp("data")
    labels = {
        "mine": write_folder(root / "mine"),
        "rgb": write_folder(root / "rgb", masks="rgb", seed=1),
        "ade_like": write_folder(root / "ade_like", reduce_zero=True, seed=2),
    }
    return root, labels


def test_the_tutorial_takes_a_folder_to_an_evaluated_predicted_and_exported_model(data, tmp_path):
    root, labels = data
    validate, train_command, evaluate, predict, export = commands("tutorial")
    assert validate.startswith("python -m segjml.data.validate dataset=folder dataset.root=/data/mine")
    assert train_command.startswith("python train.py dataset=folder") and "loss=ce_jml_bls" in train_command
    assert [c.split()[1] for c in (evaluate, predict, export)] == ["eval.py", "predict.py", "export.py"]
    logs = tmp_path / "logs"
    classes = ["road", "building", "tree"]

    # 2. the report counts the pixels of each class that the masks hold
    proc = run(validate, root, None, LOGS.format(logs))
    assert f"folder: {sum(SPLITS.values())} samples scanned, 0 bad" in proc.stdout
    report = json.loads(printed_path(r"data report: (\S+\.json),", proc).read_text())
    assert report["class_names"] == classes
    for split, masks in labels["mine"].items():
        expected = [sum(int((m == c).sum()) for m in masks) for c in range(len(CLASSES))]
        assert report["splits"][split]["class_pixels"] == expected, split
        assert report["splits"][split]["images"] == SPLITS[split]

    # 3. train; 4. evaluate the best checkpoint
    run_dir = train(train_command, root, logs)
    best = run_dir / "checkpoints" / "best.pt"
    proc = run(evaluate, root, run_dir, "num_workers=0", LOGS.format(logs))
    eval_dir = printed_path(r"wrote (\S+)/metrics\.json", proc)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert (eval_dir / "reliability.png").is_file() and metrics["class_names"] == classes

    # the Python block predicts what eval.py measured: its mIoU from its labels and the written masks
    code = fenced("python")[0].replace("<run dir>", str(run_dir)).replace("/data/", f"{root}/")
    code = code.replace("<name>", "val_00")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"{classes} torch.Size([{H}, {W}])"
    import segjml

    segmenter = segjml.Segmenter.from_checkpoint(best, device="cpu")
    images = sorted((root / "mine" / "images" / "val").glob("*.jpg"))
    predicted = [segmenter(path).numpy() for path in images]
    assert metrics["miou"] == pytest.approx(mean_iou(predicted, labels["mine"]["val"], len(CLASSES)), abs=1e-9)

    # 5. predict: three images per input, the classes in grey levels (the folder has no palette), at the input size
    proc = run(predict, root, run_dir, LOGS.format(logs))
    out = printed_path(r"wrote predictions of \d+ images to (\S+)", proc)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        f"{p.stem}_{kind}.png" for p in images for kind in ("pred", "overlay", "conf")
    )
    for path, labels_of in zip(images, predicted, strict=True):
        pred = np.asarray(Image.open(out / f"{path.stem}_pred.png").convert("RGB"))
        assert pred.shape == (H, W, 3)
        grey = pred.reshape(-1, 3)
        # one colour per class id: equal labels have equal colours and different labels different ones
        pairs = {(int(label), tuple(colour)) for label, colour in zip(labels_of.reshape(-1), grey, strict=True)}
        assert len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})

    # 6. export: the ONNX file computes what the checkpoint computes
    proc = run(export, root, run_dir, LOGS.format(logs))
    onnx_file = printed_path(r"wrote (\S+\.onnx) \(onnx", proc)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["class_names"]) == classes
    image = np.asarray(Image.open(images[1]).convert("RGB"))
    (logits,) = session.run(None, {"image": image.transpose(2, 0, 1)[None].astype(np.float32)})
    _, probs = segmenter(image, return_probs=True)
    assert logits.shape == (1, len(CLASSES), H, W)
    np.testing.assert_array_equal(logits.argmax(1)[0], predicted[1])
    np.testing.assert_allclose(
        np.exp(logits) / np.exp(logits).sum(1, keepdims=True), probs.numpy()[None], atol=1e-5, rtol=0
    )


def in_process(command: str, data: Path, output_dir: Path, run_dir: Path | None = None, *extra: str):
    """``command`` as ``run`` would start it, run in this process (``tests.helpers.run_in_process``)."""
    if run_dir is not None:
        command = command.replace("<run dir>", str(run_dir))
    args = [arg.replace("/data/", f"{data}/") for arg in shlex.split(command)]
    return run_in_process(args[1], [*args[2:], *extra], output_dir)


@pytest.mark.parametrize("variant", ["rgb", "ade_like"])
def test_the_variants_train_evaluate_predict_and_export(data, tmp_path, variant):
    """The RGB-mask variant reads the colours of ``dataset.palette`` and predicts in them; the reduce-zero-label variant
    ignores 0 and counts its classes from 1. Both evaluate, predict and export with the tutorial's commands, composed
    and run here in the test's process (the tutorial's test runs them as processes)."""
    import segjml

    root, labels = data
    (command,) = [c for c in commands("variants") if f"/data/{variant} " in c]
    _, _, evaluate, predict, export = commands("tutorial")
    run_dir = tmp_path / "run"
    in_process(command, root, run_dir, None, *FAST)
    metrics = in_process(evaluate, root, tmp_path / "eval", run_dir, "num_workers=0")
    stored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert stored["class_names"] == ["road", "building", "tree"] and stored["miou"] == metrics["miou"]

    images = sorted((root / variant / "images" / "val").glob("*.jpg"))
    segmenter = segjml.Segmenter.from_checkpoint(run_dir / "checkpoints" / "best.pt", device="cpu")
    predicted = [segmenter(path).numpy() for path in images]
    assert metrics["miou"] == pytest.approx(mean_iou(predicted, labels[variant]["val"], len(CLASSES)), abs=1e-9)

    in_process(predict.replace("/data/mine/", f"/data/{variant}/"), root, tmp_path / "pred", run_dir)
    pred = np.asarray(Image.open(tmp_path / "pred" / f"{images[0].stem}_pred.png").convert("RGB"))
    if variant == "rgb":  # the predicted classes in the colours the masks use
        np.testing.assert_array_equal(pred, np.asarray(PALETTE, dtype=np.uint8)[predicted[0]])
    else:  # grey levels, one per class
        assert len(np.unique(pred.reshape(-1, 3), axis=0)) == len(np.unique(predicted[0]))

    path = in_process(export, root, tmp_path / "export", run_dir)
    assert path == tmp_path / "export" / "model.onnx" and path.is_file()


def test_the_readme_section_shows_commands_the_tutorial_test_runs():
    """README's "Your own data" commands are the tutorial's own, so the tutorial's test runs them as written."""
    section = (ROOT / "README.md").read_text().split("\n## Your own data", 1)[1].split("\n## ", 1)[0]
    shown = [line.strip() for block in fenced("bash", section) for line in block.splitlines() if line.strip()]
    assert len(shown) == 2 and set(shown) <= set(commands("tutorial"))
    assert "docs/own-data.md" in section
