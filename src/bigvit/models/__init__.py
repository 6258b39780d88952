from bigvit.errors import ConfigError
from bigvit.models.registry import build_model, count_params, list_models, model_config
from bigvit.models.vit import ViT, ViTConfig

__all__ = ["ConfigError", "ViT", "ViTConfig", "build_model", "count_params", "list_models", "model_config"]
