"""One checkpoint at other image and patch sizes: resampled positions, FlexiViT patch kernels, bigvit-eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bigvit.errors import ConfigError
from bigvit.models.registry import model_config
from bigvit.models.resample import (
    adapt_state_dict,
    bilinear_resize_matrix,
    resample_pos_embed,
    resize_patch_embed,
)
from tests.helpers import ROOT, run_train, summary, train_env

EVAL = [str(Path(sys.executable).parent / "bigvit-eval")]  # the installed console script


def linear_pos_embed(grid: int, width: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1 + grid², width) positions linear in each patch centre's (row, col) in [0, 1], and the slopes."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    slopes = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    patches = rows.reshape(-1, 1) * slopes[0] + cols.reshape(-1, 1) * slopes[1]
    return torch.cat([torch.full((1, width), 7.0), patches]).unsqueeze(0), slopes


def test_pos_embed_is_unchanged_at_its_own_grid():
    pos_embed = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pos_embed, 4) is pos_embed


def test_resampled_pos_embed_keeps_the_class_token_row():
    pos_embed = torch.randn(1, 1 + 16, 8)
    resized = resample_pos_embed(pos_embed, 6)
    assert resized.shape == (1, 1 + 36, 8)
    assert torch.equal(resized[:, 0], pos_embed[:, 0])


def test_linear_pos_embed_stays_linear_when_resampled_bilinearly():
    old, new = linear_pos_embed(4)
    expected, slopes = linear_pos_embed(6)
    resized = resample_pos_embed(old, 6, mode="bilinear").reshape(1 + 36, -1)[1:].reshape(6, 6, -1)
    expected = expected.reshape(1 + 36, -1)[1:].reshape(6, 6, -1)
    # Inside the old grid's patch centres bilinear interpolation is exact; the border rows clamp to the
    # outermost centre, half a new cell away at most: off by under half an old cell times the slope.
    torch.testing.assert_close(resized[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1e-5, rtol=0)
    assert ((resized - expected).abs() <= slopes.abs().sum(0) / (2 * 4) + 1e-6).all()


def test_antialias_flag_reaches_the_resize():
    pos_embed = torch.randn(1, 1 + 64, 8)
    grid = pos_embed[:, 1:].reshape(1, 8, 8, 8).permute(0, 3, 1, 2)
    for antialias in (True, False):
        want = F.interpolate(grid, size=(3, 3), mode="bicubic", antialias=antialias, align_corners=False)
        got = resample_pos_embed(pos_embed, 3, antialias=antialias)[:, 1:]
        torch.testing.assert_close(got, want.permute(0, 2, 3, 1).reshape(1, 9, 8))
    assert not torch.allclose(
        resample_pos_embed(pos_embed, 3), resample_pos_embed(pos_embed, 3, antialias=False)
    )


def upsample_each_patch(images: torch.Tensor, patch: int, new: int) -> torch.Tensor:
    """Every patch × patch tile bilinearly resized to new × new on its own (FlexiViT's resize of a patch)."""
    b, c, h, w = images.shape
    tiles = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(-1, c, patch, patch)
    resized = F.interpolate(tiles, size=(new, new), mode="bilinear", align_corners=False, antialias=False)
    resized = resized.reshape(b, h // patch, w // patch, c, new, new).permute(0, 3, 1, 4, 2, 5)
    return resized.reshape(b, c, h // patch * new, w // patch * new)


@pytest.mark.parametrize("new", [16, 12])
def test_flexivit_kernel_embeds_an_upsampled_patch_as_the_original_does(new):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 3, 8, 8, generator=generator) * 0.02
    images = torch.randn(4, 3, 32, 32, generator=generator)
    resized = resize_patch_embed(weight, new)
    assert resized.shape == (32, 3, new, new) and resized.dtype == weight.dtype
    tokens = F.conv2d(images, weight, stride=8)
    torch.testing.assert_close(
        F.conv2d(upsample_each_patch(images, 8, new), resized, stride=new), tokens, atol=1e-4, rtol=0
    )


def test_flexivit_kernel_for_a_smaller_patch_is_the_least_squares_solution():
    weight = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    resized = resize_patch_embed(weight, 8)
    assert resized.shape == (6, 3, 8, 8)
    # w' minimizes ||Bᵀ w' - w||: the residual is orthogonal to Bᵀ's columns (the normal equations).
    resize = bilinear_resize_matrix((16, 16), (8, 8))  # (64, 256)
    residual = resized.reshape(18, 64) @ resize - weight.reshape(18, 256)
    assert (residual @ resize.T).abs().max() < 1e-10
    lstsq = torch.linalg.lstsq(resize.T, weight.reshape(18, 256).T).solution.T
    torch.testing.assert_close(resized.reshape(18, 64), lstsq)


def digits_model(**overrides):
    keys = dict(image_size=32, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32, num_classes=10)
    return model_config("vit_ti16", **{**keys, **overrides})


def digits_state(cfg) -> dict[str, torch.Tensor]:
    grid = cfg.image_size // cfg.patch_size
    return {
        "pos_embed": torch.randn(1, int(cfg.class_token) + grid * grid, cfg.width),
        "patch_embed.weight": torch.randn(cfg.width, cfg.in_chans, cfg.patch_size, cfg.patch_size),
        "head.weight": torch.randn(cfg.num_classes, cfg.width),
    }


def test_adapt_state_dict_resamples_positions_and_patch_kernels_only():
    state = digits_state(digits_model())
    adapted, notes = adapt_state_dict(state, digits_model(image_size=96, patch_size=16))
    assert adapted["pos_embed"].shape == (1, 1 + 36, 16)
    assert adapted["patch_embed.weight"].shape == (16, 3, 16, 16)
    assert adapted["head.weight"] is state["head.weight"]
    assert notes == [
        "pos_embed: 4x4 -> 6x6 grid (bicubic)",
        "patch_embed.weight: patch 8x8 -> 16x16 (FlexiViT pseudo-inverse)",
    ]
    same, none = adapt_state_dict(state, digits_model())
    assert none == [] and all(same[k] is state[k] for k in state)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (dict(width=32, heads=2), r"pos_embed: the checkpoint's \(1, 17, 16\) cannot become \(1, 17, 32\)"),
        (
            dict(in_chans=1),
            r"patch_embed.weight: the checkpoint's \(16, 3, 8, 8\) cannot become \(16, 1, 8, 8\)",
        ),
        (
            dict(class_token=False, pool="gap"),
            r"pos_embed: .*\(1, 17, 16\) minus 0 class-token row\(s\) is no square",
        ),
    ],
)
def test_adapt_state_dict_names_the_key_and_shapes_it_cannot_adapt(target, message):
    with pytest.raises(ConfigError, match=message):
        adapt_state_dict(digits_state(digits_model()), digits_model(**target))


