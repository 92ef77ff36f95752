"""`segjml.Segmenter`: a checkpoint as a Python callable that predicts what `eval.py` predicts (docs/inference.md)."""

import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import segjml
from segjml.config import compose
from segjml.data import DataError, build_dataset
from segjml.data.synthetic import CLASS_NAMES
from segjml.data.transforms import BatchToDevice
from segjml.engine import train
from segjml.engine.commands import evaluate_checkpoint, load_trained, stored_dataset
from segjml.engine.inference import InferenceMode
from segjml.engine.segmenter import Prediction, Segmenter
from segjml.metrics import SegmentationMetrics
from tests.helpers import ROOT, compose_config

SAMPLES = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(compose_config(["debug=fast", "trainer.max_iters=4"], out))
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def val_images(checkpoint):
    """The first validation images of the checkpoint's data set, as `eval.py` loads them: (B, 3, H, W) uint8."""
    _, state = load_trained(checkpoint)
    val_set = build_dataset(stored_dataset(str(checkpoint), state), "val", SAMPLES)
    return torch.stack([val_set[i][0] for i in range(SAMPLES)]), torch.stack([val_set[i][1] for i in range(SAMPLES)])


def eval_path_probs(checkpoint, images, inference):
    """The probabilities `evaluate_checkpoint` computes for a batch: its model, normalisation and mode."""
    model, state = load_trained(checkpoint)
    data_cfg = stored_dataset(str(checkpoint), state)
    return inference.probs(model, BatchToDevice("cpu", data_cfg.mean, data_cfg.std).images(images))


@pytest.mark.parametrize(
    "mode", [dict(), dict(mode="slide", crop_size=(48, 48), flip=True, scales=(0.75, 1.0))], ids=["whole", "slide"]
)
def test_it_predicts_what_the_eval_path_predicts(checkpoint, val_images, mode):
    segmenter = Segmenter.from_checkpoint(checkpoint, "cpu", **mode)
    prediction = segmenter(val_images[0], return_probs=True)
    assert isinstance(prediction, Prediction)
    labels, probs = prediction
    expected = eval_path_probs(checkpoint, val_images[0], InferenceMode(**mode))
    assert probs.shape == expected.shape == (SAMPLES, 6, 64, 64) and labels.dtype == torch.int64
    torch.testing.assert_close(probs, expected)
    assert torch.equal(labels, expected.argmax(1))


def test_eval_py_metrics_equal_the_metrics_of_its_predictions(checkpoint, val_images, tmp_path):
    cfg = compose(
        [f"ckpt={checkpoint}", f"limit_samples={SAMPLES}", "device=cpu", "num_workers=0"], "eval", output_dir=tmp_path
    )
    result = evaluate_checkpoint(cfg)
    segmenter = Segmenter.from_checkpoint(checkpoint, "cpu")
    metrics = SegmentationMetrics(segmenter.num_classes, 255, **cfg.metrics)
    for image, target in zip(*val_images):
        metrics.update(segmenter(image[None], return_probs=True).probs, target[None].long())
    mine = metrics.compute()
    for key in ("acc", "miou", "miou_i", "miou_c", "ece", "sce", "bece"):
        assert mine[key] == pytest.approx(result[key], abs=1e-6), key


def test_every_input_kind_gives_the_same_labels(checkpoint, val_images, tmp_path):
    segmenter = Segmenter.from_checkpoint(checkpoint, "cpu")
    chw = val_images[0][0]
    hwc = chw.permute(1, 2, 0).numpy()
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), hwc[:, :, ::-1])
    expected = segmenter(val_images[0])[0]
    for image in (chw, hwc, Image.fromarray(hwc), path, str(path)):
        labels = segmenter(image)
        assert labels.shape == (64, 64) and labels.dtype == torch.int64
        assert torch.equal(labels, expected), type(image).__name__
    rgba = np.concatenate([hwc, np.full_like(hwc[:, :, :1], 7)], axis=2)
    assert torch.equal(segmenter(rgba), expected)
    assert torch.equal(segmenter(Image.fromarray(rgba, mode="RGBA")), expected)
    gray = hwc[:, :, 1].copy()
    as_rgb = segmenter(np.repeat(gray[:, :, None], 3, axis=2))
    for image in (gray, gray[:, :, None], Image.fromarray(gray, mode="L")):
        assert torch.equal(segmenter(image), as_rgb)


