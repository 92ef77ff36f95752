"""A built-in synthetic segmentation data set: textured shapes on textured backgrounds, no download needed.

Every sample is a pure function of ``(seed, split, index)``, so the set is identical on every machine and worker.
Objects of class ``c`` share a texture (stripe orientation and period) and a colour family, but colours are jittered
and overlap between classes, shapes are random (disc, box, triangle, ellipse), objects occlude each other, and noise
is added: a model must look at texture over a neighbourhood, not at a single pixel's colour, and boundaries are real.
Classes are imbalanced (object classes are drawn with unequal probabilities and sizes).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from segjml.data.folder import to_tensors

CLASS_NAMES = ("background", "vertical", "horizontal", "checker", "diagonal", "blobs")
PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48))

# Texture of each object class: (angle in degrees, period in pixels, kind) and a base RGB colour.
_TEXTURES = (
    (0.0, 6.0, "stripes"),
    (90.0, 6.0, "stripes"),
    (0.0, 8.0, "checker"),
    (45.0, 5.0, "stripes"),
    (0.0, 10.0, "blobs"),
)
_BASE_COLOURS = np.array(
    [[0.75, 0.35, 0.35], [0.40, 0.70, 0.40], [0.65, 0.65, 0.30], [0.35, 0.45, 0.75], [0.70, 0.50, 0.30]]
)
_CLASS_PROBS = np.array([0.32, 0.26, 0.20, 0.13, 0.09])  # object classes 1..5: imbalanced on purpose
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random ``cells x cells`` grid, bilinearly upsampled to ``size``."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i0 = np.floor(t).astype(int)
    f = t - i0
    a = grid[i0][:, i0] * (1 - f)[None, :] + grid[i0][:, i0 + 1] * f[None, :]
    b = grid[i0 + 1][:, i0] * (1 - f)[None, :] + grid[i0 + 1][:, i0 + 1] * f[None, :]
    return a * (1 - f)[:, None] + b * f[:, None]


def _texture(rng: np.random.Generator, cls: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    angle, period, kind = _TEXTURES[cls - 1]
    period *= rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, period)
    if kind == "checker":
        return (((xx + phase) // (period / 2) + (yy + phase) // (period / 2)) % 2).astype(np.float64)
    if kind == "blobs":
        return (_smooth_noise(rng, xx.shape[0], max(2, int(xx.shape[0] / period))) > 0.5).astype(np.float64)
    theta = np.deg2rad(angle + rng.uniform(-10, 10))
    u = xx * np.cos(theta) + yy * np.sin(theta)
    return 0.5 + 0.5 * np.sin(2 * np.pi * (u + phase) / period)


def _shape_mask(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int, scale: float) -> np.ndarray:
    cy, cx = rng.uniform(0.1, 0.9, 2) * size
    r = scale * size * rng.uniform(0.12, 0.28)
    kind = rng.integers(4)
    if kind == 0:  # disc
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    if kind == 1:  # axis-aligned box
        h, w = r * rng.uniform(0.6, 1.4, 2)
        return (np.abs(yy - cy) <= h) & (np.abs(xx - cx) <= w)
    if kind == 2:  # rotated ellipse
        t = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        return (u / (1.5 * r)) ** 2 + (v / (0.7 * r)) ** 2 <= 1
    # triangle: inside three half-planes
    angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    px, py = cx + 1.3 * r * np.cos(angles), cy + 1.3 * r * np.sin(angles)
    inside = np.ones_like(xx, dtype=bool)
    for k in range(3):
        x1, y1, x2, y2 = px[k], py[k], px[(k + 1) % 3], py[(k + 1) % 3]
        inside &= (x2 - x1) * (yy - y1) - (y2 - y1) * (xx - x1) >= 0
    return inside


def make_sample(
    seed: int, split: str, index: int, size: int = 64, noise: float = 0.08
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one sample.

    Returns:
        image: ``(size, size, 3)`` uint8 RGB.
        label: ``(size, size)`` uint8 with values in ``[0, len(CLASS_NAMES))``.
    """
    rng = np.random.default_rng([seed, _SPLIT_OFFSET[split], index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # Background: smooth colour field with a faint texture of its own, so it is not a flat colour.
    bg = np.stack([_smooth_noise(rng, size, 3) for _ in range(3)], axis=-1) * 0.6 + 0.2
    bg += 0.08 * (_smooth_noise(rng, size, size // 4)[..., None] - 0.5)
    image, label = bg, np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(1, 5)):
        cls = int(rng.choice(len(_CLASS_PROBS), p=_CLASS_PROBS)) + 1
        mask = _shape_mask(rng, yy, xx, size, scale=1.0 + 0.25 * (cls <= 2))
        colour = np.clip(_BASE_COLOURS[cls - 1] + rng.normal(0, 0.12, 3), 0, 1)
        contrast = rng.uniform(0.25, 0.45)
        obj = colour * (1 - contrast) + contrast * _texture(rng, cls, yy, xx)[..., None] * np.ones(3)
        image = np.where(mask[..., None], obj, image)
        label[mask] = cls
    image = image + rng.normal(0, noise, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label


class SyntheticSegmentation(Dataset):
    """The synthetic data set as a map-style ``Dataset`` of ``(image, label)`` pairs.

    Args:
        split: ``train`` or ``val``.
        length: number of samples in the split.
        size: image side in pixels.
        seed: generator seed; the same seed always gives the same samples.
        transform: an albumentations-style callable ``transform(image=..., mask=...) -> dict``.
    """

    num_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES
    palette = PALETTE
    ignore_index = 255

    def __init__(self, split: str = "train", length: int = 1000, size: int = 64, seed: int = 0, transform=None) -> None:
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"synthetic split must be one of {sorted(_SPLIT_OFFSET)}, got '{split}'")
        self.split, self.length, self.size, self.seed, self.transform = split, length, size, seed, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, label = make_sample(self.seed, self.split, index, self.size)
        if self.transform is not None:
            out = self.transform(image=image, mask=label)
            image, label = out["image"], out["mask"]
        return to_tensors(image, label)
