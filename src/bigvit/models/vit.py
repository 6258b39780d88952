"""One configurable Vision Transformer, from ViT-Ti to ViT-22B.

Plain nn.Module code: nothing here knows about process groups or sharding. Tensor reshapes use
-1 for the head count so that a tensor-parallel transform can hand each rank a subset of heads.
The fused QKV projection stores its output rows head-interleaved, (heads, 3, head_dim), so a
column-wise split across ranks keeps whole heads together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from bigvit.errors import ConfigError, did_you_mean
from bigvit.models.attention import ATTN_IMPLS, attention, window_attention
from bigvit.models.resample import resample_pos_embed

POOLS = ("cls", "gap", "map")


def config_from_dict(cls, values: dict, prefix: str):
    """`cls(**values)`; an unknown key is a ConfigError naming it (with the closest known key under `prefix`)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        close = {key: hint for key in unknown if (hint := did_you_mean(key, known, prefix))}
        hints = "; ".join(hint if len(unknown) == 1 else f"{key}: {hint}" for key, hint in close.items())
        raise ConfigError(f"unknown {prefix[:-1]} key(s) {unknown}; {hints or f'valid keys are {sorted(known)}'}")
    return cls(**values)


def check_sizes(cfg, positive: tuple[str, ...], prefix: str) -> None:
    """ConfigError unless the fields `positive` of `cfg` are positive integers and its heads divide its width."""
    for key in positive:
        if int(getattr(cfg, key)) <= 0:
            raise ConfigError(f"{prefix}{key}={getattr(cfg, key)} must be a positive integer")
    if cfg.width % cfg.heads:
        divisors = [h for h in range(1, min(cfg.width, 128) + 1) if cfg.width % h == 0]
        raise ConfigError(
            f"{prefix}heads={cfg.heads} does not divide {prefix}width={cfg.width}; valid head counts include {divisors}"
        )


@dataclass
class TextConfig:
    """The text tower of an image–text model (models/text.py), `model.text.*`: the ViT's pre-LN blocks
    (bias, norm and attention options follow the image tower's) over token + position embeddings."""

    vocab_size: int = 32000
    context_length: int = 64
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    heads: int = 12
    embed_dim: int | None = None  # the shared embedding width; None = the image tower's width
    # The sigmoid loss's learnable temperature and bias start here (the paper's 10 and −10 suit batches
    # of ~32k pairs: −log B is the prior of a pair matching; small batches learn faster nearer it).
    temperature_init: float = 10.0
    bias_init: float = -10.0

    def __post_init__(self):
        check_sizes(self, ("vocab_size", "context_length", "width", "depth", "mlp_dim", "heads"), "model.text.")
        if self.embed_dim is not None and self.embed_dim <= 0:
            raise ConfigError(f"model.text.embed_dim={self.embed_dim} must be a positive integer or null")
        if self.temperature_init <= 0:
            raise ConfigError(f"model.text.temperature_init={self.temperature_init} must be positive")

    @classmethod
    def from_dict(cls, values: dict) -> TextConfig:
        return config_from_dict(cls, values, "model.text.")

    def blocks(self, image: ViTConfig) -> ViTConfig:
        """The config the text tower's blocks are built from: its sizes, the image tower's block options."""
        return replace(
            image.tower(),
            name="text",
            width=self.width,
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            heads=self.heads,
            image_size=image.patch_size,  # one patch: the blocks never see the image fields
            num_classes=0,
            class_token=False,
            pool="gap",
            fc_norm=False,
            num_registers=0,
            drop_path=0.0,
            patch_dropout=0.0,
            window_size=0,
            global_every=0,
        )


