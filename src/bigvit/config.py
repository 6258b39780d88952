"""Checks on the composed config that Hydra cannot make: each error names the key, the value and what is valid."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from bigvit.errors import ConfigError
from bigvit.models.vit import ViTConfig
from bigvit.optim.schedule import SCHEDULES, lr_factor, schedule_args
from bigvit.parallel.parallelize import AC_MODES, DTYPES, STRATEGIES
from bigvit.train.loggers import CHECKPOINT_ARTIFACTS
from bigvit.train.objectives import DISTILLATION
from bigvit.train.watchdog import ACTIONS as WATCHDOG_ACTIONS

OPTIMIZERS = ("adamw", "sgd", "lean")
WANDB_MODES = ("auto", "online", "offline", "disabled")


def register_schemas() -> None:
    """Typed schemas that conf/ files extend: `model.depth=abc` fails at composition, naming the key.

    Stored outside every config group (conf/model/*.yaml include it as `/vit_schema@_here_`), so that
    neither --help nor a misspelt `model=` lists it among the choices."""
    ConfigStore.instance().store(name="vit_schema", node=ViTConfig)


def check_choice(key: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not one of {sorted(valid)}")


def check_positive(key: str, value, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be a {'non-negative' if allow_zero else 'positive'} integer")


def check_number(key: str, value, low: float, high: float = float("inf"), open_low: bool = False) -> None:
    """`value` is a number in [low, high), or (low, high) with `open_low`."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not (low < value if open_low else low <= value) or not value < high:
        raise ConfigError(f"{key}={value!r} must be a number in {'(' if open_low else '['}{low}, {high})")


def check_init_weights(cfg) -> None:
    """trainer.init_weights: set where a preset requires it (init_weights_required), PyTorch engines only."""
    if cfg.trainer.get("init_weights_required") and not cfg.trainer.get("init_weights"):
        raise ConfigError(
            "trainer.init_weights is not set: this run starts from weights; give trainer.init_weights=PATH "
            "(a .safetensors file from bigvit-export / bigvit-convert, a bigvit run dir or a checkpoint dir)"
        )
    if cfg.trainer.get("init_weights") and cfg.parallel.strategy == "deepspeed":
        raise ConfigError(
            "trainer.init_weights loads into the PyTorch engines; with parallel.strategy=deepspeed use "
            "parallel=fsdp | ddp | single (or start DeepSpeed from a bigvit checkpoint: trainer.branch_from)"
        )
    check_patterns("trainer.init_fresh", cfg.trainer.get("init_fresh") or [])
    check_weights_path("trainer.init_weights", cfg.trainer.get("init_weights"))


def check_weights_path(key: str, path) -> None:
    if path and not Path(str(path)).exists():
        raise ConfigError(
            f"{key}={path}: no such file or directory; give a .safetensors file (bigvit-export, "
            "bigvit-convert), a bigvit run dir or a checkpoint dir"
        )


def check_distill(cfg) -> None:
    """distill.*: the group's choice, the mixing weight and temperature, and a teacher to read."""
    distill = cfg.get("distill")
    if distill is None:
        return
    check_choice("distill.name", distill.name, DISTILLATION)
    if distill.name == "none":
        return
    alpha = distill.alpha
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"distill.alpha={alpha!r} must be a number in [0, 1] (1: soft targets only, 0: labels only)")
    check_number("distill.temperature", distill.temperature, 0.0, open_low=True)
    if not distill.teacher.get("weights"):
        raise ConfigError(
            "distill.teacher.weights is not set: give the teacher's weights, a .safetensors file "
            "(bigvit-export, bigvit-convert) or a bigvit run dir, e.g. distill.teacher.weights=outputs/<date>/<run>"
        )
    check_weights_path("distill.teacher.weights", distill.teacher.weights)


def check_trainer(cfg) -> None:
    if cfg.get("stop_step") is not None:
        check_positive("trainer.stop_step", cfg.stop_step, allow_zero=True)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"trainer.seed={cfg.seed!r} must be an integer")
    check_number("trainer.label_smoothing", cfg.label_smoothing, 0.0, 1.0)
    check_number("trainer.dist_timeout_s", cfg.dist_timeout_s, 0.0, open_low=True)


def check_data_and_model(cfg) -> None:
    """The data keys the model follows, then the model's fit to the data (the rest is ViTConfig's)."""
    # Before any model key is read: model.image_size and model.num_classes interpolate these into typed fields.
    for key in ("batch_size", "image_size", "num_classes"):
        if OmegaConf.is_missing(cfg.data, key):
            raise ConfigError(f"data.{key} is not set: give it on the command line, e.g. data.{key}=N")
        check_positive(f"data.{key}", cfg.data[key])
    if cfg.model.num_classes < cfg.data.num_classes:  # labels past the classifier (or none, at 0)
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} is fewer than data.num_classes={cfg.data.num_classes}: "
            "labels would fall outside the classifier; leave model.num_classes at ${data.num_classes}"
        )
    if cfg.model.in_chans != 3:
        raise ConfigError(
            f"model.in_chans={cfg.model.in_chans}: bigvit's data gives RGB images (3 channels); leave it at 3"
        )


def check_optim(cfg) -> None:
    """The optimizer's hyperparameters (torch's own checks name no key; a negative clip would flip gradients)."""
    check_number("optim.lr", cfg.lr, 0.0)
    check_number("optim.weight_decay", cfg.weight_decay, 0.0)
    check_number("optim.layer_decay", cfg.layer_decay, 0.0, open_low=True)
    if cfg.get("grad_clip") is not None:
        check_number("optim.grad_clip", cfg.grad_clip, 0.0)
    check_patterns("optim.no_decay", cfg.get("no_decay", []))
    if cfg.name == "sgd":
        check_number("optim.momentum", cfg.momentum, 0.0, 1.0)
        return
    betas = cfg.betas
    if isinstance(betas, str) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ConfigError(f"optim.betas={betas!r} must be a pair [beta1, beta2], e.g. [0.9, 0.999]")
    for index, beta in enumerate(betas):
        check_number(f"optim.betas[{index}]", beta, 0.0, 1.0)
    check_number("optim.eps", cfg.eps, 0.0)


def check_patterns(key: str, value) -> None:
    if isinstance(value, str) or not hasattr(value, "__len__") or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{key}={value!r} must be a list of parameter-name patterns, e.g. [pos_embed, '*.probe']")


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
    check_positive("trainer.fewshot_every", cfg.trainer.get("fewshot_every", 0), allow_zero=True)
    check_trainer(cfg.trainer)
    check_init_weights(cfg)
    check_distill(cfg)
    check_data_and_model(cfg)
    check_optim(cfg.optim)
    check_positive("logger.console_every", cfg.logger.console_every)
    if cfg.hardware.get("peak_tflops") is not None:
        check_number("hardware.peak_tflops", cfg.hardware.peak_tflops, 0.0)
    checkpoint_at = cfg.trainer.get("checkpoint_at") or []
    if isinstance(checkpoint_at, str) or not hasattr(checkpoint_at, "__len__"):
        raise ConfigError(f"trainer.checkpoint_at={checkpoint_at!r} must be a list of steps, e.g. [100, 200]")
    for step in checkpoint_at:
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
