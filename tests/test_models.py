"""Every model preset: Table 9 parameter counts, forward/backward, output shapes, param groups, weights errors;
one test class per architecture of ``DECODERS``; the model interface that ``param_groups`` relies on."""

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from segjml.engine.optim import param_groups
from segjml.models import ARCHITECTURES, PretrainedWeightsError, SegmentationModel, build_model
from tests.helpers import compose_config, group_options

# Table 9 of the paper, parameters (M) at 19 classes.
TABLE9 = {
    "dl3p_r101": 62.58,
    "dl3_r101": 87.10,
    "dl3_r50": 68.11,
    "dl3_r18": 13.98,
    "dl3_mb2": 3.79,
    "psp_r18": 12.79,
    "unet_r50": 76.07,
    "unet_r18": 14.49,
    "unet_mb2": 4.06,
    "segformer_b5": 83.77,
    "segformer_b3": 46.40,
    "segformer_b1": 15.48,
    "segformer_b0": 5.01,
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


# --- one-line errors for bad model input
def _one_line_value_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert excinfo.type is ValueError or issubclass(excinfo.type, ValueError)
    assert "\n" not in message and message.strip() == message and message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.mark.parametrize(
    ("name", "close"),
    [
        ("resnet_nope", "resnet"),
        ("resnt18d", "resnet18d"),
        ("convnxt_tiny", "convnext_tiny"),
        ("mit_b9", "mit_b5"),
        ("mit_b0x", "mit_b0"),
        ("mobilenetv2_10", "mobilenetv2_100"),
    ],
)
def test_unknown_encoder_lists_close_names(name, close):
    from segjml.models import build_encoder

    with pytest.raises(ValueError) as excinfo:
        build_encoder(name)
    message = _one_line_value_error(excinfo, f"unknown model.encoder '{name}'", "timm.list_models()", "mit_b0..mit_b5")
    suggested = message.split("names: ", 1)[1].split(";", 1)[0].split(", ")
    assert 1 <= len(suggested) <= 5
    assert any(close in s for s in suggested)
    import timm

    known = set(timm.list_models()) | {f"mit_b{i}" for i in range(6)}
    assert set(suggested) <= known  # only real names are suggested


@pytest.mark.parametrize("name", ["zzzz_qq", "", None, 18])
def test_encoder_names_without_a_close_match_still_fail_in_one_line(name):
    from segjml.models import build_encoder

    with pytest.raises(ValueError) as excinfo:
        build_encoder(name)
    _one_line_value_error(excinfo, "model.encoder", "mit_b0..mit_b5", str(name) if name else "")


def test_unknown_pretrained_tag_lists_the_known_tags():
    from segjml.models import build_encoder

    with pytest.raises(ValueError) as excinfo:
        build_encoder("resnet18d.nope")
    _one_line_value_error(excinfo, "'nope'", "resnet18d.nope", "ra2_in1k")


def test_known_pretrained_tag_is_accepted():
    from segjml.models import build_encoder

    torch.manual_seed(0)
    enc = build_encoder("resnet10t.c3_in1k", output_stride=32).eval()
    with torch.no_grad():
        features = enc(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == enc.out_channels


def test_encoder_without_dilation_names_the_stride():
    from segjml.models import build_encoder

    with pytest.raises(ValueError) as excinfo:
        build_encoder("vit_tiny_patch16_224", output_stride=8)
    _one_line_value_error(excinfo, "'vit_tiny_patch16_224'", "model.output_stride=8")


@pytest.mark.parametrize("pretrained", [False, True])
@pytest.mark.parametrize("error", [RuntimeError, AssertionError, AttributeError, NotImplementedError])
def test_encoder_without_features_only_is_a_one_line_error(monkeypatch, tmp_path, pretrained, error):
    import timm

    from segjml.models import build_encoder

    def refuse(name, *args, **kwargs):
        raise error(f"features_only not implemented for {name}\nsecond line of a long timm message")

    monkeypatch.setattr(timm, "create_model", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError) as excinfo:  # not PretrainedWeightsError: the architecture is the problem
        build_encoder("resnet18d", pretrained=pretrained)
    assert not isinstance(excinfo.value, PretrainedWeightsError)
    _one_line_value_error(excinfo, "'resnet18d'", "features_only")


@pytest.mark.parametrize("arch", ["segnet", "DeepLabV3", "", None])
def test_unknown_arch_is_refused_before_the_encoder_is_built(arch, monkeypatch):
    import segjml.models.segmentation_model as sm

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder was built before the architecture was checked")

    monkeypatch.setattr(sm, "build_encoder", no_encoder)
    with pytest.raises(ValueError) as excinfo:
        sm.build_model(arch, "resnet101", 5, 32, 16)
    _one_line_value_error(excinfo, f"model.arch '{arch}'", "deeplabv3plus", "segformer")


def test_unknown_encoder_under_a_known_arch():
    with pytest.raises(ValueError) as excinfo:
        build_model("deeplabv3", "resnet_nope", 5, 32, 16)
    _one_line_value_error(excinfo, "unknown model.encoder 'resnet_nope'", "resnet")


# --- one test class per architecture (a subclass of ArchitectureTests sets ``arch`` and, if needed, the encoder)
class ArchitectureTests:
    """Forward/backward, output shapes and parameter groups of one architecture on a small encoder."""

    arch: str
    encoder = "mobilenetv2_050"
    output_stride = 8
    num_classes = 3

    @pytest.fixture(scope="class")
    def model(self):
        torch.manual_seed(0)
        return build_model(
            self.arch, self.encoder, self.num_classes, channels=16, aux_channels=8, output_stride=self.output_stride
        )

    def test_builds_a_segmentation_model(self, model):
        assert isinstance(model, SegmentationModel) and model.num_classes == self.num_classes
        assert model.encoder is not None and model.decoder is not None
        assert model.head is not None and model.aux_head is not None

    def test_forward_backward(self, model):
        torch.manual_seed(0)
        model.train().zero_grad(set_to_none=True)
        out = model(torch.randn(2, 3, 64, 64))
        assert set(out) == {"out", "aux"}
        assert out["out"].shape == out["aux"].shape == (2, self.num_classes, 64, 64)
        (out["out"].mean() + out["aux"].mean()).backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)

    @pytest.mark.parametrize("size", [(64, 64), (48, 80), (33, 47)])
    def test_output_is_at_the_input_size(self, model, size):
        torch.manual_seed(0)
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, *size))
            both = model(torch.randn(1, 3, *size), with_aux=True)
        assert set(out) == {"out"} and out["out"].shape == (1, self.num_classes, *size)
        assert set(both) == {"out", "aux"} and both["aux"].shape == (1, self.num_classes, *size)

    @pytest.mark.parametrize("no_decay_1d", [True, False])
    def test_param_groups(self, model, no_decay_1d):
        groups = param_groups(model, lr=0.01, weight_decay=5e-4, head_lr_mult=10, no_decay_1d=no_decay_1d)
        names = ["head", "head_no_decay", "encoder", "encoder_no_decay"] if no_decay_1d else ["head", "encoder"]
        assert [g["name"] for g in groups] == names
        encoder = {id(p) for p in model.encoder.parameters()}
        for g in groups:
            assert all((id(p) in encoder) == g["name"].startswith("encoder") for p in g["params"])
            assert g["lr_mult"] == (1.0 if g["name"].startswith("encoder") else 10)
            assert g["lr"] == pytest.approx(0.01 * g["lr_mult"])
            assert all(g["weight_decay"] == (0.0 if no_decay_1d and p.ndim <= 1 else 5e-4) for p in g["params"])
        order = {id(p): i for i, p in enumerate(model.parameters())}
        seen = [id(p) for g in groups for p in g["params"]]
        assert sorted(seen) == sorted(order)  # every parameter exactly once
        assert all([order[id(p)] for p in g["params"]] == sorted(order[id(p)] for p in g["params"]) for g in groups)


