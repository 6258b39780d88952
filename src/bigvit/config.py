"""Checks on the composed config that Hydra cannot make: each error names the key, the value and what is valid."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from bigvit.errors import ConfigError
from bigvit.models.vit import ViTConfig
from bigvit.optim.schedule import SCHEDULES, lr_factor, schedule_args
from bigvit.parallel.parallelize import AC_MODES, DTYPES, STRATEGIES
from bigvit.train.loggers import CHECKPOINT_ARTIFACTS
from bigvit.train.watchdog import ACTIONS as WATCHDOG_ACTIONS

OPTIMIZERS = ("adamw", "sgd", "lean")
WANDB_MODES = ("auto", "online", "offline", "disabled")


def register_schemas() -> None:
    """Typed schemas that conf/ files extend: `model.depth=abc` fails at composition, naming the key."""
    ConfigStore.instance().store(group="model", name="vit_schema", node=ViTConfig)


def check_choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not one of {sorted(valid)}")


def check_positive(key: str, value, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be a {'non-negative' if allow_zero else 'positive'} integer")


def validate(cfg) -> None:
    """Validate the keys bigvit reads from the composed config (model keys are checked by ViTConfig)."""
    check_choice("trainer.precision", cfg.trainer.precision, DTYPES)
    check_choice("parallel.strategy", cfg.parallel.strategy, STRATEGIES)
    check_choice("parallel.reduce_dtype", cfg.parallel.reduce_dtype, DTYPES)
    check_choice("parallel.activation_checkpointing", cfg.parallel.activation_checkpointing, AC_MODES)
    check_choice("optim.name", cfg.optim.name, OPTIMIZERS)
    check_choice("schedule.name", cfg.schedule.name, SCHEDULES)
    check_choice("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES)
    check_choice("logger.wandb.checkpoint_artifacts", cfg.logger.wandb.checkpoint_artifacts, CHECKPOINT_ARTIFACTS)
    check_choice("trainer.watchdog_action", cfg.trainer.watchdog_action, WATCHDOG_ACTIONS)
    for key in ("max_steps", "grad_accum"):
        check_positive(f"trainer.{key}", cfg.trainer[key])
    for key in ("eval_every", "checkpoint_every", "keep_checkpoints"):
        check_positive(f"trainer.{key}", cfg.trainer[key], allow_zero=True)
    check_positive("data.batch_size", cfg.data.batch_size)
    for step in cfg.trainer.get("checkpoint_at") or ():
        if not isinstance(step, int) or not 0 < step <= cfg.trainer.max_steps:
            raise ConfigError(
                f"trainer.checkpoint_at holds {step!r}: each entry must be a step in "
                f"[1, trainer.max_steps={cfg.trainer.max_steps}]"
            )
    lr_factor(0, **schedule_args(cfg.schedule, cfg.trainer.max_steps))  # raises on bad values
    if cfg.trainer.precision == "fp16" and cfg.parallel.strategy == "fsdp":
        raise ConfigError(
            "trainer.precision=fp16 needs loss scaling, which bigvit offers with parallel=single or "
            "ddp; with parallel=fsdp use trainer.precision=bf16"
        )


def local_batch_size(global_batch: int, data_parallel: int, grad_accum: int) -> int:
    """Per-rank micro-batch; the global batch must split evenly over data-parallel ranks and accumulation steps."""
    if global_batch % (data_parallel * grad_accum):
        raise ConfigError(
            f"data.batch_size={global_batch} does not split over {data_parallel} data-parallel rank(s) × "
            f"trainer.grad_accum={grad_accum}; use a multiple of {data_parallel * grad_accum}"
        )
    return global_batch // (data_parallel * grad_accum)
