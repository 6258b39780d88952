"""DeepSpeed ZeRO 1/2/3 (parallel=deepspeed_zero*) on 2 real processes against one plain process.

Layer-wise LR decay, weight-decay masks, the warm-up LR and clipping are all active in the reference
runs, so a DeepSpeed run matches only if it honours each of them.
"""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from bigvit.config import register_schemas
from bigvit.errors import ConfigError
from bigvit.parallel.deepspeed import deepspeed_config
from bigvit.parallel.mesh import resolve_dims
from tests.helpers import ROOT, TINY, final_params, losses, run_train, summary

COMMON = [*TINY, "data=synthetic", "data.batch_size=8", "trainer.max_steps=5", "trainer.precision=fp32"]
OPTIMIZERS = {
    "adamw": ["optim.layer_decay=0.5"],  # weight_decay 0.05 with masks, grad_clip 1.0
    "sgd": ["optim=sgd", "optim.weight_decay=0.05", "optim.layer_decay=0.5", "optim.grad_clip=1.0"],
}


def grad_norms(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/grad_norm"] for r in map(json.loads, lines) if "train/grad_norm" in r}


def assert_close(expected: dict, got: dict, rel: float) -> None:
    assert expected.keys() == got.keys()
    for step in expected:
        assert abs(got[step] - expected[step]) <= rel * abs(expected[step]), (step, expected[step], got[step])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process run for an optimizer setting, made once on first use."""
    runs = {}

    def get(optim: str) -> Path:
        if optim not in runs:
            runs[optim] = tmp_path_factory.mktemp(f"single_{optim}")
            run_train(runs[optim], [*COMMON, *OPTIMIZERS[optim], "parallel=single"])
        return runs[optim]

    return get


def compose_cfg(overrides: list[str]):
    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("train", overrides=overrides)


def test_deepspeed_config_follows_the_hydra_config():
    cfg = compose_cfg(
        [
            "parallel=deepspeed_zero3",
            "optim=sgd",
            "data.batch_size=16",
            "trainer.grad_accum=2",
            "trainer.precision=bf16",
            "+parallel.deepspeed.zero_optimization.reduce_bucket_size=1000",
        ]
    )
    config = deepspeed_config(cfg, resolve_dims(cfg.parallel, 2))
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}
    assert config["gradient_clipping"] == 0.0  # sgd's grad_clip is null; DeepSpeed's own default is 1.0
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (16, 4)
    assert config["gradient_accumulation_steps"] == 2
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    with pytest.raises(ConfigError, match="parallel.zero_stage=4"):
        deepspeed_config(
            compose_cfg(["parallel=deepspeed_zero1", "parallel.zero_stage=4"]), resolve_dims(cfg.parallel, 2)
        )


@pytest.mark.slow
def test_zero1_matches_one_process(tmp_path, single):
    run_train(tmp_path, [*COMMON, *OPTIMIZERS["adamw"], "parallel=deepspeed_zero1"], nproc=2)
    assert len(losses(tmp_path)) == 5
    assert_close(losses(single("adamw")), losses(tmp_path), rel=1e-5)
    assert_close(grad_norms(single("adamw")), grad_norms(tmp_path), rel=1e-5)
    assert summary(tmp_path)["strategy"] == "deepspeed"


@pytest.mark.slow
def test_zero2_gradient_accumulation_matches_one_large_batch_on_one_process(tmp_path, single):
    overrides = [*COMMON, *OPTIMIZERS["adamw"], "parallel=deepspeed_zero2", "trainer.grad_accum=2"]
    run_train(tmp_path, overrides, nproc=2)
    assert_close(losses(single("adamw")), losses(tmp_path), rel=1e-5)
    assert_close(grad_norms(single("adamw")), grad_norms(tmp_path), rel=1e-5)


@pytest.mark.slow
def test_zero3_stopped_and_resumed_matches_one_uninterrupted_process(tmp_path, single):
    overrides = [
        *COMMON,
        *OPTIMIZERS["sgd"],
        "parallel=deepspeed_zero3",
        "parallel.activation_checkpointing=full",
    ]
    run_train(tmp_path, [*overrides, "trainer.stop_step=3"], nproc=2)
    assert (tmp_path / "checkpoints" / "step_00000003" / "deepspeed").is_dir()
    run_train(tmp_path, [*overrides, "trainer.resume=auto"], nproc=2)
    assert (summary(tmp_path)["first_step"], summary(tmp_path)["final_step"]) == (3, 5)
    reference = single("sgd")
    assert_close(losses(reference), losses(tmp_path), rel=1e-5)
    assert_close(grad_norms(reference), grad_norms(tmp_path), rel=1e-5)
    expected, got = final_params(reference), final_params(tmp_path)  # DCP weights, read without DeepSpeed
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_zero3_bf16_trains_close_to_fp32(tmp_path, single):
    run_train(
        tmp_path,
        [*COMMON, *OPTIMIZERS["adamw"], "parallel=deepspeed_zero3", "trainer.precision=bf16"],
        nproc=2,
    )
    assert_close(losses(single("adamw")), losses(tmp_path), rel=1e-2)
    expected, got = final_params(single("adamw")), final_params(tmp_path)
    for name in expected:  # the checkpoint holds DeepSpeed's fp32 master weights
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-2, msg=name)


@pytest.mark.slow
def test_tampered_deepspeed_file_is_refused_without_running_it(tmp_path):
    from tests.test_safe_checkpoints import Exploit, one_error_line

    overrides = [*COMMON, "trainer.max_steps=2", "parallel=deepspeed_zero2"]
    run_train(tmp_path / "run", overrides)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    optim = next((checkpoint / "deepspeed").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": Exploit(tmp_path / "code_ran")}, optim)
    line = one_error_line(run_train(tmp_path / "run", [*overrides, "trainer.max_steps=3"], check=False))
    assert not (tmp_path / "code_ran").exists()
    assert f"{optim} is not a plain DeepSpeed checkpoint file" in line and "posix.system" in line, line