@dataclass
class ViTConfig:
    """Architecture of a ViT; field names are the keys of conf/model/*.yaml. With `text` set it is the
    image tower of an image–text (SigLIP) model whose text tower `text` describes (models/two_tower.py)."""

    name: str = "vit"
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    heads: int = 12
    num_classes: int = 1000
    head_bias_init: float = 0.0  # the classifier's initial bias (sigmoid training: -10, as big_vision's JFT)
    class_token: bool = True
    pool: str = "cls"
    fc_norm: bool = False  # the final norm applies to the pooled feature, not every token (timm's MAE fine-tunes)
    num_registers: int = 0
    qkv_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    norm_bias: bool = True
    qk_norm: bool = False
    parallel_block: bool = False
    layer_scale: float | None = None
    drop_path: float = 0.0
    patch_dropout: float = 0.0  # share of patches dropped per image while training (FLIP); 0 = off
    window_size: int = 0  # > 0: attention within window_size² patch windows (ViTDet, SAM); 0 = global
    global_every: int = 0  # with window_size: every global_every-th block attends globally (0 = none)
    norm_eps: float = 1e-6
    attn_impl: str = "auto"
    text: TextConfig | None = None

    def __post_init__(self):
        if isinstance(self.text, dict):
            self.text = TextConfig.from_dict(self.text)
        check_sizes(self, ("image_size", "patch_size", "in_chans", "width", "depth", "mlp_dim", "heads"), "model.")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.patch_size={self.patch_size} does not divide model.image_size={self.image_size}"
            )
        if self.pool not in POOLS:
            raise ConfigError(f"model.pool={self.pool!r} is not one of {list(POOLS)}")
        if self.pool == "cls" and not self.class_token:
            raise ConfigError("model.pool='cls' needs model.class_token=true; use pool=gap or pool=map")
        if self.attn_impl not in ATTN_IMPLS:
            raise ConfigError(f"model.attn_impl={self.attn_impl!r} is not one of {list(ATTN_IMPLS)}")
        if self.num_classes < 0 or self.num_registers < 0 or not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(
                f"model.num_classes={self.num_classes}, model.num_registers={self.num_registers} must be "
                f">= 0 and model.drop_path={self.drop_path} in [0, 1)"
            )
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"model.patch_dropout={self.patch_dropout} must be in [0, 1)")
        self._check_windows()

    def _check_windows(self) -> None:
        if self.window_size < 0 or self.global_every < 0:
            raise ConfigError(
                f"model.window_size={self.window_size} and model.global_every={self.global_every} must be >= 0"
            )
        if not self.window_size:
            return
        if self.num_prefix_tokens:
            raise ConfigError(
                f"model.window_size={self.window_size} windows the patch grid, which class/register tokens "
                "are not part of: use model.class_token=false model.num_registers=0 with pool=gap or map "
                "(as ViTDet and SAM)"
            )
        if self.patch_dropout:
            raise ConfigError(
                f"model.window_size={self.window_size} needs the whole patch grid, which "
                f"model.patch_dropout={self.patch_dropout} breaks up; set one of them to 0"
            )

    @classmethod
    def from_dict(cls, values: dict) -> ViTConfig:
        return config_from_dict(cls, values, "model.")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def embed_dim(self) -> int:
        """An image–text model's shared embedding width (the image tower's output)."""
        return (self.text.embed_dim if self.text is not None else None) or self.width

    def tower(self, **changes) -> ViTConfig:
        """This config without its text tower (the image tower alone), with `changes`."""
        return replace(self, text=None, **changes)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_registers

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def kept_patches(self) -> int:
        """Patches per image a training forward keeps under patch dropout (all of them at eval)."""
        return kept_patches(self.num_patches, self.patch_dropout)

    @property
    def train_tokens(self) -> int:
        """Tokens per image in a training forward: the kept patches and the class/register tokens."""
        return self.kept_patches + self.num_prefix_tokens

    def block_window(self, index: int) -> int:
        """The attention window of block `index` (0: global)."""
        if not self.window_size or (self.global_every and (index + 1) % self.global_every == 0):
            return 0
        return self.window_size


def kept_patches(num_patches: int, patch_dropout: float) -> int:
    # At least one patch survives (timm's PatchDropout rounds the same way).
    return num_patches if not patch_dropout else max(1, int(num_patches * (1.0 - patch_dropout)))


