"""bigvit: train Vision Transformers at any scale, and plan that scale."""

from bigvit.errors import ConfigError
from bigvit.models import ViT, ViTConfig, build_model, count_params, list_models, model_config

__all__ = ["ConfigError", "ViT", "ViTConfig", "build_model", "count_params", "list_models", "model_config"]
__version__ = "0.1.0"
