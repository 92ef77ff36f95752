"""Every ``configs/loss`` preset trains the demo for a few iterations (KD presets with a teacher trained here)."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from segjml.engine import train
from segjml.engine.checkpoint import load_checkpoint
from segjml.engine.distillation import TeacherError, build_teacher
from tests.conftest import compose_config, group_options


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train(compose_config(["debug=fast", "loss=ce_jml_bls"], out))
    return out / "checkpoints" / "last.pt"


@pytest.mark.parametrize("loss", group_options("loss"))
def test_loss_preset_trains(loss, tmp_path, teacher_checkpoint):
    cfg = compose_config(["debug=fast", f"loss={loss}", f"teacher.checkpoint={teacher_checkpoint}"], tmp_path)
    before = load_checkpoint(teacher_checkpoint)["model"]
    result = train(cfg)
    assert 0.0 <= result["miou"] <= 100.0
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert any('"total"' in line for line in lines)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["iteration"] == cfg.trainer.max_iters
    if "kd" in loss:
        assert state["teacher_sha256"] is not None
        assert any('"ce_teacher"' in line for line in lines)
        after = load_checkpoint(teacher_checkpoint)["model"]
        assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher file is untouched


def test_teacher_is_frozen_and_checked(teacher_checkpoint, tmp_path):
    cfg = compose_config(["debug=fast", "loss=ce_kd", f"teacher.checkpoint={teacher_checkpoint}"], tmp_path)
    teacher, digest = build_teacher(cfg.teacher, cfg.dataset.num_classes, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert len(digest) == 64
    with pytest.raises(TeacherError, match="predicts 6 classes but the data set has 9"):
        build_teacher(cfg.teacher, 9, torch.device("cpu"))
    other = compose_config(["debug=fast", "model=custom", "model.encoder=resnet10t"], tmp_path)
    with open_dict(cfg):
        cfg.teacher.model = other.model
    with pytest.raises(TeacherError, match="does not fit the model: tensor '"):
        build_teacher(cfg.teacher, cfg.dataset.num_classes, torch.device("cpu"))


def test_kd_without_teacher_checkpoint_is_refused(tmp_path):
    with pytest.raises(TeacherError, match="teacher.checkpoint"):
        train(compose_config(["debug=fast", "loss=ce_jml_kd"], tmp_path))


def test_loss_presets_instantiate_with_the_recipe(tmp_path):
    for name in ("ce_jml", "ce_jml_bls", "ce_jml_kd"):
        criterion = instantiate(compose_config([f"loss={name}"], tmp_path).loss)
        assert (criterion.ce_weight, criterion.jml_weight) == (0.25, 0.75)
    assert instantiate(compose_config(["loss=ce"], tmp_path).loss).jml_weight == 0.0