def padded_length(tokens: int, multiple: int) -> int:
    """`tokens` rounded up to a multiple of `multiple` (the sequence-shard degree)."""
    return -(-tokens // multiple) * multiple


def layer_norm(cfg: ViTConfig, dim: int | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(dim or cfg.width, eps=cfg.norm_eps, bias=cfg.norm_bias)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, prob: float):
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class AttentionKernel(nn.Module):
    """Softmax attention over (B, N, H, D), as a module so that a parallel transform can swap it
    (context parallelism replaces it with an all-to-all around the same kernel). `window` > 0 attends
    within window × window squares of the patch grid; `valid_tokens` marks trailing padding."""

    def __init__(self, impl: str, window: int = 0):
        super().__init__()
        self.impl, self.window = impl, window

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid_tokens: int | None = None
    ) -> torch.Tensor:
        if self.window:
            return window_attention(q, k, v, self.window, self.impl, valid_tokens)
        return attention(q, k, v, self.impl, valid_tokens)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig, window: int = 0):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.kernel = AttentionKernel(cfg.attn_impl, window)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.qkv_bias)
        self.q_norm = layer_norm(cfg, cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = layer_norm(cfg, cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.width, cfg.width, bias=cfg.proj_bias)

    def forward(self, x: torch.Tensor, valid_tokens: int | None = None) -> torch.Tensor:
        batch, tokens = x.shape[:2]
        q, k, v = self.qkv(x).view(batch, tokens, -1, 3, self.head_dim).unbind(dim=3)
        out = self.kernel(self.q_norm(q), self.k_norm(k), v, valid_tokens)
        return self.proj(out.reshape(batch, tokens, -1))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN block; with `parallel_block` one shared LayerNorm feeds attention and MLP side by side
    (ViT-22B: y = x + attn(ln(x)) + mlp(ln(x)))."""

    def __init__(self, cfg: ViTConfig, drop_path: float, window: int = 0):
        super().__init__()
        self.parallel = cfg.parallel_block
        self.norm1 = layer_norm(cfg)
        self.attn = Attention(cfg, window)
        self.norm2 = nn.Identity() if self.parallel else layer_norm(cfg)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, bias=cfg.mlp_bias)
        scale = (lambda: LayerScale(cfg.width, cfg.layer_scale)) if cfg.layer_scale else nn.Identity
        self.ls1, self.ls2 = scale(), scale()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, valid_tokens: int | None = None) -> torch.Tensor:
        """`valid_tokens`: the count of real tokens when the sequence carries trailing padding."""
        if self.parallel:
            h = self.norm1(x)
            return x + self.drop_path(self.ls1(self.attn(h, valid_tokens)) + self.ls2(self.mlp(h)))
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), valid_tokens)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class PatchDropout(nn.Module):
    """While training, keep a uniformly random subset of each image's patch tokens, in grid order
    (FLIP). Ranks that share images must draw the same subsets: they share a seed (see Trainer)."""

    def __init__(self, prob: float):
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, W) → (B, kept_patches(P, prob), W) in training, else unchanged."""
        if not self.training or not self.prob:
            return x
        scores = torch.rand(x.shape[0], x.shape[1], device=x.device)
        kept = scores.topk(kept_patches(x.shape[1], self.prob), dim=1).indices.sort(dim=1).values
        return x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[2]))


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision's MAPHead, timm's AttentionPoolLatent): a learned probe
    attends over all tokens, then a residual MLP."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.kernel = AttentionKernel(cfg.attn_impl)
        self.probe = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm = layer_norm(cfg)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens = x.shape[:2]
        q = self.q(self.probe.expand(batch, -1, -1)).view(batch, 1, -1, self.head_dim)
        k, v = self.kv(x).view(batch, tokens, -1, 2, self.head_dim).unbind(dim=3)
        out = self.proj(self.kernel(q, k, v).reshape(batch, 1, -1))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, token_multiple: int) -> torch.Tensor:
    """(B, N, W) tokens through `blocks`, run on the sequence padded with trailing zero tokens to a
    multiple of `token_multiple` (masked out of attention), the padding dropped again after them."""
    tokens = x.shape[1]
    padded = padded_length(tokens, token_multiple)
    valid = tokens if padded > tokens else None
    if valid:
        x = torch.cat([x, x.new_zeros(x.shape[0], padded - tokens, x.shape[2])], dim=1)
    for block in blocks:
        x = block(x, valid_tokens=valid)
    return x[:, :tokens] if valid else x


