"""A rank that dies takes the job down within a bounded time, and the last checkpoint stays usable."""

import json
import os
import signal
import subprocess
import time

import pytest

from tests.helpers import ROOT, TINY, run_train, summary, train_command, train_env, wait_until

pytestmark = pytest.mark.slow

ARGS = [
    *TINY,
    "data=synthetic",
    "parallel=fsdp",
    "trainer.max_steps=100000",
    "trainer.checkpoint_every=20",
    "logger.console_every=10",
    "trainer.dist_timeout_s=60",
]


def child_pids(pid: int) -> list[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in result.stdout.split()]


def start_two_ranks(run_dir, args: list[str], ready) -> tuple[subprocess.Popen, list[int]]:
    """Launch a 2-rank run, wait (at most 120 s) until `ready()`; returns the launcher and its 2 workers."""
    process = subprocess.Popen(
        train_command([f"trainer.run_dir={run_dir}", *args], nproc=2),
        cwd=ROOT,
        env=train_env(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until(ready, 120)
    workers = child_pids(process.pid)
    assert len(workers) == 2
    return process, workers


def test_killed_rank_ends_the_job_quickly_and_the_checkpoint_resumes(tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    process, workers = start_two_ranks(run_dir, ARGS, lambda: any(checkpoints.glob("step_*[0-9]")))
    os.kill(workers[1], signal.SIGKILL)
    killed_at = time.monotonic()
    process.communicate(timeout=180)
    assert process.returncode != 0
    assert time.monotonic() - killed_at < 120
    # The newest complete checkpoint resumes on a fresh launch.
    latest = sorted(p for p in checkpoints.iterdir() if not p.name.endswith(".tmp"))[-1]
    step = json.loads((latest / "bigvit.json").read_text())["step"]
    resumed_max = step + 2
    run_train(run_dir, [*ARGS, f"trainer.max_steps={resumed_max}"], nproc=2)
    assert (summary(run_dir)["first_step"], summary(run_dir)["final_step"]) == (step, resumed_max)


def test_stalled_rank_is_flagged_by_the_watchdog_and_the_job_ends(tmp_path):
    """Rank 1 frozen (SIGSTOP): rank 0 waits in a collective; its watchdog reports where and ends the job."""
    run_dir = tmp_path / "run"
    args = [*ARGS, "trainer.dist_timeout_s=600", "trainer.watchdog_s=5"]
    metrics = run_dir / "metrics.jsonl"
    process, workers = start_two_ranks(
        run_dir, args, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2
    )
    os.kill(workers[1], signal.SIGSTOP)
    stopped_at = time.monotonic()
    output, _ = process.communicate(timeout=180)
    assert process.returncode != 0
    assert time.monotonic() - stopped_at < 60  # the collective timeout (600 s) would take ten times longer
    assert "watchdog: rank 0 made no progress for" in output
    assert "Thread" in output and "trainer.py" in output  # the stack dump says where the loop hung
