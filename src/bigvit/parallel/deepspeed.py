"""DeepSpeed ZeRO 1/2/3 as a bigvit engine: DeepSpeed shards, casts, reduces and steps.

The DeepSpeed config is built from the Hydra config (no JSON file); `parallel.deepspeed` is merged
last for any other DeepSpeed knob. The trainer's loop maps onto DeepSpeed's documented "step once
after all micro-batches" style: the boundary flag follows `sync_grads`, `backward` never rescales
by the accumulation count (the trainer already divided the loss) and `step` runs once per
optimizer step.

Checkpoints hold DeepSpeed's own files (tag `deepspeed/`, resumable at the same world size) and the
full fp32 model as DCP `{"model": ...}` by parameter name, so the weights load without DeepSpeed
exactly like a PyTorch-engine checkpoint (the Checkpointer adds per-rank state and metadata).
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from omegaconf import OmegaConf

from bigvit.config import local_batch_size
from bigvit.errors import CheckpointError, ConfigError, weights_only_reason
from bigvit.extras import require
from bigvit.parallel.materialize import materialize
from bigvit.parallel.mesh import ParallelDims
from bigvit.parallel.names import clean_name
from bigvit.parallel.parallelize import DTYPES, apply_ac

TAG = "deepspeed"  # DeepSpeed's sub-directory inside a bigvit checkpoint directory
# The classes DeepSpeed's checkpoint files hold besides tensors and containers: an enum and loss
# scalers restored attribute by attribute (torch.load admits them under weights_only=True).
CHECKPOINT_CLASSES = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
)


def data_only_load(path: str, map_location=None):
    """DeepSpeed's checkpoint-engine load, as data: weights_only with its few classes admitted."""
    classes = [getattr(importlib.import_module(module), name) for module, name in CHECKPOINT_CLASSES]
    try:
        with torch.serialization.safe_globals(classes):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = weights_only_reason(error)
        raise CheckpointError(f"{path} is not a plain DeepSpeed checkpoint file, refusing it ({reason})") from None
ZERO_STAGES = (1, 2, 3)


def deep_merge(base: dict, extra: dict) -> dict:
    """`base` updated by `extra`, recursing into nested dicts (neither argument is modified)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(cfg, dims: ParallelDims) -> dict:
    """The DeepSpeed config dict for a composed bigvit config on `dims` (data parallel only)."""
    pcfg, tcfg = cfg.parallel, cfg.trainer
    stage = int(pcfg.get("zero_stage", 0))
    if stage not in ZERO_STAGES:
        raise ConfigError(f"parallel.zero_stage={stage!r} is not one of {list(ZERO_STAGES)}")
    if dims.tp > 1 or dims.cp > 1 or dims.dp_replicate > 1:
        raise ConfigError(
            f"parallel=deepspeed shards over all ranks (dp_shard=-1, dp_replicate=cp=tp=1), got {dims}"
        )
    if pcfg.compile:
        raise ConfigError("parallel.compile=true is not supported with parallel.strategy=deepspeed")
    if tcfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("trainer.precision=fp16 with DeepSpeed needs CUDA; on CPU use fp32 or bf16")
    if pcfg.cpu_offload:
        raise ConfigError(
            "parallel.cpu_offload is FSDP's switch; with DeepSpeed set "
            "parallel.deepspeed.zero_optimization.offload_optimizer / offload_param instead"
        )
    extra = pcfg.get("deepspeed")
    extra = OmegaConf.to_container(extra, resolve=True) if extra is not None else {}
    micro = local_batch_size(cfg.data.batch_size, dims.dp, tcfg.grad_accum)
    config = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": tcfg.grad_accum,
        # DeepSpeed clips at 1.0 unless told otherwise; bigvit's null means off.
        "gradient_clipping": float(cfg.optim.grad_clip or 0.0),
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": tcfg.precision == "bf16"},
        "fp16": {"enabled": tcfg.precision == "fp16"},
        # bigvit's torch AdamW/SGD with its param groups; DeepSpeed's fused ones would JIT-build C++ ops.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # bigvit logs progress itself
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, extra)


def import_deepspeed(device: torch.device, feature: str = "parallel.strategy=deepspeed"):
    """Import DeepSpeed, on its CPU accelerator when there is no CUDA (must precede the import); `feature`
    names the setting that needs it in the error where it is not installed."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = require("deepspeed", feature)

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # it prints its whole config at INFO
    if device.type == "cpu":
        # Its CPU backend JIT-builds a shared-memory all-reduce (~1 min cold) that only
        # inference_all_reduce uses; training collectives go through torch.distributed.
        # (`deepspeed.comm.torch` as an attribute is torch itself, re-exported: import the module by name.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group even on one process: make a one-rank one if torchrun did not."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


