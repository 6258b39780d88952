"""SIGTERM / SIGUSR1 mid-run: every rank finishes its step, a checkpoint is written, and the rerun continues exactly."""

import signal
import subprocess

import pytest

from bigvit.train.preemption import EXIT_PREEMPTED
from tests.helpers import ROOT, TINY, losses, run_train, summary, train_command, train_env, wait_until

pytestmark = pytest.mark.slow

ARGS = [*TINY, "data=synthetic", "data.batch_size=8", "trainer.max_steps=200", "logger.console_every=10"]


def start_and_signal(run_dir, nproc: int, sig: int) -> subprocess.CompletedProcess:
    """Start a run, wait until it has logged its first steps, send `sig` to the launcher, wait for the exit."""
    command = train_command(
        [f"trainer.run_dir={run_dir}", *ARGS, f"parallel={'fsdp' if nproc > 1 else 'single'}"], nproc
    )
    process = subprocess.Popen(
        command, cwd=ROOT, env=train_env(nproc), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 5, 120)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("nproc,sig", [(1, signal.SIGUSR1), (2, signal.SIGTERM)])
def test_signal_checkpoints_and_the_rerun_continues_exactly(tmp_path, nproc, sig):
    parallel = f"parallel={'fsdp' if nproc > 1 else 'single'}"
    run_train(tmp_path / "reference", [*ARGS, parallel], nproc=nproc)
    stopped = start_and_signal(tmp_path / "run", nproc, sig)
    if nproc == 1:
        assert stopped.returncode == EXIT_PREEMPTED
    assert f"stopped by {signal.Signals(sig).name} after step" in stopped.stderr
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    stop_step = int(checkpoints[-1].removeprefix("step_"))
    assert 10 <= stop_step < 200 and not (tmp_path / "run" / "summary.json").exists()
    run_train(tmp_path / "run", [*ARGS, parallel], nproc=nproc)  # the same command resumes (resume=auto)
    assert (summary(tmp_path / "run")["first_step"], summary(tmp_path / "run")["final_step"]) == (
        stop_step,
        200,
    )
    reference, resumed = losses(tmp_path / "reference"), losses(tmp_path / "run")
    assert all(resumed[step] == reference[step] for step in resumed if step > stop_step)
    assert max(resumed) == 200
