"""Checkpoints move between layouts: saved sharded, loaded by one process or another layout, exported whole."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, TINY, final_params, run_train, summary

pytestmark = pytest.mark.slow

# Two heads and one register (18 tokens) so that the same checkpoint also fits tensor + sequence parallel.
COMMON = [
    *TINY,
    "model.heads=2",
    "model.num_registers=1",
    "data=synthetic",
    "data.batch_size=8",
    "trainer.max_steps=4",
    "trainer.precision=fp32",
]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    run_train(run_dir, [*COMMON, "parallel=fsdp"], nproc=2)
    return run_dir


def test_fsdp_checkpoint_resumes_in_one_process_with_the_same_eval_loss(fsdp_run, tmp_path):
    checkpoint = fsdp_run / "checkpoints" / "step_00000004"
    run_train(tmp_path / "single", [*COMMON, "parallel=single", f"trainer.resume={checkpoint}"])
    saved, resumed = summary(fsdp_run), summary(tmp_path / "single")
    assert resumed["first_step"] == 4 and resumed["world_size"] == 1
    assert resumed["eval_loss"] == pytest.approx(saved["eval_loss"], rel=1e-5)
    assert resumed["eval_top1"] == saved["eval_top1"]


def test_fsdp_checkpoint_loads_under_fsdp_x_tp_with_identical_parameters(fsdp_run, tmp_path):
    """Resume on 4 ranks as FSDP 2 × TP 2 and take one step at LR 0: the weights must come back unchanged."""
    checkpoint = fsdp_run / "checkpoints" / "step_00000004"
    run_dir = tmp_path / "fsdp_tp"
    run_train(
        run_dir,
        [
            *COMMON,
            "parallel=fsdp_tp",
            "parallel.tp=2",
            f"trainer.resume={checkpoint}",
            "trainer.max_steps=5",
            "optim.lr=0.0",
        ],
        nproc=4,
    )
    assert summary(run_dir)["eval_loss"] == pytest.approx(summary(fsdp_run)["eval_loss"], rel=1e-5)
    before, after = final_params(fsdp_run), final_params(run_dir)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_export_writes_the_full_weights(fsdp_run, tmp_path):
    out = tmp_path / "model.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "bigvit.train.export", str(fsdp_run), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "of step 4" in result.stdout
    exported, expected = load_file(str(out)), final_params(fsdp_run)
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    assert exported["pos_embed"].shape == (
        1,
        17,
        48,
    )  # class token + 16 patches (registers carry none)  # sharded on its last dim in training, whole here


def test_export_names_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bigvit.train.export", str(tmp_path), str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "bigvit: error: no complete bigvit checkpoint at" in result.stderr
