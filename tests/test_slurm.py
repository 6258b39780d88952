"""A real Slurm (slurmctld + two slurmd on 127.0.0.1, see tests/slurm/local_cluster.sh) runs bigvit's jobs.

CI installs and starts the cluster before the tests (.ci/run); locally the fixture does it when it can
(root and apt), and skips, saying why, when it cannot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, losses, summary, wait_until

pytestmark = pytest.mark.slow

CLUSTER = ROOT / "tests" / "slurm" / "local_cluster.sh"
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"


USABLE_STATES = ("idle", "mixed", "allocated", "completing")
# Slurm compares credential times in whole seconds: a requeued job must start in a later second.
REVOKE_GRACE_S = 2.0


def cluster_up(wait_s: float = 30) -> bool:
    """Both nodes answer and take jobs (nodes still completing an earlier test's job count)."""
    if shutil.which("sinfo") is None:
        return False

    def usable() -> bool:
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
        states = [line.split()[1] for line in nodes.stdout.splitlines()]
        return nodes.returncode == 0 and len(states) == 2 and all(state in USABLE_STATES for state in states)

    return wait_until(usable, wait_s, interval=1)


@pytest.fixture(scope="module")
def slurm():
    if not cluster_up(wait_s=0):
        actions = ["start"] if shutil.which("slurmctld") else ["install", "start"]
        can_set_up = os.geteuid() == 0 and (shutil.which("slurmctld") or shutil.which("apt-get"))
        if can_set_up:
            subprocess.run(["bash", str(CLUSTER), *actions], capture_output=True, timeout=600)
    if not cluster_up():
        reason = f"no Slurm cluster here and none could be set up ({CLUSTER.name} install start needs root and apt)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run Slurm: {reason}")
        pytest.skip(reason)


def job_env(run_dir: Path) -> dict:
    return {
        **os.environ,
        "PYTHON": sys.executable,
        "NPROC": "1",
        "RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
    }


def submit(run_dir: Path, overrides: list[str], log_dir: Path) -> str:
    command = ["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", str(SBATCH), *overrides]
    result = subprocess.run(command, cwd=ROOT, env=job_env(run_dir), capture_output=True, text=True, check=True)
    return result.stdout.strip().split(";")[0]


def job_fields(job: str) -> dict[str, str] | None:
    """`scontrol show job` as a dict; {} once Slurm has forgotten the job; None when slurmctld did not
    answer (it can be busy for a moment around a requeue): not a reason to think the job is gone."""
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    if info.returncode != 0:
        return {} if "Invalid job id" in info.stderr else None
    return dict(word.split("=", 1) for word in info.stdout.split() if "=" in word) or None


def nodes_idle() -> bool:
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    states = nodes.stdout.split()
    return nodes.returncode == 0 and len(states) == 2 and all(state == "idle" for state in states)


def wait_for(condition, timeout: float, what: str) -> None:
    if not wait_until(condition, timeout, interval=1):
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(job: str, log: Path, timeout: float = 300) -> dict:
    """Wait until the job has left the queue for good; returns its last fields.

    A requeued job waits for a begin time Slurm sets about two minutes ahead (time for nodes to
    clean up); the test releases it sooner, as an admin would, so the suite stays short: once both
    nodes are idle and at least REVOKE_GRACE_S after the requeue. The requeue revokes the job's
    credential, and slurmd refuses any credential of that job created in the same second or before
    (`cred->ctime <= revoked`, whole seconds): released within that second, the job dies ("Killing
    non-startable batch JobId: Job credential revoked"), which is what made this test fail on a
    loaded machine, whose nodes turn idle fast enough to hit it. A real requeue waits its BeginTime.
    """
    last: dict[str, str] = {}
    pending_since: float | None = None

    def finished() -> bool:
        nonlocal last, pending_since
        fields = job_fields(job)
        if fields is None:
            return False
        if not fields:
            return True
        last = fields
        if fields["JobState"] == "PENDING" and fields.get("Reason") == "BeginTime":
            pending_since = pending_since or time.monotonic()
            if time.monotonic() - pending_since >= REVOKE_GRACE_S and nodes_idle():
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        return fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")

    try:
        wait_for(finished, timeout, f"job {job}")
    except AssertionError as timeout_error:
        subprocess.run(["scancel", job])
        output = log.read_text()[-4000:] if log.exists() else ""
        raise AssertionError(f"job {job} did not finish: {last}\n{output}") from timeout_error
    return last


