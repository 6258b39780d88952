"""Closed-form parameter counts and FLOPs of a ViT, from its ViTConfig alone (no model is built).

This module is the single source of truth for sizes: the trainer's MFU and the memory planner read it.

FLOP convention:
- Only matrix multiplications count, each multiply-accumulate as 2 FLOPs: the patch-embedding conv,
  QKV, attention scores QK^T and attention x V (over all tokens, class and register tokens included),
  the attention out-projection, MLP fc1/fc2, the MAP head (probe query, keys/values over all tokens,
  one-query attention, projection, MLP) and the classifier. Bias adds, LayerNorms, GELU, softmax,
  residuals, layer scale and position embeddings are elementwise and left out: about 1% of the
  FLOPs of ViT-Ti and less for larger models, and memory-bound, so MFU conventionally omits them.
- Attention FLOPs are those of dense (non-causal) attention, whatever kernel runs it; a windowed block
  (model.window_size) attends within windows of the patch grid padded to whole windows, as it runs.
- A training forward sees the tokens patch dropout keeps (`cfg.train_tokens`); the patch conv still
  runs on every patch. Evaluation sees all tokens.
- Model FLOPs (MFU) leave out the padding a sequence-sharded layout adds (`sequence_multiple`): the
  executed FLOPs, which the planner times, run the padding through the blocks' linear layers only
  (attention skips it).
- Training costs 3x the forward (the backward computes gradients for both activations and weights,
  2x the forward); full activation checkpointing adds one more forward of the transformer blocks.
  Autograd actually skips the patch conv's input gradient (images need none), a fraction of a percent
  that this convention keeps, as the usual 6 x params x tokens estimate does.
- All FLOPs are per step for `batch` images (per image by default).
"""

from __future__ import annotations

import dataclasses
import math

from bigvit.models.vit import ViTConfig, padded_length


def _norm_params(cfg: ViTConfig, dim: int) -> int:
    return dim * (1 + int(cfg.norm_bias))


def _linear_params(fan_in: int, fan_out: int, bias: bool) -> int:
    return fan_in * fan_out + fan_out * int(bias)


def _mlp_params(width: int, hidden: int, bias: bool) -> int:
    return _linear_params(width, hidden, bias) + _linear_params(hidden, width, bias)


def block_param_count(cfg: ViTConfig) -> int:
    """Parameters of one transformer block (all blocks are the same size)."""
    w = cfg.width
    attn = _linear_params(w, 3 * w, cfg.qkv_bias) + _linear_params(w, w, cfg.proj_bias)
    if cfg.qk_norm:
        attn += 2 * _norm_params(cfg, cfg.head_dim)
    # A parallel block shares one LayerNorm between attention and MLP.
    norms = (1 if cfg.parallel_block else 2) * _norm_params(cfg, w)
    # LayerScale exists only for a truthy init value (None or 0.0 disables it, as in Block).
    scales = 2 * w if cfg.layer_scale else 0
    return attn + _mlp_params(w, cfg.mlp_dim, cfg.mlp_bias) + norms + scales


def _map_head_params(cfg: ViTConfig) -> int:
    w = cfg.width
    # The MAP head always has biases, whatever the block options (big_vision's MAPHead).
    probe_attn = w + _linear_params(w, w, True) + _linear_params(w, 2 * w, True) + _linear_params(w, w, True)
    return probe_attn + _norm_params(cfg, w) + _mlp_params(w, cfg.mlp_dim, True)


def param_breakdown(cfg: ViTConfig) -> dict[str, int]:
    """Parameters by part of the model; the values sum to `param_count(cfg)`.

    Keys: embed (patch conv, class token, registers, position embeddings), blocks (all of them),
    norm (final LayerNorm), map_head (0 unless pool='map'), head (classifier, 0 when num_classes=0;
    an image–text model's image projection). With a text tower (cfg.text) also: text (token and
    position embeddings, blocks, final norm, projection) and logit (temperature and bias).
    """
    image = image_tower(cfg)
    w = image.width
    patch_conv = _linear_params(image.in_chans * image.patch_size**2, w, True)
    # Positions cover the class token and the patches, not the registers (see ViT.__init__).
    positions = (image.num_patches + int(image.class_token)) * w
    parts = {
        "embed": patch_conv + image.num_prefix_tokens * w + positions,
        "blocks": image.depth * block_param_count(image),
        "norm": _norm_params(image, w),
        "map_head": _map_head_params(image) if image.pool == "map" else 0,
        "head": _linear_params(w, image.num_classes, True) if image.num_classes else 0,
    }
    if cfg.text is not None:
        text, blocks = cfg.text, cfg.text.blocks(cfg)
        parts["text"] = (
            (text.vocab_size + text.context_length) * text.width
            + text.depth * block_param_count(blocks)
            + _norm_params(blocks, text.width)
            + _linear_params(text.width, cfg.embed_dim, True)
        )
        parts["logit"] = 2
    return parts


def image_tower(cfg: ViTConfig) -> ViTConfig:
    """The ViT that embeds images: `cfg` itself, or an image–text model's image tower, whose head is the
    projection to the shared width (none where that is the tower's own width; models/two_tower.py)."""
    if cfg.text is None:
        return cfg
    return cfg.tower(num_classes=0 if cfg.embed_dim == cfg.width else cfg.embed_dim)


