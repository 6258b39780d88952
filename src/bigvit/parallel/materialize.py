"""Turn a (possibly sharded) meta-device model into real, initialized parameters.

Each parameter is drawn in full from a generator seeded by (seed, its name), then this rank keeps
its shard. The initial weights are therefore the same whatever the world size or layout; the cost
is generating one full parameter at a time, never the whole model.
"""

from __future__ import annotations

import zlib

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from bigvit.parallel.names import clean_name


def parameter_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


@torch.no_grad()
def materialize(model: torch.nn.Module, device: torch.device, seed: int) -> torch.nn.Module:
    """Allocate `model`'s parameters on `device` and initialize them with `model.init_parameter_`."""
    model.to_empty(device=device)
    for raw_name, param in model.named_parameters():
        name = clean_name(raw_name)
        full = torch.empty(param.shape, dtype=param.dtype, device=device)
        model.init_parameter_(name, full, parameter_generator(seed, name, device))
        copy_full_(param, full)
    return model


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Set `param` (a plain tensor or a DTensor of any placement) from `full`, the whole tensor, which
    every rank holds: each rank keeps its own shard, no communication."""
    if isinstance(param, DTensor):
        full = full.to(device=param.device, dtype=param.dtype)
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)
