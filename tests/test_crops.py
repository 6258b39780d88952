"""Decode-and-crop in the workers, resize on the device: each piece against the direct computation."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bigvit.data.pixels import rgbx
from bigvit.data.resample import resample
from bigvit.data.transforms import (
    BatchPrep,
    Crop,
    UndecodableImage,
    crop_batch,
    decoded_crop,
    eval_transform,
    train_transform,
)
from bigvit.errors import ConfigError


def photo(width: int, height: int, seed: int = 0, cell: int = 16) -> np.ndarray:
    """Smooth random colour fields, features of about `cell` pixels (JPEG-friendly, unlike noise),
    uint8 (height, width, 3)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // cell + 2, width // cell + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def encoded(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_rgbx_is_a_view_of_the_pixels_and_outlives_the_image():
    pixels = photo(53, 37)
    view = rgbx(Image.fromarray(pixels))
    assert view.shape == (37, 53, 4) and not view.flags.writeable and not view.flags.owndata
    _ = [Image.fromarray(np.zeros((37, 53, 3), np.uint8)) for _ in range(20)]  # reuse freed memory, if any
    assert np.array_equal(view[..., :3], pixels) and (view[..., 3] == 255).all()


def test_rgbx_copies_an_image_pillow_keeps_in_several_blocks():
    pixels = np.random.default_rng(0).integers(0, 256, (2100, 2100, 3), dtype=np.uint8)  # > 16 MiB as RGBX
    view = rgbx(Image.fromarray(pixels))
    assert np.array_equal(view[..., :3], pixels)
    with pytest.raises(ValueError, match="mode 'L'"):
        rgbx(Image.fromarray(pixels[..., 0]))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize(("height", "width", "size"), [(20, 30, 32), (100, 80, 32), (32, 32, 32), (7, 90, 24)])
def test_device_resize_equals_torch_antialiased_interpolate(interpolation, height, width, size):
    generator = torch.Generator().manual_seed(height * width)
    crop = torch.randint(0, 256, (1, 3, height, width), generator=generator).float()
    canvas = torch.full((2, 3, 110, 120), 77.0)
    canvas[:, :, :height, :width] = crop  # sample 1 is mirrored
    flip = torch.tensor([False, True])
    region = torch.tensor([[0.0, 0.0, height, width]] * 2)
    ours = resample(canvas, torch.tensor([[height, width]] * 2), region, size, interpolation, flip)
    direct = F.interpolate(crop, size=(size, size), mode=interpolation, antialias=True).clamp(0, 255)
    assert torch.allclose(ours[0], direct[0], atol=2e-3)
    assert torch.allclose(ours[1], direct[0].flip(-1), atol=2e-3)


def test_a_fractional_region_resizes_as_pil_resize_with_a_float_box():
    pixels = photo(320, 240, cell=40)
    whole = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float()[None]
    left, top, right, bottom = 40.3, 30.7, 300.2, 230.9
    pil = Image.fromarray(pixels).resize((48, 48), Image.BILINEAR, box=(left, top, right, bottom))
    region = torch.tensor([[top, left, bottom - top, right - left]])
    ours = resample(whole, torch.tensor([[240, 320]]), region, 48, "bilinear")
    assert (ours[0] - torch.from_numpy(np.array(pil)).permute(2, 0, 1)).abs().max().item() < 1.0  # PIL rounds


def test_an_unknown_interpolation_is_named():
    with pytest.raises(ConfigError, match=r"data.augment.interpolation='nearest' is not one of \['bicubic', 'bilinear'\]"):
        BatchPrep(8, (0.5,) * 3, (0.5,) * 3, interpolation="nearest")


def test_crops_that_fit_are_shipped_exactly_as_decoded():
    pixels = photo(60, 40)
    for fmt in ("PNG", "JPEG"):
        data = encoded(pixels, fmt)
        whole = np.asarray(opened(data).convert("RGB"))
        crop = decoded_crop(opened(data), (5, 7, 45, 33), size=32)
        assert np.array_equal(crop.pixels[..., :3], whole[7:33, 5:45]) and crop.region == (0, 0, 26, 40)


@pytest.mark.parametrize(("fmt", "draft"), [("JPEG", True), ("JPEG", False), ("PNG", True)])
def test_large_crops_shrink_in_the_worker_and_resize_like_the_full_decode(fmt, draft):
    # Shrinks 560x420 → 64, by more than 6x; features of 80 px stay 9 px wide: no aliasing to differ in.
    pixels, size, box = photo(640, 480, cell=80), 64, (40, 30, 600, 450)
    data = encoded(pixels, fmt)
    crop = decoded_crop(opened(data), box, size, draft=draft)
    shape = crop.pixels.shape[:2]
    assert size <= min(shape) <= 2 * size  # JPEG draft or PNG reduce: within 2x of the target
    shipped = torch.from_numpy(crop.pixels[..., :3].copy()).permute(2, 0, 1).float()[None]
    ours = resample(shipped, torch.tensor([shape]), torch.tensor([crop.region]), size, "bicubic")
    full = torch.from_numpy(np.array(opened(data).convert("RGB"))).permute(2, 0, 1).float()[None]
    direct = F.interpolate(full[..., 30:450, 40:600], size=(size, size), mode="bicubic", antialias=True)
    # Of 255 (measured 0.22 to 0.27); PIL's own two-stage resize (reducing_gap=2) differs from the
    # direct one by 0.31, and a box misplaced by half a shrunk pixel made it 2.6.
    assert (ours - direct).abs().mean().item() < 0.5


def test_train_and_eval_transforms_draw_the_box_and_flip_from_the_sample_rng():
    data = encoded(photo(96, 64))
    train = train_transform(32, scale=(0.3, 0.6), ratio=(0.75, 1.33))
    first, again = train(opened(data), random.Random(5)), train(opened(data), random.Random(5))
    assert np.array_equal(first.pixels, again.pixels) and first.flip == again.flip
    flips = {train(opened(data), random.Random(seed)).flip for seed in range(20)}
    assert flips == {True, False}
    assert first.region[:2] == (0, 0) and first.region[2:] == first.pixels.shape[:2]
    area = first.pixels.shape[0] * first.pixels.shape[1] / (96 * 64)
    assert 0.28 <= area <= 0.62
    centre = eval_transform(32, crop_pct=0.5)(opened(data))
    whole = np.asarray(opened(data).convert("RGB"))
    assert not centre.flip and np.array_equal(centre.pixels[..., :3], whole[16:48, 32:64])


def test_an_undecodable_image_fails_in_the_transform_with_its_own_error():
    data = encoded(photo(64, 64))
    with pytest.raises(UndecodableImage):
        train_transform(32)(opened(data[: len(data) // 2]), random.Random(0))  # truncated mid-scan


def test_crop_batch_pads_each_crop_with_zeros_in_one_canvas():
    sizes = [(3, 5), (6, 2)]
    crops = [Crop(np.full((h, w, 4), i + 1, np.uint8), (0.5, 0, h - 1, w), bool(i)) for i, (h, w) in enumerate(sizes)]
    batch = crop_batch(crops)
    assert batch["image"].shape == (2, 6, 5, 4) and batch["image"].dtype == torch.uint8
    assert batch["extent"].tolist() == [[3, 5], [6, 2]] and batch["flip"].tolist() == [False, True]
    assert batch["region"].tolist() == [[0.5, 0, 2, 5], [0.5, 0, 5, 2]]
    assert (batch["image"][0, :3] == 1).all() and not batch["image"][0, 3:].any()
    assert (batch["image"][1, :, :2] == 2).all() and not batch["image"][1, :, 2:].any()
