"""Checkpoints move between layouts: saved sharded, loaded by one process or another layout, exported whole."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, TINY, final_params, run_train, summary

pytestmark = pytest.mark.slow

COMMON = [*TINY, "data=synthetic", "data.batch_size=8", "trainer.max_steps=4", "trainer.precision=fp32"]


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
    assert exported["pos_embed"].shape == (1, 17, 48)  # sharded on its last dim in training, whole here


def test_export_names_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bigvit.train.export", str(tmp_path), str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "bigvit: error: no complete bigvit checkpoint at" in result.stderr
