"""The model zoo: conf/model/*.yaml are the single source of architecture sizes."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from bigvit.errors import ConfigError, did_you_mean
from bigvit.models.vit import ViT, ViTConfig

MODEL_CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"


def list_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONF_DIR.glob("*.yaml"))


def model_config(name_or_cfg: str | dict | ViTConfig, **overrides) -> ViTConfig:
    """A validated ViTConfig from a zoo name, a dict of model keys, or a config; overrides use the same keys."""
    if isinstance(name_or_cfg, ViTConfig):
        values = name_or_cfg.to_dict()
    elif isinstance(name_or_cfg, str):
        path = MODEL_CONF_DIR / f"{name_or_cfg}.yaml"
        if not path.is_file():
            hint = did_you_mean(name_or_cfg, list_models())
            raise ConfigError(
                f"unknown model {name_or_cfg!r}; available models: {', '.join(list_models())}{'; ' + hint if hint else ''}"
            )
        values = yaml.safe_load(path.read_text())
        values.pop("defaults", None)  # the Hydra schema reference; its defaults are ViTConfig's own
    else:
        values = dict(name_or_cfg)
    return ViTConfig.from_dict({**values, **overrides})


def build_model(
    name_or_cfg: str | dict | ViTConfig, device: str | torch.device | None = None, **overrides
) -> ViT:
    """Build a ViT. With device="meta" no memory is allocated (sizes, planning, later sharding)."""
    cfg = model_config(name_or_cfg, **overrides)
    with torch.device(device or "cpu"):
        return ViT(cfg)


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters, counting each shared tensor once (works on the meta device and on DTensors)."""
    seen = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in seen.values())