def test_sbatch_trains_digits_on_two_nodes(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(run_dir, ["experiment=digits", "trainer.max_steps=60", "logger=none"], tmp_path)
    log = tmp_path / f"bigvit-{job}.out"
    fields = wait_done(job, log)
    assert fields.get("JobState", "COMPLETED") == "COMPLETED", log.read_text()[-3000:]
    result = summary(run_dir)
    assert (result["final_step"], result["world_size"]) == (60, 2)
    logged = losses(run_dir)
    assert logged[60] < logged[10] - 0.1 and result["eval_top1"] > 0.2  # learning: chance is 0.1
    text = log.read_text()
    assert "on n[1-2], 1 process(es) per node" in text and "bigvit: finished" in text


@pytest.mark.parametrize("signal_name", ["USR1", "TERM"])
def test_preempted_job_checkpoints_requeues_and_finishes(slurm, tmp_path, signal_name):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "data=synthetic", "data.batch_size=8", "trainer.max_steps=300", "logger.console_every=10"]
    job = submit(run_dir, overrides, tmp_path)
    log = tmp_path / f"bigvit-{job}.out"
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, 180, "the first steps")
    # Signals the job's steps, not the batch shell: what --signal=USR1@120 or a preemption does.
    subprocess.run(["scancel", f"--signal={signal_name}", job], check=True)
    fields = wait_done(job, log)

    text = log.read_text()
    assert fields.get("JobState", "COMPLETED") == "COMPLETED", text[-3000:]
    assert int(fields.get("Restarts", "1")) == 1
    stopped = json.loads(text.split("bigvit: preempted (", 1)[1].split(")", 1)[0])
    assert stopped["signal"] == f"SIG{signal_name}" and 10 <= stopped["step"] < 300
    assert "(restart 1)" in text and f"resumed from {run_dir}/checkpoints/step_{stopped['step']:08d}" in text
    result = summary(run_dir)
    assert (result["first_step"], result["final_step"]) == (stopped["step"], 300)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    logged = [r["step"] for r in records if "train/loss" in r]  # before and after the requeue, each once
    assert logged == list(range(10, 301, 10))


def test_multirun_submits_one_slurm_job_per_point(slurm, tmp_path):
    sweep = [
        "--multirun",
        "hydra/launcher=slurm",
        "hydra.launcher.tasks_per_node=2",  # each point is a 2-process FSDP job, ranks from the srun step
        f"hydra.sweep.dir={tmp_path}",
        *TINY,
        "data=synthetic",
        "data.batch_size=8",
        "trainer.max_steps=4",
        "optim.lr=1e-3,3e-4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "bigvit.train", *sweep], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitit 'slurm' sweep output dir" in result.stdout + result.stderr
    for point, lr in (("0", 1e-3), ("1", 3e-4)):
        assert f"lr: {lr}" in (tmp_path / point / "config.yaml").read_text()
        assert (summary(tmp_path / point)["final_step"], summary(tmp_path / point)["world_size"]) == (4, 2)
    tasks = sorted(p.name for p in (tmp_path / ".submitit").iterdir() if p.name[0].isdigit() and "_" in p.name)
    assert [task.split("_")[1] for task in tasks] == ["0", "1"]  # one Slurm array task per point


def test_a_scaling_sweep_submits_its_points_as_slurm_jobs(slurm, tmp_path):
    """`hydra/launcher=slurm` passes through bigvit-scaling sweep unchanged: each point (both the long
    runs and their WSD cooldown branches) is a Slurm array task, and the results file collects them."""
    from bigvit.scaling.results import read_results

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    command = [sys.executable, "-m", "bigvit.scaling.scaling_cli", "sweep", "scaling=micro",
               f"scaling.dir={tmp_path}", "hydra/launcher=slurm"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    records = read_results(tmp_path / "results.jsonl")
    assert len(records) == 6 and sum(1 for r in records if r["branch_step"]) == 3
    tasks = [p for p in (tmp_path / ".multirun" / ".submitit").iterdir() if p.is_dir() and p.name[0].isdigit() and "_" in p.name]
    assert len(tasks) == 6  # 3 long runs, then 3 branches: one array task each
