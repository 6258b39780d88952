"""The text tower of an image–text model: token + position embeddings → the ViT's pre-LN blocks →
final norm → the last position's feature → a projection to the shared embedding width.

As in SigLIP (big_vision's `pool_type="last"`), captions are padded to the fixed context length and the
last position is pooled: attention is bidirectional and unmasked, so that position sees the whole caption.
Plain nn.Module code, shaped like the ViT (`cfg`, `blocks`, `token_multiple`) so that the same parallel
recipe (tensor/sequence parallel, activation checkpointing, FSDP2) applies to it block for block.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bigvit.models.vit import Block, TextConfig, ViTConfig, layer_norm, run_blocks


class TextTower(nn.Module):
    def __init__(self, text: TextConfig, image: ViTConfig):
        super().__init__()
        self.text_cfg = text
        self.cfg = text.blocks(image)  # what the blocks (and the parallel plans) are built from
        self.token_multiple = 1
        self.token_embed = nn.Embedding(text.vocab_size, text.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, text.context_length, text.width))
        self.blocks = nn.ModuleList(Block(self.cfg, 0.0) for _ in range(text.depth))
        self.norm = layer_norm(self.cfg)
        self.head = nn.Linear(text.width, image.embed_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, L ≤ context_length → (B, embed_dim) caption features (not normalized)."""
        x = self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        x = self.norm(run_blocks(self.blocks, x, self.token_multiple))
        return self.head(x[:, -1])

    @torch.no_grad()
    def init_parameter_(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """As the ViT's rules, but the projection is drawn, not zeroed: a zero caption feature has no
        direction for the loss to normalize."""
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            tensor.zero_()
        elif tensor.ndim == 1:  # LayerNorm weights
            tensor.fill_(1.0)
        else:  # token and position embeddings, linear kernels, the projection
            nn.init.trunc_normal_(tensor, std=0.02, generator=generator)
