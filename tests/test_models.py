"""Every model preset: Table 9 parameter counts, forward/backward, output shapes, param groups, weights errors."""

import pytest
import torch
from hydra.utils import instantiate

from segjml.engine.optim import param_groups
from segjml.models import PretrainedWeightsError, build_model
from tests.conftest import compose_config, group_options

# Table 9 of the paper, parameters (M) at 19 classes.
TABLE9 = {
    "dl3p_r101": 62.58, "dl3_r101": 87.10, "dl3_r50": 68.11, "dl3_r18": 13.98, "dl3_mb2": 3.79, "psp_r18": 12.79,
    "unet_r50": 76.07, "unet_r18": 14.49, "unet_mb2": 4.06, "segformer_b5": 83.77, "segformer_b3": 46.40,
    "segformer_b1": 15.48, "segformer_b0": 5.01,
}
PAPER_MODELS = sorted(TABLE9)
LARGE = {"dl3p_r101", "dl3_r101", "dl3_r50", "unet_r50", "segformer_b5", "segformer_b3"}


def build_preset(name, tmp_path, num_classes=19):
    cfg = compose_config([f"model={name}", "pretrained=false", f"dataset.num_classes={num_classes}"], tmp_path)
    return instantiate(cfg.model)


def test_every_paper_model_has_a_preset():
    assert set(PAPER_MODELS) <= set(group_options("model"))


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_parameter_count_matches_table9(name, tmp_path):
    model = build_preset(name, tmp_path)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - TABLE9[name]) / TABLE9[name] < 0.005, f"{name}: {params:.2f} M vs {TABLE9[name]} M"


def _forward_backward(name, tmp_path):
    torch.manual_seed(0)
    model = build_preset(name, tmp_path, num_classes=3).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == (2, 3, 64, 64) and out["aux"].shape == (2, 3, 64, 64)
    (out["out"].mean() + out["aux"].mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 80))
    assert set(out) == {"out"} and out["out"].shape == (1, 3, 48, 80)


@pytest.mark.parametrize("name", [n for n in group_options("model") if n not in LARGE])
def test_forward_backward(name, tmp_path):
    _forward_backward(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LARGE))
def test_forward_backward_large(name, tmp_path):
    _forward_backward(name, tmp_path)


def test_param_groups_cover_every_parameter_once_with_the_recipe():
    model = build_model("deeplabv3", "resnet18d", 5, 32, 16)
    groups = param_groups(model, lr=0.01, weight_decay=5e-4, head_lr_mult=10)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    encoder = {id(p) for p in model.encoder.parameters()}
    for g in groups:
        for p in g["params"]:
            assert g["lr"] == pytest.approx(0.01 if id(p) in encoder else 0.1)
            assert g["weight_decay"] == (0.0 if p.ndim == 1 else 5e-4)


def test_pretrained_without_weights_stops_with_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(PretrainedWeightsError, match="resnet18d.*pretrained_path"):
        build_model("deeplabv3", "resnet18d", 5, 32, 16, pretrained=True)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_model("deeplabv3", "resnet18d", 5, 32, 16, pretrained=True, pretrained_path=str(tmp_path / "x.pth"))


def test_pretrained_path_loads_the_weights(tmp_path):
    import timm

    reference = timm.create_model("resnet18d", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    model = build_model("deeplabv3", "resnet18d", 5, 32, 16, pretrained=True, pretrained_path=str(tmp_path / "r18.pth"))
    assert torch.equal(model.encoder.body.conv1[0].weight, reference.conv1[0].weight)
