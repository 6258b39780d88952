"""Ulysses context parallelism (DeepSpeed-Ulysses, arXiv:2309.14509) for long token sequences.

The cp ranks of one group read the same images. After the embedding each keeps a contiguous N/cp
slice of the tokens and carries only that slice of the residual stream through every block. Inside
attention an all-to-all trades the token split for a head split, (B, N/cp, H, D) → (B, N, H/cp, D),
so each rank attends over the whole sequence with H/cp heads, and a second all-to-all trades back.
Before the final norm the sequence is gathered again, so pooling and heads see every token.

Gradients: every cp rank computes the same loss, and the gather's backward sums the cp identical
upstream gradients, so each rank's parameter gradients are cp × its own share and their sum over the
group is cp × the single-process gradient. FSDP therefore averages over the flattened
(dp_shard, cp) mesh (`mesh.dp_mesh`), which yields exactly the single-process gradient and keeps the
parameters identical across cp ranks.

Applied after tensor parallelism: the kernel then sees H/tp local heads (so H/tp must divide by cp),
the hooks work on the local part of the replicated DTensor stream, and the token split runs before
tensor parallel's own input hook, so sequence parallel shards each cp slice further over tp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from bigvit.errors import ConfigError


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 of a (cp, ...) tensor: chunk j goes to rank j, and chunk j of the
    result came from rank j. With equal chunks it is its own adjoint, so backward is the same exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.group), None


class _GatherTokens(torch.autograd.Function):
    """(B, N/cp, W) on each rank → (B, N, W) on all; backward sums the ranks' gradients of each slice
    (reduce-scatter), the adjoint of the gather whatever the upstream gradients are."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        local = x.transpose(0, 1).contiguous()  # collectives concatenate along dim 0: tokens first
        out = local.new_empty((local.shape[0] * dist.get_world_size(group), *local.shape[1:]))
        dist.all_gather_single(out, local, group=group)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.transpose(0, 1).contiguous()
        out = full.new_empty((full.shape[0] // dist.get_world_size(ctx.group), *full.shape[1:]))
        dist.reduce_scatter_single(out, full, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.transpose(0, 1), None


def tokens_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(L, N/cp, H, D) token slices → (L, N, H/cp, D): all tokens, this rank's contiguous group of heads."""
    cp = dist.get_world_size(group)
    length, tokens, heads, dim = x.shape
    x = x.reshape(length, tokens, cp, heads // cp, dim).permute(2, 0, 1, 3, 4)  # chunk j: heads of rank j
    x = _AllToAll.apply(x, group)  # chunk j: tokens of rank j, this rank's heads
    return x.permute(1, 0, 2, 3, 4).reshape(length, cp * tokens, heads // cp, dim)


def heads_to_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(L, N, H/cp, D) head groups → (L, N/cp, H, D): this rank's token slice, all heads (inverse of
    `tokens_to_heads`)."""
    cp = dist.get_world_size(group)
    length, tokens, heads, dim = x.shape
    x = x.reshape(length, cp, tokens // cp, heads, dim).permute(1, 0, 2, 3, 4)  # chunk j: tokens of rank j
    x = _AllToAll.apply(x, group)  # chunk j: this rank's tokens, heads of rank j
    return x.permute(1, 2, 0, 3, 4).reshape(length, tokens // cp, cp * heads, dim)


class UlyssesAttention(nn.Module):
    """Wraps an attention kernel: q, k, v arrive as (B, N/cp, H, D) token slices, `kernel` runs on
    (B, N, H/cp, D), and the output returns as (B, N/cp, H, D). Needs H divisible by cp."""

    def __init__(self, kernel: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        self.kernel = kernel
        self.group = group

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_tokens: int | None = None
    ) -> torch.Tensor:
        # One all-to-all for q, k and v together: stacked along the batch dimension.
        q, k, v = tokens_to_heads(torch.cat((q, k, v)), self.group).chunk(3)
        return heads_to_tokens(self.kernel(q, k, v, valid_tokens), self.group)


def on_local(x: torch.Tensor, fn) -> torch.Tensor:
    """`fn(x)`; for a DTensor replicated over tensor-parallel ranks, `fn` of its local tensor, re-wrapped."""
    if not isinstance(x, DTensor):
        return fn(x)
    if not all(p.is_replicate() for p in x.placements):
        raise RuntimeError(
            f"context parallelism needs the full token stream here, got placements {x.placements}"
        )
    return DTensor.from_local(fn(x.to_local()), x.device_mesh, x.placements, run_check=False)


def split_tokens(group: dist.ProcessGroup):
    """Forward pre-hook: keep this rank's contiguous slice of the tokens (dim 1)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)

    def hook(module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        return (on_local(x, lambda t: t.chunk(cp, dim=1)[rank]), *rest)

    return hook


def gather_tokens(group: dist.ProcessGroup):
    """Forward pre-hook: the whole sequence again, from every rank's slice (autograd-aware)."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        return (on_local(x, lambda t: _GatherTokens.apply(t, group)), *rest)

    return hook


def check_cp(model: nn.Module, cp: int) -> None:
    """Raise ConfigError unless `model`'s heads split evenly over `cp` ranks (and the tp ranks that
    tensor parallelism, applied before, already split them over). Any token count works: the model
    pads its sequence to a multiple of the shard degree."""
    cfg = model.cfg
    if cfg.window_size:
        raise ConfigError(
            f"parallel.cp={cp} shards the token sequence, which model.window_size={cfg.window_size} "
            "attention partitions by windows of the patch grid instead; use parallel.tp for windowed "
            "models or model.window_size=0"
        )
    qkv = model.blocks[0].attn.qkv.weight
    tp = qkv.device_mesh.size() if isinstance(qkv, DTensor) else 1  # tensor parallel ran first
    if (cfg.heads // tp) % cp:
        local = f"the {cfg.heads // tp} heads per tp rank (model.heads={cfg.heads} / parallel.tp={tp})"
        valid = [d for d in range(1, cfg.heads // tp + 1) if (cfg.heads // tp) % d == 0]
        raise ConfigError(
            f"parallel.cp={cp} does not divide {local if tp > 1 else f'model.heads={cfg.heads}'}: "
            f"Ulysses gives each cp rank heads/cp heads; use parallel.cp in {valid}"
        )


def apply_cp(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard the token sequence of every block over the 1-D `mesh` (the cp dimension), in place.

    The blocks see N/cp tokens per rank, their attention kernels become UlyssesAttention, and the
    final norm receives the full sequence again, identical on every cp rank.
    """
    cp = mesh.size()
    check_cp(model, cp)
    # Sequence parallel (applied before) already asked for a multiple of tp; each cp slice splits again.
    model.token_multiple *= cp
    group = mesh.get_group()
    for block in model.blocks:
        block.attn.kernel = UlyssesAttention(block.attn.kernel, group)
    # Prepended: split before any tensor-parallel input hook, so cp takes contiguous slices of all tokens.
    model.blocks[0].register_forward_pre_hook(split_tokens(group), prepend=True)
    model.norm.register_forward_pre_hook(gather_tokens(group))
