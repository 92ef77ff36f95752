"""Backbones: any timm model with ``features_only=True`` (dilated to an output stride), or an SMP MiT encoder.

Every encoder exposes ``out_channels`` (one entry per feature map, shallow to deep) and returns the list of
feature maps. Pretrained weights come from the local timm / Hugging Face cache or from an explicit file; when they
cannot be found the build stops with :class:`PretrainedWeightsError` instead of silently starting from scratch.
"""

from __future__ import annotations

import difflib
import os
import re
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from segjml.utils.files import read_tensors

MIT_ENCODERS = tuple(f"mit_b{i}" for i in range(6))


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but are not available offline."""


@lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def _closest_names(name: str, limit: int = 5) -> list[str]:
    """Up to ``limit`` known encoder names that look like ``name`` (difflib, then a shared leading word)."""
    candidates = list(_timm_names()) + list(MIT_ENCODERS)
    base = name.split(".", 1)[0].lower()
    close = difflib.get_close_matches(base, candidates, n=limit, cutoff=0.6)
    word = re.match(r"[a-z]+", base)
    if word:  # names that start like the request first ('resnet_nope' -> resnet*), then the rest of difflib's
        prefixed = [c for c in close if c.startswith(word.group())]
        close = prefixed + [c for c in close if c not in prefixed]
        if len(close) < limit:
            close += [c for c in candidates if c.startswith(word.group()) and c not in close][: limit - len(close)]
    return close[:limit]


def check_encoder_name(name: object) -> None:
    """Raise a one-line :class:`ValueError` unless ``name`` is a timm model (optionally ``.tag``) or ``mit_b0..5``.

    Names with a source prefix (``hf-hub:...``, ``local-dir:...``) are left to timm.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"model.encoder={name!r} is not a model name; use a name from timm.list_models() or mit_b0..mit_b5"
        )
    if ":" in name or name in MIT_ENCODERS:
        return
    import timm

    arch, _, tag = name.partition(".")
    if not name.startswith("mit_") and timm.is_model(arch):
        if tag and name not in timm.list_pretrained(name):
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
            known = (
                f"known tags: {', '.join(tags[:5])}{', ...' if len(tags) > 5 else ''}"
                if tags
                else f"'{arch}' has no pretrained tags; use model.encoder={arch}"
            )
            raise ValueError(f"unknown pretrained tag '{tag}' in model.encoder '{name}'; {known}")
        return
    close = _closest_names(name)
    kind = "timm names" if not any(c in MIT_ENCODERS for c in close) else "names"
    hint = f"closest {kind}: {', '.join(close)}; " if close else ""
    raise ValueError(f"unknown model.encoder '{name}'; {hint}any name from timm.list_models() or mit_b0..mit_b5 works")


class _ArchitectureError(ValueError):
    """The timm architecture itself cannot serve as a feature encoder (whatever the weights)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _create_timm_features(name: str, output_stride: int, pretrained: bool, kwargs: dict) -> nn.Module:
    """``timm.create_model(..., features_only=True)``; architecture problems become one-line ValueErrors.

    With ``pretrained=True`` only the output-stride problem is recognised here; any other failure is re-raised for
    the caller to tell a missing download from an unusable architecture.
    """
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, RuntimeError, AssertionError, AttributeError, NotImplementedError, KeyError) as err:
        if isinstance(err, TypeError) and "output_stride" in str(err):
            raise _ArchitectureError(
                f"model.encoder '{name}' cannot be dilated to model.output_stride={output_stride}; "
                f"use model.output_stride=32 or a CNN encoder such as resnet18d"
            ) from err
        if pretrained:
            raise
        raise _ArchitectureError(
            f"model.encoder '{name}' does not support features_only feature maps ({_first_line(err)}); "
            f"pick a CNN or hierarchical encoder such as resnet18d"
        ) from err


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
    try:
        state = read_tensors(path)
    except Exception as err:  # not a weights file, or one that cannot be read safely
        raise PretrainedWeightsError(
            f"model.pretrained_path={path} is not a weights file that can be read safely "
            f"({type(err).__name__}); give a .pth / .safetensors state dict"
        ) from err
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
        if output_stride not in (8, 16, 32):
            raise ValueError(f"model.output_stride must be 8, 16 or 32, got {output_stride}")
        check_encoder_name(name)
        kwargs = {"features_only": True}
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        if pretrained and pretrained_path is None:
            try:
                self.body = _create_timm_features(name, output_stride, True, kwargs)
            except _ArchitectureError:
                raise
            except Exception as err:  # network/cache errors come in many types (OSError, HF hub errors, ...)
                # the architecture itself may be the problem: building it without weights tells (error path only)
                _create_timm_features(name, output_stride, False, kwargs)
                raise PretrainedWeightsError(_weights_hint(name) + f" ({type(err).__name__})") from err
        else:
            self.body = _create_timm_features(name, output_stride, False, kwargs)
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
                wrong = [k for k, v in matched.items() if tuple(v.shape) != tuple(own[k].shape)]
                if wrong:
                    raise PretrainedWeightsError(
                        f"{pretrained_path} does not fit timm model '{name}': tensor '{wrong[0]}' has shape "
                        f"{tuple(matched[wrong[0]].shape)} in the file but {tuple(own[wrong[0]].shape)} in the model"
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
    """Build an encoder by name: ``mit_b0`` ... ``mit_b5`` from SMP, anything else from timm.

    Raises:
        ValueError: an unknown name (with the closest known names), an unknown pretrained tag, or an encoder that
            cannot give feature maps at ``output_stride``; one line each.
    """
    check_encoder_name(name)
    if name in MIT_ENCODERS:
        if output_stride != 32:
            raise ValueError(f"MiT encoders only support model.output_stride=32, got {output_stride}")
        return MiTEncoder(name, pretrained=pretrained, pretrained_path=pretrained_path)
    return TimmEncoder(name, output_stride=output_stride, pretrained=pretrained, pretrained_path=pretrained_path)
