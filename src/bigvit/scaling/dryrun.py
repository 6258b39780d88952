"""Dry run at cluster scale: apply a parallel layout on a fake process group, on the meta device.

The model never allocates: parameters are meta DTensors whose local shapes are exactly what a rank
of the real job would hold. Per-rank bytes of parameters, gradients and optimizer state follow.
"""

from __future__ import annotations

import time

import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bigvit.errors import ConfigError
from bigvit.models.registry import build_model, count_params
from bigvit.optim.lean import optimizer_state_bytes as lean_state_bytes
from bigvit.parallel.mesh import build_mesh, resolve_dims
from bigvit.parallel.parallelize import DTYPES, parallelize

# Optimizer-state bytes of one local parameter shard, by optimizer name.
OPTIMIZER_BYTES = {
    "adamw": lambda shape, numel: 8 * numel,  # two fp32 moments
    "sgd": lambda shape, numel: 4 * numel,  # fp32 momentum
    "lean": lambda shape, numel: lean_state_bytes(shape),  # bf16 momentum, factored second moment
}


def dry_run(
    model_cfg: dict, parallel_cfg, world_size: int, precision: str = "fp32", optimizer: str = "adamw"
) -> dict:
    """Per-rank model-state bytes of `model_cfg` under `parallel_cfg` on `world_size` fake ranks."""
    if parallel_cfg.strategy == "deepspeed":
        raise ConfigError(
            "the dry run applies PyTorch layouts (fsdp, hsdp, fsdp_tp, fsdp_cp, ddp); "
            "DeepSpeed ZeRO partitions inside its engine and cannot run on a fake process group"
        )
    if dist.is_initialized():
        raise RuntimeError("dry_run needs a process without a process group (it creates a fake one)")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    start = time.perf_counter()
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        dims = resolve_dims(parallel_cfg, world_size)
        model = build_model(model_cfg, device="meta")
        total = count_params(model)
        parallelize(model, build_mesh(dims, "cpu"), dims, parallel_cfg, precision)
        # This is rank 0's shard: the largest of an uneven split, and the padded size FSDP2 allocates everywhere.
        shards = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
        elements = sum(shard.numel() for shard in shards)
        param_bytes = sum(shard.numel() * shard.element_size() for shard in shards)
        optimizer_bytes = sum(
            OPTIMIZER_BYTES[optimizer](tuple(shard.shape), shard.numel()) for shard in shards
        )
    finally:
        dist.destroy_process_group()
    # Gradients are reduced in the reduce dtype into the same sharding; optimizer states are fp32.
    grad_bytes = elements * DTYPES[parallel_cfg.get("reduce_dtype", "fp32")].itemsize
    return {
        "model": model_cfg.get("name"),
        "strategy": parallel_cfg.strategy,
        "world_size": world_size,
        "layout": {
            "dp_replicate": dims.dp_replicate,
            "dp_shard": dims.dp_shard,
            "cp": dims.cp,
            "tp": dims.tp,
        },
        "total_params": total,
        "params_per_rank": elements,
        "params_bytes": param_bytes,
        "grads_bytes": grad_bytes,
        "optimizer_bytes": optimizer_bytes,
        "seconds": time.perf_counter() - start,
    }
