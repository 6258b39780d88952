"""Attention kernels behind one function.

Every backend takes and returns tensors in the (batch, tokens, heads, head_dim) layout, the one
flash-attn uses natively; SDPA and the math reference transpose views internally.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

from bigvit.errors import ConfigError
from bigvit.extras import optional, require

ATTN_IMPLS = ("auto", "flash_attn", "sdpa", "math")


@cache
def _flash_attn_func() -> Callable | None:
    """The flash-attn package's kernel, or None where it is not installed."""
    return getattr(optional("flash_attn"), "flash_attn_func", None)


def flash_attn_usable(q: torch.Tensor) -> bool:
    """flash-attn runs on CUDA tensors in half precision with head_dim <= 256."""
    return (
        _flash_attn_func() is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
    )


def resolve_impl(impl: str, q: torch.Tensor) -> str:
    """The backend `impl` stands for on this input ("auto" → flash_attn where usable, else sdpa)."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"model.attn_impl={impl!r} is not one of {list(ATTN_IMPLS)}")
    if impl == "auto":
        return "flash_attn" if flash_attn_usable(q) else "sdpa"
    if impl == "flash_attn" and not flash_attn_usable(q):
        require("flash_attn", "model.attn_impl=flash_attn")
        raise ConfigError(
            "model.attn_impl=flash_attn needs CUDA fp16/bf16 inputs with head_dim <= 256; got "
            f"device={q.device}, dtype={q.dtype}, head_dim={q.shape[-1]}. Use model.attn_impl=auto or sdpa."
        )
    return impl


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto", valid_tokens: int | None = None
) -> torch.Tensor:
    """Softmax attention over (B, N, H, D) inputs; returns (B, N, H, D).

    With `valid_tokens` < N the last N - valid_tokens tokens are padding: they take no part as keys
    and their outputs are zero. Attending over the valid prefix alone is exact for every kernel
    (flash-attn takes no mask) and skips the padding's work.
    """
    tokens = q.shape[1]
    if valid_tokens is not None and valid_tokens < tokens:
        valid = attention(q[:, :valid_tokens], k[:, :valid_tokens], v[:, :valid_tokens], impl)
        return F.pad(valid, (0, 0, 0, 0, 0, tokens - valid_tokens))
    impl = resolve_impl(impl, q)
    if impl == "flash_attn":
        return _flash_attn_func()(q, k, v)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views
    out = F.scaled_dot_product_attention(q, k, v) if impl == "sdpa" else math_attention(q, k, v)
    return out.transpose(1, 2)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention over (B, H, N, D), computed in fp32."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    impl: str = "auto",
    valid_tokens: int | None = None,
) -> torch.Tensor:
    """Attention within window × window squares of a square patch grid (ViTDet, SAM), over (B, N, H, D).

    The first `valid_tokens` (default N) tokens are the grid's patches in row-major order; a grid whose
    side `window` does not divide is padded with zero queries/keys/values to whole windows, as SAM pads
    its grid, and cropped again. Trailing tokens beyond `valid_tokens` are padding and come out as zeros.
    """
    batch, tokens, heads, dim = q.shape
    valid = tokens if valid_tokens is None else valid_tokens
    side = math.isqrt(valid)
    if side * side != valid:
        raise ValueError(f"windowed attention needs a square patch grid, got {valid} tokens")
    cells = -(-side // window)  # windows per side
    padded = cells * window

    def windows(t: torch.Tensor) -> torch.Tensor:
        grid = t[:, :valid].reshape(batch, side, side, heads, dim)
        grid = F.pad(grid, (0, 0, 0, 0, 0, padded - side, 0, padded - side))
        grid = grid.reshape(batch, cells, window, cells, window, heads, dim).transpose(2, 3)
        return grid.reshape(batch * cells * cells, window * window, heads, dim)

    out = attention(windows(q), windows(k), windows(v), impl)
    out = out.reshape(batch, cells, cells, window, window, heads, dim).transpose(2, 3)
    out = out.reshape(batch, padded, padded, heads, dim)[:, :side, :side].reshape(batch, valid, heads, dim)
    return F.pad(out, (0, 0, 0, 0, 0, tokens - valid)) if tokens > valid else out
