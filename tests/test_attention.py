"""Attention backends agree with each other, and each is handed the (B, N, H, D) layout it expects."""

from __future__ import annotations

import math

import pytest
import torch

import bigvit.models.attention as attention_module
from bigvit import build_model
from bigvit.errors import ConfigError
from bigvit.models.attention import attention, resolve_impl

TINY = dict(depth=2, width=48, heads=3, mlp_dim=96, image_size=32, patch_size=8, num_classes=10)
# (batch, q tokens, kv tokens, heads, head_dim); 197 / 257 are ViT-B/16 at 224 px and ViT-L/14 at 224 px
# (+ class token), 1 query token is the MAP head's probe.
SHAPES = [
    (1, 197, 197, 3, 64),
    (2, 257, 257, 2, 32),
    (3, 50, 50, 4, 64),
    (2, 197, 197, 6, 32),
    (3, 1, 257, 2, 64),
]


def random_qkv(batch, q_tokens, kv_tokens, heads, head_dim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_tokens, heads, head_dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_tokens, heads, head_dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_tokens, heads, head_dim, generator=g, dtype=dtype)
    return q, k, v


def bnhd_reference(q, k, v):
    """Softmax attention written directly in the (B, N, H, D) layout, independent of the backends."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q.float(), k.float()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bmhd->bnhd", scores.softmax(dim=-1), v.float()).to(q.dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sdpa_matches_math_in_fp32(shape):
    q, k, v = random_qkv(*shape, seed=sum(shape))
    sdpa = attention(q, k, v, impl="sdpa")
    reference = attention(q, k, v, impl="math")
    assert sdpa.shape == reference.shape == q.shape
    assert (sdpa - reference).abs().max().item() < 1e-5
    assert (reference - bnhd_reference(q, k, v)).abs().max().item() < 1e-5


def test_math_attention_keeps_the_input_dtype():
    q, k, v = random_qkv(2, 16, 16, 2, 32, dtype=torch.bfloat16)
    assert attention(q, k, v, impl="math").dtype == torch.bfloat16


def test_auto_resolves_to_sdpa_on_cpu():
    q = torch.zeros(1, 4, 2, 8)
    assert resolve_impl("auto", q) == "sdpa"
    assert resolve_impl("math", q) == "math"


def test_unknown_impl_raises_naming_it():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"attn_impl='flash'.*\['auto', 'flash_attn', 'sdpa', 'math'\]"):
        resolve_impl("flash", q)


def test_flash_attn_on_cpu_raises_a_clear_error():
    """Without the package: the extra to install; with it (a GPU machine), the inputs it needs."""
    q, k, v = random_qkv(1, 4, 4, 2, 8)
    expected = r"model\.attn_impl=flash_attn needs (the flash-attn package: pip install 'bigvit\[gpu\]'|CUDA .* device=cpu)"
    with pytest.raises(ConfigError, match=expected):
        attention(q, k, v, impl="flash_attn")


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]], ids=["self", "probe"])
def test_flash_attn_path_hands_over_bnhd_tensors(monkeypatch, shape):
    """Checks the layout handed to flash-attn, using a stand-in for `flash_attn_func`; the CUDA kernel
    itself is not run here."""
    received = {}

    def stand_in(q, k, v):
        received.update(q=q, k=k, v=v)
        return bnhd_reference(q, k, v)

    # _flash_attn_func is functools.cache'd: replace the module attribute, not its cached result.
    monkeypatch.setattr(attention_module, "_flash_attn_func", lambda: stand_in)
    monkeypatch.setattr(attention_module, "flash_attn_usable", lambda q: True)
    batch, q_tokens, kv_tokens, heads, head_dim = shape
    q, k, v = random_qkv(*shape, seed=1)

    assert resolve_impl("auto", q) == "flash_attn"
    out = attention(q, k, v, impl="flash_attn")
    assert received["q"].shape == (batch, q_tokens, heads, head_dim)
    assert received["k"].shape == received["v"].shape == (batch, kv_tokens, heads, head_dim)
    assert all(torch.equal(received[n], t) for n, t in zip("qkv", (q, k, v), strict=True))
    assert out.shape == q.shape
    assert (out - attention(q, k, v, impl="sdpa")).abs().max().item() < 1e-5


def randomized_vit(attn_impl: str, **overrides) -> torch.nn.Module:
    """A tiny ViT with every parameter drawn from one seed, so zero-initialized ones take part too."""
    model = build_model("vit_ti16", **{**TINY, **overrides, "attn_impl": attn_impl}).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize(
    "overrides",
    [{}, {"pool": "map", "num_registers": 2}, {"qk_norm": True, "layer_scale": 0.5, "parallel_block": True}],
    ids=["cls", "map", "qk_norm_parallel"],
)
def test_vit_logits_match_between_sdpa_and_math(overrides):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sdpa = randomized_vit("sdpa", **overrides)(images)
        reference = randomized_vit("math", **overrides)(images)
    assert sdpa.shape == (3, 10)
    assert (sdpa - reference).abs().max().item() < 1e-5
