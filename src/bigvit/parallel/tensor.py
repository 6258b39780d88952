"""Megatron-style tensor parallelism, optionally with sequence parallelism, as DTensor plans.

Per block, `attn.qkv` and `mlp.fc1` are split column-wise and `attn.proj` and `mlp.fc2` row-wise:
each rank holds whole attention heads (the fused qkv rows are head-interleaved) and a slice of the
MLP, and attention runs on plain local tensors. Without sequence parallel the residual stream is
replicated and each sub-layer ends in an all-reduce; with it the stream between blocks is sharded
on the token dim (Shard(1)), norms and layer scales run on this rank's tokens, and each sub-layer
is an all-gather (at the norm's output) and a reduce-scatter (at proj / fc2).

The MAP pooling head is split like a block (without sequence parallel). Every other parameter
(embeddings, norms, layer scales, QK-norms, probe, classifier) becomes a
replicated DTensor on the tp mesh, so optimizer, gradient clipping and checkpoints see one kind of
tensor, and FSDP later shards all of them the same way over the dp mesh.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInputOutput,
    RowwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import Placement

from bigvit.errors import ConfigError

TOKENS = Shard(1)  # (batch, tokens, width): sequence parallel shards the token dim
HEADS = Shard(2)  # (batch, tokens, heads, head_dim): column-wise qkv leaves each rank its own heads


class Replicated(ParallelStyle):
    """Replicate a module's parameters on the mesh and run it on an input of layout `input_layout`
    (a plain tensor is taken to be this rank's part of it); the output leaves as `output_layout`.

    The input layout is what makes gradients right: a LayerNorm fed this rank's tokens (Shard(1)) or
    heads (Shard(2)) gets a Partial weight gradient, summed over the tp ranks when first used (FSDP
    does it before its reduce-scatter; a plain optimizer would on its first op).
    """

    def __init__(
        self,
        input_layout: Placement | None = None,
        output_layout: Placement | None = None,
        use_local_output: bool = True,
    ):
        self.input_layout = input_layout or Replicate()
        self.output_layout = output_layout or self.input_layout
        self.use_local_output = use_local_output

    def _prepare_input(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (self.input_layout,), run_check=False)
        elif x.placements != (self.input_layout,):
            x = x.redistribute(placements=(self.input_layout,))
        return (x, *inputs[1:])

    def _prepare_output(self, module: nn.Module, output: DTensor, mesh: DeviceMesh):
        if output.placements != (self.output_layout,):
            output = output.redistribute(placements=(self.output_layout,))
        return output.to_local() if self.use_local_output else output

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, mesh, None, self._prepare_input, self._prepare_output)


class LocalModule(ParallelStyle):
    """Run a parameter-free module on this rank's local tensor of a replicated stream: for code that
    mixes the stream with plain tensors (patch dropout's random indices). The tp ranks draw the same
    random numbers (they share a seed), so the output is replicated again."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def to_local(module, inputs, mesh):
            return tuple(x.to_local() if isinstance(x, DTensor) else x for x in inputs)

        def to_replicated(module, output, mesh):
            return DTensor.from_local(output, mesh, (Replicate(),), run_check=False)

        return distribute_module(module, mesh, None, to_local, to_replicated)


class ReplicatedModel(Replicated):
    """The whole model: full images in, full outputs out, as a fresh tensor rather than the view
    `to_local` returns (FSDP hooks the root's output for backward and warns about views)."""

    def _prepare_output(self, module: nn.Module, output: DTensor, mesh: DeviceMesh):
        return super()._prepare_output(module, output, mesh).clone()


class ReplicatedRoot(ParallelStyle):
    """An image–text model around its (already split) towers: its own parameters (temperature, bias)
    replicated on the mesh, its outputs handed on as plain tensors (the towers' are already)."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def to_local(module, outputs, mesh):
            return tuple(x.to_local() if isinstance(x, DTensor) else x for x in outputs)

        return distribute_module(module, mesh, None, None, to_local)


def check_tp_layout(cfg, tp: int, sequence_parallel: bool) -> None:
    """Raise ConfigError unless heads and MLP width split over `tp` (tokens always do: with sequence
    parallel the model pads its sequence to a multiple of tp)."""
    if cfg.heads % tp:
        valid = [d for d in range(1, cfg.heads + 1) if cfg.heads % d == 0]
        raise ConfigError(
            f"model.heads={cfg.heads} does not split over parallel.tp={tp}: tensor parallelism gives "
            f"each rank whole attention heads; use tp in {valid} or a head count divisible by {tp}"
        )
    if cfg.mlp_dim % tp:
        raise ConfigError(
            f"model.mlp_dim={cfg.mlp_dim} does not split over parallel.tp={tp}; use a multiple of {tp}"
        )


def block_plan(block: nn.Module, stream: Placement) -> dict[str, ParallelStyle]:
    """The plan inside one block whose residual stream has layout `stream` (Replicate or Shard(1)).

    The norm gathers its output to Replicate as a DTensor, so in a parallel block the one norm1
    output feeds attention and MLP with a single all-gather (and a single reduce-scatter back).
    """
    norm = Replicated(input_layout=stream, output_layout=Replicate(), use_local_output=False)
    plan: dict[str, ParallelStyle] = {
        "norm1": norm,
        "attn.qkv": ColwiseParallel(),
        "attn.proj": RowwiseParallel(output_layouts=stream),
        "mlp.fc1": ColwiseParallel(),
        "mlp.fc2": RowwiseParallel(output_layouts=stream),
    }
    if not isinstance(block.norm2, nn.Identity):
        plan["norm2"] = norm
    for name in ("attn.q_norm", "attn.k_norm"):  # shared over heads: each rank adds its heads' part
        if not isinstance(block.get_submodule(name), nn.Identity):
            plan[name] = Replicated(input_layout=HEADS)
    for name in ("ls1", "ls2"):
        if not isinstance(block.get_submodule(name), nn.Identity):
            plan[name] = Replicated(input_layout=stream)
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    """Shard `model`'s blocks over `tp_mesh` in place (on any device, meta included).

    The ranks of a tp group must be fed the same images; the model still returns full logits,
    identical on each of them. Every parameter becomes a DTensor on `tp_mesh`. Raises ConfigError
    (at start-up, before any weight exists) when heads or mlp_dim do not split over tp. An image–text
    model's towers are each split the same way, its temperature and bias replicated.
    """
    parts = model.towers() if hasattr(model, "towers") else (model,)
    for tower in parts:
        apply_tp_tower(tower, tp_mesh, sequence_parallel)
    if parts != (model,):
        parallelize_module(model, tp_mesh, ReplicatedRoot())


def apply_tp_tower(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """apply_tp for one ViT-shaped tower: its blocks, MAP head, and the rest replicated around them."""
    check_tp_layout(model.cfg, tp_mesh.size(), sequence_parallel)
    if sequence_parallel:
        model.token_multiple *= tp_mesh.size()
    stream = TOKENS if sequence_parallel else Replicate()
    last = len(model.blocks) - 1
    for index, block in enumerate(model.blocks):
        parallelize_module(block, tp_mesh, block_plan(block, stream))
        # The stream enters block 0 replicated and leaves the last block replicated again.
        boundary = PrepareModuleInputOutput(
            input_layouts=Replicate() if index == 0 else stream,
            desired_input_layouts=stream,
            use_local_input=True,
            output_layouts=stream,
            desired_output_layouts=Replicate() if index == last else stream,
            use_local_output=False,
        )
        parallelize_module(block, tp_mesh, boundary)
    if getattr(model, "map_head", None) is not None:
        # The pooling head is as wide as a block (ViT-22B: ~450M parameters): split it the same way,
        # full sequence in, full pooled features out; its attention runs on this rank's heads.
        parallelize_module(
            model.map_head,
            tp_mesh,
            {
                "q": ColwiseParallel(),
                "kv": ColwiseParallel(),
                "proj": RowwiseParallel(use_local_output=False),
                "mlp.fc1": ColwiseParallel(),
                "mlp.fc2": RowwiseParallel(use_local_output=False),
            },
        )
    if hasattr(model, "patch_drop"):
        parallelize_module(model.patch_drop, tp_mesh, LocalModule())
    # Embeddings, final norm, pooling and head: replicated, run on replicated DTensors. The last block
    # hands back a replicated (gathered) stream, so the final norm sees whole sequences, or with
    # model.fc_norm the pooled features, under sequence parallel as without it.
    parallelize_module(model, tp_mesh, ReplicatedModel())
