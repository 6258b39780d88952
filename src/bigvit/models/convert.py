"""Checkpoint interchange: timm and big_vision ViT weights in bigvit's names and layouts, exact checks of
a state dict against a model, full tensors to and from safetensors. Pure functions on tensors."""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from bigvit.errors import CheckpointError
from bigvit.models.vit import ViTConfig

# timm name fragment → bigvit name fragment (all other names are shared).
TIMM_RENAMES = (
    ("patch_embed.proj.", "patch_embed."),
    ("attn_pool.latent", "map_head.probe"),
    ("attn_pool.", "map_head."),
)


def interleave_heads(weight: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    """Rows ordered (parts, heads, head_dim), as timm stores fused projections → (heads, parts, head_dim)."""
    head_dim = weight.shape[0] // (parts * heads)
    return weight.reshape(parts, heads, head_dim, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)


# timm pieces bigvit has no counterpart for (name fragment → what it is).
TIMM_UNSUPPORTED = {
    "norm_pre.": "a norm before the blocks (timm pre_norm=True, CLIP-style)",
    "attn.norm.": "a norm inside attention (timm scale_attn_norm)",
    "mlp.norm.": "a norm inside the MLP (timm scale_mlp_norm)",
    "mlp.fc1_g.": "a gated MLP (SwiGLU)",
    "attn_pool.q_norm.": "QK-norm inside the MAP head",
    "attn_pool.pos_embed": "positions inside the MAP head",
    "head_norm.": "a norm before the head",
}


def from_timm(state_dict: dict[str, torch.Tensor], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """A timm VisionTransformer state dict in bigvit's names and layouts (fp32 copies, any dtype in).

    Positions: timm's pos_embed covers the class token and registers (or, with no_embed_class, only
    the patches); bigvit gives the class token a position and registers none, so a register's position
    is added into the register token (the sum is what timm uses). `fc_norm.*` (the norm after pooling)
    becomes `norm.*` and needs cfg.fc_norm. Raises CheckpointError naming any piece bigvit lacks.
    """
    unsupported = sorted(
        {what for name in state_dict for frag, what in TIMM_UNSUPPORTED.items() if frag in name}
    )
    if unsupported:
        raise CheckpointError(f"the timm checkpoint has parts bigvit's ViT does not: {'; '.join(unsupported)}")
    if "fc_norm.weight" in state_dict and not cfg.fc_norm:
        raise CheckpointError(
            "the timm checkpoint norms the pooled feature (fc_norm.*): pass fc_norm=true (and pool=gap)"
        )
    if "norm.weight" in state_dict and cfg.fc_norm:
        raise CheckpointError("the timm checkpoint norms every token (norm.*, no fc_norm.*): drop fc_norm=true")
    converted = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().float()
        if name.startswith("fc_norm."):
            name = "norm." + name.removeprefix("fc_norm.")
        for old, new in TIMM_RENAMES:
            name = name.replace(old, new)
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            tensor = interleave_heads(tensor, 3, cfg.heads)
        elif name.endswith(("map_head.kv.weight", "map_head.kv.bias")):
            tensor = interleave_heads(tensor, 2, cfg.heads)
        converted["reg_tokens" if name == "reg_token" else name] = tensor
    if "pos_embed" in converted:
        _timm_positions(converted, cfg)
    return converted


def _timm_positions(state: dict[str, torch.Tensor], cfg: ViTConfig) -> None:
    """Re-lay timm's pos_embed in place as bigvit's: [class-token row (zeros if it had none), patches]."""
    pos = state["pos_embed"]
    has_cls, registers = "cls_token" in state, state["reg_tokens"].shape[1] if "reg_tokens" in state else 0
    prefix = int(has_cls) + registers
    rows = pos.shape[1]
    # timm's no_embed_class: positions cover the patches only. Prefer the reading that fits cfg's grid.
    embeds_prefix = rows - prefix == cfg.num_patches or (
        rows != cfg.num_patches and prefix and math.isqrt(rows - prefix) ** 2 == rows - prefix
    )
    prefix_pos = pos[:, :prefix] if embeds_prefix else pos.new_zeros(1, prefix, pos.shape[2])
    patches = pos[:, prefix:] if embeds_prefix else pos
    if registers:
        state["reg_tokens"] = state["reg_tokens"] + prefix_pos[:, int(has_cls) :]
    cls_pos = prefix_pos[:, :1] if has_cls else pos.new_zeros(1, 0, pos.shape[2])
    state["pos_embed"] = torch.cat([cls_pos, patches], dim=1)


def load_timm_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A timm state dict from a .safetensors file or a .pth/.bin read as data (weights_only), unwrapping a
    top-level `model` / `state_dict` / `module` dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return import_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors name the refused global; keep the first line
        raise CheckpointError(f"{path} is not a readable torch weights file ({str(error).splitlines()[0]})") from None
    while isinstance(state, dict):
        inner = next((state[k] for k in ("model", "state_dict", "module") if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (nor under model/state_dict/module)")
    return state


# -- big_vision ------------------------------------------------------------------------------

BV_LAYERNORM = {"scale": "weight", "bias": "bias"}


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (no pickled objects allowed)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable .npz file ({error})") from None


def from_big_vision(arrays: dict[str, np.ndarray], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """A big_vision ViT checkpoint (flattened param tree, keys joined by '/', with or without the
    `params/` prefix; per-block `encoderblock_{i}` or scanned `encoderblock` with a leading depth axis)
    in bigvit's names and layouts, fp32. big_vision adds positions to the patches only, so the class
    token's position row is zeros. Keys it does not know are kept under their own names (the exact
    check against the model then names them)."""
    tree = {key.removeprefix("params/"): torch.from_numpy(np.asarray(value, dtype=np.float32)) for key, value in arrays.items()}
    tree = _unscan(tree)
    if "embedding/kernel" in tree and "pos_embedding" not in tree:
        raise CheckpointError(
            "the big_vision checkpoint has no pos_embedding (posemb='sincos2d' or none): bigvit's ViT "
            "learns its positions; only posemb='learn' checkpoints convert"
        )
    out: dict[str, torch.Tensor] = {}
    for key in list(tree):
        if key.startswith("Transformer/encoderblock_"):
            continue
        name = _bv_top_level(key, tree, cfg, out)
        if name is not None:
            out[name] = tree[key]
    for i in sorted({int(m.group(1)) for k in tree if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}):
        prefix = f"Transformer/encoderblock_{i}/"
        block = {k.removeprefix(prefix): v for k, v in tree.items() if k.startswith(prefix)}
        out.update({f"blocks.{i}.{k}": v for k, v in _bv_block(block, cfg).items()})
    if "pos_embed" in out and cfg.class_token:
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    return out


def _unscan(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scanned `Transformer/encoderblock/...` (leading depth axis) → per-block `encoderblock_{i}/...`."""
    scanned = "Transformer/encoderblock/"
    out = {}
    for key, value in tree.items():
        if key.startswith(scanned):
            for i, layer in enumerate(value.unbind(0)):
                out[f"Transformer/encoderblock_{i}/{key.removeprefix(scanned)}"] = layer.contiguous()
        else:
            out[key] = value
    return out


BV_TOP_LEVEL = {
    "embedding/bias": "patch_embed.bias",
    "cls": "cls_token",
    "pos_embedding": "pos_embed",
    "head/bias": "head.bias",
    "Transformer/encoder_norm/scale": "norm.weight",
    "Transformer/encoder_norm/bias": "norm.bias",
    "MAPHead_0/probe": "map_head.probe",
}
BV_ATTENTION = "MultiHeadDotProductAttention_0/"


def _bv_top_level(key: str, tree: dict, cfg: ViTConfig, out: dict) -> str | None:
    """The bigvit name of a non-block big_vision key, or None where the tensor went into `out` already
    (re-laid-out kernels, the MAP head's fused key/value)."""
    value = tree[key]
    if key == "embedding/kernel":  # HWIO → OIHW
        out["patch_embed.weight"] = value.permute(3, 2, 0, 1).contiguous()
        return None
    if key == "head/kernel":
        out["head.weight"] = value.T.contiguous()
        return None
    if key in BV_TOP_LEVEL:
        return BV_TOP_LEVEL[key]
    if key.startswith("MAPHead_0/" + BV_ATTENTION):
        if key.endswith("query/kernel"):
            prefix = "MAPHead_0/" + BV_ATTENTION
            parts = {k.removeprefix(prefix): v for k, v in tree.items() if k.startswith(prefix)}
            out.update({f"map_head.{k}": v for k, v in _bv_attention(parts, cfg, fused=False).items()})
        return None
    if key.startswith("MAPHead_0/"):
        name = "map_head." + _bv_norm_or_mlp(key.removeprefix("MAPHead_0/"), {"LayerNorm_0": "norm"})
        if key.endswith("/kernel") and ".mlp." in name:
            out[name] = value.T.contiguous()
            return None
        return name
    return key


def _bv_norm_or_mlp(key: str, norms: dict[str, str]) -> str:
    """`LayerNorm_k/{scale,bias}` (named by `norms`) or `MlpBlock_0/Dense_{0,1}/bias` in bigvit's names
    (kernels are transposed by the caller); other keys pass through."""
    module, _, leaf = key.rpartition("/")
    if module in norms:
        return f"{norms[module]}.{BV_LAYERNORM.get(leaf, leaf)}"
    mlp = {"MlpBlock_0/Dense_0": "mlp.fc1", "MlpBlock_0/Dense_1": "mlp.fc2"}
    if module in mlp:
        return f"{mlp[module]}.{'weight' if leaf == 'kernel' else leaf}"
    return key


def _bv_attention(parts: dict[str, torch.Tensor], cfg: ViTConfig, fused: bool = True) -> dict[str, torch.Tensor]:
    """Flax attention {query,key,value,out}/{kernel,bias} → bigvit's head-interleaved qkv (or, for the
    MAP head, separate q and fused kv) and proj. q/k/v kernels are (W, heads, head_dim), biases
    (heads, head_dim); the out kernel is (heads, head_dim, W)."""
    def rows(name: str, leaf: str) -> torch.Tensor | None:  # (heads, head_dim, ...) output rows
        value = parts.get(f"{name}/{leaf}")
        if value is None:
            return None
        return value.permute(1, 2, 0) if leaf == "kernel" else value

    out = {}
    for leaf, suffix in (("kernel", "weight"), ("bias", "bias")):
        q, k, v = (rows(name, leaf) for name in ("query", "key", "value"))
        if q is None:
            continue
        if fused:
            out[f"attn.qkv.{suffix}"] = torch.stack([q, k, v], dim=1).reshape(3 * cfg.width, *q.shape[2:])
        else:
            out[f"q.{suffix}"] = q.reshape(cfg.width, *q.shape[2:])
            out[f"kv.{suffix}"] = torch.stack([k, v], dim=1).reshape(2 * cfg.width, *k.shape[2:])
    prefix = "attn.proj" if fused else "proj"
    if "out/kernel" in parts:
        kernel = parts["out/kernel"]
        out[f"{prefix}.weight"] = kernel.reshape(-1, kernel.shape[-1]).T.contiguous()
    if "out/bias" in parts:
        out[f"{prefix}.bias"] = parts["out/bias"]
    return {k: v.contiguous() for k, v in out.items()}


def _bv_block(block: dict[str, torch.Tensor], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """One `encoderblock_{i}` subtree in bigvit's block names."""
    attention = {k.removeprefix(BV_ATTENTION): v for k, v in block.items() if k.startswith(BV_ATTENTION)}
    out = {}
    for key, value in block.items():
        if key.startswith(BV_ATTENTION):
            continue
        name = _bv_norm_or_mlp(key, {"LayerNorm_0": "norm1", "LayerNorm_1": "norm2"})
        out[name] = value.T.contiguous() if key.endswith("/kernel") and name.startswith("mlp.") else value
    out.update(_bv_attention(attention, cfg))
    return out


# -- checks ----------------------------------------------------------------------------------


def fit_problems(
    shapes: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    kept: set[str] = frozenset(),
    mismatch: str = "{key} {got} (model: {want})",
) -> list[str]:
    """What keeps tensors of `shapes` from loading into a model whose parameters have `expected` shapes:
    "missing: ...", "unexpected: ...", "shape mismatch: ..." (each `mismatch`-formatted), every key named;
    [] when they fit. Keys in `kept` (left at the model's own init) may be missing."""
    missing = sorted(set(expected) - set(shapes) - set(kept))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [
        mismatch.format(key=key, got=tuple(shapes[key]), want=tuple(expected[key]))
        for key in sorted(set(expected) & set(shapes))
        if tuple(shapes[key]) != tuple(expected[key])
    ]
    return [
        f"{label}: {', '.join(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    ]


def check_state_dict(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError unless `state_dict` has exactly the keys and shapes of `expected` (a model's
    state dict, meta tensors are fine), naming every missing key, unexpected key and shape mismatch."""
    problems = fit_problems(
        {k: tuple(v.shape) for k, v in state_dict.items()}, {k: tuple(v.shape) for k, v in expected.items()}
    )
    if problems:
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(problems)}")


def export_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None
) -> None:
    """Write full (unsharded, contiguous, CPU) tensors to a .safetensors file."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def import_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (data only: the format holds no code); a CheckpointError
    names a file that is not one."""
    with _readable(path):
        return load_file(str(path))


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a .safetensors file (bigvit-export writes `model`, the config as JSON, and `step`)."""
    with _readable(path), safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


@contextlib.contextmanager
def _readable(path: str | Path):
    try:
        yield
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error})") from None
