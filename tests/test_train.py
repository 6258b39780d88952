"""End-to-end training through the CLI with real processes: parity across world sizes, exact resume."""

import pytest

from tests.helpers import TINY, losses, run_train, summary

pytestmark = pytest.mark.slow


def assert_close_losses(expected: dict, got: dict, rel: float) -> None:
    assert expected.keys() == got.keys()
    for step in expected:
        assert abs(got[step] - expected[step]) <= rel * abs(expected[step]), (step, expected[step], got[step])


def test_fsdp_on_two_processes_matches_one_process(tmp_path):
    common = [*TINY, "data=synthetic", "data.batch_size=8", "trainer.max_steps=5", "trainer.precision=fp32"]
    run_train(tmp_path / "one", [*common, "parallel=single"])
    run_train(tmp_path / "two", [*common, "parallel=fsdp"], nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == 5
    assert_close_losses(one, two, rel=1e-5)
    assert summary(tmp_path / "two")["world_size"] == 2
    assert summary(tmp_path / "two")["train_loss"] == pytest.approx(
        summary(tmp_path / "one")["train_loss"], rel=1e-5
    )


def test_resume_after_a_stop_repeats_the_uninterrupted_losses(tmp_path):
    digits = [
        *TINY,
        "data=digits",
        f"data.root={tmp_path / 'digits'}",
        "data.batch_size=16",
        "data.num_workers=1",
        "data.image_size=16",
        "trainer.max_steps=10",
        "trainer.checkpoint_every=5",
    ]
    run_train(tmp_path / "full", digits, nproc=2)
    run_train(tmp_path / "parts", [*digits, "trainer.stop_step=5"], nproc=2)
    assert summary(tmp_path / "parts")["final_step"] == 5
    run_train(tmp_path / "parts", [*digits, "trainer.resume=auto"], nproc=2)
    resumed = summary(tmp_path / "parts")
    assert (resumed["first_step"], resumed["final_step"]) == (5, 10)
    full = losses(tmp_path / "full")
    after = {s: v for s, v in losses(tmp_path / "parts").items() if s > 5 and s in full}
    assert sorted(after) == [6, 7, 8, 9, 10]
    assert after == {s: full[s] for s in after}  # same world size, fp32: bit-for-bit


def test_single_process_run_writes_summary_checkpoint_and_config(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, [*TINY, "data=synthetic", "trainer.max_steps=4", "parallel=single"])
    result = summary(run_dir)
    for key in (
        "final_step",
        "eval_top1",
        "train_loss",
        "images_per_sec",
        "mfu",
        "world_size",
        "wall_seconds",
    ):
        assert result[key] is not None, key
    assert result["final_step"] == 4 and result["world_size"] == 1
    assert 0.0 <= result["eval_top1"] <= 1.0 and result["images_per_sec"] > 0 and result["mfu"] > 0
    assert (run_dir / "checkpoints" / "step_00000004" / ".metadata").is_file()
    assert "vit_ti16" in (run_dir / "config.yaml").read_text()


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    common = [*TINY, "data=synthetic", "data.batch_size=8", "trainer.max_steps=3", "parallel=single"]
    run_train(tmp_path / "whole", common)
    run_train(tmp_path / "accum", [*common, "trainer.grad_accum=2"])
    assert_close_losses(losses(tmp_path / "whole"), losses(tmp_path / "accum"), rel=1e-5)


@pytest.mark.parametrize(
    "precision,parallel,nproc", [("bf16", "fsdp", 2), ("bf16", "single", 1), ("fp16", "single", 1)]
)
def test_mixed_precision_trains_close_to_fp32(tmp_path, precision, parallel, nproc):
    common = [*TINY, "data=synthetic", "data.batch_size=8", "trainer.max_steps=4", f"parallel={parallel}"]
    run_train(tmp_path / "fp32", [*common, "trainer.precision=fp32"], nproc=nproc)
    run_train(tmp_path / precision, [*common, f"trainer.precision={precision}"], nproc=nproc)
    assert_close_losses(losses(tmp_path / "fp32"), losses(tmp_path / precision), rel=1e-2)
