"""The model zoo: conf/model/*.yaml are the single source of architecture sizes."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from bigvit.errors import ConfigError, did_you_mean
from bigvit.models.convert import check_state_dict, import_safetensors
from bigvit.models.resample import adapt_state_dict
from bigvit.models.two_tower import TwoTower
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
    name_or_cfg: str | dict | ViTConfig,
    device: str | torch.device | None = None,
    weights: str | Path | None = None,
    **overrides,
) -> ViT:
    """Build a ViT, or an image–text TwoTower where the config has a text tower. With device="meta" no
    memory is allocated (sizes, planning, later sharding).

    `weights`: a .safetensors file of full bigvit tensors (bigvit-export, bigvit-convert) loaded into it;
    position embeddings are resampled (and patch kernels resized) where the model's grid differs, and a
    CheckpointError names every missing or unexpected key and shape mismatch.
    """
    cfg = model_config(name_or_cfg, **overrides)
    with torch.device(device or "cpu"):
        model = TwoTower(cfg) if cfg.text is not None else ViT(cfg)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: ViT, path: str | Path) -> list[str]:
    """Load a full-weights .safetensors file into `model` exactly; returns the notes of what was adapted."""
    return load_fitted(model, import_safetensors(path), str(path))


def load_fitted(model: ViT, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load full tensors into `model`, adapted to its grid and patch size (models/resample.py), exactly:
    a CheckpointError names every missing or unexpected key and shape mismatch. Returns what was adapted."""
    state, notes = adapt_state_dict(state, model.cfg)
    check_state_dict(state, model.state_dict(), source)
    model.load_state_dict(state, strict=True, assign=next(model.parameters()).is_meta)
    return notes


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters, counting each shared tensor once (works on the meta device and on DTensors)."""
    seen = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in seen.values())
