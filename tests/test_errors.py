"""Bad input ends a command with exit code 2 and one line naming the value; the traceback goes to the run's
``error.log``; a changed config is not resumed silently; a full disk leaves the previous ``last.pt`` intact."""

import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from segjml.cli import guarded
from segjml.engine import train
from segjml.engine.checkpoint import CheckpointError, load_checkpoint
from tests.helpers import ROOT, compose_config

FAST = ["debug=fast", "trainer.max_iters=2", "trainer.ckpt_interval=1"]


def fails_in_one_line(cfg, capsys, fn=None) -> str:
    """Run ``fn`` (default: train ``cfg``) as the commands do; return the one line it printed."""
    with pytest.raises(SystemExit) as exit_info:
        guarded(cfg, fn or (lambda: train(cfg)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" in (ROOT / cfg.paths.output_dir / "error.log").read_text()
    return lines[0]


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["model=custom", "model.encoder=resnet_nope"], "'resnet_nope'"),
        (["model.arch=segnet"], "'segnet'"),
        (["loss.jml_weight=-1"], "loss.jml_weight=-1"),
        (["loss.ce_weight=0", "loss.jml_weight=0"], "loss.ce_weight and loss.jml_weight are both 0"),
        (["loss=ce_jml_bls", "loss.bls.eps=1.5"], "loss.bls.eps=1.5"),
        (["loss=ce_jml_bls", "loss.bls.kernel_size=4"], "loss.bls.kernel_size=4"),
        (["trainer.accumulate_steps=0"], "trainer.accumulate_steps=0"),
    ],
)
def test_bad_config_values_fail_in_one_line_naming_the_value(overrides, named, tmp_path, capsys):
    line = fails_in_one_line(compose_config([*FAST, *overrides], tmp_path), capsys)
    assert named in line


def test_unknown_encoder_names_the_closest_valid_names(tmp_path, capsys):
    line = fails_in_one_line(compose_config([*FAST, "model=custom", "model.encoder=resnet18x"], tmp_path), capsys)
    assert "resnet18" in line.split("closest", 1)[1]


def test_a_file_that_is_not_a_checkpoint_fails_in_one_line_without_unsafe_advice(tmp_path, capsys):
    bogus = tmp_path / "notes.pt"
    bogus.write_text("not a checkpoint\n")
    line = fails_in_one_line(compose_config([*FAST, f"trainer.resume={bogus}"], tmp_path / "run"), capsys)
    assert str(bogus) in line and "not a segjml checkpoint" in line and "weights_only" not in line


def test_a_checkpoint_of_another_model_names_the_first_mismatching_tensor(tmp_path, capsys):
    other = compose_config([*FAST, "model.num_classes=3"], tmp_path)
    from segjml.utils import build

    path = tmp_path / "other.pt"
    torch.save({"model": build(other.model).state_dict()}, path)  # no stored config: only the weights are checked
    line = fails_in_one_line(compose_config([*FAST, f"trainer.resume={path}"], tmp_path / "run"), capsys)
    assert "does not fit the model: tensor '" in line and "(3, " in line and "(6, " in line


def test_eval_of_a_checkpoint_that_does_not_fit_fails_in_one_line(tmp_path, capsys):
    from omegaconf import OmegaConf

    from segjml.config import compose
    from segjml.engine.commands import evaluate_checkpoint
    from segjml.utils import build

    train_cfg = compose_config(FAST, tmp_path)
    state = {
        "model": build(compose_config([*FAST, "model.num_classes=3"], tmp_path).model).state_dict(),
        "config": OmegaConf.to_container(train_cfg, resolve=True, enum_to_str=True),  # as the trainer saves it
    }
    path = tmp_path / "mismatch.pt"
    torch.save(state, path)
    cfg = compose([f"ckpt={path}"], config_name="eval", output_dir=tmp_path / "eval")
    line = fails_in_one_line(cfg, capsys, lambda: evaluate_checkpoint(cfg))
    assert f"checkpoint {path} does not fit the model: tensor '" in line


# --- resume safety ------------------------------------------------------------------------------------------------
@pytest.fixture
def finished(tmp_path):
    """A finished 2-iteration run in ``tmp_path``."""
    train(compose_config(FAST, tmp_path))
    return tmp_path


def test_a_changed_config_is_not_resumed_and_the_message_names_the_keys(finished, capsys):
    cfg = compose_config([*FAST, "optimizer.lr=0.5", "loss.jml_weight=0.5"], finished)
    line = fails_in_one_line(cfg, capsys)
    assert "optimizer.lr (0.02 -> 0.5)" in line and "loss.jml_weight (0.75 -> 0.5)" in line
    assert "trainer.allow_config_change=true" in line
    assert load_checkpoint(finished / "checkpoints" / "last.pt")["config"]["optimizer"]["lr"] == 0.02