class TestDeepLabV3(ArchitectureTests):
    arch = "deeplabv3"


class TestDeepLabV3Plus(ArchitectureTests):
    arch = "deeplabv3plus"


class TestPSPNet(ArchitectureTests):
    arch = "pspnet"


class TestUNet(ArchitectureTests):
    arch = "unet"
    output_stride = 32


class TestSegFormer(ArchitectureTests):
    arch = "segformer"
    encoder = "mit_b0"
    output_stride = 32


def _subclasses(cls):
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def test_every_architecture_has_a_test_class():
    assert sorted(c.arch for c in _subclasses(ArchitectureTests)) == sorted(ARCHITECTURES)


def test_architectures_table():
    from segjml.models import DECODERS

    assert ARCHITECTURES == tuple(DECODERS) == ("deeplabv3", "deeplabv3plus", "pspnet", "unet", "segformer")


# --- the model interface (SegmentationModel) that param_groups relies on
class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


class HalfNet(MyNet):  # an encoder, but nothing else of the interface
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 3, 1)


def test_param_groups_refuses_a_model_without_the_interface():
    with pytest.raises(ValueError) as excinfo:
        param_groups(MyNet(), lr=0.01, weight_decay=5e-4)
    _one_line_value_error(
        excinfo,
        "model MyNet does not follow segjml's model interface",
        "segjml.models.SegmentationModel",
        "it has no 'encoder', ",
        "subclass SegmentationModel",
    )


def test_param_groups_names_every_missing_part_of_the_interface():
    with pytest.raises(ValueError) as excinfo:
        param_groups(HalfNet(), lr=0.01, weight_decay=5e-4)
    message = _one_line_value_error(
        excinfo,
        "model HalfNet",
        "'decoder'",
        "'head'",
        "'aux_head'",
        "'num_classes'",
        "'encoder_parameters'",
        "'head_parameters'",
    )
    assert "'encoder'" not in message.split("; ", 1)[0]


def test_a_subclass_with_its_own_forward_follows_the_interface():
    class NoAux(SegmentationModel):
        def forward(self, x, with_aux=None):
            return {"out": self.head(self.decoder(self.encoder(x)))}

    torch.manual_seed(0)
    base = build_model("pspnet", "mobilenetv2_050", 3, 16, 8, output_stride=32)
    model = NoAux(base.encoder, base.decoder, 3, 8)
    groups = param_groups(model, lr=0.01, weight_decay=0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
