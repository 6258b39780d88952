"""Chaos resume: a 2-process run on real digits shards is SIGKILLed at seeded random moments (in the
forward, the backward, the optimizer step and during a checkpoint write), resumed each time with
trainer.resume=auto, and ends with the weights of a run that was never interrupted; after a kill, a
restart at another world size reads no sample twice. A torn checkpoint is never picked as the latest,
and retention never deletes the last complete one."""

import random

import pytest
import torch

from bigvit.train.chaos import PHASES
from bigvit.train.checkpoint import checkpoint_dirs, checkpoint_step
from tests.helpers import TINY, final_params, losses, run_train, summary
from tests.test_data_scale import positions_read_across_a_resize

STEPS, EVERY = 12, 2


def digits(tmp_path) -> list[str]:
    return [
        *TINY,
        "data=digits",
        f"data.root={tmp_path / 'digits'}",
        "data.batch_size=16",
        "data.num_workers=1",
        f"trainer.max_steps={STEPS}",
        f"trainer.checkpoint_every={EVERY}",
        "trainer.keep_checkpoints=1",  # retention at its tightest: only the newest complete one is kept
        "trainer.precision=fp32",
        "trainer.eval_every=0",
    ]


def kill_plan(seed: int, kills: int = 5, steps: int = STEPS, every: int = EVERY) -> list[tuple[str, int, int]]:
    """(phase, step, rank) of each kill, steps increasing: every phase once, then random ones; a
    checkpoint kill falls on a checkpoint step."""
    rng = random.Random(seed)
    phases = [*PHASES, *(rng.choice(PHASES) for _ in range(kills - len(PHASES)))]
    rng.shuffle(phases)
    plan, step = [], 1
    for phase in phases:
        step += rng.randint(1, 2)
        if phase == "checkpoint" and step % every:
            step += every - step % every
        plan.append((phase, step, rng.randint(0, 1)))
    assert step < steps, f"{kills} kills do not fit in {steps} steps"
    return plan


def killed(result) -> bool:
    return result.returncode != 0 and ("Signals.SIGKILL" in result.stderr or "exitcode: -9" in result.stderr)


@pytest.mark.slow
def test_run_killed_five_times_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    overrides = digits(tmp_path)
    run_train(tmp_path / "reference", overrides, nproc=2)
    run_dir, checkpoints = tmp_path / "chaos", tmp_path / "chaos" / "checkpoints"
    plan = kill_plan(seed=0)
    assert {phase for phase, _, _ in plan} == set(PHASES)
    for phase, step, rank in plan:
        chaos = {"BIGVIT_CHAOS": f"{phase}@{step}:{rank}"}
        result = run_train(run_dir, [*overrides, "trainer.resume=auto"], nproc=2, check=False, env=chaos)
        assert killed(result), (phase, step, result.stderr[-2000:])
        complete = checkpoint_dirs(checkpoints)
        assert len(complete) == 1  # retention never leaves none: the newest complete one survives
        if phase == "checkpoint":  # the torn write is there, and not taken for a checkpoint
            assert (checkpoints / f"step_{step:08d}.tmp").is_dir()
            assert checkpoint_step(complete[0]) == step - EVERY
        else:
            assert checkpoint_step(complete[0]) < step
    run_train(run_dir, [*overrides, "trainer.resume=auto"], nproc=2)
    assert summary(run_dir)["final_step"] == STEPS
    expected, got = final_params(tmp_path / "reference"), final_params(run_dir)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)  # bit for bit
    assert losses(run_dir) == losses(tmp_path / "reference")


@pytest.mark.slow
def test_restart_at_another_world_size_after_a_kill_reads_no_sample_twice(tmp_path):
    overrides = digits(tmp_path)
    run_dir = tmp_path / "run"
    result = run_train(run_dir, overrides, nproc=2, check=False, env={"BIGVIT_CHAOS": "checkpoint@6:1"})
    assert killed(result)
    assert [checkpoint_step(p) for p in checkpoint_dirs(run_dir / "checkpoints")] == [4]
    run_train(run_dir, [*overrides, "trainer.resume=auto"], nproc=1)
    assert (summary(run_dir)["first_step"], summary(run_dir)["world_size"]) == (4, 1)
    before, after = positions_read_across_a_resize(run_dir / "checkpoints" / f"step_{STEPS:08d}", tmp_path / "digits")
    # 4 steps × 16 on two processes, 8 steps × 16 on one: every sample read once, none twice.
    assert (len(before), len(after)) == (4 * 16, 8 * 16) and not before & after