class DeepSpeedEngine:
    """A ViT trained by a DeepSpeed ZeRO engine around bigvit's own torch optimizer and param groups."""

    def __init__(
        self,
        model: nn.Module,
        mesh,
        dims: ParallelDims,
        cfg,
        device: torch.device,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    ):
        config = deepspeed_config(cfg, dims)
        deepspeed = import_deepspeed(device, f"parallel=deepspeed_zero{cfg.parallel.zero_stage}")
        apply_ac(model, cfg.parallel.activation_checkpointing, cfg.parallel.get("ac_every", 1))
        materialize(model, device, cfg.trainer.seed)  # the same initial weights as every other layout
        ensure_process_group(device)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=make_optimizer(model), config=config
        )
        # DeepSpeed reads its own files with torch.load(weights_only=False); bigvit reads them as data.
        self.engine.checkpoint_engine.load = data_only_load
        self.input_dtype = DTYPES[cfg.trainer.precision]  # DeepSpeed casts the weights, not the inputs
        self.safe_get_full_fp32_param = deepspeed.utils.safe_get_full_fp32_param

    @property
    def param_groups(self) -> list[dict]:
        """The torch optimizer's groups (DeepSpeed swaps in flat partitions but keeps the dicts)."""
        return self.optimizer.param_groups

    def forward(self, images: torch.Tensor, *rest: torch.Tensor, sync_grads: bool = True):
        # The trainer marks the last micro-batch; DeepSpeed then reduces and lets step() update.
        self.engine.set_gradient_accumulation_boundary(sync_grads)
        return self.engine(images.to(self.input_dtype), *rest)  # token ids (rest) stay integers

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divided by grad_accum

    def step(self) -> torch.Tensor:
        """Reduce, unscale, clip and step (DeepSpeed); returns the global grad norm before clipping."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).detach().cpu()

    def zero_grad(self) -> None:
        # DeepSpeed clears its reduced/partitioned gradients itself in step(); this drops .grad pointers.
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    # -- checkpoints ---------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights by clean parameter name on rank 0 (empty elsewhere); collective under ZeRO."""
        keep = dist.get_rank() == 0
        state = {}
        for name, param in self.engine.module.named_parameters():
            full = self.safe_get_full_fp32_param(param)  # master weights, gathered over the ZeRO shards
            if keep:
                state[clean_name(name)] = (param if full is None else full).detach().float().cpu().clone()
        if keep:
            for name, buffer in self.engine.module.named_buffers():
                state[clean_name(name)] = buffer.detach().cpu().clone()
        return state

    saves_async = False  # DeepSpeed writes with its own checkpoint engine

    def save(self, directory: Path, step: int, asynchronous: bool = False, group=None) -> None:
        self.engine.save_checkpoint(str(directory), tag=TAG, client_state={"step": step}, save_latest=False)
        model_state = self.full_state_dict()
        if dist.get_rank() == 0:
            dcp.save({"model": model_state}, checkpoint_id=str(directory), no_dist=True)

    def load(self, directory: Path, same_layout: bool = True) -> int:
        if not same_layout:
            raise CheckpointError(
                f"{directory} was saved at another world size; DeepSpeed resumes ZeRO optimizer state "
                "only at the world size it was saved with (the full fp32 weights are in the same "
                "directory as DCP {'model': ...}, to start a fresh run from)"
            )
        path, client_state = self.engine.load_checkpoint(
            str(directory), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise CheckpointError(f"{directory} holds no DeepSpeed checkpoint (expected {TAG}/)")
        return int(client_state["step"])
