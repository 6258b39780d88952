"""Fine-tuning from weights: a converted timm checkpoint trained on 2 FSDP2 ranks at a new resolution."""

import json

import pytest
import torch

import bigvit
from bigvit.config import validate
from bigvit.errors import CheckpointError, ConfigError
from bigvit.models.convert import export_safetensors, from_timm
from bigvit.models.resample import adapt_state_dict
from bigvit.optim import lr_factor
from bigvit.train.export import load_full_state
from bigvit.train.init_weights import fit_weights
from tests.helpers import TINY, compose_train, run_train
from tests.timm_shim import import_timm

timm = import_timm()
needs_timm = pytest.mark.skipif(timm is None, reason="timm (dev extra, installed by `make venv`) is missing")

TINY_KEYS = dict(depth=2, width=48, heads=3, mlp_dim=96, patch_size=4)


def timm_weights(path, num_classes: int):
    """A random-init timm ViT (16 px, patch 4) converted to bigvit names, written with its `model` config."""
    reference = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=48,
        depth=2,
        num_heads=3,
        mlp_ratio=2.0,
        num_classes=num_classes,
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    cfg = bigvit.model_config("vit_ti16", image_size=16, num_classes=num_classes, **TINY_KEYS)
    state = from_timm(reference.state_dict(), cfg)
    export_safetensors(state, path, {"model": json.dumps(cfg.to_dict())})
    return state


def layer_of(name: str, depth: int) -> int:
    if name.split(".")[0] in ("patch_embed", "cls_token", "pos_embed"):
        return 0
    return int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1


def moved_by_lr(before: torch.Tensor, after: torch.Tensor, lr: float) -> torch.Tensor:
    """How far each element moved in units of `lr`, asserting it is ±1 or 0: Adam with betas (0, 0) and
    no weight decay steps each element by lr·g/|g| (a zero gradient: not at all)."""
    moved = (after - before) / lr
    assert torch.minimum((moved.abs() - 1).abs(), moved.abs()).max() < 1e-3
    return moved


@needs_timm
@pytest.mark.slow
def test_finetune_from_timm_at_a_new_resolution_on_two_fsdp_ranks(tmp_path):
    """The step-1 weights are the file's (resampled 4x4 → 6x6 positions) exactly: behind a zero head nothing
    else has a gradient yet; the head moved from zero. Step 2 moves every element by ±lr·lr_scale."""
    weights = timm_weights(tmp_path / "timm.safetensors", num_classes=7)
    lr, warmup = 1e-2, 2
    run_train(
        tmp_path / "run",
        [
            *TINY,
            "experiment=finetune",
            f"trainer.init_weights={tmp_path / 'timm.safetensors'}",
            "data=synthetic",
            "data.image_size=24",
            "data.num_classes=10",
            "data.batch_size=8",
            "trainer.max_steps=2",
            "trainer.checkpoint_at=[1]",
            f"schedule.warmup_steps={warmup}",
            f"optim.lr={lr}",
            "optim.betas=[0.0,0.0]",
            "optim.eps=1e-20",
            "optim.weight_decay=0.0",
            "parallel=fsdp",
        ],
        nproc=2,
    )
    log = (tmp_path / "run" / "train.log").read_text()
    assert "pos_embed: 4x4 -> 6x6 grid" in log and "head.weight: fresh init" in log
    checkpoints = tmp_path / "run" / "checkpoints"
    step1, meta = load_full_state(checkpoints / "step_00000001")
    step2, _ = load_full_state(checkpoints / "step_00000002")
    cfg = bigvit.model_config(meta["model"])
    assert (cfg.image_size, cfg.num_classes, cfg.drop_path) == (24, 10, 0.1)
    expected, _ = adapt_state_dict({k: v for k, v in weights.items() if not k.startswith("head.")}, cfg)
    assert step1.keys() == {*expected, "head.weight", "head.bias"}
    for name, tensor in expected.items():
        assert torch.equal(step1[name], tensor), name
    schedule = dict(name="cosine", warmup_steps=warmup, total_steps=2, min_factor=1e-3)
    head = moved_by_lr(torch.zeros(10, 48), step1["head.weight"], lr * lr_factor(0, **schedule))
    assert (head.abs() > 0.5).float().mean() > 0.9  # it was zero: a new head, not the file's 7 classes
    decay = 0.65  # the preset's optim.layer_decay
    for name in step1:
        scale = decay ** (cfg.depth + 1 - layer_of(name, cfg.depth))
        moved = moved_by_lr(step1[name], step2[name], lr * lr_factor(1, **schedule) * scale)
        assert (moved.abs() > 0.5).float().mean() > 0.5, name  # most elements moved by their group's LR


def test_weights_that_do_not_fit_name_every_key():
    cfg = bigvit.model_config("vit_ti16", image_size=16, num_classes=10, **TINY_KEYS)
    model = bigvit.build_model(cfg, device="meta")
    shapes = {name: p.shape for name, p in model.named_parameters()}
    state = {name: torch.zeros(shape) for name, shape in shapes.items()}
    state["head.weight"] = torch.zeros(5, 48)  # another classifier: left fresh, not an error
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3 * 48, 40)
    state["map_head.probe"] = torch.zeros(1, 1, 48)
    with pytest.raises(CheckpointError) as error:
        fit_weights(state, cfg, shapes, source="w.safetensors")
    message = str(error.value)
    assert "missing: blocks.1.mlp.fc2.bias" in message and "unexpected: map_head.probe" in message
    assert "shape mismatch: blocks.0.attn.qkv.weight (144, 40) vs model (144, 48)" in message
    assert "head.weight" not in message


def test_finetune_without_weights_is_a_clear_error():
    with pytest.raises(ConfigError, match="trainer.init_weights is not set: this run starts from weights"):
        validate(compose_train([*TINY, "experiment=finetune"]))
