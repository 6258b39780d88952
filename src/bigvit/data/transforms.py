"""Image augmentations written with PIL and torch (no torchvision at run time), split where each is cheap.

In the dataloader workers: decode and crop. A transform picks its crop box from the image's header
(RandomResizedCrop's box, or the evaluation's centre square), decodes (JPEGs at 1/2, 1/4 or 1/8 scale
in the DCT when the crop will shrink by 2x or more: `Image.draft`), and returns a `Crop`, the box's
pixels at their own size as a view of PIL's memory (pixels.py). `crop_batch` copies a batch of them
into the corner of one uint8 canvas, once.

On the training device (`BatchPrep`): each crop resized to the training size by PIL's antialiased
filters as two batched matmuls (resample.py), flipped, normalized, then mixed (mixup/cutmix). A
crop's resize costs a worker about as much as decoding a 224 px JPEG, so in the worker it would
halve the images/s a worker gives (bench/data.py); on an accelerator it costs next to nothing.

Randomness comes from a `random.Random` handed in by the stream, seeded per sample (per batch for
mixup/cutmix), so that a resumed stream reproduces the exact augmentation of every sample.
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
from torch.utils.data import get_worker_info

from bigvit.data.pixels import rgbx
from bigvit.data.resample import check_filter, resample
from bigvit.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[int, int, int, int]  # left, top, right, bottom


class UndecodableImage(Exception):
    """An image's bytes failed to decode (the stream counts and skips the sample, or stops)."""


@dataclass(frozen=True)
class Crop:
    """What a worker ships per image: `pixels` (h, w, 4) uint8 RGBX and, in their coordinates, the
    `region` (top, left, height, width) to resize to the training size on the device (fractional
    where the worker shrank the image), and whether to mirror it."""

    pixels: np.ndarray
    region: tuple[float, float, float, float]
    flip: bool = False


Transform = Callable[[Image.Image, random.Random], Crop]


