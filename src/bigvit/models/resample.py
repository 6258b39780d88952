"""Resampling a ViT's learned position embeddings to another patch grid.

As big_vision (`resample_posemb`) and timm (`resample_abs_pos_embed`) do: the class token's position
is kept apart, the patch positions are viewed as a (rows, cols, width) image and resized with an
antialiased filter (antialiasing matters when the grid shrinks), then flattened again.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from bigvit.errors import ConfigError

if TYPE_CHECKING:  # a type only: vit.py resamples at run time with this module
    from bigvit.models.vit import ViTConfig

POS_EMBED_MODES = ("bicubic", "bilinear")


def grid_of(num_positions: int) -> int:
    """The side of the square patch grid `num_positions` positions cover."""
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ConfigError(f"{num_positions} patch positions do not form a square grid")
    return side


def resample_pos_embed(
    pos_embed: torch.Tensor,
    grid: int | tuple[int, int],
    num_prefix: int = 1,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """(1, num_prefix + g*g, W) positions → (1, num_prefix + rows*cols, W) for the new `grid`.

    The first `num_prefix` rows (the class token's position) are kept unchanged. Computed in fp32
    and returned in the input's dtype; autograd flows through it (resampling at run time trains the
    stored positions).
    """
    if mode not in POS_EMBED_MODES:
        raise ConfigError(f"position-embedding resampling mode={mode!r} is not one of {list(POS_EMBED_MODES)}")
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    side = grid_of(patches.shape[1])
    if (rows, cols) == (side, side):
        return pos_embed
    width = patches.shape[-1]
    image = patches.float().reshape(1, side, side, width).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=(rows, cols), mode=mode, antialias=antialias, align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, rows * cols, width).to(pos_embed.dtype)
    return torch.cat([prefix, resized], dim=1)


# -- patch embeddings (FlexiViT) ---------------------------------------------------------------


def bilinear_resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """(new_h*new_w, old_h*old_w) float64 B with B @ x.flatten() = bilinear resize of x (old → new), no
    antialiasing: the resize FlexiViT's pseudo-inverse is taken of (big_vision's `resample_patchemb`)."""
    basis = torch.eye(old[0] * old[1], dtype=torch.float64).reshape(-1, 1, *old)
    resized = F.interpolate(basis, size=new, mode="bilinear", align_corners=False, antialias=False)
    return resized.reshape(old[0] * old[1], -1).T


def resize_patch_embed(weight: torch.Tensor, new_patch_size: int | tuple[int, int]) -> torch.Tensor:
    """A patch-embedding kernel (out, in, p, p) → (out, in, p', p') by FlexiViT's pseudo-inverse resize
    (Beyer et al. 2023, Sec. 3.4).

    With B the bilinear resize p → p' (`bilinear_resize_matrix`), the new kernel is pinv(Bᵀ) w, so that
    <x, w> = <B x, w'> for every patch x when p' >= p: a patch embedded at p equals its bilinear upsample
    embedded at p'. When p' < p it is the least-squares solution (min over w' of ||Bᵀ w' - w||).
    Computed in float64, without autograd; returned in the input's dtype and on its device.
    """
    new = (new_patch_size, new_patch_size) if isinstance(new_patch_size, int) else tuple(new_patch_size)
    old = tuple(weight.shape[-2:])
    if new == old:
        return weight
    resize = bilinear_resize_matrix(old, new).to(weight.device)
    project = torch.linalg.pinv(resize.T)  # (p'^2, p^2)
    flat = weight.detach().to(torch.float64).reshape(-1, old[0] * old[1])
    return (flat @ project.T).reshape(*weight.shape[:-2], *new).to(weight.dtype)


# -- whole checkpoints -------------------------------------------------------------------------


def adapt_state_dict(
    state_dict: dict[str, torch.Tensor], cfg: ViTConfig, mode: str = "bicubic"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A full bigvit state dict made to fit the ViTConfig `cfg`, and one note per tensor it changed.

    `pos_embed` (1, int(class_token) + g*g, W) is resampled to cfg's grid (image_size // patch_size;
    registers carry no positions), `patch_embed.weight` (W, C, p, p) is FlexiViT-resized to
    cfg.patch_size; every other tensor is passed through as it is. Raises ConfigError naming the key
    and both shapes when a tensor cannot be made to fit (another width or channel count).
    """
    state, notes = dict(state_dict), []
    grid = cfg.image_size // cfg.patch_size
    prefix = int(cfg.class_token)
    if "pos_embed" in state:
        pos_embed = state["pos_embed"]
        want = (1, prefix + grid * grid, cfg.width)
        if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[-1] != cfg.width:
            raise ConfigError(f"pos_embed: the checkpoint's {tuple(pos_embed.shape)} cannot become {want}")
        try:
            old_grid = grid_of(pos_embed.shape[1] - prefix)
        except ConfigError:
            raise ConfigError(
                f"pos_embed: the checkpoint's {tuple(pos_embed.shape)} minus {prefix} class-token row(s) "
                f"is no square patch grid (model.class_token={cfg.class_token}); the model wants {want}"
            ) from None
        state["pos_embed"] = resample_pos_embed(pos_embed, grid, prefix, mode)  # checks `mode` at any grid
        if old_grid != grid:
            notes.append(f"pos_embed: {old_grid}x{old_grid} -> {grid}x{grid} grid ({mode})")
    if "patch_embed.weight" in state:
        kernel = state["patch_embed.weight"]
        want = (cfg.width, cfg.in_chans, cfg.patch_size, cfg.patch_size)
        if kernel.ndim != 4 or tuple(kernel.shape[:2]) != want[:2]:
            raise ConfigError(
                f"patch_embed.weight: the checkpoint's {tuple(kernel.shape)} cannot become {want}"
            )
        if tuple(kernel.shape[2:]) != want[2:]:
            state["patch_embed.weight"] = resize_patch_embed(kernel, cfg.patch_size)
            notes.append(
                f"patch_embed.weight: patch {kernel.shape[-2]}x{kernel.shape[-1]} -> "
                f"{cfg.patch_size}x{cfg.patch_size} (FlexiViT pseudo-inverse)"
            )
    return state, notes
