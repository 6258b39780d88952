"""The EMA of the weights: sharded like the parameters, the same as one process computes, checkpointed and
resumed exactly, evaluated beside the live weights, exported with --ema."""

import json
import shutil

import pytest
import torch

from bigvit.models.registry import build_model
from bigvit.parallel.materialize import materialize
from bigvit.train.checkpoint import checkpoint_dirs
from bigvit.train.export import load_full_state
from bigvit.train.export import main as export_main
from tests.helpers import TINY, final_params, run_train, summary

pytestmark = pytest.mark.slow

DECAY = 0.8
# Plain SGD with a moderate step: the live weights of the layouts agree to fp32 rounding, and they move
# far enough in 10 steps that the EMA is far from both the initial and the final weights.
TRAIN = [
    *TINY,
    "data=synthetic",
    "data.batch_size=8",
    "data.eval_samples=16",
    "trainer.max_steps=10",
    "trainer.eval_every=4",  # EMA swapped in and out mid-run: training must go on with the live weights
    "trainer.precision=fp32",
    "optim=sgd",
    "optim.lr=0.5",
    "optim.momentum=0.0",
]
COMMON = [*TRAIN, "ema=on", f"ema.decay={DECAY}", "ema.warmup=true"]


def ema_params(run_dir, step: int | None = None) -> dict[str, torch.Tensor]:
    found = checkpoint_dirs(run_dir / "checkpoints")
    checkpoint = found[-1] if step is None else next(p for p in found if p.name.endswith(f"{step:08d}"))
    return load_full_state(checkpoint, ema=True)[0]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, a checkpoint after every step: the live weights the EMA must average."""
    run_dir = tmp_path_factory.mktemp("ema") / "single"
    run_train(
        run_dir, [*COMMON, "parallel=single", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=0"]
    )
    return run_dir


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ema") / "fsdp"
    run_train(run_dir, [*COMMON, "parallel=fsdp"], nproc=2)
    return run_dir


def test_ema_is_the_moving_average_of_the_weights(single):
    """The run's EMA equals the warmed-up average of its initial and per-step weights, computed here."""
    meta = json.loads((checkpoint_dirs(single / "checkpoints")[0] / "bigvit.json").read_text())
    model = materialize(build_model(meta["model"], device="meta"), torch.device("cpu"), seed=0)
    shadow = {name: p.detach().clone() for name, p in model.named_parameters()}
    for updates, checkpoint in enumerate(checkpoint_dirs(single / "checkpoints")):
        decay = min(DECAY, (1 + updates) / (10 + updates))
        live = load_full_state(checkpoint)[0]
        shadow = {name: decay * s + (1 - decay) * live[name] for name, s in shadow.items()}
    got, final = ema_params(single), final_params(single)
    for name, tensor in shadow.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    gap = max((got[n] - final[n]).abs().max().item() for n in got)
    assert gap > 1e-3  # the EMA is not the live weights under another name


def test_fsdp_ema_matches_single_process(single, fsdp):
    expected, got = ema_params(single), ema_params(fsdp)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    figures = summary(fsdp)["eval"]
    assert {"ema_top1", "ema_loss", "eval_top1"} <= figures.keys()
    logged = [json.loads(line) for line in (fsdp / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/ema_top1" in row for row in logged)


def test_fsdp_resume_reproduces_the_ema_bit_for_bit_and_reshards_to_one_process(tmp_path, fsdp):
    run_dir, elsewhere = tmp_path / "resumed", tmp_path / "resumed_single"
    run_train(run_dir, [*COMMON, "parallel=fsdp", "trainer.stop_step=5"], nproc=2)
    shutil.copytree(run_dir, elsewhere)
    run_train(run_dir, [*COMMON, "parallel=fsdp"], nproc=2)
    expected, got = ema_params(fsdp), ema_params(run_dir)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    # The sharded shadows load by name into one process's full ones (DCP reshards them like the model).
    run_train(elsewhere, [*COMMON, "parallel=single"])
    got = ema_params(elsewhere)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_tensor_parallel_run_with_ema_and_export(tmp_path, single):
    """TP shards the shadows like the parameters (DTensor shards); the EMA tracks one process's within
    rounding, and bigvit-export --ema writes it."""
    run_dir = tmp_path / "tp"
    # TINY's 3 heads do not split over tp=2; 2 heads of 24 keep the width at 48.
    run_train(run_dir, [*COMMON, "parallel=fsdp_tp", "parallel.tp=2", "model.heads=2"], nproc=2)
    assert "ema_top1" in summary(run_dir)["eval"]
    out = tmp_path / "ema.safetensors"
    export_main([str(run_dir), str(out), "--ema"])
    from safetensors.torch import load_file

    exported, ema, live = load_file(out), ema_params(run_dir), final_params(run_dir)
    assert exported.keys() == live.keys()
    for name, tensor in ema.items():
        assert torch.equal(exported[name], tensor), name
    assert any(not torch.equal(exported[n], live[n]) for n in live)


def test_a_branch_of_a_run_without_ema_starts_the_ema_at_its_weights(tmp_path):
    """bigvit-export --ema refuses the plain run; a branch of it with ema=on averages from its weights."""
    plain, branch = tmp_path / "plain", tmp_path / "branch"
    run_train(plain, [*TRAIN, "parallel=single", "trainer.max_steps=2"])
    with pytest.raises(SystemExit, match="holds no EMA weights.*ema.decay=0"):
        export_main([str(plain), str(tmp_path / "x.safetensors"), "--ema"])
    start = checkpoint_dirs(plain / "checkpoints")[-1]
    run_train(branch, [*COMMON, "parallel=single", "trainer.max_steps=3", f"trainer.branch_from={start}"])
    decay = min(DECAY, 3 / 12)  # the warm-up counts updates from step 0: this is update n=2
    loaded, live, got = final_params(plain), final_params(branch), ema_params(branch)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, decay * loaded[name] + (1 - decay) * live[name], rtol=0, atol=1e-6)


def test_engines_without_component_state_refuse_ema():
    """DeepSpeed's engine keeps its weights itself: ema.decay>0 is one clear error, ema.decay=0 is off."""
    from omegaconf import OmegaConf

    from bigvit.errors import ConfigError
    from bigvit.train.ema import build_ema

    class DeepSpeedLike:
        model = torch.nn.Linear(2, 2)

    assert build_ema(OmegaConf.create({"decay": 0.0, "every": 1}), DeepSpeedLike()) is None
    with pytest.raises(ConfigError, match=r"ema.decay=0.999 needs a PyTorch engine.*ema=none"):
        build_ema(OmegaConf.create({"decay": 0.999, "every": 1}), DeepSpeedLike())
    with pytest.raises(ConfigError, match=r"ema.decay=1.5 must be a number in \[0.0, 1.0\)"):
        build_ema(OmegaConf.create({"decay": 1.5, "every": 1}), DeepSpeedLike())
