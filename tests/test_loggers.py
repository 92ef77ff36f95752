"""logger=tensorboard and logger=mlflow, read back with each tool's own reader: the values of log.jsonl, the images and
artifacts, a resumed run that continues the same run, the viewer commands of docs/training.md, a missing extra."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from segjml.cli import guarded
from segjml.engine import train
from segjml.engine.logger import RunLogger
from tests.helpers import ROOT, compose_config, torchrun_train

FAST = ["debug=fast", "trainer.log_interval=1", "trainer.eval_interval=2"]
DOCS = (ROOT / "docs" / "training.md").read_text()


def run(log_dir, logger: str, max_iters: int, *extra: str):
    """Train (or resume) the run of ``logger`` under ``log_dir`` to ``max_iters``; returns its config."""
    overrides = [*FAST, f"logger={logger}", f"paths.log_dir={log_dir}", f"trainer.max_iters={max_iters}", *extra]
    cfg = compose_config(overrides, log_dir / "run")
    train(cfg)
    return cfg


def logged(run_dir) -> dict[str, dict[int, float]]:
    """``log.jsonl`` as {key: {step: value}} (a later line for a step wins, as a rerun's does)."""
    values = defaultdict(dict)
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for key, value in entry.items():
            if key != "step":
                values[key][entry["step"]] = value
    return values


def documented(program: str) -> list[str]:
    """The arguments of the ``program`` command in docs/training.md's Logging section (environment words dropped)."""
    line = next(line for line in DOCS.splitlines() if re.match(rf"(\w+=\S+ )*{program} ", line))
    return [w for w in shlex.split(line) if not re.match(r"\w+=", w)][1:]


def tensorboard_of(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """A run trained to 2, resumed to 4; then last.pt of iteration 2 put back (an attempt killed after it had logged
    steps 3-4 but saved only iteration 2) and resumed to 4 again."""
    log_dir = tmp_path_factory.mktemp("tb")
    run(log_dir, "tensorboard", 2)
    last = log_dir / "run" / "checkpoints" / "last.pt"
    shutil.copy(last, log_dir / "last_at_2.pt")
    run(log_dir, "tensorboard", 4)
    shutil.copy(log_dir / "last_at_2.pt", last)
    cfg = run(log_dir, "tensorboard", 4)
    return log_dir, log_dir / "run", cfg


def test_tensorboard_scalars_equal_log_jsonl_and_each_evaluation_has_its_images(tensorboard_run):
    _, run_dir, _ = tensorboard_run
    events = tensorboard_of(run_dir / "tensorboard")
    values = logged(run_dir)
    assert set(events.Tags()["scalars"]) == set(values)
    for key, by_step in values.items():
        read = {e.step: e.value for e in events.Scalars(key)}
        assert read == {step: float(np.float32(v)) for step, v in by_step.items()}, key  # TensorBoard keeps float32
    assert sorted(values["total"]) == [1, 2, 3, 4] and sorted(values["val/miou"]) == [2, 4]
    names = ["val/reliability", *(f"val/prediction_{i}" for i in range(4))]
    assert sorted(events.Tags()["images"]) == sorted(names)
    for name in names:
        images = events.Images(name)
        assert [e.step for e in images] == [2, 4] and all(e.width > 0 and e.height > 0 for e in images), name
    prediction = events.Images("val/prediction_0")[0]
    assert prediction.width == 2 * prediction.height  # the prediction beside the label (square synthetic images)


def test_a_resumed_run_continues_the_same_tensorboard_run_and_drops_a_killed_attempts_later_steps(tensorboard_run):
    _, run_dir, _ = tensorboard_run
    assert [p.name for p in run_dir.rglob("events.out.tfevents.*")] == [
        p.name for p in (run_dir / "tensorboard").iterdir()
    ], "every attempt writes to <run dir>/tensorboard"
    assert len(list((run_dir / "tensorboard").iterdir())) == 3  # one event file per attempt
    events = tensorboard_of(run_dir / "tensorboard")
    # steps 3 and 4 were written twice (the killed attempt, then its rerun): purge_step keeps them once
    assert [e.step for e in events.Scalars("total")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/miou")] == [2, 4]
    assert [e.step for e in events.Images("val/reliability")] == [2, 4]


def test_the_documented_tensorboard_command_finds_the_run(tensorboard_run):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    log_dir, run_dir, _ = tensorboard_run
    args = documented("tensorboard")
    assert args[0] == "--logdir" and args[1] == "outputs"  # paths.log_dir's default
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(log_dir))  # what `tensorboard --logdir` reads
    multiplexer.Reload()
    assert str((run_dir / "tensorboard").relative_to(log_dir)) in multiplexer.Runs()
    assert "<run dir>/tensorboard/" in DOCS


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_mlflow_run_holds_params_metrics_and_artifacts_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the logger opts in to MLflow 3's file store
    run(tmp_path, "mlflow", 2)
    cfg = run(tmp_path, "mlflow", 4, "logger.checkpoints=[best,last]")
    run_dir = tmp_path / "run"
    args = documented("mlflow ui")
    assert args[:2] == ["ui", "--backend-store-uri"] and args[2] == "outputs/mlruns"  # paths.log_dir's default
    client = mlflow_client(str(tmp_path / "mlruns"))
    experiment = client.get_experiment_by_name("segjml")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the resumed attempt logs to the first attempt's run"
    found = runs[0]
    assert found.info.run_id == (run_dir / "mlflow_run_id").read_text().strip()
    assert found.info.status == "FINISHED" and found.info.run_name == cfg.name
    params = found.data.params
    assert params["optimizer.lr"] == str(cfg.optimizer.lr) and params["model.arch"] == cfg.model.arch
    assert params["trainer.max_iters"] == "2"  # the first attempt's value: MLflow keeps a parameter's first value
    for key, by_step in logged(run_dir).items():
        history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, key)}
        assert history == by_step, key
    assert sorted(m.step for m in client.get_metric_history(found.info.run_id, "total")) == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"metrics.json", "reliability.png", "checkpoints"} <= artifacts
    checkpoints = {a.path for a in client.list_artifacts(found.info.run_id, "checkpoints")}
    assert checkpoints == {"checkpoints/best.pt", "checkpoints/last.pt"}
    local = client.download_artifacts(found.info.run_id, "metrics.json", str(tmp_path / "down"))
    assert json.loads(open(local).read()) == json.loads((run_dir / "metrics.json").read_text())


