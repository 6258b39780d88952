"""Parameter groups (layer-wise LR decay, weight decay) and LR schedules, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from bigvit import build_model
from bigvit.optim import SCHEDULES, apply_lr, clean_name, decay_start, lr_factor, param_groups

TINY = dict(depth=3, width=48, heads=3, mlp_dim=96, image_size=32, patch_size=8, num_classes=10)
BASE_LR = 1e-3


def exact(value: float):
    """Equal up to float rounding of a differently ordered product."""
    return pytest.approx(value, rel=1e-12, abs=0.0)


def tiny_vit(**overrides) -> nn.Module:
    return build_model("vit_ti16", **{**TINY, **overrides})


def group_of(groups: list[dict], name: str) -> dict:
    (group,) = [g for g in groups if name in g["param_names"]]
    return group


def lr_of(optimizer: torch.optim.Optimizer, name: str) -> float:
    return group_of(optimizer.param_groups, name)["lr"]


# ---------------------------------------------------------------- layer-wise LR decay


def test_layer_decay_scales_lr_by_depth_under_cosine_warmup():
    # depth 3 → embeddings are layer 0, blocks.i layer i+1, final norm / head layer 4.
    optimizer = torch.optim.AdamW(param_groups(tiny_vit(), weight_decay=0.05, layer_decay=0.5), lr=BASE_LR)
    scales = {
        "pos_embed": 0.5**4,
        "patch_embed.weight": 0.5**4,
        "cls_token": 0.5**4,
        "blocks.0.attn.qkv.weight": 0.5**3,
        "blocks.1.norm1.weight": 0.5**2,
        "blocks.2.mlp.fc2.weight": 0.5**1,
        "norm.weight": 1.0,
        "head.weight": 1.0,
    }
    schedule = dict(name="cosine", warmup_steps=10, total_steps=110)
    factors = {
        0: 0.1,  # first warm-up step: (0 + 1) / 10
        4: 0.5,  # (4 + 1) / 10
        9: 1.0,  # warm-up ends at its last step
        35: 0.5 * (1 + math.cos(math.pi * 0.25)),  # a quarter of the way through the cosine
        60: 0.5,  # half-way: cos(pi / 2) = 0
        110: 0.0,  # at and after total_steps: min_factor
    }
    for step, factor in factors.items():
        apply_lr(optimizer, BASE_LR, lr_factor(step, **schedule))
        for name, scale in scales.items():
            assert lr_of(optimizer, name) == exact(BASE_LR * scale * factor), (step, name)


def test_layer_decay_one_gives_every_group_the_base_lr():
    optimizer = torch.optim.AdamW(param_groups(tiny_vit(), weight_decay=0.05), lr=BASE_LR)
    assert apply_lr(optimizer, BASE_LR, 0.25) == BASE_LR * 0.25
    assert {g["lr"] for g in optimizer.param_groups} == {BASE_LR * 0.25}


def test_apply_lr_treats_groups_without_lr_scale_as_scale_one():
    optimizer = torch.optim.AdamW(tiny_vit().parameters(), lr=BASE_LR)
    apply_lr(optimizer, 2e-3, 0.5)
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_groups_are_named_by_layer_and_decay_and_ordered_by_depth():
    groups = param_groups(tiny_vit(), weight_decay=0.05, layer_decay=0.5)
    names = [g["name"] for g in groups]
    expected = [f"layer{i}_{kind}" for i in range(5) for kind in ("no_decay", "decay")]
    assert names == expected
    assert [g["lr_scale"] for g in groups] == [0.5 ** (4 - i) for i in range(5) for _ in range(2)]


# ---------------------------------------------------------------- weight decay


def test_weight_decay_skips_biases_norms_gammas_positions_tokens_and_probe():
    model = tiny_vit(pool="map", num_registers=2, layer_scale=0.1, qk_norm=True)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    no_decay = [
        "patch_embed.bias",
        "pos_embed",
        "cls_token",
        "reg_tokens",
        "blocks.0.norm1.weight",
        "blocks.0.norm1.bias",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.q_norm.weight",
        "blocks.0.attn.k_norm.bias",
        "blocks.1.ls1.gamma",
        "blocks.2.ls2.gamma",
        "blocks.2.mlp.fc2.bias",
        "norm.weight",
        "map_head.probe",
        "map_head.norm.weight",
        "map_head.kv.bias",
        "head.bias",
    ]
    decay = [
        "patch_embed.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.1.attn.proj.weight",
        "blocks.2.mlp.fc1.weight",
        "map_head.q.weight",
        "map_head.kv.weight",
        "map_head.mlp.fc2.weight",
        "head.weight",
    ]
    for name in no_decay:
        assert group_of(groups, name)["weight_decay"] == 0.0, name
    for name in decay:
        assert group_of(groups, name)["weight_decay"] == 0.05, name
    assert group_of(groups, "map_head.probe")["lr_scale"] == 1.0  # after the blocks: layer L+1


def test_no_decay_patterns_are_configurable():
    groups = param_groups(tiny_vit(), weight_decay=0.1, no_decay=("head.*", "blocks.1.*"))
    assert group_of(groups, "head.weight")["weight_decay"] == 0.0
    assert group_of(groups, "blocks.1.mlp.fc1.weight")["weight_decay"] == 0.0
    assert group_of(groups, "pos_embed")["weight_decay"] == 0.1  # no longer in the pattern list
    assert group_of(groups, "blocks.0.mlp.fc1.weight")["weight_decay"] == 0.1


# ---------------------------------------------------------------- coverage and wrappers


def test_every_trainable_parameter_is_in_exactly_one_group():
    model = tiny_vit(pool="map", num_registers=2, layer_scale=0.1, qk_norm=True)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    torch.optim.AdamW(groups, lr=BASE_LR)  # AdamW accepts the groups as they are


def test_frozen_parameters_are_left_out():
    model = tiny_vit()
    model.patch_embed.requires_grad_(False)
    names = [n for g in param_groups(model, weight_decay=0.05) for n in g["param_names"]]
    assert "patch_embed.weight" not in names and "patch_embed.bias" not in names
    assert "pos_embed" in names


def test_clean_name_strips_wrapper_segments():
    raw = "module._orig_mod.blocks.7._checkpoint_wrapped_module.attn.qkv.weight"
    assert clean_name(raw) == "blocks.7.attn.qkv.weight"
    assert clean_name("map_head.mlp.fc1.bias") == "map_head.mlp.fc1.bias"


def test_wrapped_blocks_and_compiled_model_keep_their_layer():
    model = tiny_vit()
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)
    wrapped = torch.compile(model)  # adds `_orig_mod.`; compiling happens only on the first call
    raw = [n for n, _ in wrapped.named_parameters()]
    assert "_orig_mod.blocks.0._checkpoint_wrapped_module.attn.qkv.weight" in raw
    groups = param_groups(wrapped, weight_decay=0.05, layer_decay=0.5)
    assert group_of(groups, "blocks.0.attn.qkv.weight")["lr_scale"] == 0.5**3
    assert group_of(groups, "blocks.2.mlp.fc2.weight")["lr_scale"] == 0.5**1
    assert group_of(groups, "blocks.2.mlp.fc2.bias")["weight_decay"] == 0.0
    assert group_of(groups, "pos_embed")["lr_scale"] == 0.5**4
    assert group_of(groups, "head.weight")["lr_scale"] == 1.0


def test_depth_is_counted_from_parameter_names_on_meta_device():
    groups = param_groups(build_model("vit_b16", device="meta"), weight_decay=0.05, layer_decay=0.9)
    assert group_of(groups, "pos_embed")["lr_scale"] == 0.9**13  # 12 blocks
    assert group_of(groups, "blocks.11.mlp.fc2.weight")["lr_scale"] == 0.9
    assert group_of(groups, "head.weight")["lr_scale"] == 1.0


def test_bad_decay_values_name_the_key():
    with pytest.raises(ValueError, match=r"optim\.layer_decay=0"):
        param_groups(tiny_vit(), weight_decay=0.05, layer_decay=0.0)
    with pytest.raises(ValueError, match=r"optim\.weight_decay=-0\.1"):
        param_groups(tiny_vit(), weight_decay=-0.1)


# ---------------------------------------------------------------- schedules


def factors(name: str, steps, **kwargs) -> list[float]:
    return [lr_factor(s, name=name, **kwargs) for s in steps]


def test_cosine_warms_up_then_decays_to_min_factor_and_holds():
    kw = dict(warmup_steps=10, total_steps=110, min_factor=0.1)
    got = factors("cosine", [0, 9, 10, 35, 60, 85, 110, 1000], **kw)
    half = lambda progress: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    expected = [0.1, 1.0, 1.0, half(0.25), 0.55, half(0.75), 0.1, 0.1]
    assert got == [exact(e) for e in expected]


def test_linear_warms_up_then_decays_linearly_to_min_factor():
    kw = dict(warmup_steps=4, total_steps=104, min_factor=0.2)
    got = factors("linear", [0, 1, 3, 4, 29, 54, 104, 200], **kw)
    expected = [0.25, 0.5, 1.0, 1.0, 0.2 + 0.8 * 0.75, 0.6, 0.2, 0.2]
    assert got == [exact(e) for e in expected]


def test_constant_warms_up_then_stays_at_one():
    got = factors("constant", [0, 1, 2, 3, 50, 99, 500], warmup_steps=4, total_steps=100, min_factor=0.5)
    assert got == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_rsqrt_decays_as_inverse_square_root_of_steps_over_warmup():
    got = factors("rsqrt", [0, 99, 100, 399, 899, 9999], warmup_steps=100, total_steps=10_000)
    expected = [0.01, 1.0, math.sqrt(100 / 101), 0.5, 1 / 3, 0.1]
    assert got == [exact(e) for e in expected]
    # Without warm-up the first step runs at the full LR.
    assert factors("rsqrt", [0, 3, 15], warmup_steps=0, total_steps=100) == [1.0, 0.5, 0.25]


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_stays_in_unit_interval_and_starts_above_zero(name):
    got = factors(name, range(0, 300, 7), warmup_steps=20, total_steps=200)
    assert got[0] > 0.0
    assert all(0.0 <= f <= 1.0 for f in got)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_decaying_schedules_without_warmup_start_at_one(name):
    assert lr_factor(0, name=name, warmup_steps=0, total_steps=50) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="cosin", warmup_steps=1, total_steps=10), r"schedule\.name='cosin' is not one of \["),
        (dict(name="cosine", warmup_steps=20, total_steps=10), r"schedule\.warmup_steps=20"),
        (dict(name="cosine", warmup_steps=-1, total_steps=10), r"schedule\.warmup_steps=-1"),
        (dict(name="cosine", warmup_steps=0, total_steps=0), r"schedule\.total_steps=0"),
        (dict(name="linear", warmup_steps=0, total_steps=10, min_factor=1.5), r"schedule\.min_factor=1\.5"),
    ],
)
def test_bad_schedule_values_raise_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lr_factor(0, **kwargs)


def test_negative_step_raises():
    with pytest.raises(ValueError, match=r"step=-1"):
        lr_factor(-1, name="cosine", warmup_steps=0, total_steps=10)


def test_wsd_warms_up_holds_then_decays_over_the_last_fraction():
    kw = dict(warmup_steps=10, total_steps=100, decay_fraction=0.2, min_factor=0.0)
    assert decay_start(100, 0.2) == 80
    linear = factors("wsd", [0, 9, 10, 79, 80, 85, 90, 99, 100, 500], decay_shape="linear", **kw)
    assert linear == [exact(e) for e in [0.1, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.05, 0.0, 0.0]]
    sqrt = factors("wsd", [79, 80, 85, 90, 99], decay_shape="sqrt", **kw)
    assert sqrt == [exact(e) for e in [1.0, 1.0, 1 - math.sqrt(0.25), 1 - math.sqrt(0.5), 1 - math.sqrt(0.95)]]
    floor = factors("wsd", [90, 100], decay_shape="linear", **{**kw, "min_factor": 0.2})
    assert floor == [exact(0.2 + 0.8 * 0.5), 0.2]


def test_a_shorter_wsd_run_is_a_prefix_of_a_longer_one_until_its_cooldown():
    """What WSD cooldown branches rely on: before decay_start(T) the LR of a T-step run equals the
    LR of any longer run, so the longer run's checkpoint at decay_start(T) starts the T-step cooldown."""
    for short in (30, 60, 150):
        start = decay_start(short, 0.2)
        kw = dict(warmup_steps=10, decay_fraction=0.2)
        assert factors("wsd", range(start + 1), total_steps=short, **kw) == factors(
            "wsd", range(start + 1), total_steps=300, **kw
        )
        assert lr_factor(start + 1, name="wsd", total_steps=short, **kw) < 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(decay_shape="cos"), r"schedule\.decay_shape='cos' is not one of \['linear', 'sqrt'\]"),
        (dict(decay_fraction=0.0), r"schedule\.decay_fraction=0\.0 must be in \(0, 1\]"),
        (dict(decay_fraction=0.95), r"starts the cooldown at step 5 of 100, inside the warm-up"),
    ],
)
def test_bad_wsd_values_raise_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lr_factor(0, name="wsd", warmup_steps=10, total_steps=100, **kwargs)
