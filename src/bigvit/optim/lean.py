"""The memory-lean optimizer Zhai et al. used to train ViT-g and ViT-G ("Scaling Vision Transformers").

Adam with two changes: the second moment of every matrix is factored into row and column averages
(Adafactor), and the first moment is stored in bfloat16. Optimizer state per (m, n) matrix drops
from 8·m·n bytes (AdamW, fp32) to 2·m·n + 4·(m + n). Vectors keep a full fp32 second moment.

Only ordinary tensor ops are used, so sharded (DTensor) parameters reduce their row/column
statistics across ranks as needed and the update does not depend on the parallel layout.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate

MOMENTUM_DTYPE = torch.bfloat16


def settled(tensor: torch.Tensor) -> torch.Tensor:
    """Finish any pending cross-rank reduction: a mean over a sharded dim leaves a Partial DTensor,
    which must become Replicate before it is stored as optimizer state (and checkpointed)."""
    if isinstance(tensor, DTensor) and any(p.is_partial() for p in tensor.placements):
        return tensor.redistribute(
            placements=[Replicate() if p.is_partial() else p for p in tensor.placements]
        )
    return tensor


class LeanAdam(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-30,
        weight_decay: float = 0.0,
    ):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"optim.betas={betas} must lie in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def factored(param: torch.Tensor) -> bool:
        return param.ndim >= 2

    def init_state(self, param: torch.Tensor) -> dict:
        state = {"step": 0, "momentum": torch.zeros_like(param, dtype=MOMENTUM_DTYPE)}
        if self.factored(param):
            grad_like = torch.zeros_like(param, dtype=torch.float32)
            state["row"] = settled(grad_like.mean(dim=-1))  # shape[:-1]
            state["col"] = settled(grad_like.mean(dim=-2))  # shape[:-2] + shape[-1:]
        else:
            state["second"] = torch.zeros_like(param, dtype=torch.float32)
        return state

    @staticmethod
    def second_moment(state: dict) -> torch.Tensor:
        """Adafactor's rank-1 estimate: row ⊗ col / mean(row)."""
        if "second" in state:
            return state["second"]
        row, col = state["row"], state["col"]
        return (row / row.mean(dim=-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(self.init_state(param))
                state["step"] += 1
                grad = param.grad.float()
                squared = grad.square() + group["eps"]
                if "second" in state:
                    state["second"].mul_(beta2).add_(squared, alpha=1 - beta2)
                else:
                    state["row"].mul_(beta2).add_(settled(squared.mean(dim=-1)), alpha=1 - beta2)
                    state["col"].mul_(beta2).add_(settled(squared.mean(dim=-2)), alpha=1 - beta2)
                momentum = state["momentum"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
                state["momentum"].copy_(momentum)  # rounded to bf16 for storage
                step = state["step"]
                second = self.second_moment(state) / (1 - beta2**step)
                update = (momentum / (1 - beta1**step)) / second.sqrt()
                if group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-group["lr"])
        return loss


def optimizer_state_bytes(shape: tuple[int, ...]) -> int:
    """LeanAdam's state bytes for one parameter of `shape` (the planner's figure)."""
    numel = 1
    for size in shape:
        numel *= size
    momentum = numel * MOMENTUM_DTYPE.itemsize
    if len(shape) < 2:
        return momentum + numel * 4
    rows = numel // shape[-1]
    cols = numel // shape[-2]
    return momentum + 4 * (rows + cols)