def test_only_the_main_process_logs(tmp_path):
    cfg = compose_config(["logger=mlflow", f"paths.log_dir={tmp_path}"], tmp_path / "run")
    (tmp_path / "run").mkdir()
    logger = RunLogger(tmp_path / "run", cfg, enabled=False)
    logger.log(1, {"total": 1.0})
    logger.close()
    assert logger.overlays is None  # the trainer renders no images on the other ranks
    assert list(tmp_path.rglob("*")) == [tmp_path / "run"]  # no log.jsonl, no mlruns/, no run id


@pytest.mark.parametrize(
    "logger,modules", [("tensorboard", ["torch.utils.tensorboard", "tensorboard"]), ("mlflow", ["mlflow"])]
)
def test_a_missing_extra_ends_in_one_line_naming_the_pip_command(logger, modules, tmp_path, monkeypatch, capsys):
    # as if the package were not installed: importing it (or a submodule imported earlier) raises ImportError
    for module in {*modules, *(m for m in sys.modules if m.startswith(tuple(f"{p}." for p in modules)))}:
        monkeypatch.setitem(sys.modules, module, None)
    cfg = compose_config([*FAST, f"logger={logger}", f"paths.log_dir={tmp_path}"], tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        guarded(cfg, lambda: train(cfg))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = f"error: logger={logger} needs the {logger} package: pip install 'segjml[{logger}]'"
    assert lines == [expected]
    if logger == "tensorboard":
        assert expected in DOCS


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_under_torchrun_only_rank_0_logs(logger, tmp_path, monkeypatch):
    cmd = torchrun_train(2, *FAST, f"logger={logger}", f"paths.log_dir={tmp_path}", "trainer.max_iters=4")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next(tmp_path.rglob("log.jsonl")).parent
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps.count(4) == 2  # one process wrote: a training line and a validation line at the last step
    if logger == "tensorboard":
        assert len(list((run_dir / "tensorboard").iterdir())) == 1
        assert [e.step for e in tensorboard_of(run_dir / "tensorboard").Scalars("total")] == [1, 2, 3, 4]
    else:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as the documented `mlflow ui` command sets it
        client = mlflow_client(str(tmp_path / "mlruns"))
        assert len(client.search_runs([client.get_experiment_by_name("segjml").experiment_id])) == 1
