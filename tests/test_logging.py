"""What a user watches: console progress, metrics.jsonl, and the offline W&B run, read back."""

import json

import pytest

from bigvit.train.loggers import console_line, wandb_mode
from bigvit.train.wandb_offline import read_run
from tests.helpers import TINY, losses, run_train

pytestmark = pytest.mark.slow


def test_offline_wandb_run_holds_the_logged_metrics_and_config(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        run_dir,
        [
            *TINY,
            "data=synthetic",
            "parallel=single",
            "trainer.max_steps=6",
            "logger.wandb.mode=offline",
            "logger.wandb.project=bigvit-test",
            "trainer.checkpoint_every=3",
            "logger.wandb.checkpoint_artifacts=reference",
        ],
    )
    logs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    run = read_run(logs[0])
    logged = {row["_step"]: row["train/loss"] for row in run["history"] if "train/loss" in row}
    assert logged == losses(run_dir) and len(logged) == 6
    assert any("eval/eval_top1" in row for row in run["history"])
    assert run["config"]["model"]["width"] == 48 and run["config"]["trainer"]["max_steps"] == 6
    assert (run_dir / "wandb_id.txt").read_text() in logs[0].name
    assert "step 6/6 | loss" in result.stdout and "img/s" in result.stdout and "eta" in result.stdout
    assert "step 6/6 | loss" in (run_dir / "train.log").read_text()  # the console, kept in the run dir
    # Each checkpoint as a version of one artifact, referencing the files in place.
    assert [(a["type"], a["metadata"]["step"], sorted(a["aliases"])) for a in run["artifacts"]] == [
        ("checkpoint", 3, ["latest", "step_3"]),  # W&B keeps aliases as a set: their order varies
        ("checkpoint", 6, ["latest", "step_6"]),
    ]
    files = run["artifacts"][-1]["files"]
    assert files and all(ref.startswith(f"file://{run_dir}/checkpoints/step_00000006") for ref in files.values())


def test_tensorboard_logger_writes_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_train(run_dir, [*TINY, "data=synthetic", "parallel=single", "trainer.max_steps=4", "logger=tensorboard"])
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("train/loss")}
    assert logged == pytest.approx(losses(run_dir)) and len(logged) == 4
    assert "eval/eval_top1" in events.Tags()["scalars"]
    assert not (run_dir / "wandb").exists()


def test_metrics_file_has_one_json_line_per_logged_step(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, [*TINY, "data=synthetic", "parallel=single", "trainer.max_steps=4"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert {
        "train/lr",
        "train/grad_norm",
        "train/images_per_sec",
        "train/mfu",
        "train/peak_memory_gib",
    } <= train_rows[0].keys()


def test_console_line_shows_progress_fields():
    line = console_line(
        50,
        200,
        {"loss": 1.23456, "lr": 3e-4, "grad_norm": 0.5, "images_per_sec": 812.0, "mfu": 0.123},
        eta_seconds=125,
    )
    assert line == "step 50/200 | loss 1.2346 | lr 3.00e-04 | gnorm 0.500 | 812 img/s | mfu 12.3% | eta 2m05s"


def test_console_line_flags_skipped_data():
    line = console_line(5, 10, {"loss": 1.0, "data/skipped_decode": 2, "data/skipped_read": 1}, eta_seconds=5)
    assert line == "step 5/10 | loss 1.0000 | skipped 3 bad | eta 0m05s"
    assert "skipped" not in console_line(5, 10, {"loss": 1.0, "data/skipped_decode": 0}, eta_seconds=5)


def test_wandb_goes_offline_without_an_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"


def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "data=synthetic", "parallel=single", "trainer.max_steps=6", "logger.wandb.mode=offline"]
    run_train(run_dir, [*args, "trainer.stop_step=3"])
    run_train(run_dir, args)
    logs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    run_id = (run_dir / "wandb_id.txt").read_text()
    assert len(logs) == 2 and all(log.name == f"run-{run_id}.wandb" for log in logs)
    steps = [row["_step"] for log in logs for row in read_run(log)["history"] if "train/loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]
