"""The first impressions of issue 14: each papercut a new user met is one clear line, or no error at all."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tomllib
from omegaconf import OmegaConf

import bigvit
from bigvit.errors import ConfigError
from bigvit.extras import EXTRAS, require
from bigvit.models.vit import ViTConfig
from bigvit.optim.schedule import decay_start, lr_factor, schedule_args, warmup_warning
from bigvit.overrides import check_command_line, compose, parse_overrides
from bigvit.scaling.sweep import Point, check_schedule
from bigvit.train.cli import CONF_DIR
from tests.helpers import ROOT, TINY, run_train, train_env

SMOKE = ["data=synthetic", "model=vit_ti16", "trainer.max_steps=5"]  # the command every user types first
WARNING = "schedule.warmup_steps=10 is longer than the run (trainer.max_steps=5): warming up over 5 steps"
BRACES = "data.train_urls=/d/train-{000000..000099}.tar"
BRACES_LINE = (
    "bigvit: error: could not parse the override data.train_urls=/d/train-{000000..000099}.tar: quote values "
    "with braces, as \"data.train_urls='/d/train-{000000..000099}.tar'\""
)


def cli(module: str, args: list[str], cwd=ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=train_env(1), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


# -- a) a warm-up longer than the run --------------------------------------------------------------


def test_the_smoke_command_runs_and_warns_once_that_the_warm_up_is_capped(tmp_path):
    result = cli("bigvit.train", SMOKE, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count(WARNING) == 1 and "schedule.warmup_steps" not in result.stderr
    assert "finished step 5" in result.stdout


def test_two_ranks_log_the_capped_warm_up_once(tmp_path):
    result = run_train(tmp_path / "run", [*TINY, "trainer.max_steps=1"], nproc=2)
    capped = "schedule.warmup_steps=2 is longer than the run (trainer.max_steps=1): warming up over 1 step"
    assert (result.stdout + result.stderr).count(capped) == 1


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "rsqrt", "wsd"])
def test_a_warm_up_longer_than_the_run_ends_with_it(name):
    schedule = OmegaConf.create({"name": name, "warmup_steps": 10, "min_factor": 0.0, "decay_fraction": 0.2})
    args = schedule_args(schedule, 5)
    assert args["warmup_steps"] == (decay_start(5, 0.2) if name == "wsd" else 5)
    factors = [lr_factor(step, **args) for step in range(5)]  # every step of the run evaluates
    assert all(0 < f <= 1 for f in factors) and warmup_warning(schedule, 5)
    fitting = schedule_args(schedule, 100)
    assert fitting["warmup_steps"] == 10 and warmup_warning(schedule, 100) is None


def test_wsd_warm_up_is_capped_where_the_cooldown_starts():
    schedule = OmegaConf.create({"name": "wsd", "warmup_steps": 10, "min_factor": 0.0, "decay_fraction": 0.2})
    assert warmup_warning(schedule, 5) == (
        "schedule.warmup_steps=10 is longer than the run (trainer.max_steps=5): warming up over 4 steps "
        "(until the WSD cooldown)"
    )


def test_a_branched_sweep_point_whose_warm_up_would_be_capped_fails_before_training(tmp_path):
    schedule = OmegaConf.create({"name": "wsd", "warmup_steps": 30, "min_factor": 0.0, "decay_fraction": 0.2})
    point = Point("width16-steps20", [], 20, tmp_path / "p")
    check_schedule(point, schedule, branched=False)  # alone, the warm-up is capped and the run trains
    with pytest.raises(ConfigError, match=r"point width16-steps20: schedule.warmup_steps=30 is longer than its"):
        check_schedule(point, schedule, branched=True)


# -- b) optional dependencies ---------------------------------------------------------------------


def test_every_extra_bigvit_names_exists_in_pyproject():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for package, extra in EXTRAS.values():
        assert any(dep.startswith(package) for dep in extras[extra]), (package, extra)


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_a_missing_optional_package_names_its_extra(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # the import fails as if it were not installed
    package, extra = EXTRAS[module]
    with pytest.raises(ConfigError) as raised:
        require(module, "the feature")
    assert str(raised.value) == f"the feature needs the {package} package: pip install 'bigvit[{extra}]'"


@pytest.mark.parametrize(
    "module,overrides,line",
    [
        ("deepspeed", ["parallel=deepspeed_zero3"],
         "parallel=deepspeed_zero3 needs the deepspeed package: pip install 'bigvit[deepspeed]'"),
        ("tensorboard", ["logger=tensorboard"],
         "logger.tensorboard=true needs the tensorboard package: pip install 'bigvit[tensorboard]'"),
        ("flash_attn", ["model.attn_impl=flash_attn"],
         "model.attn_impl=flash_attn needs the flash-attn package: pip install 'bigvit[gpu]'"),
    ],
)  # fmt: skip
def test_bigvit_train_without_an_extra_is_one_line(tmp_path, module, overrides, line):
    """The real command with the package's import made to fail (it may or may not be installed here)."""
    args = [*TINY, "trainer.max_steps=1", f"trainer.run_dir={tmp_path}", *overrides]
    code = f"import sys; sys.modules[{module!r}] = None; sys.argv[1:] = {args!r}; from bigvit.train.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=train_env(1), capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and error_lines(result) == [f"bigvit: error: {line}"]