def decoded_crop(image: Image.Image, box: Box, size: int, draft: bool = True, flip: bool = False) -> Crop:
    """The `box` of an opened, not yet decoded image: its pixels (a view of PIL's memory where it can
    be) and where the box lies in them.

    A box that will shrink by k >= 2 (its shorter side over `size`) is shrunk by about k here, so a
    worker never ships much more than it must: JPEGs by decoding at 1/2, 1/4 or 1/8 scale in the
    DCT (`draft`), other images by PIL's integer box reduce. The box, scaled with the pixels, stays
    exact (fractional), so the device's resize covers the same part of the image.
    """
    left, top, right, bottom = (float(v) for v in box)
    if draft and image.format == "JPEG" and min(right - left, bottom - top) >= 2 * size:
        width, requested = image.width, (
            math.ceil(image.width * size / (right - left)),
            math.ceil(image.height * size / (bottom - top)),
        )
        if image.draft("RGB", requested) and image.width != width:
            shrink = width / image.width
            left, top, right, bottom = left / shrink, top / shrink, right / shrink, bottom / shrink
    try:
        image.load()
        if image.mode != "RGB":
            image = image.convert("RGB")
    except Exception as error:  # PIL raises several types for bad bytes
        raise UndecodableImage(str(error) or type(error).__name__) from error
    factor = max(1, int(min(right - left, bottom - top) // size))
    # The whole pixels the box touches, widened to whole blocks of `factor` where the image allows.
    x0, y0 = int(left), int(top)
    x1 = min(x0 + math.ceil((right - x0) / factor) * factor, image.width)
    y1 = min(y0 + math.ceil((bottom - y0) / factor) * factor, image.height)
    pixels = rgbx(image.reduce(factor, (x0, y0, x1, y1))) if factor > 1 else rgbx(image)[y0:y1, x0:x1]
    region = ((top - y0) / factor, (left - x0) / factor, (bottom - top) / factor, (right - left) / factor)
    return Crop(pixels, region, flip)


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


def centre_crop_box(width: int, height: int, crop_pct: float) -> Box:
    """The centre square of side crop_pct × the shorter side (as resizing the shorter side to
    size / crop_pct and cropping size)."""
    side = max(1, round(min(width, height) * crop_pct))
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def train_transform(
    image_size: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    draft: bool = True,
) -> Transform:
    """RandomResizedCrop(scale, ratio) and a horizontal flip, the resize (to image_size) left to `BatchPrep`."""

    def apply(image: Image.Image, rng: random.Random) -> Crop:
        box = random_resized_crop_box(image.width, image.height, scale, ratio, rng)
        flip = hflip and rng.random() < 0.5
        return decoded_crop(image, box, image_size, draft, flip)

    return apply


def eval_transform(image_size: int, crop_pct: float = 0.875, draft: bool = True) -> Transform:
    """The centre crop (`centre_crop_box`), the resize (to image_size) left to `BatchPrep`."""

    def apply(image: Image.Image, rng: random.Random | None = None) -> Crop:
        box = centre_crop_box(image.width, image.height, crop_pct)
        return decoded_crop(image, box, image_size, draft)

    return apply


def zeroed_canvas(shape: tuple[int, ...]) -> torch.Tensor:
    """A zero uint8 tensor whose zeros cost no writes: fresh pages are zero. In a dataloader worker it
    is in shared memory, so that sending it to the main process copies nothing (as torch's
    default_collate allocates); elsewhere numpy's calloc maps fresh pages. Writing the zeros of a
    batch's padding cost a worker about a tenth of its rate (bench/data.py)."""
    if get_worker_info() is None:
        return torch.from_numpy(np.zeros(shape, dtype=np.uint8))
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)  # a new shared file: zeros


def crop_batch(crops: Sequence[Crop]) -> dict:
    """Crops → "image" (B, H, W, 4) uint8, crop b's pixels in [b, :h_b, :w_b] (H, W the largest),
    zeros elsewhere; "extent" (B, 2) long (h_b, w_b); "region" (B, 4) float64; "flip" (B,) bool."""
    height = max(crop.pixels.shape[0] for crop in crops)
    width = max(crop.pixels.shape[1] for crop in crops)
    images = zeroed_canvas((len(crops), height, width, 4))
    canvas = images.numpy()  # numpy's slice copies cost a fraction of torch's per call
    for slot, crop in zip(canvas, crops, strict=True):
        slot[: crop.pixels.shape[0], : crop.pixels.shape[1]] = crop.pixels
    return {
        "image": images,
        "extent": torch.tensor([crop.pixels.shape[:2] for crop in crops], dtype=torch.long),
        "region": torch.tensor([crop.region for crop in crops], dtype=torch.float64),
        "flip": torch.tensor([crop.flip for crop in crops], dtype=torch.bool),
    }


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
    not; multi-hot label sets (B, num_classes) mix the same way. Label smoothing then applied by the
    loss (F.cross_entropy's label_smoothing) equals timm's smoothing of each one-hot before mixing: both
    are linear.
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
        # Multi-hot label sets (data.targets=labels) mix the same way: linearly.
        targets = labels.float() if labels.dim() == 2 else F.one_hot(labels, self.num_classes).float()
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
    """A batch of crops (`crop_batch`) on the device: resized to `size` (filter `interpolation`),
    flipped, normalized to float, then for training batches mixed (seeded by the batch).

    Returns (images float (B, 3, size, size), targets): the batch's `target` entry — class numbers (B,),
    with `mix` class probabilities (B, K); caption tokens (B, L). Evaluation batches take one without
    `mix`. A call's `size` overrides the
    default (progressive resizing: data/resolution.py).
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        mix: Mixup | None = None,
        interpolation: str = "bicubic",
        target: str = "label",
    ):
        self.size, self.interpolation, self.mix, self.target = size, check_filter(interpolation), mix, target
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = 1 / (255 * std)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std

    def __call__(
        self, batch: dict, device: torch.device, size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = batch["image"].to(device, non_blocking=True)[..., :3].permute(0, 3, 1, 2).float()
        extents, regions, flip = (batch[key].to(device) for key in ("extent", "region", "flip"))
        images = resample(pixels, extents, regions, size or self.size, self.interpolation, flip)
        images = images.mul_(self.scale.to(device)).add_(self.shift.to(device))
        labels = batch[self.target].to(device, non_blocking=True)
        if self.mix is not None:
            mixed = self.mix({"image": images, "label": labels}, random.Random(int(batch["seed"])))
            images, labels = mixed["image"], mixed["label"]
        return images, labels


def on_device(
    batch: dict, device: torch.device, size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a batch that is ready as it is (synthetic data), on the device; resized
    (bicubic, antialiased) when `size` differs from the images' own."""
    images = batch["image"].to(device, non_blocking=True)
    if size and size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return images, batch["label"].to(device, non_blocking=True)
