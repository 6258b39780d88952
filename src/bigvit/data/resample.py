"""Resizing a batch of crops of different sizes to one size, on the training device.

Dataloader workers only decode and crop (a crop's resize costs about as much CPU as decoding a
224 px JPEG); they ship each crop at its own size in the corner of a batch canvas. Here each
crop is resized to size × size with PIL's separable, antialiased filters (the weights of PIL's
`resize`, which torch's `interpolate(..., antialias=True)` also follows): per sample, one weight
matrix per axis, applied as two batched matmuls, as `jax.image.scale_and_translate` does. A
horizontal flip is the x-matrix reversed.
"""

from __future__ import annotations

import torch

from bigvit.errors import ConfigError


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1 - x.abs()).clamp(min=0)


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


FILTERS = {"bilinear": _triangle, "bicubic": _cubic}


def check_filter(name: str) -> str:
    if name not in FILTERS:
        raise ConfigError(f"data.augment.interpolation={name!r} is not one of {sorted(FILTERS)}")
    return name


def resample_weights(
    extents: torch.Tensor,
    starts: torch.Tensor,
    spans: torch.Tensor,
    length: int,
    out: int,
    filter: str,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, out, length) float32: row i weighs the first extents[b] entries of an axis of `length` to
    give output pixel i of `out` resampled from [starts[b], starts[b] + spans[b]) (PIL's `resize` with a
    box: kernel centres, support widened by the downscale factor, which is the antialiasing, and
    weights renormalized at the edges). `flip` (B,) bool reverses the output."""
    kernel = FILTERS[filter]
    shape = (-1, 1, 1)
    start, span = starts.to(torch.float32).view(shape), spans.to(torch.float32).view(shape)
    scale = span / out
    stretch = scale.clamp(min=1)  # a downscale widens the kernel: antialiasing
    centres = start + (torch.arange(out, device=span.device, dtype=torch.float32).view(1, -1, 1) + 0.5) * scale
    inputs = torch.arange(length, device=span.device, dtype=torch.float32).view(1, 1, -1)
    distance = (inputs + 0.5 - centres) / stretch
    weights = kernel(distance) * (inputs < extents.view(shape))
    weights = weights / weights.sum(-1, keepdim=True)
    if flip is not None:
        weights = torch.where(flip.view(shape), weights.flip(1), weights)
    return weights


def resample(
    images: torch.Tensor,
    extents: torch.Tensor,
    regions: torch.Tensor,
    size: int,
    filter: str,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """images (B, C, H, W) float, sample b's pixels in [:extents[b, 0], :extents[b, 1]] → (B, C, size, size)
    float: the region (top, left, height, width) = regions[b] of each resized (and mirrored where
    `flip`), clamped to the input's 0..255 range."""
    top, left, height, width = regions.unbind(-1)
    along_y = resample_weights(extents[:, 0], top, height, images.shape[-2], size, filter).unsqueeze(1)
    along_x = resample_weights(extents[:, 1], left, width, images.shape[-1], size, filter, flip).unsqueeze(1)
    return (along_y @ images @ along_x.transpose(-1, -2)).clamp_(0, 255)
