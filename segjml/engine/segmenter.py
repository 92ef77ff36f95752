"""``segjml.Segmenter``: a trained checkpoint as a Python callable from images to label maps (docs/inference.md).

It predicts exactly as ``eval.py`` does: the model that :func:`~segjml.engine.commands.load_trained` builds, the
images normalised with the data set's mean and std (:class:`~segjml.data.transforms.BatchToDevice`) and the
probabilities of :class:`~segjml.engine.inference.InferenceMode`, in float32. ``predict.py`` predicts through it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from segjml.data.transforms import BatchToDevice
from segjml.engine.inference import InferenceMode


class Prediction(NamedTuple):
    """What ``segmenter(image, return_probs=True)`` returns; unpacks as ``labels, probs``."""

    labels: torch.Tensor  # (H, W) int64 class ids, or (B, H, W) for a batch
    probs: torch.Tensor  # (C, H, W) float32 softmax probabilities, or (B, C, H, W) for a batch


class Segmenter:
    """A segmentation model with the normalisation, class names and inference mode it was trained and evaluated with.

    Build one with :meth:`from_checkpoint`. ``segmenter(image)`` gives the label map of one image ``(H, W)`` or of a
    batch ``(B, H, W)`` (int64, on :attr:`device`); ``segmenter(image, return_probs=True)`` gives a
    :class:`Prediction` that also holds the probabilities.

    Args:
        model: the network, in eval mode on ``device``.
        mean, std: per channel, 0-255 scale (the data set's ``dataset.mean`` / ``dataset.std``).
        class_names: one name per class, in class-id order.
        inference: whole image or sliding windows, flip, scales (:class:`InferenceMode`).
        device: where the model runs and the results are.
        palette: one RGB colour per class (colour-coded predictions).
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        class_names: Sequence[str],
        inference: InferenceMode,
        device: torch.device,
        palette: Sequence[tuple[int, int, int]],
    ) -> None:
        self.model = model.to(device).eval()
        self.class_names = list(class_names)
        self.inference = inference
        self.device = device
        self.palette = list(palette)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._to_device = BatchToDevice(device, mean, std)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "auto",
        *,
        mode: str | None = None,
        flip: bool | None = None,
        scales: Sequence[float] | None = None,
        crop_size: Sequence[int] | None = None,
    ) -> Segmenter:
        """The model of a segjml checkpoint with its run's normalisation, class names and evaluation mode.

        Everything is read from the config stored in the checkpoint, through the checks ``eval.py`` applies to it
        (docs/security.md): the model, ``dataset.mean`` / ``dataset.std``, the data set's class names and palette,
        and the inference mode of the validation during training (``trainer.eval``: ``mode``, ``flip``, ``scales``;
        the windows of ``mode="slide"`` are ``dataset.crop_size``). A keyword that is not ``None`` replaces the stored
        value, as ``eval.py mode=slide flip=true`` does.

        Args:
            path: a segjml checkpoint (``checkpoints/best.pt``).
            device: ``auto`` (a GPU if torch sees one), ``cpu``, ``cuda`` or ``cuda:N``.

        Raises:
            CheckpointError: an unreadable checkpoint, or a stored config that would build anything but segjml's own
                model and data set classes.
            ValueError: a device name torch does not know, or a GPU on a machine without one.
        """
        from segjml.engine.commands import dataset_class_names, dataset_palette, load_trained, stored_dataset
        from segjml.engine.distributed import resolve_device

        device = resolve_device(str(device))
        model, state = load_trained(path, device)
        data_cfg = stored_dataset(str(path), state)
        stored = ((state.get("config") or {}).get("trainer") or {}).get("eval") or {}
        inference = InferenceMode(
            mode=stored.get("mode", "whole"),
            crop_size=None if data_cfg.get("crop_size") is None else tuple(data_cfg.crop_size),
            flip=bool(stored.get("flip", False)),
            scales=tuple(stored.get("scales", (1.0,))),
        )
        given = dict(
            mode=mode,
            flip=flip,
            scales=None if scales is None else tuple(scales),
            crop_size=None if crop_size is None else tuple(crop_size),
        )
        inference = dataclasses.replace(inference, **{key: value for key, value in given.items() if value is not None})
        return cls(
            model,
            data_cfg.mean,
            data_cfg.std,
            dataset_class_names(data_cfg),
            inference,
            device,
            dataset_palette(data_cfg),
        )

    @property
    def num_classes(self) -> int:
        """The number of classes the model predicts."""
        return len(self.class_names)

    @torch.no_grad()
    def __call__(self, image: Any, return_probs: bool = False) -> torch.Tensor | Prediction:
        """The label map of ``image``: ``(H, W)`` int64, or ``(B, H, W)`` for a ``(B, 3, H, W)`` tensor.

        Args:
            image: a path (read with OpenCV, as ``predict.py`` does), a ``PIL.Image``, an ``(H, W, 3)`` uint8 RGB
                array, or a uint8 tensor ``(3, H, W)`` or ``(B, 3, H, W)`` (0-255, unnormalised: the segmenter
                normalises it). Grayscale (``(H, W)``, ``(H, W, 1)``, PIL ``L``) and RGBA (``(H, W, 4)``, PIL
                ``RGBA``, its alpha dropped) images are converted to RGB.
            return_probs: also return the softmax probabilities, as a :class:`Prediction` ``(labels, probs)``.

        Raises:
            DataError: a path that cannot be read as an image.
            ValueError: an array or tensor of another dtype or shape, or another type of input.
        """
        batch, single = as_uint8_batch(image)
        probs = self.inference.probs(self.model, self._to_device.images(batch))
        labels = probs.argmax(1)
        if single:
            probs, labels = probs[0], labels[0]
        return Prediction(labels, probs) if return_probs else labels


def as_uint8_batch(image: Any) -> tuple[torch.Tensor, bool]:
    """``image`` as a ``(B, 3, H, W)`` uint8 tensor, and whether it was one image (not a batch)."""
    from PIL import Image

    from segjml.data.folder import read_image

    if isinstance(image, (str, Path)):
        image = read_image(image)
    elif isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return torch.tensor(rgb_array(image)).permute(2, 0, 1)[None], True  # a copy: arrays may be read-only
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise ValueError(
                f"image tensor has dtype {image.dtype}; pass uint8 images (0-255, unnormalised): the segmenter "
                "normalises them with the checkpoint's dataset.mean / dataset.std"
            )
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"image tensor has shape {tuple(image.shape)}; pass (B, 3, H, W) or (3, H, W) uint8 RGB")
        return (image[None], True) if image.ndim == 3 else (image, False)
    raise ValueError(
        f"cannot segment a {type(image).__name__}; pass an image path, a PIL image, an (H, W, 3) uint8 RGB array "
        "(0-255) or a (B, 3, H, W) / (3, H, W) uint8 tensor"
    )


def rgb_array(image: np.ndarray) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 array from an RGB, grayscale (``(H, W)``, ``(H, W, 1)``) or RGBA array."""
    if image.dtype != np.uint8:
        raise ValueError(f"image array has dtype {image.dtype}; pass an (H, W, 3) uint8 RGB array (0-255)")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"image array has shape {image.shape}; pass an (H, W, 3) uint8 RGB array (channels last; grayscale "
            "(H, W) and RGBA (H, W, 4) are converted)"
        )
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3]
