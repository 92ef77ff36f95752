"""A checkpoint's stored config cannot run code: eval, predict and the KD teacher build only segjml's own targets."""

import copy
import json
import subprocess
import sys

import cv2
import pytest
import torch
from omegaconf import OmegaConf

from segjml.data import DATASET_TARGETS
from segjml.data.synthetic import make_sample
from segjml.engine import train
from segjml.engine.commands import MODEL_TARGET
from segjml.engine.distillation import TeacherError, build_teacher
from tests.helpers import ROOT, compose_config, group_options


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(compose_config(["debug=fast", "trainer.max_iters=2", "trainer.limit_val_samples=2"], out))
    return out / "checkpoints" / "last.pt"


def write_file(victim):
    """A node that writes ``victim`` when Hydra instantiates it."""
    return {
        "_target_": "pathlib.Path.write_text",
        "self": {"_target_": "pathlib.Path", "_args_": [str(victim)]},
        "data": "x",
    }


def forge(honest, path, edit):
    """``honest`` with ``edit(config, victim)`` applied to its stored config, saved to ``path``."""
    state = torch.load(honest, weights_only=True)
    state["config"] = copy.deepcopy(state["config"])
    edit(state["config"], path.parent / "pwned.npz")
    torch.save(state, path)
    return path


def _set(node, value):
    def edit(cfg, victim):
        *parents, last = node.split(".")
        target = cfg
        for key in parents:
            target = target[key]
        target[last] = value(victim) if callable(value) else value

    return edit


FORGED = {
    # (a) the issue's example: a nested node that writes a file
    "write_file": (_set("model.encoder", write_file), "model.encoder._target_=pathlib.Path.write_text"),
    # (b) deeper down, inside a plain mapping and a list
    "nested_deeper": (
        _set("model.channels", lambda victim: {"inner": [write_file(victim)]}),
        "model.channels.inner[0]._target_=pathlib.Path.write_text",
    ),
    # segjml's own builder, but nested: a built node's arguments are plain values
    "nested_allowed": (
        _set("model.encoder", {"_target_": "segjml.models.build_model"}),
        "model.encoder._target_=segjml.models.build_model, a node nested in model",
    ),
    # (c) Hydra's partial instantiation
    "partial": (_set("model._partial_", True), "model._partial_=true"),
    # (d) the model node itself built by a target outside segjml
    "top_level_target": (_set("model", write_file), "model._target_=pathlib.Path.write_text"),
    "os_getcwd": (_set("model._target_", "os.getcwd"), "model._target_=os.getcwd"),
    # (e) positional arguments
    "args": (_set("model._args_", ["unet"]), 'model._args_=["unet"]'),
    # an interpolation that decodes into a node once resolved
    "interpolation": (
        _set(
            "model.encoder",
            lambda victim: (
                "${oc.decode:'{_target_: pathlib.Path.write_text, "
                f'self: {{_target_: pathlib.Path, _args_: ["{victim}"]}}, data: x}}\'}}'
            ),
        ),
        "model.encoder=${oc.decode:",
    ),
    # (f) the data set eval builds from the checkpoint's config
    "dataset_target": (
        _set("dataset.val", lambda victim: {"_target_": "numpy.savez", "file": str(victim)}),
        "dataset.val._target_=numpy.savez",
    ),
    "dataset_nested": (_set("dataset.val.length", write_file), "dataset.val.length._target_=pathlib.Path.write_text"),
}


def run(script, tmp_path, *args):
    cmd = [sys.executable, script, f"paths.log_dir={tmp_path / 'logs'}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_refused(proc, path, key):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: checkpoint {path} is refused: its config sets {key}"), lines[0]


@pytest.mark.parametrize(
    "case", [c if c == "write_file" else pytest.param(c, marks=pytest.mark.slow) for c in sorted(FORGED)]
)  # make test: one case, make test-slow: every case
def test_eval_refuses_a_stored_config_that_would_run_code(case, honest, tmp_path):
    edit, key = FORGED[case]
    path = forge(honest, tmp_path / "forged.pt", edit)
    proc = run("eval.py", tmp_path, f"ckpt={path}", "limit_samples=2", "num_workers=0")
    assert_refused(proc, path, key)
    assert not (tmp_path / "pwned.npz").exists()


@pytest.mark.parametrize("case", ["write_file", pytest.param("dataset_target", marks=pytest.mark.slow)])
def test_predict_refuses_a_stored_config_that_would_run_code(case, honest, tmp_path):
    edit, key = FORGED[case]
    path = forge(honest, tmp_path / "forged.pt", edit)
    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "img.png"), make_sample(0, "val", 0)[0][:, :, ::-1])
    proc = run("predict.py", tmp_path, f"ckpt={path}", f"inputs={inputs}")
    assert_refused(proc, path, key)
    assert not (tmp_path / "pwned.npz").exists()
    assert not list((tmp_path / "logs").rglob("img_pred.png"))


@pytest.mark.parametrize("case", ["write_file", "nested_deeper", "top_level_target"])
def test_teacher_refuses_a_stored_config_that_would_run_code(case, honest, tmp_path):
    edit, key = FORGED[case]
    path = forge(honest, tmp_path / "forged.pt", edit)
    cfg = compose_config(["debug=fast", "loss=ce_kd", f"teacher.checkpoint={path}"], tmp_path)
    with pytest.raises(TeacherError) as err:
        build_teacher(cfg.teacher, cfg.dataset.num_classes, torch.device("cpu"))
    assert str(err.value).startswith(f"teacher checkpoint {path} is refused: its config sets {key}")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pwned.npz").exists()


def test_teacher_model_given_by_the_user_is_built_instead_of_the_stored_one(honest, tmp_path):
    path = forge(honest, tmp_path / "forged.pt", FORGED["write_file"][0])
    cfg = compose_config(["debug=fast", "loss=ce_kd", f"teacher.checkpoint={path}"], tmp_path)
    cfg.teacher.model = OmegaConf.to_container(cfg.model, resolve=True)
    teacher, _ = build_teacher(cfg.teacher, cfg.dataset.num_classes, torch.device("cpu"))
    assert not teacher.training
    assert not (tmp_path / "pwned.npz").exists()


def test_honest_checkpoint_still_evaluates_and_dataset_given_by_the_user_is_not_the_files(honest, tmp_path):
    proc = run("eval.py", tmp_path / "honest", f"ckpt={honest}", "limit_samples=2", "num_workers=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 0.0 <= json.loads(next((tmp_path / "honest").rglob("metrics.json")).read_text())["miou"] <= 100.0
    # dataset= on the command line replaces the checkpoint's data set config: its forged node is never read
    path = forge(honest, tmp_path / "forged.pt", FORGED["dataset_target"][0])
    proc = run("eval.py", tmp_path / "user", f"ckpt={path}", "dataset=synthetic", "limit_samples=2", "num_workers=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "pwned.npz").exists()


def test_allowlists_are_the_targets_of_the_shipped_configs():
    datasets = [compose_config([f"dataset={name}"]).dataset for name in group_options("dataset")]
    assert {d[split]._target_ for d in datasets for split in ("train", "val")} == set(DATASET_TARGETS)
    assert {compose_config([f"model={name}"]).model._target_ for name in group_options("model")} == {MODEL_TARGET}