def test_allow_config_change_resumes_on_purpose(finished, caplog):
    cfg = compose_config(
        [*FAST, "optimizer.lr=0.5", "trainer.max_iters=3", "trainer.allow_config_change=true"], finished
    )
    with caplog.at_level("INFO"):
        train(cfg)
    assert "resumed from" in caplog.text and "at iteration 2" in caplog.text
    state = load_checkpoint(finished / "checkpoints" / "last.pt")
    assert state["iteration"] == 3 and state["config"]["optimizer"]["lr"] == 0.5


def test_keys_that_may_change_between_attempts_do_not_block_resume(finished, caplog):
    cfg = compose_config(
        [*FAST, "trainer.max_iters=3", "trainer.log_interval=1", "trainer.num_workers=1", "trainer.progress=true"],
        finished,
    )
    with caplog.at_level("INFO"):
        train(cfg)
    assert "at iteration 2" in caplog.text
    assert load_checkpoint(finished / "checkpoints" / "last.pt")["iteration"] == 3


def test_checkpoint_stores_the_config_and_its_hash(finished):
    from segjml.config import config_hash

    state = load_checkpoint(finished / "checkpoints" / "last.pt")
    assert state["config"]["trainer"]["max_iters"] == 2
    assert state["config_sha256"] == config_hash(state["config"]) and len(state["config_sha256"]) == 64


# --- files ------------------------------------------------------------------------------------------------------
def test_checkpoints_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        train(compose_config(FAST, tmp_path))
    finally:
        os.umask(old)
    for name in ("last.pt", "best.pt"):
        assert (tmp_path / "checkpoints" / name).stat().st_mode & 0o777 == 0o644


def test_a_full_disk_stops_in_one_line_and_keeps_the_previous_last(finished, capsys, monkeypatch):
    last = finished / "checkpoints" / "last.pt"
    before = last.read_bytes()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    cfg = compose_config([*FAST, "trainer.max_iters=3"], finished)
    line = fails_in_one_line(cfg, capsys)
    assert f"cannot write checkpoint {last}: disk full" in line
    assert "disk full" in line and "MB" in line
    assert last.read_bytes() == before
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]


def test_train_py_prints_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", f"paths.log_dir={tmp_path}", *FAST, "loss.bls.eps=1.5", "loss=ce_jml_bls"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: loss.bls.eps=1.5 is outside [0, 1]"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "Traceback" in next(tmp_path.rglob("error.log")).read_text()


def test_checkpoint_errors_are_user_errors():
    from segjml.cli import user_errors

    assert CheckpointError in user_errors()


class _BrokenSamples(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        from segjml.data.errors import DataError

        raise DataError(f"cannot read label /data/broken_{index}.png: not a PNG")


def test_a_data_error_in_a_loader_worker_is_reported_by_its_own_message(tmp_path, capsys):
    cfg = compose_config(FAST, tmp_path)
    loader = torch.utils.data.DataLoader(_BrokenSamples(), batch_size=1, num_workers=1)
    line = fails_in_one_line(cfg, capsys, lambda: next(iter(loader)))
    assert line == "error: cannot read label /data/broken_0.png: not a PNG"


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["trainer.precision=fp8"], "trainer.precision=fp8"),
        (["trainer.max_iters=0"], "trainer.max_iters=0"),
    ],
)
def test_bad_trainer_values_fail_in_one_line(overrides, named, tmp_path, capsys):
    assert named in fails_in_one_line(compose_config([*FAST, *overrides], tmp_path), capsys)


def test_a_missing_mandatory_value_names_it(tmp_path, capsys):
    from segjml.config import compose
    from segjml.engine.commands import evaluate_checkpoint

    cfg = compose([], config_name="eval", output_dir=tmp_path)
    line = fails_in_one_line(cfg, capsys, lambda: evaluate_checkpoint(cfg))
    assert line.startswith("error: Missing mandatory value: ckpt") and "ckpt=" in line


def test_eval_refuses_an_unknown_dataset_instead_of_ignoring_it(tmp_path):
    from hydra.errors import MissingConfigException

    from segjml.config import compose

    with pytest.raises(MissingConfigException, match="dataset/no_such"):
        compose(["ckpt=x.pt", "dataset=no_such"], config_name="eval", output_dir=tmp_path)


