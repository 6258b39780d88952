"""Per-rank bytes of parameters, gradients and optimizer state under a layout, in closed form.

The planner's counterpart of the dry run (scaling/dryrun.py), which it must match within 10%
(tests/test_planner.py): the same sharding rules, computed from parameter shapes of a meta-device model
instead of by applying the layout on a fake process group.

- FSDP2 (fsdp, hsdp, fsdp_tp, fsdp_cp): Megatron TP splits the block and MAP-head matmuls over tp
  (column-parallel on dim 0 with their biases, row-parallel on dim 1); then FSDP2 shards every tensor
  over dp_shard × cp on dim 0, or on its largest evenly divisible dim when dim 0 is shorter than the shard count (as
  `parallelize.largest_dim_placement`). Rank 0 holds the ceil-divided chunk. Parameters and optimizer
  state stay fp32, gradients are reduced into the same sharding in parallel.reduce_dtype.
- DDP: full replicas of all three.
- DeepSpeed ZeRO with bf16 (Rajbhandari et al. 2020, "ZeRO", sec. 5): bf16 parameters and gradients in
  full, plus an fp32 master copy and the optimizer state over a flat partition of P/N elements; stage 2
  also partitions the bf16 gradients and stage 3 the bf16 parameters. The torch optimizer sees flat 1-D
  partitions, so the lean optimizer cannot factor its second moment there (6 bytes per element).
"""

from __future__ import annotations

import json
import math
from functools import cache

import torch

from bigvit.models.registry import build_model
from bigvit.models.vit import ViTConfig
from bigvit.parallel.mesh import ParallelDims
from bigvit.parallel.parallelize import DTYPES, largest_dim_placement
from bigvit.scaling.dryrun import OPTIMIZER_BYTES
from bigvit.scaling.flops import param_count

# Module paths tensor parallelism splits (parallel/tensor.py: block_plan and the MAP head's plan).
COLWISE = ("attn.qkv", "mlp.fc1", "map_head.q", "map_head.kv")
ROWWISE = ("attn.proj", "mlp.fc2", "map_head.proj")
FP32 = 4


def _named_shapes(cfg: ViTConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every parameter, from a meta-device model (no memory; cached per config)."""
    return _shapes_of(json.dumps(cfg.to_dict(), sort_keys=True))  # hashable, the text tower's section too


@cache
def _shapes_of(config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = build_model(json.loads(config_json), device="meta")
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


def tp_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """This tp rank's part of parameter `name` (unchanged when tensor parallelism replicates it)."""
    module, _, leaf = name.rpartition(".")
    if tp == 1:
        return shape
    if module.endswith(COLWISE):
        return (shape[0] // tp, *shape[1:])
    if module.endswith(ROWWISE) and leaf == "weight":
        return (shape[0], shape[1] // tp)
    return shape


def fsdp_shard_shape(name: str, shape: tuple[int, ...], shards: int, tp_split: bool) -> tuple[int, ...]:
    """Rank 0's FSDP2 chunk of parameter `name`'s (tp-local) tensor over `shards` ranks."""
    placement = None
    if not tp_split:
        placement = largest_dim_placement(shards)(torch.empty(shape, device="meta"))
    dim = 0 if placement is None else placement.dim
    chunk = min(math.ceil(shape[dim] / shards), shape[dim])
    return (*shape[:dim], chunk, *shape[dim + 1 :])


def fsdp_local_shapes(cfg: ViTConfig, dims: ParallelDims) -> list[tuple[int, ...]]:
    """Rank 0's local shape of every parameter under FSDP2 (× TP) over `dims`."""
    shards = dims.dp_shard * dims.cp
    shapes = []
    for name, shape in _named_shapes(cfg):
        local = tp_shape(name, shape, dims.tp)
        shapes.append(fsdp_shard_shape(name, local, shards, local != shape) if shards > 1 else local)
    return shapes


def model_state_bytes(
    cfg: ViTConfig,
    strategy: str,
    dims: ParallelDims,
    optimizer: str = "adamw",
    precision: str = "bf16",
    reduce_dtype: str = "fp32",
    zero_stage: int = 0,
) -> dict[str, int]:
    """Per-rank params_bytes, grads_bytes, optimizer_bytes (the dry run's keys) and params_per_rank."""
    if strategy == "deepspeed":
        return zero_state_bytes(param_count(cfg), dims.world_size, zero_stage, optimizer, precision)
    shapes = fsdp_local_shapes(cfg, dims) if strategy == "fsdp" else [s for _, s in _named_shapes(cfg)]
    elements = sum(math.prod(shape) for shape in shapes)
    return {
        "params_per_rank": elements,
        "params_bytes": elements * FP32,
        "grads_bytes": elements * DTYPES[reduce_dtype].itemsize,
        "optimizer_bytes": sum(OPTIMIZER_BYTES[optimizer](shape, math.prod(shape)) for shape in shapes),
    }


def zero_state_bytes(params: int, ranks: int, stage: int, optimizer: str, precision: str) -> dict[str, int]:
    """DeepSpeed ZeRO stage 1-3 model states per rank (fp32 master weights when training in bf16/fp16)."""
    partition = math.ceil(params / ranks)
    low = DTYPES[precision].itemsize
    master = partition * FP32 if low < FP32 else 0
    return {
        "params_per_rank": partition if stage == 3 else params,
        "params_bytes": (partition if stage == 3 else params) * low + master,
        "grads_bytes": (params if stage == 1 else partition) * low,
        "optimizer_bytes": OPTIMIZER_BYTES[optimizer]((partition,), partition),
    }


def unsharded_elements(cfg: ViTConfig, tp: int = 1) -> dict[str, int]:
    """Elements one tp rank gathers whole: one block ("block") and everything outside the blocks ("root":
    embeddings, final norm, MAP head, classifier), which FSDP2 keeps gathered from forward to backward."""
    block = root = 0
    for name, shape in _named_shapes(cfg):
        elements = math.prod(tp_shape(name, shape, tp))
        if name.startswith("blocks.0."):
            block += elements
        elif not name.startswith("blocks."):
            root += elements
    return {"block": block, "root": root}
