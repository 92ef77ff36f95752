"""Every ``configs/loss`` preset trains the demo for a few iterations (KD presets with a teacher trained here)."""

import math
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from segjml.engine import train
from segjml.engine.checkpoint import load_checkpoint
from segjml.engine.distillation import TeacherError, build_teacher, teacher_logits
from segjml.losses import SegmentationCriterion
from segjml.losses.lovasz import LovaszSoftmaxLoss
from tests.helpers import CONFIG_DIR, compose_config, group_options


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
        # the authors' mix (loss/kd/default.yaml): KL teacher terms on the main and the auxiliary head
        assert any('"kl_teacher"' in line and '"kl_aux_teacher"' in line for line in lines)
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


def test_teacher_gives_its_aux_head_in_eval_mode_when_the_mix_needs_it(teacher_checkpoint, tmp_path):
    cfg = compose_config(["debug=fast", "loss=ce_jml_kd", f"teacher.checkpoint={teacher_checkpoint}"], tmp_path)
    assert instantiate(cfg.loss).needs_teacher_aux
    teacher, _ = build_teacher(cfg.teacher, cfg.dataset.num_classes, torch.device("cpu"))
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    both = teacher_logits(teacher, image, with_aux=True)
    assert not teacher.training and set(both) == {"out", "aux"}
    assert both["aux"].shape == both["out"].shape == (2, cfg.dataset.num_classes, 32, 32)
    with torch.no_grad():
        reference = teacher(image, with_aux=True)
    assert torch.equal(both["aux"], reference["aux"].float()) and torch.equal(both["out"], reference["out"].float())
    assert set(teacher_logits(teacher, image)) == {"out"}
    with open_dict(cfg):
        cfg.loss.kd.mix = "label_aux"
    assert not instantiate(cfg.loss).needs_teacher_aux


def test_kd_without_teacher_checkpoint_is_refused(tmp_path):
    with pytest.raises(TeacherError, match="teacher.checkpoint"):
        train(compose_config(["debug=fast", "loss=ce_jml_kd"], tmp_path))


def test_loss_presets_instantiate_with_the_recipe(tmp_path):
    for name in ("ce_jml", "ce_jml_bls", "ce_jml_kd"):
        criterion = instantiate(compose_config([f"loss={name}"], tmp_path).loss)
        assert (criterion.ce_weight, criterion.jml_weight) == (0.25, 0.75)
    assert instantiate(compose_config(["loss=ce"], tmp_path).loss).jml_weight == 0.0


# The loss presets are composed from shared pieces (loss/common/base.yaml: the full CE + JML-1 node, built on
# loss/common/criterion.yaml; loss/kd/default.yaml: the KD weights) and state only what differs.
LOSS_DIR = CONFIG_DIR / "loss"


def _node(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_config(overrides, Path("/tmp/segjml-unused")).loss, resolve=True)


def _criterion(node: dict) -> SegmentationCriterion:
    return SegmentationCriterion(**{k: v for k, v in node.items() if k != "_target_"})


def _leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_only_the_presets_are_options_of_loss():
    assert group_options("loss") == [
        "ce",
        "ce_bls",
        "ce_jml",
        "ce_jml_bls",
        "ce_jml_kd",
        "ce_kd",
        "ce_ls",
        "jml2",
        "lovasz",
        "sjl_l1",
        "sjl_l2",
    ]


@pytest.mark.parametrize("loss", group_options("loss"))
def test_loss_preset_composes_from_the_base_and_states_only_what_differs(loss):
    text = (LOSS_DIR / f"{loss}.yaml").read_text()
    assert text.startswith("# ") and len(text.splitlines()[0]) > 10, "a one-line comment says what the preset is"
    raw = OmegaConf.to_container(OmegaConf.load(LOSS_DIR / f"{loss}.yaml"))
    defaults = raw.pop("defaults")
    base = "criterion" if loss == "lovasz" else "base"
    assert defaults[0] == f"/loss/common/{base}@_here_" and defaults[-1] == "_self_"
    assert ({"kd": "default"} in defaults) == ("kd" in loss)
    node = _node([f"loss={loss}"])
    shared = OmegaConf.to_container(OmegaConf.load(LOSS_DIR / "common" / f"{base}.yaml"))
    shared.pop("defaults", None)
    stated, inherited = _leaves(raw), _leaves(shared)
    assert not {k for k, v in stated.items() if k in inherited and inherited[k] == v}, "a key repeats the base"
    # YAML reads `inf` as text, the schema as the number (loss.bls.kernel_size: inf)
    assert all(_leaves(node)[k] == (math.inf if v == "inf" else v) for k, v in stated.items())
    _criterion(node)  # every key is an argument of SegmentationCriterion, every value valid


