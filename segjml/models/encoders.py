"""Backbones: any timm model with ``features_only=True`` (dilated to an output stride), or an SMP MiT encoder.

Every encoder exposes ``out_channels`` (one entry per feature map, shallow to deep) and returns the list of
feature maps. Pretrained weights come from the local timm / Hugging Face cache or from an explicit file; when they
cannot be found the build stops with :class:`PretrainedWeightsError` instead of silently starting from scratch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but are not available offline."""


def _weights_hint(name: str) -> str:
    return (
        f"pretrained weights for '{name}' are not in the local timm/Hugging Face cache; download them on a machine "
        f"with internet (python -c \"import timm; timm.create_model('{name}', pretrained=True)\") and copy "
        f"~/.cache/huggingface here, or pass model.pretrained_path=/path/to/weights.(pth|safetensors), "
        f"or set model.pretrained=false"
    )


def _load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"model.pretrained_path={path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


class TimmEncoder(nn.Module):
    """A timm backbone returning its feature pyramid.

    Args:
        name: any timm model name that supports ``features_only`` (``resnet18d``, ``mobilenetv2_100``, ...).
        output_stride: 8, 16 or 32; strides below 32 replace the last strides by dilation.
        pretrained: load ImageNet weights (from the offline cache or ``pretrained_path``).
        pretrained_path: explicit weights file for the full timm model (classifier keys are ignored).
    """

    def __init__(
        self, name: str, output_stride: int = 32, pretrained: bool = False, pretrained_path: str | None = None
    ) -> None:
        super().__init__()
        import timm

        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        kwargs = {"features_only": True}
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        if pretrained and pretrained_path is None:
            try:
                self.body = timm.create_model(name, pretrained=True, **kwargs)
            except Exception as err:  # network/cache errors come in many types (OSError, HF hub errors, ...)
                raise PretrainedWeightsError(_weights_hint(name) + f" ({type(err).__name__})") from err
        else:
            self.body = timm.create_model(name, pretrained=False, **kwargs)
            if pretrained:
                state = _load_state_dict_file(pretrained_path)
                own = self.body.state_dict()
                matched = {k: v for k, v in state.items() if k in own}
                if not matched:
                    raise PretrainedWeightsError(f"{pretrained_path} holds no weights for timm model '{name}'")
                missing = set(own) - set(matched)
                if missing:
                    raise PretrainedWeightsError(
                        f"{pretrained_path} lacks {len(missing)} weights of '{name}', e.g. {sorted(missing)[0]}"
                    )
                self.body.load_state_dict(matched, strict=True)
        self.out_channels: list[int] = list(self.body.feature_info.channels())
        self.reductions: list[int] = list(self.body.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


class MiTEncoder(nn.Module):
    """Mix Transformer (SegFormer) encoder from segmentation-models-pytorch: 4 stages at strides 4, 8, 16, 32.

    Args:
        name: ``mit_b0`` ... ``mit_b5``.
        pretrained: load ImageNet weights (offline cache or ``pretrained_path``).
        pretrained_path: explicit weights file for the encoder.
    """

    def __init__(self, name: str, pretrained: bool = False, pretrained_path: str | None = None) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        weights = None
        if pretrained and pretrained_path is None:
            weights = "imagenet"
        try:
            self.body = smp.encoders.get_encoder(name, in_channels=3, depth=5, weights=weights)
        except Exception as err:
            if weights is None:
                raise
            raise PretrainedWeightsError(_weights_hint(name) + f" ({type(err).__name__})") from err
        if pretrained_path is not None and pretrained:
            state = _load_state_dict_file(pretrained_path)
            try:
                self.body.load_state_dict(state, strict=False)
            except RuntimeError as err:
                raise PretrainedWeightsError(f"{pretrained_path} does not fit encoder '{name}': {err}") from err
        # SMP pads the pyramid with two placeholder maps (identity and an empty stride-2 map); keep the 4 real ones.
        self.out_channels = [c for c in self.body.out_channels if c > 0][-4:]
        self.reductions = [4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x)[-4:])


def build_encoder(
    name: str, output_stride: int = 32, pretrained: bool = False, pretrained_path: str | None = None
) -> nn.Module:
    """Build an encoder by name: ``mit_b*`` from SMP, anything else from timm."""
    if name.startswith("mit_"):
        if output_stride != 32:
            raise ValueError(f"MiT encoders only support output_stride=32, got {output_stride}")
        return MiTEncoder(name, pretrained=pretrained, pretrained_path=pretrained_path)
    return TimmEncoder(name, output_stride=output_stride, pretrained=pretrained, pretrained_path=pretrained_path)