# --- refused by the schemas while the config is composed ---------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,line",
    [
        (["loss.jml.variant=jml3"], "loss.jml.variant=jml3 is not one of jml1, jml2, sjl_l1, sjl_l2"),
        (
            ["loss.jml.foo=1"],
            "unknown key loss.jml.foo; loss.jml takes variant, alpha, beta, gamma, log_loss, smooth, "
            "active_classes_hard, active_classes_soft, threshold, miou_d, miou_i, miou_c, sync_stats, class_weights, "
            "class_weights_mode",
        ),
        (["loss.jml.alpha=x"], "loss.jml.alpha='x' must be a number"),
        (["loss.iou_loss=dice"], "loss.iou_loss=dice is not one of jml, lovasz"),
        (["loss.jml_weight=abc"], "loss.jml_weight='abc' is not a number; loss weights must be >= 0"),
        (["loss=ce_jml_bls", "loss.bls.strict_ignore=maybe"], "loss.bls.strict_ignore='maybe' must be true or false"),
        (
            ["loss=ce_jml_bls", "loss.bls.kernel_size=wide"],
            "loss.bls.kernel_size=wide must be an odd positive integer or inf",
        ),
        (["loss=ce_jml_bls", "loss.bls.eps=big"], "loss.bls.eps='big' is not a number in [0, 1]"),
        (
            ["loss=ce_jml_bls", "loss.bls.kernel_sise=3"],
            "unknown key loss.bls.kernel_sise; loss.bls takes kernel_size, eps, strict_ignore",
        ),
        (
            ["loss=ce_jml_kd", "loss.kd.mix=paper"],
            "loss.kd.mix=paper is not one of authors, label_aux (authors: the aux head also distils from the "
            "teacher's aux head, KL at the temperature; label_aux: the aux head takes the label CE only)",
        ),
        (
            ["loss=ce_jml_kd", "loss.kd.active_classes=label"],
            "loss.kd.active_classes=label is not one of PRESENT, ALL, LABEL, PROB, BOTH",
        ),
        (
            ["loss=ce_jml_kd", "loss.kd.temprature=2"],
            "unknown key loss.kd.temprature; loss.kd takes temperature, ce_label, ce_teacher, jml_label, jml_teacher, "
            "active_classes, mix",
        ),
        (
            ["ssl=augseg", "ssl.pseudo_label=argmax"],
            "ssl.pseudo_label=argmax is not one of soft, hard (soft: the teacher's probabilities; hard: their argmax "
            "(AugSeg))",
        ),
        (
            ["ssl=augseg", "ssl.evaluate=ema"],
            "ssl.evaluate=ema is not one of teacher, student (teacher: the EMA teacher, as AugSeg reports; student: "
            "the student)",
        ),
        (["ssl=augseg", "ssl.strong_ops=many"], "ssl.strong_ops='many' must be an integer"),
        (["ssl=augseg", "ssl.confidence_threshold=high"], "ssl.confidence_threshold='high' is not a number in [0, 1]"),
        (
            ["ssl=augseg", "ssl.eta_x=1"],
            "unknown key ssl.eta_x; ssl takes eta_s, eta_u, theta_s, theta_u, confidence_threshold, pseudo_label, "
            "ce_u_mean_over, unlabeled_batch_size, ema_decay, ema_warmup, evaluate, strong_ops, cutmix",
        ),
    ],
)
def test_the_schemas_refuse_a_bad_value_or_an_unknown_key_at_composition_in_one_line(overrides, line):
    from hydra.errors import ConfigCompositionException

    from segjml.cli import one_line
    from segjml.config import compose

    with pytest.raises(ConfigCompositionException) as err:
        compose(overrides)
    assert one_line(err.value) == line


def test_a_key_added_under_a_schema_is_refused_when_the_loss_is_built(tmp_path, capsys):
    line = fails_in_one_line(compose_config([*FAST, "+loss.jml.foo=1"], tmp_path), capsys)
    assert line.startswith("error: unknown key loss.jml.foo; loss.jml takes variant, alpha,")


def test_train_py_refuses_a_schema_error_at_composition_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", f"paths.log_dir={tmp_path}", *FAST, "loss.jml.variant=jml3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: loss.jml.variant=jml3 is not one of jml1, jml2, sjl_l1, sjl_l2"]
    assert "Traceback" not in proc.stdout + proc.stderr and not list(tmp_path.rglob("error.log"))


def test_a_key_added_at_the_top_of_the_loss_is_refused_with_the_keys_it_takes(tmp_path, capsys):
    line = fails_in_one_line(compose_config([*FAST, "+loss.foo=1"], tmp_path), capsys)
    assert line == (
        "error: unknown key loss.foo; loss takes num_classes, ignore_index, ce_weight, jml_weight, lovasz_weight, "
        "main_weight, aux_weight, iou_loss, jml, bls, kd"
    )


@pytest.mark.parametrize(
    "override,line",
    [
        (
            "loss.kd.mix=authors",
            "error: loss.kd.mix=authors sets a key under loss.kd, which is null (off) in this config; "
            "add +loss/kd=default before it, or choose a preset that sets loss.kd",
        ),
        (
            "+loss.bls.eps=0.1",
            "error: loss.bls.eps=0.1 sets a key under loss.bls, which is null (off) in this config; "
            "add +loss/bls=default before it, or choose a preset that sets loss.bls",
        ),
    ],
)
def test_train_py_names_a_key_set_under_a_node_the_config_leaves_null(tmp_path, override, line):
    """OmegaConf cannot apply ``loss.kd.mix=...`` when ``loss.kd`` is null (it raises an AssertionError)."""
    proc = subprocess.run(
        [sys.executable, "train.py", f"paths.log_dir={tmp_path}", *FAST, "loss=ce_jml", override],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [line]
    assert not list(tmp_path.rglob("error.log"))
