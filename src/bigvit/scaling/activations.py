"""Bytes a training step saves for backward (activation memory), from a ViTConfig alone.

The figures are what autograd keeps alive at the end of the forward pass of one micro-batch, on one
rank, tensor by tensor as bigvit's model code produces them (validated against saved-tensor hooks on
real models in tests/test_activations.py). Parameters are not activations and are not counted.

Per transformer block, with b images, N tokens (class/register tokens included), width W, MLP width
M, H heads, tensor-parallel degree t and context-parallel degree c (Ulysses: the block sees N/c
tokens, attention sees all N tokens with H/c heads, the same number of elements):

    residual stream into each LayerNorm  b·Ns·W   (Ns = N/c/t with sequence parallel, else N/c) + 2 fp32 stats per token
    LayerNorm outputs, linear inputs     b·N/c·W  (gathered whole over tp; one shared norm in a parallel block)
    qkv                                  b·N/c·3W/t  (fused kernels save q, k, v as views of it)
    qk-norm                              b·N/c·2W/t  (normalized q and k) + 4 fp32 stats per token and head
    attention output                     b·N/c·W/t + fp32 logsumexp b·N/c·H/t (flash/SDPA: no N×N matrix)
    under cp: all-to-all copies          b·N/c·3W/t of q,k,v after the exchange + b·N/c·W/t proj input
    MLP hidden, before and after GELU    2·b·N/c·M/t
    layer scale inputs                   2·b·Ns·W

Precision: "fp32"; "bf16" = parameters cast to bf16 (FSDP2 MixedPrecisionPolicy, DeepSpeed bf16), so
every activation is bf16; "autocast" = fp32 parameters under torch.autocast (DDP): matmul inputs and
outputs are bf16, the residual stream and LayerNorm inputs stay fp32, and the bf16 weight copies
autocast makes are saved too (reported apart, as "weight_copies"). Norm statistics and the attention
logsumexp are fp32 as CUDA keeps them (CPU keeps norm statistics in bf16 under bf16: < 0.5% here).
Under autocast the q/k LayerNorms run in fp32 as on CUDA (they save fp32 copies of q and k); CPU
autocast runs them in bf16, so that one combination is CUDA-only.

Tokens: a training forward sees the tokens patch dropout keeps (`cfg.train_tokens`); with tokens
sharded over c·t ranks the blocks run on the sequence padded to a multiple of c·t (N above is then
the padded count), the final norm and heads on the real tokens. A windowed block (model.window_size)
saves q, k, v and the attention output in window layout (the grid padded to whole windows) and the
projection's input apart from them.

Activation checkpointing (bigvit wraps whole blocks): a checkpointed block saves only its input; the
first block's input is the embedding output, saved whole. Its activations exist again, transiently,
while its backward runs (see `backward_working_bytes`). Stochastic-depth masks (b bytes) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigvit.errors import ConfigError
from bigvit.models.vit import ViTConfig, padded_length
from bigvit.parallel.parallelize import AC_MODES
from bigvit.scaling.flops import attended_pairs

PRECISIONS = ("fp32", "bf16", "autocast")
FP32, BF16 = 4, 2
STAT_BYTES = FP32  # LayerNorm mean/rstd and attention logsumexp
LABEL_BYTES = 8  # int64 class targets


@dataclass(frozen=True)
class ActivationLayout:
    """How one rank runs the forward pass: micro-batch, precision, checkpointing and sharding."""

    micro_batch: int = 1
    precision: str = "fp32"  # fp32 | bf16 | autocast (see the module docstring)
    checkpointing: str = "none"  # none | full | selective (every `ac_every`-th block), as apply_ac
    ac_every: int = 2
    tp: int = 1
    sequence_parallel: bool = True
    cp: int = 1

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"activation precision {self.precision!r} is not one of {list(PRECISIONS)}")
        if self.checkpointing not in AC_MODES:
            raise ConfigError(
                f"parallel.activation_checkpointing={self.checkpointing!r} is not one of {list(AC_MODES)}"
            )
        if min(self.micro_batch, self.tp, self.cp, self.ac_every) < 1:
            raise ConfigError(f"micro_batch, tp, cp and ac_every must be positive, got {self}")

    @property
    def stream_bytes(self) -> int:
        """Element size of the residual stream and LayerNorm inputs."""
        return BF16 if self.precision == "bf16" else FP32

    @property
    def matmul_bytes(self) -> int:
        """Element size of matmul inputs/outputs and attention tensors."""
        return FP32 if self.precision == "fp32" else BF16

    @property
    def sequence_sharded(self) -> bool:
        return self.tp > 1 and self.sequence_parallel


def _check_split(cfg: ViTConfig, layout: ActivationLayout) -> None:
    if cfg.heads % (layout.tp * layout.cp) or cfg.mlp_dim % layout.tp:
        raise ConfigError(
            f"model.heads={cfg.heads} and model.mlp_dim={cfg.mlp_dim} do not split over "
            f"tp={layout.tp} × cp={layout.cp}"
        )
    if cfg.window_size and layout.cp > 1:
        raise ConfigError(f"model.window_size={cfg.window_size} does not run under cp={layout.cp}")
    if cfg.text is not None and layout.cp > 1:  # as parallel/parallelize.py refuses it
        raise ConfigError(f"an image–text model (model.text) does not run under cp={layout.cp}")


def sequence_shards(layout: ActivationLayout) -> int:
    """Ranks the token sequence is split over (cp × sequence-parallel tp)."""
    return layout.cp * (layout.tp if layout.sequence_sharded else 1)


def _tokens(cfg: ViTConfig, layout: ActivationLayout) -> tuple[int, int]:
    """(tokens a block's matmuls see on this rank, tokens of its residual stream), padding included."""
    tokens = padded_length(cfg.train_tokens, sequence_shards(layout)) // layout.cp
    return tokens, tokens // layout.tp if layout.sequence_sharded else tokens


def _window_rows(cfg: ViTConfig, micro_batch: int) -> int:
    """Rows of one windowed block's q, k, v in window layout (the grid padded to whole windows)."""
    return micro_batch * attended_pairs(cfg.train_tokens, cfg.window_size) // cfg.window_size**2


def block_activation_bytes(cfg: ViTConfig, layout: ActivationLayout, window: int = 0) -> dict[str, int]:
    """Bytes one non-checkpointed transformer block saves for backward, by tensor (one micro-batch);
    `window`: its attention window (0: global attention)."""
    _check_split(cfg, layout)
    b, t, cp = layout.micro_batch, layout.tp, layout.cp
    tokens, stream_tokens = _tokens(cfg, layout)
    s, mm = layout.stream_bytes, layout.matmul_bytes
    w, local_w, local_heads = cfg.width, cfg.width // t, cfg.heads // t
    norms = 1 if cfg.parallel_block else 2
    # A parallel block's one norm output feeds qkv and fc1 as the same tensor, except under autocast,
    # where each linear saves its own bf16 copy of it.
    linear_inputs = 2 if layout.precision == "autocast" else norms
    rows, stream_rows = b * tokens, b * stream_tokens
    parts = {
        "norm_inputs": norms * stream_rows * (w * s + 2 * STAT_BYTES),
        "norm_outputs": linear_inputs * rows * w * mm,
        "mlp_hidden": 2 * rows * (cfg.mlp_dim // t) * mm,
        "layer_scale": 2 * stream_rows * w * mm if cfg.layer_scale else 0,
    }
    qkv = rows * 3 * local_w * mm
    # The kernel's output covers the real tokens only; with padding, a padded copy feeds the projection.
    attended = b * cfg.train_tokens * local_w // cp * mm
    padded_output = rows * local_w * mm if attended < rows * local_w * mm else 0
    qk_inputs = qk_stats = 0
    if cfg.qk_norm:
        # The q/k LayerNorms save q and k (views of qkv; fp32 copies under autocast) and their stats.
        qk_inputs = qkv + (rows * 2 * local_w * FP32 if layout.precision == "autocast" else 0)
        qk_stats = rows * 2 * 2 * local_heads * STAT_BYTES
    if window:
        if attention_kernel(cfg) == "math":
            raise ConfigError("windowed attention with the math kernel is not modelled; use attn_impl=auto")
        # q, k, v and the kernel's output in window layout; the output re-laid out for the projection.
        window_rows = _window_rows(cfg, b)
        parts["qkv"] = qk_inputs + qk_stats if cfg.qk_norm else 0
        windowed = 4 * window_rows * local_w * mm + window_rows * local_heads * STAT_BYTES
        parts["attention"] = windowed + rows * local_w * mm
        return parts
    if attention_kernel(cfg) == "math":
        if layout.precision == "autocast":
            raise ConfigError(
                "the math attention kernel under autocast is not modelled (its softmax dtype differs between "
                "CPU and CUDA); use model.attn_impl=auto (flash/SDPA) or fp32/bf16 parameters"
            )
        # Reference attention in fp32: q, k, v copied to fp32 for the matmuls, the N×N probabilities,
        # and the output re-laid out for the projection. qkv itself is kept only by the q/k norms.
        probabilities = b * (local_heads // cp) * cfg.train_tokens**2 * FP32
        parts["attention"] = rows * 3 * local_w * FP32 + probabilities + attended + padded_output
        parts["qkv"] = qk_inputs + qk_stats if cfg.qk_norm else 0
        return parts
    logsumexp = b * cfg.train_tokens * local_heads // cp * STAT_BYTES
    if cp > 1:
        # Ulysses: the kernel saves the all-to-all copy of q, k, v; the output is exchanged back
        # into a fresh tensor for the projection. qkv itself is kept only by the q/k norms.
        parts["qkv"] = qk_inputs + qk_stats if cfg.qk_norm else 0
        parts["attention"] = qkv + attended + rows * local_w * mm + logsumexp
    else:
        normalized = rows * 2 * local_w * mm
        parts["qkv"] = qk_inputs + qk_stats + normalized if cfg.qk_norm else qkv
        parts["attention"] = attended + padded_output + logsumexp  # output (the projection's input)
    return parts


def blocks_activation_bytes(cfg: ViTConfig, layout: ActivationLayout) -> list[int]:
    """Saved bytes of each block as it runs (a checkpointed block keeps only its input)."""
    _, stream_tokens = _tokens(cfg, layout)
    block_input = layout.micro_batch * stream_tokens * cfg.width * layout.stream_bytes
    checkpointed = checkpointed_indices(cfg, layout)
    return [
        block_input if index in checkpointed else sum(block_activation_bytes(cfg, layout, window).values())
        for index, window in enumerate(map(cfg.block_window, range(cfg.depth)))
    ]


def attention_kernel(cfg: ViTConfig) -> str:
    """ "math" for the reference kernel (saves the N×N matrix), else "fused" (flash / SDPA)."""
    return "math" if cfg.attn_impl == "math" else "fused"


def checkpointed_indices(cfg: ViTConfig, layout: ActivationLayout) -> range:
    """The blocks apply_ac wraps: all (full), every ac_every-th from the first (selective), none."""
    if layout.checkpointing == "none":
        return range(0)
    return range(0, cfg.depth, 1 if layout.checkpointing == "full" else layout.ac_every)


def checkpointed_blocks(cfg: ViTConfig, layout: ActivationLayout) -> int:
    """How many blocks apply_ac wraps."""
    return len(checkpointed_indices(cfg, layout))


def embed_activation_bytes(cfg: ViTConfig, layout: ActivationLayout) -> int:
    """The images (saved by the patch conv), plus the part of the embedding output the first block keeps
    beyond its own token slice: a cp slice is a view of the whole output, and a checkpointed block
    saves its input from before any split."""
    b = layout.micro_batch
    images = b * cfg.in_chans * cfg.image_size**2 * layout.matmul_bytes
    _, stream_tokens = _tokens(cfg, layout)
    first_keeps_whole = checkpointed_blocks(cfg, layout) > 0 or (
        layout.cp > 1 and not layout.sequence_sharded
    )
    extra_tokens = sequence_tokens(cfg, layout) - stream_tokens if first_keeps_whole else 0
    # Patch dropout's gather keeps its input (every patch token) and its int64 indices (one per kept
    # patch, expanded over the width as a view).
    kept = b * (cfg.num_patches * cfg.width * layout.stream_bytes + cfg.kept_patches * LABEL_BYTES)
    kept = kept if cfg.patch_dropout else 0
    return images + kept + b * extra_tokens * cfg.width * layout.stream_bytes


def sequence_tokens(cfg: ViTConfig, layout: ActivationLayout) -> int:
    """Tokens of the whole (padded) sequence the blocks and the final norm run on."""
    return padded_length(cfg.train_tokens, sequence_shards(layout))


def _map_head_bytes(cfg: ViTConfig, layout: ActivationLayout) -> int:
    """The MAP head: keys/values over all tokens, then per-image probe attention and MLP (tp-split)."""
    b, t, mm = layout.micro_batch, layout.tp, layout.matmul_bytes
    w, local_w, local_heads, n = cfg.width, cfg.width // t, cfg.heads // t, cfg.train_tokens
    tokens_in = b * sequence_tokens(cfg, layout) * w * mm  # the final norm's output (bf16 under autocast)
    if attention_kernel(cfg) == "math":
        attention = b * (n * 2 + 1) * local_w * FP32 + b * local_heads * n * FP32
        attention += b * local_w * mm
    else:
        attention = b * n * 2 * local_w * mm + b * local_heads * STAT_BYTES + b * local_w * mm
    probe = b * w * BF16 if layout.precision == "autocast" else 0  # the parameter's bf16 copy, expanded
    # q output; projection output (its norm's input: fp32 under autocast); norm stats; MLP input,
    # hidden before and after GELU; the residual sum the classifier reads.
    norm_input = FP32 if layout.precision == "autocast" else mm
    per_image = local_w * mm + w * norm_input + 2 * STAT_BYTES + w * mm + 2 * (cfg.mlp_dim // t) * mm + w * mm
    return tokens_in + attention + probe + b * per_image


def head_activation_bytes(cfg: ViTConfig, layout: ActivationLayout) -> int:
    """Final norm (on the whole sequence again), pooling, classifier and the cross-entropy loss."""
    b, s, mm = layout.micro_batch, layout.stream_bytes, layout.matmul_bytes
    rows, w = b * sequence_tokens(cfg, layout), cfg.width
    if cfg.fc_norm:
        return _fc_norm_head_bytes(cfg, layout)
    total = rows * (w * s + 2 * STAT_BYTES)
    if cfg.pool == "map":
        total += _map_head_bytes(cfg, layout)
    elif cfg.num_classes and cfg.pool == "cls" and layout.precision != "autocast":
        total += rows * w * mm  # the class token is a view: the classifier keeps the norm output alive
    elif cfg.num_classes:
        total += b * w * mm  # pooled features (or their bf16 copy under autocast)
    if cfg.num_classes:
        # Log-softmax of the fp32 logits, the targets, and the loss's fp32 total-weight scalar.
        total += b * (cfg.num_classes * FP32 + LABEL_BYTES) + FP32
    return total


def _fc_norm_head_bytes(cfg: ViTConfig, layout: ActivationLayout) -> int:
    """Pooling straight off the last block, the final norm on the pooled feature (model.fc_norm),
    classifier and loss."""
    b, s, mm = layout.micro_batch, layout.stream_bytes, layout.matmul_bytes
    rows, w = b * sequence_tokens(cfg, layout), cfg.width
    if cfg.pool == "map":
        total = _map_head_bytes(cfg, layout)  # its residual sum is now the norm's input
    elif cfg.pool == "cls":
        total = rows * w * s  # the norm keeps the class token, a view of the whole last-block output
    else:
        total = b * w * s  # the mean (its own backward keeps nothing), which the norm keeps
    total += b * 2 * STAT_BYTES
    if cfg.num_classes:
        # The norm output the classifier reads; log-softmax of the fp32 logits, targets, the fp32 total weight.
        total += b * w * mm + b * (cfg.num_classes * FP32 + LABEL_BYTES) + FP32
    return total


def autocast_weight_copy_bytes(cfg: ViTConfig, tp: int = 1, blocks: int | None = None) -> int:
    """bf16 copies autocast makes of the matmul weights (patch conv, linears) that backward keeps: those of
    `blocks` transformer blocks (default all; a checkpointed block re-casts its own) and of the embedding
    and heads."""
    w = cfg.width
    block = (4 * w * w + 2 * w * cfg.mlp_dim) // tp
    embed = cfg.in_chans * cfg.patch_size**2 * w
    head = w * cfg.num_classes
    map_head = (4 * w * w + 2 * w * cfg.mlp_dim) // tp if cfg.pool == "map" else 0
    return BF16 * ((cfg.depth if blocks is None else blocks) * block + embed + head + map_head)


def activation_breakdown(cfg: ViTConfig, layout: ActivationLayout) -> dict[str, int]:
    """Saved-for-backward bytes of one micro-batch on one rank: embed, blocks, head, weight_copies."""
    checkpointed = checkpointed_blocks(cfg, layout)
    weight_copies = 0
    if layout.precision == "autocast":
        weight_copies = autocast_weight_copy_bytes(cfg, layout.tp, cfg.depth - checkpointed)
    return {
        "embed": embed_activation_bytes(cfg, layout),
        "blocks": sum(blocks_activation_bytes(cfg, layout)),
        "head": head_activation_bytes(cfg, layout),
        "weight_copies": weight_copies,
    }


def saved_activation_bytes(cfg: ViTConfig, layout: ActivationLayout) -> int:
    """Total bytes saved for backward at the end of the forward pass (all of `activation_breakdown`)."""
    return sum(activation_breakdown(cfg, layout).values())


def backward_working_bytes(cfg: ViTConfig, layout: ActivationLayout) -> int:
    """Transient bytes on top of the saved ones while backward runs: the gradients in flight through one
    block, taken as one block's activations; with checkpointing, also that block's recomputed ones."""
    windows = {cfg.block_window(index) for index in range(cfg.depth)}
    block = max(sum(block_activation_bytes(cfg, layout, window).values()) for window in windows)
    return block * (2 if checkpointed_blocks(cfg, layout) else 1)
