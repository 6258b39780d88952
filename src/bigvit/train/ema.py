"""An exponential moving average of the weights, kept with the parameters' own sharding.

The shadow of each parameter is a clone of it (a DTensor under FSDP2/TP, with the same placements),
updated on the local shards with one `_foreach` op per step: nothing is ever gathered. Its state is
{parameter name: shadow}, so DCP saves and reshards it exactly like the model. Evaluation swaps the
shadow into the parameters (local copies, no grad), runs the trainer's evaluation, and swaps back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from bigvit.config import check_number, check_positive
from bigvit.errors import ConfigError
from bigvit.parallel.names import clean_name

log = logging.getLogger("bigvit")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


class EMA:
    """shadow ← decay·shadow + (1−decay)·param every `every` steps; `warmup` ramps the decay as timm's
    ModelEmaV2/BEiT do, min(decay, (1+n)/(10+n)) after n updates counted from step 0 (also on a branch),
    so early weights do not linger."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, every: int = 1):
        named = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.warmup, self.every = decay, warmup, every
        self.model = model

    def decay_at(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based): fold the parameters in when `step` is a multiple of `every`."""
        if step % self.every:
            return
        weight = 1.0 - self.decay_at(step // self.every - 1)
        torch._foreach_lerp_([local(s) for s in self.shadow], [local(p) for p in self.params], weight)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the parameters for the duration (local shards only), the live ones after."""
        live = [local(p) for p in self.params]
        with torch.no_grad():
            backup = [t.clone() for t in live]
            torch._foreach_copy_(live, [local(s) for s in self.shadow])
        reshard(self.model)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, backup)
            reshard(self.model)

    # Component state for the engine's checkpoint (TorchEngine.extra_state): DCP loads in place.
    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, shadow in zip(self.names, self.shadow, strict=True):
                if state[name] is not shadow:
                    shadow.copy_(state[name])

    def start_from_loaded(self) -> None:
        """A checkpoint without EMA state (a branch of a run without one): the average starts at its weights."""
        log.warning("the checkpoint holds no EMA of the weights: the EMA starts from its weights")
        self.restart()

    @torch.no_grad()
    def restart(self) -> None:
        """The average restarts at the weights now in the parameters (initial weights just loaded)."""
        torch._foreach_copy_([local(s) for s in self.shadow], [local(p) for p in self.params])


def reshard(model: nn.Module) -> None:
    """Drop FSDP2's gathered copies (the root and last block keep theirs after a forward without backward),
    so that the next forward gathers the shards just written."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def check_ema(cfg) -> None:
    check_number("ema.decay", cfg.decay, 0.0, 1.0)
    check_positive("ema.every", cfg.every)


def build_ema(cfg, engine) -> EMA | None:
    """The EMA of `engine`'s model that `ema.*` asks for (None when ema.decay=0), registered as checkpoint
    state of the engine. Engines without component state (DeepSpeed) refuse it."""
    if cfg is None:
        return None
    check_ema(cfg)
    if not cfg.decay:
        return None
    extra = getattr(engine, "extra_state", None)
    if extra is None:
        raise ConfigError(
            f"ema.decay={cfg.decay} needs a PyTorch engine (parallel=single|ddp|fsdp|fsdp_tp|hsdp|fsdp_cp); "
            "DeepSpeed keeps its weights itself: use ema=none with parallel=deepspeed_*"
        )
    ema = EMA(engine.model, float(cfg.decay), bool(cfg.get("warmup", False)), int(cfg.get("every", 1)))
    extra["ema"] = ema
    return ema


class EMAEvaluation:
    """The trainer's evaluation of the EMA weights, scored as the objective scores the live ones: each mean
    figure `eval_X` (or `X`) as `ema_X` (classify: `ema_top1`, `ema_loss`)."""

    def __init__(self, ema: EMA):
        self.ema = ema

    def __call__(self, trainer) -> dict:
        with self.ema.swapped():
            scores = trainer.held_out_scores()  # as the objective scores them
        # eval_top1 → ema_top1, eval_loss → ema_loss; an objective's own figures (zeroshot_top1) → ema_zeroshot_top1.
        figures = {
            f"ema_{key.removeprefix('eval_')}": value
            for key, value in scores.items()
            if isinstance(value, float) and "/" not in key
        }
        log.info("eval step %d | EMA %s", trainer.step, " | ".join(f"{k[4:]} {v:.4f}" for k, v in figures.items()))
        return figures
