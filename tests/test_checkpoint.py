"""Checkpoints are atomic, resumable and refuse to load into an incompatible model."""

import shutil

import pytest

from tests.helpers import TINY, run_train, summary

pytestmark = pytest.mark.slow

BASE = [
    *TINY,
    "data=synthetic",
    "parallel=single",
    "trainer.checkpoint_every=2",
    "trainer.keep_checkpoints=2",
]


def test_interrupted_save_leaves_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, [*BASE, "trainer.max_steps=6", "trainer.stop_step=4"])
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]
    # A save killed midway leaves a temp dir without metadata; resume must skip it.
    shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000006.tmp")
    (ckpts / "step_00000006.tmp" / ".metadata").unlink()
    run_train(run_dir, [*BASE, "trainer.max_steps=6"])
    result = summary(run_dir)
    assert (result["first_step"], result["final_step"]) == (4, 6)
    # Retention keeps the newest two complete checkpoints; the stale temp dir is replaced.
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000006"]


def test_incompatible_checkpoint_is_refused_naming_the_difference(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, [*BASE, "trainer.max_steps=2"])
    result = run_train(run_dir, [*BASE, "trainer.max_steps=4", "model.width=96"], check=False)
    assert result.returncode != 0
    assert "bigvit: error: checkpoint" in result.stderr and "incompatible" in result.stderr
    assert "'width': (48, 96)" in result.stderr
