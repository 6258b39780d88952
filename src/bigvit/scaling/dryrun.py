"""Dry run at cluster scale: apply a parallel layout on a fake process group, on the meta device.

The model never allocates: parameters are meta DTensors whose local shapes are exactly what a rank
of the real job would hold. Per-rank bytes of parameters, gradients and optimizer state follow.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bigvit.errors import ConfigError
from bigvit.models.registry import build_model, count_params
from bigvit.parallel.mesh import build_mesh, resolve_dims
from bigvit.parallel.parallelize import DTYPES, parallelize

# fp32 optimizer states per parameter element.
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}


def local_numel(param: torch.Tensor) -> int:
    """Elements this rank stores. Rank 0 holds the largest chunk of an uneven split (torch.chunk), which
    is also the padded size FSDP2 allocates on every rank."""
    return (param.to_local() if isinstance(param, DTensor) else param).numel()


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
        params = [p for p in model.parameters()]
        elements = sum(local_numel(p) for p in params)
        param_bytes = sum(local_numel(p) * p.element_size() for p in params)
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
        "optimizer_bytes": elements * 4 * OPTIMIZER_STATES[optimizer],
        "seconds": time.perf_counter() - start,
    }
