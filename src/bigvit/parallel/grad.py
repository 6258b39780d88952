"""Gradient clipping by the true global norm, whether gradients are plain tensors or DTensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clip in place (when max_norm is set) and return the global gradient norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if max_norm:  # without clipping, the norm is only measured (no pass over the gradients)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    # Sharded gradients give a DTensor norm whose value is only complete once redistributed.
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
