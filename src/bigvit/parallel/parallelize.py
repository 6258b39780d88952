"""The ordered recipe that turns a plain ViT into a parallel one.

    tensor/sequence parallel → context parallel → activation checkpointing → torch.compile →
    data parallel (FSDP2 | DDP)

Each step is a small `apply_*` function; the model file holds no parallel code. A strategy is a
name in STRATEGIES plus a conf/parallel/*.yaml, never a branch in the trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.distributed._composable.replicate import replicate
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, Shard

from bigvit.errors import ConfigError
from bigvit.parallel.mesh import ParallelDims, dp_mesh


def towers(model: nn.Module) -> tuple[nn.Module, ...]:
    """The parts of `model` with transformer blocks: the ViT itself, or an image–text model's two towers
    (each shaped like a ViT: `cfg`, `blocks`, `token_multiple`), which every step below treats alike."""
    return model.towers() if hasattr(model, "towers") else (model,)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AC_MODES = ("none", "full", "selective")


def apply_ac(model: nn.Module, mode: str, every: int = 1) -> None:
    """Activation checkpointing of whole blocks: all of them (`full`) or every `every`-th (`selective`)."""
    if mode not in AC_MODES:
        raise ConfigError(f"parallel.activation_checkpointing={mode!r} is not one of {list(AC_MODES)}")
    if mode == "none":
        return
    stride = 1 if mode == "full" else max(int(every), 1)
    for tower in towers(model):
        for index, block in enumerate(tower.blocks):
            if index % stride == 0:
                tower.blocks[index] = checkpoint_wrapper(block, preserve_rng_state=True)


def apply_compile(model: nn.Module, **options) -> None:
    """Compile each block separately: blocks are identical, so one graph is reused and compile stays
    short. `options` go to torch.compile (e.g. backend)."""
    for tower in towers(model):
        for index, block in enumerate(tower.blocks):
            tower.blocks[index] = torch.compile(block, **options)


def largest_dim_placement(shard_degree: int) -> Callable[[nn.Parameter], Shard | None]:
    """Shard a parameter on its largest evenly divisible dim when dim 0 is too short to split (e.g.
    pos_embed (1, N, D)): FSDP2's default Shard(0) would pad such a tensor to a full copy on every rank.
    FSDP2 splits only dim 0 unevenly, so with no dim that divides, Shard(0) (padded) it stays."""

    def placement(param: nn.Parameter) -> Shard | None:
        tp_sharded = isinstance(param, DTensor) and not all(p.is_replicate() for p in param.placements)
        if tp_sharded or param.ndim < 2 or param.shape[0] >= shard_degree:
            return None
        divisible = [dim for dim in range(1, param.ndim) if param.shape[dim] % shard_degree == 0]
        return Shard(max(divisible, key=lambda dim: param.shape[dim])) if divisible else None

    return placement


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, cfg, precision: str) -> None:
    """FSDP2: shard each block, then each tower of a two-tower model, then the root (embeddings, final
    norm, heads; an image–text model's temperature and bias)."""
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=DTYPES[cfg.reduce_dtype])
    # Pinned host memory needs an accelerator; on a CPU-only machine offload without pinning.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cfg.cpu_offload else OffloadPolicy()
    reshard = cfg.reshard_after_forward
    common = dict(
        mesh=mesh,
        mp_policy=policy,
        offload_policy=offload,
        shard_placement_fn=largest_dim_placement(mesh.shape[-1]),
    )
    parts = towers(model)
    for tower in parts:
        for index, block in enumerate(tower.blocks):
            # The last block's parameters are needed again at once by backward: keep them gathered.
            last = index == len(tower.blocks) - 1
            fully_shard(block, reshard_after_forward=False if last and reshard is True else reshard, **common)
        if tower is not model:  # its own unit: a tower can run alone (zero-shot prompts embed texts only)
            fully_shard(tower, reshard_after_forward=reshard, **common)
    fully_shard(model, reshard_after_forward=reshard, **common)


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> None:
    replicate(model, device_mesh=mesh)


