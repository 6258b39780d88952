"""Scaling studies end to end: results files, WSD cooldown branches, the sweep (real multirun processes),
then fit and plot on what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from bigvit.errors import ConfigError
from bigvit.optim import decay_start
from bigvit.scaling.results import append_results, columns, read_results, record_from_run
from bigvit.scaling.sweep import expand, point_config, point_id
from tests.helpers import ROOT, TINY, losses, run_train, summary

WSD = [*TINY, "data=synthetic", "parallel=single", "schedule=wsd", "trainer.precision=fp32"]


def scaling_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bigvit.scaling.scaling_cli", *args]


def run_scaling(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "WANDB_SILENT": "true"}
    result = subprocess.run(scaling_command(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"bigvit-scaling {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# -- WSD branches ---------------------------------------------------------------------------------


def test_a_cooldown_branched_from_a_longer_wsd_run_equals_the_full_short_run(tmp_path):
    start = decay_start(12, 0.2)
    run_train(tmp_path / "full", [*WSD, "trainer.max_steps=12"])
    run_train(
        tmp_path / "long",
        [*WSD, "trainer.max_steps=24", f"trainer.checkpoint_at=[{start}]", "trainer.keep_checkpoints=1"],
    )
    branch_point = tmp_path / "long" / "checkpoints" / f"step_{start:08d}"
    assert branch_point.is_dir()  # kept although keep_checkpoints=1: a pinned branch point
    run_train(tmp_path / "branch", [*WSD, "trainer.max_steps=12", f"trainer.branch_from={branch_point}"])

    full, branch = losses(tmp_path / "full"), losses(tmp_path / "branch")
    assert sorted(branch) == list(range(start + 1, 13))
    assert branch == {s: full[s] for s in branch}  # same data, same LR, same state: bit-for-bit
    assert summary(tmp_path / "branch")["eval_loss"] == summary(tmp_path / "full")["eval_loss"]
    assert summary(tmp_path / "branch")["first_step"] == start

    record = record_from_run(tmp_path / "branch")
    assert (record["steps"], record["branch_step"], record["examples_seen"]) == (12, start, 12 * 16)
    assert record["compute"] == record["flops_per_image"] * 12 * 16
    assert record["compute_spent"] == record["flops_per_image"] * (12 - start) * 16
    assert record["eval_error"] == pytest.approx(1 - summary(tmp_path / "full")["eval_top1"])


# -- results files ---------------------------------------------------------------------------------


def fake_record(run: str, **values) -> dict:
    return {"run": run, "width": 64, "depth": 4, "params": 1000, "compute": 1e9, "eval_error": 0.5, **values}


def test_appending_results_is_idempotent_and_csv_reads_like_jsonl(tmp_path):
    path = tmp_path / "results.jsonl"
    assert append_results(path, [fake_record("a"), fake_record("b")]) == 2
    assert append_results(path, [fake_record("b"), fake_record("c"), fake_record("c")]) == 1
    records = read_results(path)
    assert [r["run"] for r in records] == ["a", "b", "c"]

    csv = tmp_path / "results.csv"
    csv.write_text("run,width,compute,eval_error\na,64,1e9,0.5\nb,32,,0.25\n")
    table = columns(read_results(csv))
    assert table["width"].tolist() == [64, 32] and table["eval_error"].tolist() == [0.5, 0.25]
    assert table["compute"][0] == 1e9 and table["compute"][1] != table["compute"][1]  # empty → NaN


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "holds no records"), ('{"run": "a"}\nnot json\n', r"results\.jsonl:2 is not a JSON line")],
)
def test_bad_results_files_are_one_line(tmp_path, text, message):
    path = tmp_path / "results.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_results(path)


# -- sweep definitions ----------------------------------------------------------------------------


def test_a_star_sweep_varies_one_dimension_at_a_time_and_branches_shorter_durations(tmp_path):
    scfg = OmegaConf.create(
        {
            "name": "s",
            "star": {
                "centre": {"model.width": 64, "model.depth": 4},
                "vary": {"model.width": [32, 64, 128], "model.depth": [2, 8]},
            },
            "durations": [400, 100, 200],
            "branch": True,
        }
    )
    points = expand(scfg, tmp_path, decay_fraction=0.2)
    shapes = {tuple(o for o in p.overrides if "max_steps" not in o) for p in points}
    assert shapes == {
        ("model.width=64", "model.depth=4"),
        ("model.width=32", "model.depth=4"),
        ("model.width=128", "model.depth=4"),
        ("model.width=64", "model.depth=2"),
        ("model.width=64", "model.depth=8"),
    }
    assert len(points) == 5 * 3
    longest = [p for p in points if p.phase == "train"]
    assert {p.steps for p in longest} == {400} and all(p.checkpoint_at == [80, 160] for p in longest)
    branch = next(p for p in points if p.id == "width32-depth4-steps100")
    assert branch.phase == "branch"
    assert branch.branch_from == tmp_path / "width32-depth4-steps400" / "checkpoints" / "step_00000080"

    config = point_config(branch, scfg, tmp_path / "results.jsonl")
    assert config["model"] == {"width": 32, "depth": 4}
    assert config["trainer"]["branch_from"] == str(branch.branch_from)
    assert config["sweep"] == {"name": "s", "point": "width32-depth4-steps100", "phase": "branch"}


def test_group_choices_in_a_point_become_defaults_overrides(tmp_path):
    scfg = OmegaConf.create({"name": "g", "grid": {"model": ["vit_s16", "vit_b16"]}, "durations": [10]})
    points = expand(scfg, tmp_path, decay_fraction=0.2)
    assert [p.id for p in points] == ["modelvit_s16-steps10", "modelvit_b16-steps10"]
    assert point_config(points[0], scfg, tmp_path / "r.jsonl")["defaults"] == [{"override /model": "vit_s16"}, "_self_"]
    assert point_id(["data.train_urls='/a/b-{0..9}.tar'"]).startswith("train_urls")


def test_a_branched_sweep_without_wsd_is_refused(tmp_path):
    result = run_scaling("sweep", "scaling=micro", f"scaling.dir={tmp_path}", "schedule=cosine", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("bigvit: error: point ")
    assert "needs schedule=wsd" in result.stderr


# -- the micro sweep → fit → plot (frontier: tests/test_frontier.py) ----------------------------------


def test_micro_sweep_resumes_after_an_interruption_then_fits_plots_and_plans(tmp_path):
    sweep_dir = tmp_path / "micro"
    results = sweep_dir / "results.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "WANDB_SILENT": "true"}
    first = subprocess.Popen(
        scaling_command("sweep", "scaling=micro", f"scaling.dir={sweep_dir}"),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    # Ctrl-C once the sweep itself reports its first point (it is then polling the first phase's multirun,
    # two of whose three points are still to train), not merely once a result is on disk.
    seen = []
    for line in first.stdout:
        seen.append(line)
        if line.startswith("[1/6 points]"):
            break
    assert seen and seen[-1].startswith("[1/6 points]"), "".join(seen)
    first.send_signal(signal.SIGINT)
    output = "".join(seen) + first.communicate(timeout=120)[0]
    assert first.returncode == 130, output
    assert "rerun the same command to resume" in output
    done_before = {r["run"] for r in read_results(results)}
    assert 1 <= len(done_before) < 6

    rerun = run_scaling("sweep", "scaling=micro", f"scaling.dir={sweep_dir}")
    assert f"({len(done_before)} already in results.jsonl)" in rerun.stdout
    assert "[6/6 points]" in rerun.stdout and "ETA" in rerun.stdout
    records = read_results(results)
    assert len(records) == 6 and len({r["run"] for r in records}) == 6
    assert {r["steps"] for r in records} == {20, 40}
    branches = [r for r in records if r["branch_step"]]
    assert len(branches) == 3 and all(r["branch_step"] == decay_start(20, 0.2) for r in branches)
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert sweep["compute_ratio"] == pytest.approx((40 + 20 - decay_start(20, 0.2)) / 60)

    again = run_scaling("sweep", "scaling=micro", f"scaling.dir={sweep_dir}")
    assert "(6 already in results.jsonl)" in again.stdout and "through Hydra multirun" not in again.stdout
    other = run_scaling("sweep", "scaling=micro", f"scaling.dir={sweep_dir}", "optim.lr=0.01", check=False)
    assert other.returncode != 0 and "holds a sweep run with the overrides" in other.stderr

    fit = json.loads(run_scaling("fit", str(results), "--law", "power", "--metric", "eval_loss",
                                 "--bootstrap", "200", "--format", "json").stdout)  # fmt: skip
    assert fit["law"] == "power" and fit["points"] == 6 and set(fit["params"]) == {"a", "b"}
    assert fit["ci95"]["b"][0] <= fit["params"]["b"] <= fit["ci95"]["b"][1]

    plots = run_scaling("plot", str(results), "--out", str(tmp_path / "plots"), "--metric", "eval_loss",
                        "--bootstrap", "50", "--wandb", "micro")  # fmt: skip
    assert (tmp_path / "plots" / "compute.png").stat().st_size > 10_000, plots.stdout
    assert (tmp_path / "plots" / "isoflop.png").is_file() is False  # 6 points: too few for chinchilla
    assert "isoflop.png: left out" in plots.stdout
    logged = list((tmp_path / "plots" / "wandb").glob("offline-run-*/files/media/images/compute*.png"))
    assert len(logged) == 1  # W&B (offline without an API key) holds the plot too
