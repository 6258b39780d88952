"""The model zoo: exact parameter counts against timm, identical outputs with timm's weights, the public API."""

import pytest
import torch

import bigvit
from bigvit.models.convert import export_safetensors, from_timm, import_safetensors
from bigvit.scaling.flops import param_count
from tests.timm_shim import import_timm

timm = import_timm()
needs_timm = pytest.mark.skipif(timm is None, reason="timm (dev extra, installed by `make venv`) is missing")

# bigvit zoo name → timm model of the same architecture (timm's default num_classes varies; we pass ours).
TIMM_EQUIVALENTS = {
    "vit_ti16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
    "vit_b32": "vit_base_patch32_224",
    "vit_l16": "vit_large_patch16_224",
    "vit_h14": "vit_huge_patch14_224",
    "vit_so400m14": "vit_so400m_patch14_siglip_224",
    "vit_g14": "vit_giant_patch14_224",
    "vit_G14": "vit_gigantic_patch14_224",
}


def test_vit_b16_has_timms_parameter_count():
    model = bigvit.build_model("vit_b16", num_classes=1000, device="meta")
    assert bigvit.count_params(model) == 86_567_656


@pytest.mark.parametrize("name", bigvit.list_models())
def test_every_zoo_model_builds_on_meta_with_closed_form_count(name):
    model = bigvit.build_model(name, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert bigvit.count_params(model) == param_count(model.cfg)


def test_zoo_covers_the_documented_sizes():
    expected = {
        "vit_ti16",
        "vit_s16",
        "vit_b16",
        "vit_b32",
        "vit_l16",
        "vit_h14",
        "vit_so400m14",
        "vit_g14",
        "vit_G14",
        "vit_e14",
        "vit_22b",
    }
    assert expected <= set(bigvit.list_models())
    big = bigvit.build_model("vit_22b", device="meta")
    assert 21.7e9 < bigvit.count_params(big) < 22.3e9  # ViT-22B: 21.7B encoder + MAP head and classifier


@needs_timm
@pytest.mark.parametrize("name", sorted(TIMM_EQUIVALENTS))
@pytest.mark.parametrize("num_classes", [0, 1000])
def test_parameter_count_equals_timm(name, num_classes):
    with torch.device("meta"):
        reference = timm.create_model(TIMM_EQUIVALENTS[name], pretrained=False, num_classes=num_classes)
    ours = bigvit.build_model(name, num_classes=num_classes, device="meta")
    assert bigvit.count_params(ours) == sum(p.numel() for p in reference.parameters())


@needs_timm
@pytest.mark.parametrize(
    "timm_name,overrides",
    [
        ("vit_tiny_patch16_224", {}),
        ("vit_so400m_patch14_siglip_224", {"width": 96, "depth": 2, "heads": 4, "mlp_dim": 192}),
    ],
)
def test_timm_weights_give_identical_logits(timm_name, overrides):
    small = {"img_size": 32, "patch_size": 8, "num_classes": 10}
    timm_kwargs = {
        **small,
        **({"embed_dim": 96, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0} if overrides else {}),
    }
    reference = timm.create_model(timm_name, pretrained=False, **timm_kwargs).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    zoo = {"vit_tiny_patch16_224": "vit_ti16", "vit_so400m_patch14_siglip_224": "vit_so400m14"}[timm_name]
    ours = bigvit.build_model(zoo, image_size=32, patch_size=8, num_classes=10, **overrides).eval()
    ours.load_state_dict(from_timm(reference.state_dict(), ours.cfg), strict=True)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), rtol=1e-5, atol=1e-6)


def test_safetensors_export_round_trips(tmp_path):
    model = bigvit.build_model("vit_ti16", depth=2, image_size=32, patch_size=8, num_classes=10)
    export_safetensors(model.state_dict(), tmp_path / "model.safetensors", {"name": "vit_ti16"})
    loaded = import_safetensors(tmp_path / "model.safetensors")
    assert loaded.keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded[key], tensor)


def test_overrides_use_config_key_names():
    model = bigvit.build_model("vit_b16", num_classes=0, depth=3, device="meta")
    assert model.cfg.depth == 3 and len(model.blocks) == 3
    assert isinstance(model.head, torch.nn.Identity)


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(bigvit.ConfigError, match=r"unknown model 'vit_foo'; available models: .*vit_b16"):
        bigvit.build_model("vit_foo")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"heads": 7}, r"model.heads=7 does not divide model.width=192"),
        ({"pool": "max"}, r"model.pool='max' is not one of \['cls', 'gap', 'map'\]"),
        ({"patch_size": 15}, r"model.patch_size=15 does not divide model.image_size=224"),
        ({"widht": 3}, r"unknown model key\(s\) \['widht'\]"),
    ],
)
def test_bad_model_values_are_named(overrides, message):
    with pytest.raises(bigvit.ConfigError, match=message):
        bigvit.build_model("vit_ti16", device="meta", **overrides)


@pytest.mark.parametrize(
    "variant",
    [
        {"pool": "gap", "class_token": False},
        {"pool": "map", "class_token": False, "num_registers": 2},
        {"parallel_block": True, "qk_norm": True, "qkv_bias": False, "norm_bias": False, "layer_scale": 0.1},
        {"drop_path": 0.2},
    ],
)
def test_variants_train_a_step(variant):
    model = bigvit.build_model(
        "vit_ti16",
        depth=2,
        width=48,
        heads=3,
        mlp_dim=96,
        image_size=32,
        patch_size=8,
        num_classes=5,
        **variant,
    )
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
