"""Fault injection for resume tests: SIGKILL this process at a chosen moment of a chosen step.

    BIGVIT_CHAOS=backward@5:1   kill rank 1 during the backward pass of step 5

Phases: `forward` (inside the last block's forward), `backward` (as the gradient reaches the first
block), `optimizer` (just before the optimizer step), `checkpoint` (after this rank's checkpoint
shards are written, before the checkpoint is declared complete). The rank defaults to 0. SIGKILL
leaves no chance to clean up, as an OOM kill or a lost node does; the launcher then ends the job.
Off unless the variable is set; PyTorch engines only (DeepSpeed runs its own step).
"""

from __future__ import annotations

import os
import signal

from bigvit.errors import ConfigError

PHASES = ("forward", "backward", "optimizer", "checkpoint")
ENV = "BIGVIT_CHAOS"


def parse(spec: str) -> tuple[str, int, int]:
    """"phase@step[:rank]" → (phase, step, rank)."""
    try:
        phase, rest = spec.split("@")
        step, _, rank = rest.partition(":")
        parsed = phase, int(step), int(rank or 0)
    except ValueError:
        parsed = None
    if parsed is None or parsed[0] not in PHASES:
        raise ConfigError(f"{ENV}={spec!r} must be PHASE@STEP[:RANK] with PHASE one of {list(PHASES)}")
    return parsed


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(trainer) -> None:
    """Arm the kill that BIGVIT_CHAOS asks for on `trainer` (nothing when it is unset)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    phase, step, rank = parse(spec)
    if trainer.env.rank != rank:
        return

    def at_step() -> bool:
        return trainer.step + 1 == step  # trainer.step counts finished steps

    model = trainer.engine.model
    if phase == "forward":
        model.blocks[-1].register_forward_pre_hook(lambda module, args: kill() if at_step() else None)
    elif phase == "backward":

        def arm(module, args, output):
            if at_step() and output.requires_grad:
                output.register_hook(lambda grad: kill())

        model.blocks[0].register_forward_hook(arm)
    elif phase == "optimizer":
        trainer.engine.optimizer.register_step_pre_hook(lambda *args: kill() if at_step() else None)
    else:  # the checkpoint written at the end of `step`, when trainer.step == step
        trainer.checkpointer.after_shards = lambda saved_step: kill() if saved_step == step else None
