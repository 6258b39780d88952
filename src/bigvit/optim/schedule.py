"""Learning-rate schedules as pure functions of the optimizer step (nanoGPT's `get_lr`).

The step count is the only state, so resuming from a checkpoint needs nothing but the step.
"""

from __future__ import annotations

import math

from bigvit.errors import ConfigError

SCHEDULES = ("cosine", "constant", "linear", "rsqrt", "wsd")
DECAY_SHAPES = ("linear", "sqrt")


def decay_start(total_steps: int, decay_fraction: float) -> int:
    """First step of a WSD cooldown: the last round(decay_fraction * total_steps) steps decay.

    A run of any length is identical to a longer WSD run up to this step, so a checkpoint of the
    longer run taken here (after this many steps) starts this run's cooldown: `bigvit-scaling sweep`
    branches shorter durations from it."""
    return total_steps - round(decay_fraction * total_steps)


def lr_factor(
    step: int,
    *,
    name: str,
    warmup_steps: int,
    total_steps: int,
    min_factor: float = 0.0,
    decay_fraction: float = 0.2,
    decay_shape: str = "sqrt",
) -> float:
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
      - wsd:      warm-up, stable (1.0), then decay over the last `decay_fraction` of the run (Hägele et
                  al. 2024), from step s = decay_start(total_steps, decay_fraction) with
                  progress = (step - s) / (total_steps - s): 1 - progress (decay_shape=linear) or
                  1 - sqrt(progress) (decay_shape=sqrt), scaled into [min_factor, 1].
    cosine, linear and wsd hold min_factor from step total_steps on.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"schedule.name={name!r} is not one of {list(SCHEDULES)}")
    if total_steps <= 0:
        raise ConfigError(f"schedule.total_steps={total_steps} must be > 0")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ConfigError(
            f"schedule.warmup_steps={warmup_steps!r} must be an integer in [0, total_steps={total_steps}] "
            "(total_steps = trainer.max_steps)"
        )
    if not _is_number(min_factor) or not 0.0 <= min_factor <= 1.0:
        raise ConfigError(f"schedule.min_factor={min_factor!r} must be in [0, 1]")
    if step < 0:
        raise ConfigError(f"step={step} must be >= 0")
    if name == "wsd":
        return _wsd_factor(step, warmup_steps, total_steps, min_factor, decay_fraction, decay_shape)

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


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_decay_fraction(decay_fraction) -> None:
    if not _is_number(decay_fraction) or not 0.0 < decay_fraction <= 1.0:
        raise ConfigError(f"schedule.decay_fraction={decay_fraction!r} must be in (0, 1]")


def _wsd_factor(
    step: int, warmup_steps: int, total_steps: int, min_factor: float, decay_fraction: float, decay_shape: str
) -> float:
    if decay_shape not in DECAY_SHAPES:
        raise ConfigError(f"schedule.decay_shape={decay_shape!r} is not one of {list(DECAY_SHAPES)}")
    check_decay_fraction(decay_fraction)
    start = decay_start(total_steps, decay_fraction)
    if start < warmup_steps:
        raise ConfigError(
            f"schedule.decay_fraction={decay_fraction} starts the cooldown at step {start} of "
            f"{total_steps}, inside the warm-up (schedule.warmup_steps={warmup_steps}); lower one of them"
        )
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step < start:
        return 1.0
    if step >= total_steps:
        return min_factor
    progress = (step - start) / (total_steps - start)
    decay = 1.0 - (math.sqrt(progress) if decay_shape == "sqrt" else progress)
    return min_factor + (1.0 - min_factor) * decay


def capped_warmup(cfg, total_steps: int) -> int:
    """schedule.warmup_steps, or where it is longer than the run, the run's length (WSD: the steps before
    its cooldown), so that a short smoke run (trainer.max_steps=5) of any config trains."""
    warmup = cfg.warmup_steps
    if not isinstance(warmup, int) or warmup <= total_steps or total_steps <= 0:
        return warmup  # lr_factor reports bad values
    if cfg.name == "wsd":
        check_decay_fraction(cfg.get("decay_fraction", 0.2))
        return max(decay_start(total_steps, cfg.get("decay_fraction", 0.2)), 0)
    return total_steps


def warmup_warning(cfg, total_steps: int) -> str | None:
    """The line to log once (main rank) when capped_warmup shortens the configured warm-up; else None."""
    capped = capped_warmup(cfg, total_steps)
    if capped == cfg.warmup_steps:
        return None
    return (
        f"schedule.warmup_steps={cfg.warmup_steps} is longer than the run (trainer.max_steps={total_steps}): "
        f"warming up over {capped} step{'' if capped == 1 else 's'}{' (until the WSD cooldown)' if cfg.name == 'wsd' else ''}"
    )


def schedule_args(cfg, total_steps: int) -> dict:
    """lr_factor's keyword arguments from a `schedule` config (conf/schedule/*.yaml), the warm-up capped to
    the run (capped_warmup)."""
    return dict(
        name=cfg.name,
        warmup_steps=capped_warmup(cfg, total_steps),
        total_steps=total_steps,
        min_factor=cfg.min_factor,
        decay_fraction=cfg.get("decay_fraction", 0.2),
        decay_shape=cfg.get("decay_shape", "sqrt"),
    )


def apply_lr(optimizer, base_lr: float, factor: float) -> float:
    """Set every group's LR to base_lr * group["lr_scale"] (1.0 if absent) * factor; call before each
    optimizer step. `optimizer` is anything with `param_groups` (an optimizer or an engine).
    Returns base_lr * factor, the unscaled LR, for logging."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_scale", 1.0) * factor
    return base_lr * factor