def test_kd_presets_take_the_kd_weights_from_the_kd_group():
    kd = OmegaConf.to_container(OmegaConf.load(LOSS_DIR / "kd" / "default.yaml"))
    assert kd == {
        "temperature": 1.0,
        "ce_label": 0.5,
        "ce_teacher": 0.5,
        "jml_label": 0.5,
        "jml_teacher": 0.5,
        "active_classes": "LABEL",
        "mix": "authors",
    }
    for loss in ("ce_kd", "ce_jml_kd"):
        assert _node([f"loss={loss}"])["kd"] == kd
    assert _node(["loss=ce_jml_kd", "loss.kd.active_classes=BOTH"])["kd"]["active_classes"] == "BOTH"
    for experiment in ("voc_dl3r18_sjl1_kd", "cs_dl3r18_sjl2_kd", "voc_dl3r18_jml2_kd"):
        assert _node([f"experiment={experiment}"])["kd"] == kd


def test_lovasz_has_its_own_weight_and_keeps_the_term_names():
    node = _node(["loss=lovasz"])
    assert node["jml"] is None and node["jml_weight"] == 0.0  # the schema's defaults: no JML, and no JML weight
    assert (node["iou_loss"], node["ce_weight"], node["lovasz_weight"]) == ("lovasz", 0.25, 0.75)
    criterion = _criterion(node)
    assert isinstance(criterion.iou, LovaszSoftmaxLoss) and criterion.iou_weight == 0.75
    torch.manual_seed(0)
    outputs = {"out": torch.randn(2, 3, 8, 8), "aux": torch.randn(2, 3, 8, 8)}
    target = torch.randint(0, 3, (2, 8, 8))
    terms = criterion(outputs, target)
    assert set(terms) == {"ce", "ce_aux", "iou", "total"}
    ce = 0.5 * terms["ce"] + 0.5 * terms["ce_aux"]
    assert torch.allclose(terms["total"], 0.25 * ce + 0.75 * terms["iou"])
    assert _node(["loss=lovasz", "loss.lovasz_weight=0.5"])["lovasz_weight"] == 0.5


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["loss=lovasz", "loss.jml_weight=0.75"],
            "unused with loss.iou_loss=lovasz: weight the Lovasz-Softmax term with loss.lovasz_weight",
        ),
        (["loss=ce_jml", "loss.iou_loss=lovasz"], "loss.jml_weight=0.75 weights the Jaccard metric loss, unused with"),
        (["loss=lovasz", "loss.lovasz_weight=-1"], "loss.lovasz_weight=-1.0 is negative; loss weights must be >= 0"),
        (
            ["loss=lovasz", "loss.lovasz_weight=0", "loss.ce_weight=0"],
            "loss.ce_weight and loss.lovasz_weight are both 0",
        ),
        (["loss=ce_jml", "loss.lovasz_weight=0.75"], "loss.lovasz_weight=0.75 is only used with loss.iou_loss=lovasz"),
    ],
)
def test_lovasz_weight_is_checked_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        _criterion(_node(overrides))
    assert "\n" not in str(info.value)


def test_lovasz_takes_a_zero_jml_weight():
    criterion = _criterion(_node(["loss=lovasz", "loss.jml_weight=0"]))
    assert (criterion.jml_weight, criterion.iou_weight) == (0, 0.75)


def test_kd_with_accumulation_gives_the_loss_and_gradient_of_the_whole_batch(teacher_checkpoint, tmp_path):
    """The teacher's ``out`` and ``aux`` logits of every micro-batch are put together for the loss of the batch."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from segjml.engine.trainer import TrainState, build_run, train_step

    def run_and_step(micro):
        torch.manual_seed(0)
        overrides = ["debug=fast", "loss=ce_jml_kd", f"teacher.checkpoint={teacher_checkpoint}", "optimizer.lr=0.0"]
        steps = f"trainer.accumulate_steps={len(micro)}"  # several micro-batches: build_run picks the accumulating step
        run = build_run(
            compose_config([*overrides, "optimizer.weight_decay=0.0", "trainer.batch_size=8", steps], tmp_path)
        )
        run.model.train()
        for m in run.model.modules():  # as in test_accumulation.py: per-micro-batch statistics and dropout off
            if isinstance(m, (_BatchNorm, torch.nn.Dropout2d)):
                m.eval()
        terms = train_step(run, TrainState(), micro)
        return terms, {n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None}

    g = torch.Generator().manual_seed(8)
    image = torch.randn(8, 3, 32, 32, generator=g)
    labels = torch.randint(0, 6, (8, 1, 4, 4), generator=g).float()
    labels = torch.nn.functional.interpolate(labels, size=(32, 32), mode="nearest")[:, 0].long()
    labels[:, :2, :2] = 255
    whole, g_whole = run_and_step([(image, labels)])
    parts, g_parts = run_and_step([(image[:4], labels[:4]), (image[4:], labels[4:])])
    assert {"kl_teacher", "kl_aux_teacher", "iou_teacher"} <= set(whole)
    for key in whole:
        assert float(parts[key]) == pytest.approx(float(whole[key].detach()), rel=1e-5), key
    assert g_whole.keys() == g_parts.keys() and g_whole
    for name in g_whole:
        assert torch.allclose(g_parts[name], g_whole[name], rtol=1e-4, atol=1e-6), name
