"""Learning-rate schedules as pure functions of the optimizer step (nanoGPT's `get_lr`).

The step count is the only state, so resuming from a checkpoint needs nothing but the step.
"""

from __future__ import annotations

import math

from bigvit.errors import ConfigError

SCHEDULES = ("cosine", "constant", "linear", "rsqrt")


def lr_factor(step: int, *, name: str, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """The LR multiplier at optimizer step `step` (0-based).

    All schedules warm up linearly: (step + 1) / warmup_steps for step < warmup_steps, so the first step
    already trains and step warmup_steps - 1 reaches 1.0. After the warm-up, with
    progress = (step - warmup_steps) / (total_steps - warmup_steps):
      - cosine:   min_factor + (1 - min_factor) * (1 + cos(pi * progress)) / 2
      - linear:   min_factor + (1 - min_factor) * (1 - progress)
      - constant: 1.0
      - rsqrt:    sqrt(max(warmup_steps, 1) / (step + 1)), i.e. 1.0 at the end of the warm-up, then
                  1 / sqrt of the number of steps taken in units of warm-up lengths; it ignores
                  total_steps and min_factor.
    cosine and linear hold min_factor from step total_steps on.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"schedule.name={name!r} is not one of {list(SCHEDULES)}")
    if total_steps <= 0:
        raise ConfigError(f"schedule.total_steps={total_steps} must be > 0")
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(
            f"schedule.warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}] (total_steps = trainer.max_steps)"
        )
    if not 0.0 <= min_factor <= 1.0:
        raise ConfigError(f"schedule.min_factor={min_factor} must be in [0, 1]")
    if step < 0:
        raise ConfigError(f"step={step} must be >= 0")

    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    if name == "rsqrt":
        return math.sqrt(max(warmup_steps, 1) / (step + 1))
    if step >= total_steps:
        return min_factor
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1): step < total_steps
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress
    return min_factor + (1.0 - min_factor) * decay


def apply_lr(optimizer, base_lr: float, factor: float) -> float:
    """Set every group's LR to base_lr * group["lr_scale"] (1.0 if absent) * factor; call before each
    optimizer step. `optimizer` is anything with `param_groups` (an optimizer or an engine).
    Returns base_lr * factor, the unscaled LR, for logging."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_scale", 1.0) * factor
    return base_lr * factor
