"""`eval.py` and `predict.py` on a checkpoint from a short demo run."""

import json
import subprocess
import sys

import cv2
import pytest

from segjml.data.synthetic import PALETTE, make_sample
from segjml.engine import train
from tests.helpers import ROOT, compose_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = train(compose_config(["debug=fast", "trainer.max_iters=6", "trainer.limit_val_samples=6"], out))
    return out / "checkpoints" / "last.pt", result


def run(script, tmp_path, *args):
    cmd = [sys.executable, script, f"paths.log_dir={tmp_path}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_eval_reproduces_the_final_evaluation_of_the_run(checkpoint, tmp_path):
    ckpt, result = checkpoint
    proc = run("eval.py", tmp_path, f"ckpt='{ckpt}'", "limit_samples=6", "batch_size=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    for key in ("acc", "miou", "ece", "sce", "bece"):
        assert metrics[key] == pytest.approx(result[key], abs=1e-4), key
    assert next(tmp_path.rglob("reliability.png")).stat().st_size > 1000
    slide = run(
        "eval.py",
        tmp_path / "slide",
        f"ckpt='{ckpt}'",
        "limit_samples=6",
        "mode=slide",
        "flip=true",
        "dataset=synthetic",
        "dataset.crop_size=[48,48]",
    )
    assert slide.returncode == 0, slide.stderr[-2000:]


def test_predict_writes_colour_coded_maps_overlays_and_confidence(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(2):
        cv2.imwrite(str(inputs / f"img{i}.png"), make_sample(0, "val", i)[0][:, :, ::-1])
    proc = run("predict.py", tmp_path / "out", f"ckpt='{ckpt}'", f"inputs={inputs}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = next((tmp_path / "out").rglob("img0_pred.png")).parent
    for i in range(2):
        pred = cv2.imread(str(out / f"img{i}_pred.png"))[:, :, ::-1]
        assert pred.shape == (64, 64, 3)
        colours = {tuple(int(v) for v in c) for c in pred.reshape(-1, 3)}
        assert colours <= set(PALETTE)
        assert (out / f"img{i}_overlay.png").is_file() and (out / f"img{i}_conf.png").is_file()


def test_bad_checkpoint_and_empty_inputs_fail_in_one_line(checkpoint, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    proc = run("eval.py", tmp_path, f"ckpt={bad}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {bad}")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run("predict.py", tmp_path, f"ckpt='{checkpoint[0]}'", f"inputs={empty}")
    assert proc.returncode == 2 and "no .jpg / .png images match" in proc.stderr
