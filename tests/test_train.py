"""`python train.py` end to end: outputs, checkpoint, bad overrides."""

import json
import subprocess
import sys

import pytest
import torch

from segjml.engine import train
from segjml.engine.checkpoint import load_checkpoint
from tests.helpers import ROOT, compose_config

FAST = ["debug=fast", "trainer.max_iters=6", "trainer.progress=true"]


def run_train(tmp_path, *args):
    cmd = [sys.executable, "train.py", f"paths.log_dir={tmp_path}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """``python train.py`` run once as a user would; its log folder and the completed process."""
    log_dir = tmp_path_factory.mktemp("logs")
    proc = run_train(log_dir, *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return log_dir, proc


def test_train_writes_metrics_checkpoint_and_config(finished_run):
    tmp_path, proc = finished_run
    run_dirs = [p.parent for p in tmp_path.rglob("metrics.json")]
    assert len(run_dirs) == 1
    run = run_dirs[0]
    # trainer.progress and trainer.max_iters do not define the run: they are not in its directory's name
    assert run == tmp_path / "synthetic_demo_ce_jml" / "debug=fast"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("acc", "miou", "miou_i", "miou_c", "ece", "bece", "sce", "bsce", "iou_per_class"):
        assert key in metrics
    assert 0 <= metrics["acc"] <= 100 and len(metrics["iou_per_class"]) == 6
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "reliability.png").stat().st_size > 1000
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["iteration"] == 6
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    model = instantiate(OmegaConf.create(state["config"])["model"])
    model.load_state_dict(state["model"])  # strict: the checkpoint fits the model its config builds
    # the per-class table and the progress bar are shown
    assert "miou" in proc.stdout and "background" in proc.stdout
    assert "train:" in proc.stderr
    # nothing is written outside the run directory
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert all(run in p.parents for p in written)


def test_checkpoint_is_loadable_with_weights_only(finished_run):
    path = next(finished_run[0].rglob("last.pt"))
    obj = torch.load(path, weights_only=True)
    assert set(obj) >= {"model", "optimizer", "scheduler", "iteration", "config"}


def test_rerun_resumes_from_last(tmp_path, caplog):
    cfg = compose_config(["debug=fast", "trainer.max_iters=6"], tmp_path)
    train(cfg)
    with caplog.at_level("INFO"):
        train(compose_config(["debug=fast", "trainer.max_iters=6"], tmp_path))
    assert "resumed from" in caplog.text and "at iteration 6" in caplog.text
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 6


def test_the_same_command_with_more_iterations_extends_the_run_in_its_directory(tmp_path):
    first = run_train(tmp_path, "experiment=demo", "debug=fast")  # 4 iterations
    assert first.returncode == 0, first.stderr[-2000:]
    more = run_train(tmp_path, "experiment=demo", "debug=fast", "trainer.max_iters=7")
    assert more.returncode == 0, more.stderr[-2000:]
    run = tmp_path / "demo" / "debug=fast"
    assert f"resumed from {run / 'checkpoints' / 'last.pt'} at iteration 4" in more.stdout + more.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 7
    assert [p.parent for p in tmp_path.rglob("metrics.json")] == [run]  # no second run directory


def test_bad_override_value_is_refused_at_composition_in_one_line(tmp_path):
    proc = run_train(tmp_path, "trainer.max_iters=abc")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: trainer.max_iters='abc' must be an integer"]
    assert "segjml/engine" not in proc.stderr  # refused at composition, not inside the loop
    assert not list(tmp_path.rglob("error.log"))  # before a run directory exists


def test_unknown_group_option_fails_with_hydra_message(tmp_path):
    proc = run_train(tmp_path, "model=no_such_model")
    assert proc.returncode != 0
    assert "Could not find 'model/no_such_model'" in proc.stderr
    assert "segjml/engine" not in proc.stderr


def test_other_model_trains(tmp_path):
    result = train(
        compose_config(
            [
                "debug=fast",
                "trainer.max_iters=6",
                "model=custom",
                "model.arch=pspnet",
                "model.encoder=resnet10t",
                "model.channels=16",
                "model.aux_channels=16",
            ],
            tmp_path,
        )
    )
    assert 0 <= result["miou"] <= 100
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["config"]["model"]["arch"] == "pspnet"
