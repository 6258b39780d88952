"""Engines: what one optimizer step means under a parallel layout.

The trainer calls forward / backward / step / zero_grad and save / load; a layout that brings its
own runtime (DeepSpeed) is another engine class in parallel/, chosen by `parallel.strategy`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from bigvit.parallel.grad import clip_grad_norm_
from bigvit.parallel.materialize import materialize
from bigvit.parallel.parallelize import autocast_context, parallelize, set_gradient_sync
from bigvit.train.safe_load import load_dcp, saved_groups

# Strategies whose engine is not TorchEngine: strategy → "module:Class", imported only when chosen.
ENGINES = {"deepspeed": "bigvit.parallel.deepspeed:DeepSpeedEngine"}


class TorchEngine:
    """A model parallelized with PyTorch's own APIs (FSDP2, DDP, single), its optimizer and loss scaler."""

    def __init__(
        self,
        model: nn.Module,
        mesh,
        dims,
        cfg,
        device: torch.device,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    ):
        precision = cfg.trainer.precision
        self.model = parallelize(model, mesh, dims, cfg.parallel, precision)
        materialize(self.model, device, cfg.trainer.seed)
        self.optimizer = make_optimizer(self.model)
        self.autocast = autocast_context(cfg.parallel.strategy, precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.grad_clip = cfg.optim.grad_clip
        # Other components' checkpoint state (e.g. the EMA), name → object with state_dict/load_state_dict
        # whose tensors DCP saves and loads in place by name, resharded like the model's, and
        # start_from_loaded for a checkpoint that holds none of its state.
        self.extra_state: dict = {}

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def forward(self, *inputs: torch.Tensor, sync_grads: bool = True):
        """The model on `inputs` (images; a two-tower model: images and tokens)."""
        set_gradient_sync(self.model, sync_grads)  # before forward: DDP decides during forward
        with self.autocast():
            return self.model(*inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> torch.Tensor:
        """Unscale, clip by the global norm, step; returns the norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return grad_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    saves_async = True

    def save(self, directory: Path, step: int, asynchronous: bool = False, group=None) -> Future | None:
        """DCP by parameter name (DTensor shards and all), so the checkpoint loads under another layout.
        Asynchronous: staged to host memory, then written by a thread; returns the write's future."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state, "step": step, "scaler": self.scaler.state_dict()}
        state.update({name: part.state_dict() for name, part in self.extra_state.items()})
        if asynchronous:
            return dcp.async_save(state, checkpoint_id=str(directory), process_group=group)
        dcp.save(state, checkpoint_id=str(directory))
        return None

    def load(self, directory: Path, same_layout: bool = True) -> int:
        """Load a checkpoint saved under any layout (read as data only); returns its step."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state, "step": 0}
        saved = saved_groups(directory)  # a component added since (e.g. EMA on a branch) has no state there
        state.update({name: part.state_dict() for name, part in self.extra_state.items() if name in saved})
        load_dcp(state, directory)
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        for name, part in self.extra_state.items():
            if name in saved:
                part.load_state_dict(state[name])
            else:
                part.start_from_loaded()
        return int(state["step"])


def build_engine(
    model: nn.Module,
    mesh,
    dims,
    cfg,
    device: torch.device,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
):
    """The engine for `cfg.parallel.strategy`, around a meta-device model."""
    target = ENGINES.get(cfg.parallel.strategy)
    if target is None:
        return TorchEngine(model, mesh, dims, cfg, device, make_optimizer)
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(model, mesh, dims, cfg, device, make_optimizer)
