"""The token-count options of the model: sequence padding (what SP/CP layouts add), patch dropout,
windowed attention and run-time position resampling, each against the plain model and torch's FLOP
counter. The layouts themselves are proven in test_tensor_parallel.py and test_context_parallel.py."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bigvit
from bigvit import ConfigError
from bigvit.models.attention import attention, window_attention
from bigvit.models.resample import resample_pos_embed
from bigvit.scaling.flops import block_windows, forward_flops, forward_flops_breakdown, train_flops
from tests.helpers import VIT_22B_STYLE

SMALL = dict(image_size=32, patch_size=8, width=48, depth=2, mlp_dim=96, heads=4, num_classes=10)
OPTIONS = {
    "cls": {},
    "registers": dict(num_registers=2),
    "gap": dict(pool="gap"),
    "map": dict(class_token=False, pool="map"),
    "vit_22b_style": VIT_22B_STYLE,
    "windowed": dict(class_token=False, pool="gap", window_size=3, global_every=2),
}


def built(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    model = bigvit.build_model({**SMALL, **options}, attn_impl="math")
    for param in model.parameters():  # every parameter non-trivial (the head is zero-initialized)
        param.data.normal_(0, 0.2)
    return model


def outputs_and_grads(model, images) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    out = model(images)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("multiple", [3, 5, 7])  # divides none of the 16, 17 or 19 token counts
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_padding_changes_no_output_or_gradient(options, multiple):
    model = built(**options)
    images = torch.randn(3, 3, 32, 32)
    expected, expected_grads = outputs_and_grads(model, images)
    model.token_multiple = multiple
    got, got_grads = outputs_and_grads(model, images)
    assert model.cfg.num_tokens % multiple  # the sequence really is padded
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_attention_ignores_padding_as_keys_and_zeroes_its_outputs():
    q, k, v = (torch.randn(2, 7, 3, 8) for _ in range(3))
    out = attention(q, k, v, "sdpa", valid_tokens=5)
    torch.testing.assert_close(out[:, :5], attention(q[:, :5], k[:, :5], v[:, :5], "math"))
    assert out[:, 5:].abs().max() == 0


def test_patch_dropout_keeps_a_random_subset_while_training_and_all_tokens_at_eval():
    model = built(patch_dropout=0.5, pool="gap")
    plain = built(pool="gap")  # the same weights without patch dropout
    images = torch.randn(4, 3, 32, 32)
    assert model.cfg.kept_patches == 8 and model.cfg.train_tokens == 9
    model.train()
    assert model.forward_features(images).shape == (4, 9, 48)
    # Each image draws its own subset: the kept patch tokens are rows of its embedded patches.
    patches = model.patch_embed(images).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
    kept = model.patch_drop(patches)
    chosen = [[int((p - row).abs().sum(-1).argmin()) for row in k] for p, k in zip(patches, kept, strict=True)]
    assert all(c == sorted(c) and len(set(c)) == 8 for c in chosen)  # distinct, in grid order
    assert len({tuple(c) for c in chosen}) > 1
    model.eval()
    torch.testing.assert_close(model(images), plain.eval()(images), rtol=0, atol=0)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(patch_dropout=1.0), "model.patch_dropout=1.0 must be in [0, 1)"),
        (dict(window_size=2), "model.window_size=2 windows the patch grid, which class/register tokens"),
        (dict(window_size=2, class_token=False, pool="gap", patch_dropout=0.5), "set one of them to 0"),
        (dict(window_size=-1), "model.window_size=-1 and model.global_every=0 must be >= 0"),
    ],
)
def test_token_options_that_cannot_compose_are_named(options, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        bigvit.model_config({**SMALL, **options})


def test_window_covering_the_grid_is_global_attention_and_windows_are_independent():
    q, k, v = (torch.randn(2, 16, 3, 8) for _ in range(3))
    torch.testing.assert_close(window_attention(q, k, v, 4, "math"), attention(q, k, v, "math"))
    out = window_attention(q, k, v, 2, "math")
    for window in ([0, 1, 4, 5], [10, 11, 14, 15]):
        ref = attention(q[:, window], k[:, window], v[:, window], "math")
        torch.testing.assert_close(out[:, window], ref)
    # A 4×4 grid in windows of 3 pads to 6×6: the corner window holds one real token and zero keys.
    padded = window_attention(q, k, v, 3, "math")
    corner = attention(q[:, [15]], torch.cat([k[:, [15]], torch.zeros(2, 8, 3, 8)], 1),
                       torch.cat([v[:, [15]], torch.zeros(2, 8, 3, 8)], 1), "math")
    torch.testing.assert_close(padded[:, [15]], corner)


def test_global_every_makes_every_kth_block_global():
    cfg = bigvit.model_config({**SMALL, "depth": 8, "class_token": False, "pool": "gap", "window_size": 2,
                               "global_every": 4})
    assert [cfg.block_window(i) for i in range(8)] == [2, 2, 2, 0, 2, 2, 2, 0]
    model = bigvit.build_model(cfg, device="meta")
    assert [block.attn.kernel.window for block in model.blocks] == [2, 2, 2, 0, 2, 2, 2, 0]
    assert block_windows(cfg) == {2: 6, 0: 2}  # the closed form scaling/flops.py counts with


def counted(model, images, train: bool = False) -> int:
    with FlopCounterMode(display=False) as counter:
        out = model(images)
        if train:
            out.sum().backward()
    return counter.get_total_flops()


# FlopCounterMode counts SDPA as 0 on CPU; the math kernel's matmuls it counts (see test_flops.py).
@pytest.mark.parametrize(
    "size,window",
    [(224, 14), (448, 14), (1024, 14), (64, 3)],
    ids=["224-w14", "448-w14", "1024-w14-padded-grid", "64-w3-padded-grid"],
)
def test_windowed_flops_match_flop_counter(size, window):
    options = dict(class_token=False, pool="gap", window_size=window, global_every=4, attn_impl="math")
    cfg = bigvit.model_config("vit_ti16", image_size=size, depth=4, **options)
    model = bigvit.build_model(cfg).eval().requires_grad_(False)
    assert forward_flops(cfg) == counted(model, torch.randn(1, 3, size, size))
    plain = bigvit.model_config("vit_ti16", image_size=size, depth=4, class_token=False, pool="gap")
    if size >= 448:  # where windows pay off (a small grid padded to whole windows costs more)
        assert forward_flops(cfg) < forward_flops(plain)


def test_patch_dropout_and_padding_flops_match_flop_counter():
    model = bigvit.build_model({**SMALL, "patch_dropout": 0.5, "pool": "map", "attn_impl": "math"})
    images = torch.randn(2, 3, 32, 32)
    # The images need no gradient: autograd skips the patch conv's input gradient (one forward of it).
    skipped = 2 * forward_flops_breakdown(model.cfg)["patch_embed"]
    assert train_flops(model.cfg, batch=2) - skipped == counted(model.train(), images, train=True)
    assert train_flops(model.cfg) < 0.6 * train_flops(bigvit.model_config({**SMALL, "pool": "map"}))
    # Padding runs through the linear layers, not attention: the executed FLOPs count it so.
    model.token_multiple = 4  # 8 kept + class = 9 tokens → 12
    assert train_flops(model.cfg, batch=2, sequence_multiple=4) - skipped == counted(model, images, train=True)
    model.eval()  # evaluation: all 17 tokens → 20
    executed = 2 * sum(forward_flops_breakdown(model.cfg, sequence_multiple=4).values())
    assert executed == counted(model.requires_grad_(False), images)


def test_positions_are_resampled_at_run_time_for_another_image_size():
    model = built(pool="gap").eval()
    assert model.positions(4) is model.pos_embed
    at_48 = bigvit.build_model({**SMALL, "pool": "gap", "image_size": 48}, attn_impl="math").eval()
    state = model.state_dict()
    state["pos_embed"] = resample_pos_embed(model.pos_embed.detach(), 6)
    at_48.load_state_dict(state)
    images = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(model(images), at_48(images), rtol=0, atol=0)
    assert resample_pos_embed(model.pos_embed, 6).shape == (1, 37, 48)