def test_it_reads_the_stored_config_and_keywords_replace_it(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["trainer"]["eval"] = {"mode": "slide", "flip": True, "scales": [0.5, 1.0]}
    state["config"]["dataset"]["crop_size"] = [32, 32]
    changed = tmp_path / "changed.pt"
    torch.save(state, changed)
    segmenter = Segmenter.from_checkpoint(changed, "cpu")
    assert segmenter.inference == InferenceMode(mode="slide", crop_size=(32, 32), flip=True, scales=(0.5, 1.0))
    assert segmenter.class_names == list(CLASS_NAMES) and segmenter.num_classes == 6
    assert segmenter.mean == pytest.approx(state["config"]["dataset"]["mean"])
    assert segmenter.std == pytest.approx(state["config"]["dataset"]["std"])
    replaced = Segmenter.from_checkpoint(changed, "cpu", mode="whole", flip=False, scales=[1.0])
    assert replaced.inference == InferenceMode(mode="whole", crop_size=(32, 32))


@pytest.mark.parametrize(
    "image,error,message",
    [
        ("not-an-image.txt", DataError, "cannot read image {tmp}/not-an-image.txt: missing, corrupt or not an image"),
        (np.zeros((8, 8, 3), np.float32), ValueError, "image array has dtype float32; pass an (H, W, 3) uint8"),
        (np.zeros((3, 8, 8, 1), np.uint8), ValueError, "image array has shape (3, 8, 8, 1); pass an (H, W, 3) uint8"),
        (np.zeros((8, 8, 2), np.uint8), ValueError, "image array has shape (8, 8, 2); pass an (H, W, 3) uint8"),
        (torch.zeros(1, 3, 8, 8), ValueError, "image tensor has dtype torch.float32; pass uint8 images (0-255"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), ValueError, "image tensor has shape (8, 8, 3); pass (B, 3, H, W)"),
        ([1, 2], ValueError, "cannot segment a list; pass an image path, a PIL image"),
    ],
    ids=["not-an-image", "float-array", "4d-array", "2-channels", "float-tensor", "hwc-tensor", "list"],
)
def test_bad_inputs_get_one_line_naming_them(checkpoint, tmp_path, image, error, message):
    if isinstance(image, str):
        (tmp_path / image).write_text("hello")
        image = tmp_path / image
    with pytest.raises(error) as caught:
        Segmenter.from_checkpoint(checkpoint, "cpu")(image)
    text = str(caught.value)
    assert "\n" not in text and text.startswith(message.format(tmp=tmp_path))


def test_the_docs_example_runs(checkpoint, val_images, tmp_path, capsys):
    text = (ROOT / "docs" / "inference.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    image = tmp_path / "image.png"
    cv2.imwrite(str(image), val_images[0][0].permute(1, 2, 0).numpy()[:, :, ::-1])
    code = code.replace("outputs/demo/checkpoints/best.pt", str(checkpoint)).replace("path/to/image.png", str(image))
    scope = {}
    exec(code, scope)
    assert isinstance(scope["segmenter"], Segmenter) and scope["slide"].inference.flip
    assert scope["labels"].shape == (64, 64) and scope["probs"].shape == (6, 64, 64)
    assert "mean confidence" in capsys.readouterr().out


def test_segmenter_is_exported_lazily():
    assert segjml.Segmenter is Segmenter
    code = "import sys, segjml; assert 'torch' not in sys.modules; segjml.Segmenter; assert 'torch' in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0