def test_adapt_state_dict_refuses_an_unknown_mode():
    with pytest.raises(ConfigError, match=r"mode='nearest' is not one of \['bicubic', 'bilinear'\]"):
        adapt_state_dict(digits_state(digits_model()), digits_model(), mode="nearest")


def run_eval(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*EVAL, *args], cwd=ROOT, env=train_env(1), capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_digits_model_trained_at_32px_evaluates_at_48_and_64px(tmp_path):
    run_dir = tmp_path / "run"
    tiny_digits = [
        "experiment=digits",
        *("model.depth=2", "model.width=64", "model.heads=4", "model.mlp_dim=128", "model.pool=cls"),
        f"data.root={tmp_path / 'digits'}",
        *("data.num_workers=0", "data.batch_size=64", "optim.lr=1e-3", "parallel=single", "logger=none"),
        *("trainer.max_steps=150", "trainer.eval_every=0", "trainer.checkpoint_every=0"),
        *("schedule.warmup_steps=5", "hardware.peak_tflops=1"),
    ]
    run_train(run_dir, tiny_digits)
    report = tmp_path / "eval.json"
    result = run_eval(["classify", str(run_dir), "data.image_size=32,48,64", "--json", str(report)])
    assert result.returncode == 0, result.stdout + result.stderr
    runs = json.loads(report.read_text())["runs"]
    assert [(r["image_size"], r["patch_size"], r["grid"]) for r in runs] == [
        (32, 8, 4),
        (48, 8, 6),
        (64, 8, 8),
    ]
    assert all(0.0 <= r["eval_top1"] <= 1.0 and r["eval_samples"] == 360 for r in runs)
    assert runs[0]["adapted"] == [] and runs[1]["adapted"] == ["pos_embed: 4x4 -> 6x6 grid (bicubic)"]
    # The trainer's own final evaluation: the same data, resize and scores at the training size.
    assert runs[0]["eval_top1"] == summary(run_dir)["eval_top1"]
    table = [line for line in result.stdout.splitlines() if line.split()[0].isdigit()]
    assert len(table) == 3 and table[1].split()[:4] == ["48", "8", "6x6", f"{runs[1]['eval_top1']:.4f}"]

    explicit = run_eval(["classify", str(run_dir), "data.image_size=48", "model.image_size=48"])
    assert explicit.returncode == 0, explicit.stderr
    assert f"{runs[1]['eval_top1']:.4f}" in explicit.stdout.splitlines()[-1]

    flexi = run_eval(["classify", str(run_dir / "checkpoints"), "data.image_size=64", "model.patch_size=16"])
    assert "patch_embed.weight: patch 8x8 -> 16x16" in flexi.stdout, flexi.stderr
    assert 0.0 <= float(flexi.stdout.splitlines()[-1].split()[3]) <= 1.0


def test_eval_of_missing_weights_is_one_error_line(tmp_path):
    result = run_eval(["classify", str(tmp_path / "nothing"), "data.image_size=48"])
    assert result.returncode != 0
    assert result.stderr.strip().startswith("bigvit: error: no complete bigvit checkpoint at ")
    assert len(result.stderr.strip().splitlines()) == 1
