"""Optional dependencies, imported through one function: a missing one is one line naming its extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from bigvit.errors import ConfigError

# import name → (pip package, the bigvit extra that installs it: pyproject.toml [project.optional-dependencies])
EXTRAS = {
    "deepspeed": ("deepspeed", "deepspeed"),
    "flash_attn": ("flash-attn", "gpu"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "matplotlib": ("matplotlib", "plot"),
    "onnx": ("onnx", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "hydra_plugins.hydra_submitit_launcher": ("hydra-submitit-launcher", "slurm"),
}


def require(module: str, feature: str) -> ModuleType:
    """Import the optional `module` (a key of EXTRAS) for `feature` (the setting that needs it, e.g.
    "parallel=deepspeed_zero3"); raise ConfigError naming the extra to install where it is missing."""
    package, extra = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = getattr(error, "name", None)
        if (
            isinstance(error, ModuleNotFoundError)
            and missing
            and module.split(".")[0] == missing.split(".")[0]
        ):
            raise ConfigError(
                f"{feature} needs the {package} package: pip install 'bigvit[{extra}]'"
            ) from None
        # Installed, but it (or one of its own dependencies) does not import.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"{feature} needs the {package} package, which is installed but does not import ({reason}); "
            f"reinstall it: pip install --force-reinstall 'bigvit[{extra}]'"
        ) from None


def optional(module: str) -> ModuleType | None:
    """The optional `module` (a key of EXTRAS) where it imports, else None (for features with a fallback)."""
    if module not in EXTRAS:
        raise KeyError(f"{module} is not an optional dependency listed in bigvit.extras.EXTRAS")
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
