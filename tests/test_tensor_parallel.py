"""Tensor (+ sequence) parallelism and 2-D FSDP×TP through the CLI, proven by parity with one process.

Every run trains the same tiny ViT on the same synthetic global batches; a TP layout must give the
single-process losses, global gradient norms and (with plain SGD) final weights to fp32 rounding.
"""

import json
import zlib
from pathlib import Path

import pytest
import torch
import yaml

import bigvit
from bigvit.errors import ConfigError
from bigvit.models.vit import ViTConfig
from bigvit.parallel.materialize import materialize
from bigvit.parallel.tensor import check_tp_layout
from tests.helpers import TINY, final_params, losses, run_train

MODEL = dict(depth=2, width=48, heads=2, mlp_dim=96, image_size=16, patch_size=4, num_classes=10)

TP = ["parallel=fsdp_tp", "parallel.tp=2"]
COMMON = [
    *TINY,
    "data=synthetic",
    "data.batch_size=8",
    "trainer.max_steps=5",
    "trainer.precision=fp32",
    # TINY's 3 heads do not split over tp=2; 2 heads of 24 keep the width at 48.
    "model.heads=2",
    # 16 patches + class token = 17 tokens: sequence parallel pads them to 18 and masks the padding.
]
# Plain SGD makes the final weights a direct function of the gradients. The zero-init head leaves
# the blocks almost still at a usual LR, so take large steps (every weight moves ~1e-5..1e-1 in 5
# steps); clipping at 0.3 acts on most steps, so the clipped global norm is part of the parity.
SGD = ["optim=sgd", "optim.lr=4", "optim.momentum=0", "optim.grad_clip=0.3"]
# ViT-22B style: parallel blocks, QK-norm, no qkv/norm biases, MAP pooling; plus layer scale.
# Without a class token the 16 patches are the 16 tokens.
VIT22B = [
    "model.parallel_block=true",
    "model.qk_norm=true",
    "model.qkv_bias=false",
    "model.norm_bias=false",
    "model.class_token=false",
    "model.pool=map",
    "model.layer_scale=1.0",
]
WINDOWED = ["model.class_token=false", "model.pool=gap", "model.window_size=2", "model.global_every=2"]
REL = 1e-5  # fp32: different reduction orders only


def grad_norms(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/grad_norm"] for r in map(json.loads, lines) if "train/grad_norm" in r}


def max_rel_diff(expected: dict[int, float], got: dict[int, float]) -> float:
    assert expected.keys() == got.keys() and len(expected) == 5
    return max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected)


def initial_params(run_dir: Path) -> dict:
    """The weights the run started from (initialization depends only on the seed, not the layout)."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = materialize(bigvit.build_model(cfg["model"]), torch.device("cpu"), cfg["trainer"]["seed"])
    return {name: p.detach() for name, p in model.named_parameters()}


def max_param_diff(expected: dict, got: dict) -> float:
    assert expected.keys() == got.keys()
    return max((got[name] - value).abs().max().item() for name, value in expected.items())


def max_update_error(initial: dict, expected: dict, got: dict) -> float:
    """Largest per-parameter ‖Δgot − Δexpected‖ / ‖Δexpected‖: a wrong gradient anywhere shows here
    even where the update is far below the weights' own size."""
    return max(
        ((got[n] - expected[n]).norm() / (expected[n] - initial[n]).norm().clamp_min(1e-12)).item()
        for n in initial
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One-process reference runs, each trained once per module: name → run directory."""
    runs = {}

    def run(name: str, overrides: list[str]) -> Path:
        if name not in runs:
            runs[name] = tmp_path_factory.mktemp(name)
            run_train(runs[name], [*COMMON, *overrides, "parallel=single"])
        return runs[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout,model",
    [
        (["parallel.sequence_parallel=false"], []),
        (["parallel.sequence_parallel=true"], []),
        (["parallel.sequence_parallel=true"], VIT22B),
        # ViT-B/16's token count: 196 patches + class token = 197, padded to 198.
        (["parallel.sequence_parallel=true"], ["model.patch_size=16", "data.image_size=224"]),
        # 8 of 16 patches + class token = 9, padded to 10; both tp ranks draw the same patches.
        (["parallel.sequence_parallel=true"], ["model.patch_dropout=0.5"]),
        # Windows of 2×2 patches in block 0, global attention in block 1.
        (["parallel.sequence_parallel=true"], WINDOWED),
    ],
    ids=["tp", "tp_sp", "tp_sp_vit22b", "tp_sp_cls197", "tp_sp_patch_dropout", "tp_sp_windowed"],
)
def test_tp_matches_single_process_losses_grad_norms_and_weights(tmp_path, single, layout, model):
    reference = single(f"sgd_{zlib.crc32(' '.join(model).encode())}", [*SGD, *model])
    run_train(tmp_path, [*COMMON, *SGD, *model, *TP, *layout], nproc=2)
    assert max_rel_diff(losses(reference), losses(tmp_path)) <= REL
    assert max_rel_diff(grad_norms(reference), grad_norms(tmp_path)) <= REL
    expected, got = final_params(reference), final_params(tmp_path)
    assert max_param_diff(expected, got) <= 1e-5
    assert max_update_error(initial_params(reference), expected, got) <= 1e-3


@pytest.mark.slow
def test_fsdp_tp_2x2_with_adamw_matches_single_process(tmp_path, single):
    reference = single("adamw", [])
    run_train(tmp_path, [*COMMON, *TP], nproc=4)
    assert max_rel_diff(losses(reference), losses(tmp_path)) <= REL
    assert max_rel_diff(grad_norms(reference), grad_norms(tmp_path)) <= REL


@pytest.mark.slow
def test_tp_bf16_trains_close_to_single_process_fp32(tmp_path, single):
    reference = single("adamw", [])
    run_train(tmp_path, [*COMMON, *TP, "trainer.precision=bf16"], nproc=2)
    assert max_rel_diff(losses(reference), losses(tmp_path)) <= 1e-2


@pytest.mark.slow
def test_heads_that_do_not_split_fail_at_start_up_with_one_line(tmp_path):
    result = run_train(tmp_path, [*COMMON, *TP, "model.heads=3", "trainer.max_steps=2"], nproc=2, check=False)
    assert result.returncode != 0
    errors = {line for line in result.stderr.splitlines() if line.startswith("bigvit: error:")}
    assert len(errors) == 1, result.stderr[-3000:]  # every rank reports the same one line
    assert "model.heads=3 does not split over parallel.tp=2" in errors.pop()
    assert "src/bigvit" not in result.stderr  # no traceback through bigvit (torchrun adds its own)


@pytest.mark.parametrize(
    "overrides,sequence_parallel,message",
    [
        ({"heads": 3}, False, "model.heads=3 does not split over parallel.tp=2"),
        ({"mlp_dim": 97}, False, "model.mlp_dim=97 does not split over parallel.tp=2"),
    ],
    ids=["heads", "mlp_dim"],
)
def test_check_tp_layout_names_the_values_that_do_not_split(overrides, sequence_parallel, message):
    cfg = ViTConfig(**{**MODEL, **overrides})
    with pytest.raises(ConfigError) as error:
        check_tp_layout(cfg, 2, sequence_parallel)
    assert message in str(error.value)
    check_tp_layout(cfg, 1, sequence_parallel)  # tp=1 always splits
