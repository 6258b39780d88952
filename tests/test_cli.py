"""Bad input fails at start-up with one clear line naming the key, the value and the valid set."""

import json
import subprocess

import pytest

from tests.helpers import ROOT, TINY, run_train, train_command


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def run_bad(tmp_path, overrides):
    result = run_train(tmp_path / "run", overrides, check=False, timeout=120)
    assert result.returncode != 0
    return result


def test_unknown_model_lists_available_models(tmp_path):
    result = run_bad(tmp_path, ["model=vit_foo"])
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("bigvit: error: model=vit_foo: there is no model config 'vit_foo'")
    assert "vit_b16" in lines[0] and "vit_22b" in lines[0] and "vit_schema" not in lines[0]


def test_heads_not_dividing_width_is_one_line(tmp_path):
    result = run_bad(tmp_path, [*TINY, "parallel=single", "model.heads=5"])
    lines = error_lines(result)
    assert lines == [
        "bigvit: error: model.heads=5 does not divide model.width=48; valid head counts include "
        "[1, 2, 3, 4, 6, 8, 12, 16, 24, 48]"
    ]


def test_missing_data_directory_is_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_bad(
        tmp_path,
        [
            *TINY,
            "parallel=single",
            "data=webdataset",
            "data.num_classes=10",
            f"data.train_urls='{missing}/train-{{000000..000003}}.tar'",
        ],
    )
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("bigvit: error: data.train_urls=")
    assert f"{missing}/train-000000.tar" in lines[0] and "4 shard(s) not found" in lines[0]


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.precision=fp8", "trainer.precision='fp8' is not one of ['bf16', 'fp16', 'fp32']"),
        ("data.batch_size=7", "data.batch_size=7 does not split over"),
        ("parallel.dp_shard=3", "= 3 ranks, but the world size is 1"),
        ("model.depth=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ],
)
def test_impossible_values_are_named(tmp_path, override, message):
    overrides = (
        [*TINY, "parallel=single", override]
        if "batch" not in override
        else [*TINY, "parallel=single", "trainer.grad_accum=2", override]
    )
    result = run_bad(tmp_path, overrides)
    assert message in result.stderr


def test_multirun_sweeps_every_point(tmp_path):
    sweep = [
        *TINY,
        "parallel=single",
        "trainer.max_steps=2",
        "optim.lr=1e-3,3e-4",
        f"hydra.sweep.dir={tmp_path}",
        "trainer.run_dir=${hydra:sweep.dir}/${hydra:job.num}",
    ]
    subprocess.run(
        train_command(["--multirun", *sweep]), cwd=ROOT, check=True, capture_output=True, timeout=300
    )
    for job, lr in (("0", 1e-3), ("1", 3e-4)):
        assert f"lr: {lr}" in (tmp_path / job / "config.yaml").read_text()
        assert json.loads((tmp_path / job / "summary.json").read_text())["final_step"] == 2