def wrap_fsdp(model: nn.Module, mesh: DeviceMesh, dims: ParallelDims, cfg, precision: str) -> None:
    apply_fsdp(model, dp_mesh(mesh, dims), cfg, precision)


def wrap_ddp(model: nn.Module, mesh: DeviceMesh, dims: ParallelDims, cfg, precision: str) -> None:
    if dims.cp > 1:
        raise ConfigError(
            "parallel.cp needs FSDP, which averages gradients over dp_shard×cp; use parallel=fsdp_cp"
        )
    if dims.dp_shard > 1 or dims.tp > 1:
        raise ConfigError(f"parallel=ddp replicates only; use dp_replicate=-1, got {dims}")
    apply_ddp(model, mesh["dp_replicate"])


def wrap_single(model: nn.Module, mesh: DeviceMesh | None, dims: ParallelDims, cfg, precision: str) -> None:
    if dims.world_size > 1:
        raise ConfigError(
            f"parallel=single runs one process, but the world size is {dims.world_size}; "
            "use parallel=fsdp or parallel=ddp under torchrun"
        )


def wrap_deepspeed(model: nn.Module, mesh: DeviceMesh, dims: ParallelDims, cfg, precision: str) -> None:
    raise ConfigError("parallel.strategy=deepspeed is built by bigvit.parallel.deepspeed.DeepSpeedEngine")


STRATEGIES: dict[str, Callable] = {
    "fsdp": wrap_fsdp,
    "ddp": wrap_ddp,
    "single": wrap_single,
    "deepspeed": wrap_deepspeed,  # its own engine (bigvit.train.engine.ENGINES); listed so configs validate
}
# Strategies that cast parameters themselves; the others run the forward under autocast.
CASTS_PARAMS = {"fsdp"}


def parallelize(
    model: nn.Module, mesh: DeviceMesh | None, dims: ParallelDims, cfg, precision: str
) -> nn.Module:
    """Apply the configured layout to a meta-device ViT, in place and in the fixed order; returns the model."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"parallel.strategy={cfg.strategy!r} is not one of {sorted(STRATEGIES)}")
    if dims.tp > 1:
        from bigvit.parallel.tensor import apply_tp

        apply_tp(model, mesh["tp"], cfg.get("sequence_parallel", True))
    if dims.cp > 1:
        from bigvit.parallel.context import apply_cp

        if len(towers(model)) > 1:
            raise ConfigError(
                f"parallel.cp={dims.cp}: context parallelism shards one image's tokens, which an image–text "
                "model's loss over whole captions and images does not use; use parallel=fsdp or fsdp_tp"
            )
        apply_cp(model, mesh["cp"])
    apply_ac(model, cfg.activation_checkpointing, cfg.get("ac_every", 1))
    if cfg.compile:
        apply_compile(model)
    if mesh is not None or cfg.strategy == "single":
        STRATEGIES[cfg.strategy](model, mesh, dims, cfg, precision)
    return model


def parallelize_frozen(
    model: nn.Module, mesh: DeviceMesh | None, dims: ParallelDims, cfg, precision: str
) -> nn.Module:
    """The layout `cfg` for a meta-device ViT that only runs forwards (a distillation teacher): TP/CP as the
    trained model, FSDP2 shards it and frees each block's gathered weights right after its forward (no
    backward comes to do it); DDP and DeepSpeed replicate it (DDP refuses a module with nothing to train)."""
    frozen = OmegaConf.merge(cfg, {"activation_checkpointing": "none"})  # it saves backward memory only
    parallelize(model, mesh if cfg.strategy == "fsdp" else None, dims, frozen, precision)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_reshard_after_forward(True)
    return model.requires_grad_(False)


def autocast_context(
    strategy: str, precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """Mixed precision for the forward pass: autocast unless the strategy already casts parameters."""
    if precision == "fp32" or strategy in CASTS_PARAMS:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=DTYPES[precision])


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip gradient communication on accumulation micro-steps (no-op for a single process)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