def param_count(cfg: ViTConfig) -> int:
    """Exact number of parameters of `ViT(cfg)`, equal to `count_params(ViT(cfg))`."""
    return sum(param_breakdown(cfg).values())


def _at_resolution(cfg: ViTConfig, image_size: int | None) -> ViTConfig:
    # dataclasses.replace re-runs ViTConfig validation, so a bad image_size fails here with its value.
    return cfg if image_size is None else dataclasses.replace(cfg, image_size=image_size)


def block_windows(cfg: ViTConfig) -> dict[int, int]:
    """{attention window: number of blocks with it} (window 0: global attention), in closed form."""
    if not cfg.window_size:
        return {0: cfg.depth}
    global_blocks = cfg.depth // cfg.global_every if cfg.global_every else 0
    return {cfg.window_size: cfg.depth - global_blocks, 0: global_blocks}


def attended_pairs(tokens: int, window: int = 0) -> int:
    """Query-key pairs attention scores for one image: all of them, or those within each window of the
    (square) patch grid padded to whole windows."""
    if not window:
        return tokens * tokens
    cells = -(-math.isqrt(tokens) // window)
    return cells * cells * window**4


def block_forward_flops(cfg: ViTConfig, tokens: int, window: int = 0, rows: int | None = None) -> int:
    """Forward FLOPs of one transformer block on one image of `tokens` tokens, attending within windows
    of `window` patches (0: globally); the linear layers run on `rows` tokens (default `tokens`; more
    when the sequence is padded)."""
    w, rows = cfg.width, rows or tokens
    qkv, proj, mlp = 2 * rows * w * 3 * w, 2 * rows * w * w, 2 * 2 * rows * w * cfg.mlp_dim
    scores_and_values = 2 * 2 * attended_pairs(tokens, window) * w
    return qkv + scores_and_values + proj + mlp


def _map_head_forward_flops(cfg: ViTConfig, tokens: int) -> int:
    w = cfg.width
    # One probe query: its projections are per image, keys/values are per token.
    query_and_proj, keys_values = 2 * 2 * w * w, 2 * tokens * w * 2 * w
    scores_and_values, mlp = 2 * 2 * tokens * w, 2 * 2 * w * cfg.mlp_dim
    return query_and_proj + keys_values + scores_and_values + mlp


def forward_flops_breakdown(
    cfg: ViTConfig, image_size: int | None = None, training: bool = False, sequence_multiple: int = 1
) -> dict[str, int]:
    """Forward FLOPs of one image by part (patch_embed, blocks, map_head, head; with a text tower also
    text_blocks and text_head, for the image's caption); they sum to forward_flops.

    `image_size` overrides cfg.image_size: the token count changes, positional embeddings are not
    resampled (interpolation is elementwise and not counted). `training`: the tokens a training forward
    keeps under patch dropout. `sequence_multiple`: as executed with the blocks' sequence padded to a
    multiple of it (see the module docstring). A caption is `model.text.context_length` tokens (padded
    to it, as bigvit's tokenizers do); the loss's image–text similarities depend on the batch and, like
    the loss, are not counted.
    """
    image = _at_resolution(image_tower(cfg), image_size)
    w = image.width
    tokens = image.train_tokens if training else image.num_tokens
    rows = padded_length(tokens, sequence_multiple)
    parts = {
        "patch_embed": 2 * image.num_patches * image.in_chans * image.patch_size**2 * w,
        "blocks": sum(
            count * block_forward_flops(image, tokens, window, rows) for window, count in block_windows(image).items()
        ),
        "map_head": _map_head_forward_flops(image, tokens) if image.pool == "map" else 0,
        "head": 2 * w * image.num_classes,
    }
    if cfg.text is not None:
        text, blocks = cfg.text, cfg.text.blocks(cfg)
        length = text.context_length
        parts["text_blocks"] = text.depth * block_forward_flops(blocks, length, rows=padded_length(length, sequence_multiple))
        parts["text_head"] = 2 * text.width * cfg.embed_dim
    return parts


def forward_flops(cfg: ViTConfig, image_size: int | None = None, batch: int = 1) -> int:
    """Matmul FLOPs (2 x multiply-accumulates) of a forward pass over `batch` images."""
    return batch * sum(forward_flops_breakdown(cfg, image_size).values())


def train_flops(
    cfg: ViTConfig,
    image_size: int | None = None,
    batch: int = 1,
    recompute: bool = False,
    sequence_multiple: int = 1,
) -> int:
    """FLOPs of one training step over `batch` images: forward (of the tokens patch dropout keeps) +
    backward (2x forward), plus one more forward of the blocks when `recompute` (full activation
    checkpointing); `sequence_multiple` > 1 counts the padding executed (not model FLOPs)."""
    parts = forward_flops_breakdown(cfg, image_size, training=True, sequence_multiple=sequence_multiple)
    extra = parts["blocks"] + parts.get("text_blocks", 0) if recompute else 0
    return batch * (3 * sum(parts.values()) + extra)
