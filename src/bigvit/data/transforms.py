"""Image augmentations written with PIL and torch (no torchvision at run time).

Randomness comes from a `random.Random` handed in by the stream, seeded per sample, so that a
resumed stream reproduces the exact augmentation of every sample it replays.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image, random.Random], torch.Tensor]


def to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image → normalized float32 (3, H, W)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def random_resized_crop_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], rng: random.Random
) -> tuple[int, int, int, int]:
    """A crop box (left, top, right, bottom) covering `scale` of the area with aspect `ratio` (Inception-style)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback: the largest centred crop within the ratio bounds.
    in_ratio = width / height
    w, h = (
        (width, round(width / ratio[0]))
        if in_ratio < ratio[0]
        else (round(height * ratio[1]), height)
        if in_ratio > ratio[1]
        else (width, height)
    )
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_transform(
    image_size: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Transform:
    def apply(image: Image.Image, rng: random.Random) -> torch.Tensor:
        box = random_resized_crop_box(image.width, image.height, scale, ratio, rng)
        image = image.resize((image_size, image_size), Image.BICUBIC, box=box)
        if hflip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(image, mean, std)

    return apply


def eval_transform(
    image_size: int,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Transform:
    """Resize the shorter side to image_size / crop_pct, then centre-crop image_size."""

    def apply(image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        short = round(image_size / crop_pct)
        scale = short / min(image.width, image.height)
        w, h = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
        image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - image_size) // 2, (h - image_size) // 2
        return to_tensor(image.crop((left, top, left + image_size, top + image_size)), mean, std)

    return apply
