"""Image augmentations written with PIL and torch (no torchvision at run time).

Randomness comes from a `random.Random` handed in by the stream, seeded per sample (per batch for
mixup/cutmix), so that a resumed stream reproduces the exact augmentation of every sample.

Crops are resized as uint8 tensors by torch's antialiased bicubic kernel (several times faster than
PIL's resize). Training batches stay uint8 until `BatchPrep` normalizes (and mixes) them on the
training device: float batches are 4x the bytes through the dataloader's shared memory and to the
device, which made a worker about 1.5x slower (bench/data.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bigvit.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image, random.Random], torch.Tensor]


def pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image's pixels as uint8 (3, H, W) (a channels-last view of one copy)."""
    return torch.from_numpy(np.array(image.convert("RGB") if image.mode != "RGB" else image)).permute(2, 0, 1)


class Normalize:
    """uint8 (3, H, W) → float32 (x / 255 - mean) / std, contiguous, in one multiply-add."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.scale = 1 / (255 * std)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.contiguous().float().mul_(self.scale).add_(self.shift)


def to_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image → normalized float32 (3, H, W)."""
    return Normalize(mean, std)(pixels(image))


def resized_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The `box` (left, top, right, bottom) of uint8 (3, H, W), resized to (3, size, size) (bicubic, antialiased)."""
    left, top, right, bottom = box
    crop = image[:, top:bottom, left:right].unsqueeze(0)
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]


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
) -> Transform:
    """RandomResizedCrop(scale, ratio) to image_size and a horizontal flip: uint8 (3, image_size, image_size)."""

    def apply(image: Image.Image, rng: random.Random) -> torch.Tensor:
        box = random_resized_crop_box(image.width, image.height, scale, ratio, rng)
        crop = resized_crop(pixels(image), box, image_size)
        return crop.flip(-1) if hflip and rng.random() < 0.5 else crop.contiguous()

    return apply


def eval_transform(
    image_size: int,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Transform:
    """The centre square of side crop_pct × the shorter side, resized to image_size (as resizing the shorter
    side to image_size / crop_pct and cropping image_size)."""
    normalize = Normalize(mean, std)

    def apply(image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        side = max(1, round(min(image.width, image.height) * crop_pct))
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return normalize(resized_crop(pixels(image), (left, top, left + side, top + side), image_size))

    return apply


def cutmix_box(height: int, width: int, lam: float, rng: random.Random) -> tuple[int, int, int, int]:
    """A box (top, bottom, left, right) of about (1 - lam) of the image, centred at random, clipped to it."""
    cut = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    y, x = rng.randrange(height), rng.randrange(width)
    top, bottom = max(y - cut_h // 2, 0), min(y + cut_h // 2, height)
    left, right = max(x - cut_w // 2, 0), min(x + cut_w // 2, width)
    return top, bottom, left, right


@dataclass(frozen=True)
class Mixup:
    """Mixup / CutMix of a batch, as timm's Mixup in batch mode: image i mixes with image B-1-i.

    With probability `prob` a batch is mixed: by CutMix (probability `switch_prob` when both alphas
    are on) with a box of area 1 - lam, lam ~ Beta(cutmix_alpha, cutmix_alpha) then set to the box's
    exact share, or by Mixup with lam ~ Beta(mixup_alpha, mixup_alpha). Labels become class
    probabilities lam * onehot(y_i) + (1 - lam) * onehot(y_(B-1-i)), float (B, num_classes), mixed or
    not. Label smoothing then applied by the loss (F.cross_entropy's label_smoothing) equals timm's
    smoothing of each one-hot before mixing: both are linear.
    """

    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self):
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.augment.{key}={getattr(self, key)!r} must be >= 0 (0 = off)")
        for key in ("prob", "switch_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"data.augment.mix_{key}={getattr(self, key)!r} must be in [0, 1]")

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, batch: dict, rng: random.Random) -> dict:
        images, labels = batch["image"], batch["label"]
        targets = F.one_hot(labels, self.num_classes).float()
        if not self.enabled or rng.random() >= self.prob:
            return {**batch, "label": targets}
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = rng.betavariate(alpha, alpha)
        partner = images.flip(0)
        if cutmix:
            height, width = images.shape[-2:]
            top, bottom, left, right = cutmix_box(height, width, lam, rng)
            images = images.clone()
            images[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
            lam = 1 - (bottom - top) * (right - left) / (height * width)
        else:
            images = images * lam + partner * (1 - lam)
        return {**batch, "image": images, "label": targets * lam + targets.flip(0) * (1 - lam)}


class BatchPrep:
    """A training batch on the device: uint8 images normalized to float, then mixed (seeded by the batch).

    Returns (images float (B, 3, H, W), labels): class numbers (B,), or with `mix` class probabilities (B, K).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], mix: Mixup | None = None):
        self.normalize, self.mix = Normalize(mean, std), mix

    def __call__(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        normalize = self.normalize
        images = images.float().mul_(normalize.scale.to(device)).add_(normalize.shift.to(device))
        if self.mix is not None:
            mixed = self.mix({"image": images, "label": labels}, random.Random(int(batch["seed"])))
            images, labels = mixed["image"], mixed["label"]
        return images, labels


def on_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a batch that is ready as it is (synthetic data), on the device."""
    return batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