class ViT(nn.Module):
    """Patch embedding → [class token, registers] + learned positions → blocks → norm → pool → head
    (with cfg.fc_norm: blocks → pool → norm → head, timm's `fc_norm`).

    `token_multiple`: the blocks run on the sequence padded with trailing tokens to a multiple of it
    (a layout that shards tokens sets it to its shard degree); padding is masked out of attention and
    dropped before the final norm, so no output depends on it.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.token_multiple = 1
        # True: forward returns the pooled pre-logit features instead of logits (few-shot probes); an
        # attribute rather than a method so that wrappers' forward hooks (FSDP2's) still run.
        self.features_only = False
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.class_token else None
        self.reg_tokens = (
            nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.width)) if cfg.num_registers else None
        )
        # Positions cover the class token and the patches; registers carry none (as in DINOv2).
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + int(cfg.class_token), cfg.width))
        self.patch_drop = PatchDropout(cfg.patch_dropout)
        # Stochastic depth grows linearly with depth (plain floats: this may run under a meta device).
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, rate, cfg.block_window(i)) for i, rate in enumerate(rates))
        self.norm = layer_norm(cfg)
        self.map_head = MAPHead(cfg) if cfg.pool == "map" else None
        self.head = nn.Linear(cfg.width, cfg.num_classes) if cfg.num_classes else nn.Identity()

    def positions(self, grid: int) -> torch.Tensor:
        """Position embeddings for a grid × grid patch grid, resampled when it is not the config's."""
        if grid == self.cfg.image_size // self.cfg.patch_size:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, grid, int(self.cfg.class_token))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images → (B, N, W) tokens: [class token, registers, patches]; any S that the
        patch size divides (positions are resampled to its grid)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        pos = self.positions(images.shape[-1] // self.cfg.patch_size)
        prefix = int(self.cfg.class_token)
        x = x + pos[:, prefix:]
        x = self.patch_drop(x)
        tokens = [x]
        if self.reg_tokens is not None:  # registers carry no positions
            tokens.insert(0, self.reg_tokens.expand(x.shape[0], -1, -1))
        if self.cls_token is not None:
            tokens.insert(0, (self.cls_token + pos[:, :prefix]).expand(x.shape[0], -1, -1))
        return torch.cat(tokens, dim=1) if len(tokens) > 1 else x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "cls":
            return x[:, 0]
        if self.cfg.pool == "gap":
            return x[:, self.cfg.num_prefix_tokens :].mean(dim=1)
        return self.map_head(x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.blocks, self.embed(images), self.token_multiple)
        return x if self.cfg.fc_norm else self.norm(x)  # fc_norm: forward() norms the pooled feature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.forward_features(images))
        if self.cfg.fc_norm:
            pooled = self.norm(pooled)
        if self.features_only or isinstance(self.head, nn.Identity):
            # A fresh tensor rather than a view of the tokens: FSDP2 hooks a module's output for backward.
            return pooled.clone() if pooled._base is not None else pooled
        return self.head(pooled)

    @torch.no_grad()
    def init_parameter_(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Fill `tensor` (a full, unsharded tensor shaped like parameter `name`) with its initial value.

        One rule per parameter name keeps initialization independent of how the model is later
        sharded: the caller draws the full tensor from a per-parameter generator, then shards it.
        """
        leaf = name.rsplit(".", 1)[-1]
        if name == "head.weight":
            tensor.zero_()  # zero-init classifier, as big_vision
        elif name == "head.bias":
            tensor.fill_(self.cfg.head_bias_init)  # -10 starts sigmoid training with every class unlikely
        elif leaf == "bias":
            tensor.zero_()
        elif leaf == "gamma":
            tensor.fill_(self.cfg.layer_scale)
        elif tensor.ndim == 1:  # LayerNorm weights
            tensor.fill_(1.0)
        elif leaf in ("cls_token", "reg_tokens"):
            tensor.normal_(0.0, 1e-6, generator=generator)
        else:  # linear/conv kernels, position embeddings, MAP probe
            nn.init.trunc_normal_(tensor, std=0.02, generator=generator)