def test_plots_without_matplotlib_name_the_plot_extra(monkeypatch):
    from bigvit.scaling.plots import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"^bigvit-scaling plot needs the matplotlib package: pip install 'bigvit\[plot\]'$"):
        pyplot()


def test_the_slurm_launcher_without_its_plugin_names_the_slurm_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)
    expected = r"^hydra/launcher=slurm needs the hydra-submitit-launcher package: pip install 'bigvit\[slurm\]'$"
    with pytest.raises(ConfigError, match=expected):
        check_command_line(CONF_DIR, "train", ["--multirun", "hydra/launcher=slurm"])


# -- c) brace patterns Hydra cannot parse ---------------------------------------------------------


def test_an_unquoted_brace_pattern_names_the_key_and_the_quoting():
    with pytest.raises(ConfigError) as raised:
        check_command_line(CONF_DIR, "train", [BRACES])
    assert f"bigvit: error: {raised.value}" == BRACES_LINE
    check_command_line(CONF_DIR, "train", ["data=webdataset", "data.train_urls='/d/train-{000000..000099}.tar'"])


@pytest.mark.parametrize("module", ["bigvit.train", "bigvit.scaling.plan_cli"])
def test_train_and_plan_print_the_brace_hint_as_one_line(module):
    result = cli(module, [BRACES])
    assert result.returncode != 0 and error_lines(result) == [BRACES_LINE]


def test_eval_and_scaling_overrides_get_the_same_hint():
    from bigvit.scaling.sweep import compose_config
    from bigvit.train.evaluate_cli import sweep_points

    hint = BRACES_LINE.removeprefix("bigvit: error: ")
    with pytest.raises(ConfigError) as raised:
        compose_config("train", [BRACES], "the sweep's common overrides")
    assert str(raised.value) == f"the sweep's common overrides: {hint}"
    with pytest.raises(ConfigError) as raised:
        sweep_points([BRACES])
    assert str(raised.value) == hint


def test_a_brace_pattern_inside_a_list_asks_to_quote_the_inner_string():
    with pytest.raises(ConfigError, match=r"inside a list or dict, quote each string with braces"):
        parse_overrides(["data.sources=[{urls:/d/a-{000000..000009}.tar,weight:1}]"])


# -- d) schema files are not choices --------------------------------------------------------------


def test_help_and_list_models_do_not_offer_the_schema():
    result = cli("bigvit.train", ["--help"])
    models = next(line for line in result.stdout.splitlines() if line.startswith("model:"))
    assert "vit_b16" in models and "schema" not in models
    assert "vit_schema" not in bigvit.list_models() and "vit_b16" in bigvit.list_models()


def test_model_keys_are_still_typed_by_the_schema():
    with pytest.raises(ConfigError, match=r"model.depth=abc: Value 'abc' of type 'str' could not be converted to Integer"):
        compose(CONF_DIR, "train", ["model.depth=abc"])
    assert compose(CONF_DIR, "train", ["model=vit_b16"]).model.qkv_bias is True  # a schema default


# -- e) closest valid names -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["trainer.max_step=5"], "unknown key trainer.max_step: did you mean trainer.max_steps?"),
        (["model.widht=64"], "unknown key model.widht: did you mean model.width?"),
        (["model=vit_b61"], "model=vit_b61: there is no model config 'vit_b61'; did you mean model=vit_b16?"),
        (["-m", "optim.lr=1e-3,1e-4", "trainer.max_step=5"], "unknown key trainer.max_step: did you mean trainer.max_steps?"),
    ],
)  # fmt: skip
def test_an_unknown_key_or_choice_gets_the_closest_valid_name(argv, message):
    with pytest.raises(ConfigError) as raised:
        check_command_line(CONF_DIR, "train", argv)
    assert str(raised.value) == message


def test_bigvit_train_with_a_misspelt_key_is_one_line():
    result = cli("bigvit.train", ["trainer.max_step=5"])
    assert error_lines(result) == ["bigvit: error: unknown key trainer.max_step: did you mean trainer.max_steps?"]


def test_an_added_model_key_that_does_not_exist_gets_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown model key\(s\) \['widht'\]; did you mean model.width\?$"):
        ViTConfig.from_dict({"width": 64, "widht": 64})
