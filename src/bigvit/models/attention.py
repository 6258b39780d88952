"""Attention kernels behind one function.

Every backend takes and returns tensors in the (batch, tokens, heads, head_dim) layout, the one
flash-attn uses natively; SDPA and the math reference transpose views internally.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("auto", "flash_attn", "sdpa", "math")


@cache
def _flash_attn_func() -> Callable | None:
    """The flash-attn package's kernel, or None where it is not installed."""
    try:
        return importlib.import_module("flash_attn").flash_attn_func
    except (ImportError, AttributeError):
        return None


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
        raise RuntimeError(
            "model.attn_impl='flash_attn' needs the flash-attn package (pip install 'bigvit[gpu]') and "
            f"CUDA fp16/bf16 inputs; got device={q.device}, dtype={q.dtype}. Use attn_impl=auto or sdpa."
        )
    return impl


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Softmax attention over (B, N, H, D) inputs; returns (B, N, H, D)."""
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
