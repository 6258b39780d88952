"""Checkpoint interchange: import timm ViT weights, export full tensors as safetensors."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from bigvit.errors import CheckpointError
from bigvit.models.vit import ViTConfig

# timm name fragment → bigvit name fragment (all other names are shared).
TIMM_RENAMES = (
    ("patch_embed.proj.", "patch_embed."),
    ("attn_pool.latent", "map_head.probe"),
    ("attn_pool.", "map_head."),
)


def interleave_heads(weight: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    """Rows ordered (parts, heads, head_dim), as timm stores fused projections → (heads, parts, head_dim)."""
    head_dim = weight.shape[0] // (parts * heads)
    return weight.reshape(parts, heads, head_dim, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)


def from_timm(state_dict: dict[str, torch.Tensor], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """A timm VisionTransformer state dict in bigvit's names and layouts."""
    converted = {}
    for name, tensor in state_dict.items():
        for old, new in TIMM_RENAMES:
            name = name.replace(old, new)
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            tensor = interleave_heads(tensor, 3, cfg.heads)
        elif name.endswith(("map_head.kv.weight", "map_head.kv.bias")):
            tensor = interleave_heads(tensor, 2, cfg.heads)
        converted[name] = tensor
    return converted


def export_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None
) -> None:
    """Write full (unsharded, contiguous, CPU) tensors to a .safetensors file."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def import_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (data only: the format holds no code); a CheckpointError
    names a file that is not one."""
    with _readable(path):
        return load_file(str(path))


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a .safetensors file (bigvit-export writes `model`, the config as JSON, and `step`)."""
    with _readable(path), safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


@contextlib.contextmanager
def _readable(path: str | Path):
    try:
        yield
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None
