"""Hydra overrides, checked before anything runs: a mistake is one line naming the key and the fix.

bigvit-train and bigvit-plan call `check_command_line` before handing argv to `hydra.main`; the commands
that compose a config themselves (bigvit-eval, bigvit-scaling) call `compose`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from bigvit.config import register_schemas
from bigvit.errors import ConfigError, did_you_mean
from bigvit.extras import require

# argv flags that choose another config (or none): the pre-check leaves those commands to Hydra.
OTHER_CONFIG_FLAGS = ("help", "hydra_help", "config_path", "config_name", "config_dir", "experimental_rerun",
                      "shell_completion")  # fmt: skip


def is_launch_override(text: str) -> bool:
    """hydra/launcher=..., hydra.launcher.* and the like: how jobs run, not what they train."""
    key = text.lstrip("+~")
    return key.startswith("hydra") and not key.startswith("hydra.searchpath")


def unparsable(text: str, reason: str) -> str:
    """The message for an override Hydra's grammar rejects, showing the quoting that makes it one value."""
    key, sep, value = text.partition("=")
    reason = "; ".join(
        line.strip() for line in reason.splitlines() if line.strip() and "hydra.cc" not in line
    )
    if sep and value and value[0] in "[{":  # a list or dict: quoting all of it would make it a string
        return (
            f"could not parse the override {text} ({reason}): inside a list or dict, quote "
            "each string with braces, as urls:'/d/train-{000000..000099}.tar'"
        )
    if sep and value and value[0] not in "'\"" and "'" not in value:
        what = "braces" if "{" in value or "}" in value else "special characters"
        return f"could not parse the override {text}: quote values with {what}, as \"{key}='{value}'\""
    return f"could not parse the override {text}: {reason}"


def parse_overrides(overrides: list[str]) -> list[Override]:
    """Hydra's parse of `overrides`; ConfigError naming the one that does not parse, with the fix."""
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as error:
        raise ConfigError(unparsable(error.override, error.message)) from None


def composition_error(error: Exception) -> str:
    """One line for an error of Hydra's composition: an unknown key or group choice gets the closest valid
    names ("did you mean trainer.max_steps?"); anything else, Hydra's first line and its cause's."""
    if isinstance(error, MissingConfigException) and error.options is not None and error.missing_cfg_file:
        group, _, choice = error.missing_cfg_file.rpartition("/")
        if group:
            options = [o for o in error.options if o != choice]
            hint = (
                did_you_mean(choice, options, f"{group}=") or f"the choices are {', '.join(sorted(options))}"
            )
            return f"{group}={choice}: there is no {group} config {choice!r}; {hint}"
    cause = error.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key and cause.key is not None:
        parent = cause.full_key.rpartition(".")[0]
        node = cause.parent_node
        valid = [str(k) for k in node if parent or k != "hydra"] if isinstance(node, DictConfig) else []
        hint = did_you_mean(str(cause.key), valid, f"{parent}." if parent else "")
        if not hint:
            hint = f"the keys of {parent or 'the config'} are {sorted(valid)} (add a new one with +{cause.full_key}=...)"
        return f"unknown key {cause.full_key}: {hint}"
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    if cause is not None and str(cause):
        first = f"{first.rstrip('.')}: {str(cause).splitlines()[0]}"
    return first


def compose(config_dir: str | Path, name: str, overrides: list[str], what: str = "") -> DictConfig:
    """<config_dir>/<name>.yaml composed with `overrides`, as Hydra composes it for a command; every error
    is one ConfigError line (prefixed with `what`, where given)."""
    try:
        parse_overrides(overrides)
    except ConfigError as error:
        raise ConfigError(f"{what}: {error}" if what else str(error)) from None
    GlobalHydra.instance().clear()
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return hydra_compose(name, overrides=list(overrides))
    except Exception as error:  # Hydra's and OmegaConf's own errors
        message = composition_error(error)
        raise ConfigError(f"{what}: {message}" if what else message) from None


def first_job(parsed: list[Override]) -> list[str] | None:
    """The overrides of a multirun's first job (each sweep at its first value), launcher settings left
    out; None where a sweep cannot be listed (an interval for an optimizing sweeper)."""
    texts = []
    for override in parsed:
        if is_launch_override(override.input_line):
            continue
        if not override.is_sweep_override():
            texts.append(override.input_line)
            continue
        try:
            value = next(iter(override.sweep_string_iterator()))
        except Exception:  # Hydra's own errors: the sweeper reports them
            return None
        texts.append(f"{override.get_key_element()}={value}")
    return texts


def check_command_line(config_dir: str | Path, config_name: str, argv: list[str]) -> None:
    """What bigvit-train and bigvit-plan check before hydra.main: every override parses, an optional
    launcher is installed, and the config composes (a multirun: its first job). Raises ConfigError."""
    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # a malformed flag: Hydra's own parser reports it
        return
    parsed = parse_overrides(args.overrides)
    for override in parsed:
        if override.key_or_group == "hydra/launcher" and override.value() == "slurm":
            require("hydra_plugins.hydra_submitit_launcher", "hydra/launcher=slurm")
    if any(getattr(args, flag, None) for flag in OTHER_CONFIG_FLAGS):
        return
    if not args.multirun and any(o.is_sweep_override() for o in parsed):
        return  # Hydra explains a sweep without --multirun itself
    job = first_job(parsed)
    if job is not None:
        compose(config_dir, config_name, job)


def checked_main(config_dir: str | Path, config_name: str, hydra_main) -> None:
    """Run a hydra.main entry point after `check_command_line`, whose ConfigError is the one line."""
    try:
        check_command_line(config_dir, config_name, sys.argv[1:])  # one line naming the key, before Hydra's own
    except ConfigError as error:
        raise SystemExit(f"bigvit: error: {error}") from None
    hydra_main()
