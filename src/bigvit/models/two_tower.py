"""An image–text model (SigLIP): the ViT as image tower, models/text.py's text tower, and the learnable
log-temperature t' and bias b of the pairwise sigmoid loss (Zhai et al. 2023), initialised to log 10 and
−10 as in the paper (model.text.temperature_init, .bias_init). The loss itself is an objective
(train/siglip.py); this module only embeds.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bigvit.models.text import TextTower
from bigvit.models.vit import ViT, ViTConfig


class TwoTower(nn.Module):
    """`forward(images, tokens)` → (image embeddings, text embeddings, temperature e^t', bias b): embeddings
    L2-normalized, (B, embed_dim) each, or None for an input not given (zero-shot prompts embed texts
    alone); temperature and bias (1,) tensors computed from the parameters, never the parameters
    themselves (FSDP2 frees an unsharded parameter after the forward)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.text is None:
            raise ValueError("TwoTower needs a config with a text tower (model.text)")
        self.cfg = cfg
        # The image tower's head is the projection to the shared width, none where that is its own width.
        embed = cfg.embed_dim
        self.image = ViT(cfg.tower(num_classes=0 if embed == cfg.width else embed))
        self.text = TextTower(cfg.text, cfg)
        # (1,)-shaped, not 0-d: FSDP2 shards parameters on dim 0.
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.logit_bias = nn.Parameter(torch.zeros(1))

    def towers(self) -> tuple[nn.Module, ...]:
        """The parts with transformer blocks, for the parallel recipe (parallel/parallelize.py)."""
        return self.image, self.text

    @property
    def features_only(self) -> bool:
        return self.image.features_only

    @features_only.setter
    def features_only(self, value: bool) -> None:
        self.image.features_only = value

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor | None = None):
        if self.features_only:  # few-shot probes: the image tower's pre-logit features
            return self.image(images)
        zimg = F.normalize(self.image(images).float(), dim=-1) if images is not None else None
        ztxt = F.normalize(self.text(tokens).float(), dim=-1) if tokens is not None else None
        return zimg, ztxt, self.logit_scale.exp(), self.logit_bias * 1.0

    @torch.no_grad()
    def init_parameter_(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        if name == "logit_scale":
            tensor.fill_(math.log(self.cfg.text.temperature_init))
        elif name == "logit_bias":
            tensor.fill_(self.cfg.text.bias_init)
        elif name.startswith("text."):
            self.text.init_parameter_(name.removeprefix("text."), tensor, generator)
        elif name == "image.head.weight":  # a projection, not a classifier: drawn, not zeroed
            nn.init.trunc_normal_(tensor, std=0.02, generator=generator)
        else:
            self.image.init_parameter_(name.removeprefix("image."), tensor, generator)
