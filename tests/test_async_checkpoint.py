"""trainer.checkpoint_async=true: DCP's async save (staged to host memory, written by a thread while
training continues) with the same atomicity; a run resumed from an async checkpoint is bit-exact."""

import pytest
import torch

from bigvit.train.checkpoint import checkpoint_dirs
from bigvit.train.export import load_full_state
from tests.helpers import TINY, final_params, losses, run_train, summary

RUN = [
    *TINY,
    "data=synthetic",
    "data.batch_size=8",
    "trainer.max_steps=6",
    "trainer.checkpoint_every=2",
    "trainer.keep_checkpoints=0",
    "trainer.precision=fp32",
]


@pytest.mark.slow
def test_async_checkpoints_hold_the_weights_of_their_step_and_resume_bit_exact(tmp_path):
    run_train(tmp_path / "sync", RUN, nproc=2)
    asynchronous = [*RUN, "trainer.checkpoint_async=true"]
    run_train(tmp_path / "async", [*asynchronous, "trainer.stop_step=4"], nproc=2)
    # Training went on while each was written, yet each holds the weights of its own step.
    saved = checkpoint_dirs(tmp_path / "async" / "checkpoints")
    assert [p.name for p in saved] == ["step_00000002", "step_00000004"]
    for path in saved:
        got, meta = load_full_state(path)
        expected, _ = load_full_state(tmp_path / "sync" / "checkpoints" / path.name)
        assert all(torch.equal(got[name], expected[name]) for name in expected), path.name
        assert meta["save_seconds"] > 0
    run_train(tmp_path / "async", [*asynchronous, "trainer.resume=auto"], nproc=2)
    assert summary(tmp_path / "async")["first_step"] == 4
    assert losses(tmp_path / "async") == losses(tmp_path / "sync")
    expected, got = final_params(tmp_path / "sync"), final_params(tmp_path / "async")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_async_checkpoints_need_a_dcp_engine(tmp_path):
    result = run_train(tmp_path, [*RUN, "parallel=deepspeed_zero1", "trainer.checkpoint_async=true"], check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("bigvit: error:")]
    assert errors == [
        "bigvit: error: trainer.checkpoint_async=true needs DCP's async save, which "
        "parallel.strategy=deepspeed does not use; set trainer.checkpoint_async=false"
    ], result.stderr[-2000:]
