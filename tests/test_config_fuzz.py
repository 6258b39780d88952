"""Config fuzzing (issue 14): every combination of model shape, parallel layout, batch and accumulation,
schedule, precision, optimizer and data options either trains one step or stops at start-up with one
`bigvit: error:` line naming a key; never a traceback from deep inside, never a hang.

Each example is composed as bigvit-train composes it (conf/ through Hydra's compose API) and run through
`bigvit.train.cli.run` in this process: a subprocess per example would spend seconds on imports. Layouts
of more than one rank run on a fake process group (collectives are no-ops, every local shape is the one
a real rank holds), so the config checks and the layout code run as on rank 0 of a real job; a few
real two-process runs back them up.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import signal
import sys
import time
from itertools import count
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from hydra.core.global_hydra import GlobalHydra
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bigvit.parallel.parallelize import set_gradient_sync
from bigvit.train import cli, engine
from bigvit.train.trainer import Trainer
from tests.helpers import TINY, compose_train, run_train, summary

EXAMPLES = int(os.environ.get("BIGVIT_FUZZ_EXAMPLES", 240))  # more for a longer search by hand
EXAMPLE_TIMEOUT_S = 60  # a hang: far beyond the ~0.2 s an example takes
# The one line names a key: `model.heads=5 ...`, `parallel.dp_shard=-1 ...`, `parallel=single ...`.
NAMES_A_KEY = re.compile(r"\b(model|data|parallel|trainer|schedule|optim|logger|hardware)(\.\w+|=)")
BASE = [
    "model=vit_ti16",
    "data=synthetic",
    "data.eval_samples=0",  # no evaluation pass
    "logger=none",
    "hardware.peak_tflops=1",  # no start-up matmul measurement
    "trainer.watchdog_s=null",
    "trainer.keep_checkpoints=1",  # the final checkpoint is written (and so exercised) all the same
]


def pick(values: list) -> st.SearchStrategy:
    return st.sampled_from(values)


@st.composite
def model_keys(draw) -> dict:
    windowed = draw(pick([False, False, False, True]))  # ViTDet-style: patches only, pooled
    class_token = not windowed and draw(pick([True, True, False]))
    return {
        "model.width": draw(pick([16, 24, 32, 48])),
        "model.heads": draw(pick([1, 2, 2, 4, 4, 3, 8])),
        "model.depth": draw(pick([1, 2])),
        "model.mlp_dim": draw(pick([16, 32, 64, 24])),
        "model.patch_size": draw(pick([4, 8, 8])),
        "model.class_token": class_token,
        "model.pool": draw(pick(["cls", "gap", "map"] if class_token else ["gap", "map"])),
        "model.num_registers": 0 if windowed else draw(pick([0, 0, 1, 3])),
        "model.qk_norm": draw(st.booleans()),
        "model.parallel_block": draw(st.booleans()),
        "model.layer_scale": draw(pick(["null", "null", 1e-4])),
        "model.patch_dropout": 0.0 if windowed else draw(pick([0.0, 0.0, 0.25, 0.5])),
        "model.window_size": draw(pick([2, 3])) if windowed else 0,
        "model.global_every": draw(pick([0, 1, 2])) if windowed else 0,
        "model.drop_path": draw(pick([0.0, 0.1])),
        "model.attn_impl": draw(pick(["auto", "sdpa", "math"])),
    }


@st.composite
def data_keys(draw) -> dict:
    return {
        "data.image_size": draw(pick([16, 16, 32, 24])),
        "data.num_classes": draw(pick([2, 10])),
        "data.batch_size": draw(pick([4, 8, 8, 2, 6])),
        "data.resolution_schedule": draw(
            pick(["null", "null", "null", "[[0,16],[0.5,32]]", "[[0,8],[0.5,16]]"])
        ),
        "data.resolution_batch_scaling": draw(st.booleans()),
        "data.repeat_batch": draw(st.booleans()),
    }


@st.composite
def schedule_keys(draw) -> dict:
    name = draw(pick(["constant", "cosine", "linear", "rsqrt", "wsd"]))
    keys = {
        "schedule": name,
        "schedule.warmup_steps": draw(pick([0, 0, 1, 2])),
        "schedule.min_factor": draw(pick([0.0, 0.1, 1.0])),
    }
    if name == "wsd":
        keys["schedule.decay_fraction"] = draw(pick([0.2, 0.5, 1.0]))
        keys["schedule.decay_shape"] = draw(pick(["sqrt", "linear"]))
    return keys


@st.composite
def optim_keys(draw) -> dict:
    name = draw(pick(["adamw", "sgd", "lean"]))
    return {
        "optim": name,
        "optim.layer_decay": draw(pick([1.0, 0.75])),
        "optim.weight_decay": draw(pick([0.0, 0.05])),
        "optim.grad_clip": draw(pick(["null", 1.0])),
        **({"optim.momentum": 0.9} if name == "sgd" else {"optim.betas": "[0.9,0.95]", "optim.eps": 1e-8}),
    }


# conf/parallel's PyTorch layouts (DeepSpeed brings its own runtime, which a fake process group cannot host)
# and the world sizes each fills; a layout may also meet a world it does not fit.
LAYOUTS = {
    "single": [1],
    "fsdp": [1, 2, 4],
    "ddp": [1, 2],
    "fsdp_tp": [2, 4],
    "fsdp_cp": [2, 4],
    "hsdp": [4, 8],
}


@st.composite
def parallel_keys(draw) -> tuple[tuple[int, int], dict]:
    """((world size, rank), keys): a layout and a world size it usually fits, sometimes with its own
    degrees, seen from the first or the last rank (which holds the uneven ends of data splits)."""
    layout = draw(pick(list(LAYOUTS)))
    world = draw(pick(LAYOUTS[layout] * 3 + [1, 2, 4, 8]))
    rank = draw(pick([0, 0, world - 1]))
    keys = {"parallel": layout}
    if layout in ("fsdp_tp", "fsdp_cp") and draw(st.booleans()):
        keys["parallel.tp" if layout == "fsdp_tp" else "parallel.cp"] = draw(pick([1, 2, 4]))
    if layout == "hsdp" and draw(st.booleans()):
        keys["parallel.dp_shard"], keys["parallel.dp_replicate"] = draw(
            pick([(2, -1), (-1, 2), (4, 2), (2, 2)])
        )
    keys.update(
        {
            "parallel.sequence_parallel": draw(st.booleans()),
            "parallel.activation_checkpointing": draw(pick(["none", "none", "full", "selective"])),
            "parallel.ac_every": draw(pick([1, 2])),
            "parallel.reshard_after_forward": draw(st.booleans()),
            "parallel.reduce_dtype": draw(pick(["fp32", "fp32", "bf16"])),
        }
    )
    return (world, rank), keys


@st.composite
def trainer_keys(draw) -> dict:
    return {
        "trainer.max_steps": draw(pick([1, 1, 1, 2])),
        "trainer.grad_accum": draw(pick([1, 1, 2])),
        "trainer.precision": draw(pick(["fp32", "fp32", "fp32", "bf16", "bf16", "fp16"])),
        "trainer.label_smoothing": draw(pick([0.0, 0.1])),
    }


# Values a user may type that cannot work: zero, negative, out of range, unknown names, wrong types.
ODD = {
    "model.width": [0, -8, 8],
    "model.heads": [0, 5, -1],
    "model.depth": [0, -1],
    "model.mlp_dim": [0, 3],
    "model.patch_size": [0, 3, 64],
    "model.class_token": [False],
    "model.pool": ["mean", "cls"],
    "model.num_registers": [-1, 5],
    "model.layer_scale": [0.0, -1.0],
    "model.patch_dropout": [-0.1, 0.9, 0.99, 1.0],
    "model.window_size": [-1, 1, 3, 9],
    "model.global_every": [-1, 3],
    "model.drop_path": [1.0, -0.5],
    "model.attn_impl": ["flash_attn", "flash"],
    "data.image_size": [0, -16, 8, 12, 4, 16.0, "abc"],
    "data.num_classes": [0, 1, -2, "abc"],
    "data.eval_samples": [1, 3, 7],  # an evaluation pass at the end, uneven over ranks
    "model.num_classes": [0, 5, 100],
    "model.in_chans": [1, 0],
    "data.batch_size": [0, -4, 1, 3, "abc"],
    "data.resolution_schedule": [
        "[[0.5,16]]",
        "[[0,16],[0,32]]",
        "[[0,12]]",
        "[[0,16],[1.0,32]]",
        "[16]",
        "[[0,-16]]",
        "[[0,4]]",
        "[[0,16],[0.5,8]]",
        "[]",
        "[[0,16,3]]",
        "16",
    ],
    "schedule.warmup_steps": [-1, 3, 10, 1.5, "abc"],
    "schedule.min_factor": [-0.5, 1.5, "abc"],
    "schedule.decay_fraction": [0.0, -0.2, 1.5, "abc"],
    "schedule.decay_shape": ["cosine"],
    "optim.lr": [0.0, -1.0, "abc"],
    "optim.layer_decay": [0.0, -1.0, 2.0],
    "optim.weight_decay": [-0.1],
    "optim.eps": [-1.0, "abc"],
    "optim.no_decay": [5, "pos_embed"],
    "optim.grad_clip": [0.0, -1.0],
    "optim.betas": ["[0.9]", "[0.9,1.5]", "0.9"],
    "optim.momentum": [-0.5, "abc"],
    "parallel.tp": [0, -2, 3, 2, 4, "null"],
    "parallel.cp": [0, 2, 3, "null"],
    "parallel.dp_shard": [0, -1, 3, "abc"],
    "parallel.dp_replicate": [0, -1, 2],
    "parallel.activation_checkpointing": ["some", "true"],
    "parallel.ac_every": [0, -1],
    "parallel.reduce_dtype": ["fp8", "fp16"],
    "parallel.cpu_offload": [True],
    "parallel.strategy": ["nope"],
    "trainer.max_steps": [0, -1, 1.5, "abc"],
    "trainer.grad_accum": [0, 3, 8],
    "trainer.precision": ["fp64", "fp16"],
    "trainer.label_smoothing": [-0.1, 1.5, "abc"],
    "trainer.stop_step": [0, -1, 5, "abc"],
    "trainer.checkpoint_at": ["[1]", "[0]", 3],
    "trainer.resume": ["never", "/nonexistent/step_00000001"],
    "trainer.seed": [-1, 1.5, "abc"],
    "trainer.dist_timeout_s": [0, -1],
    "trainer.watchdog_s": [-1, "abc"],  # a small positive one is a real (aborting) watchdog: not here
    "logger.console_every": [0, -1, "abc"],
    "hardware.peak_tflops": [-1, "abc"],
    "trainer.eval_every": [-1],
    "trainer.checkpoint_every": [-1],
    "trainer.keep_checkpoints": [-1, 0],
}


# Keys that only some choices of their group define (overriding a key that is not there is Hydra's error).
ONLY_IN = {"schedule.decay_fraction", "schedule.decay_shape", "optim.betas", "optim.eps", "optim.momentum"}


@st.composite
def configs(draw) -> tuple[tuple[int, int], list[str]]:
    """((world size, rank), overrides): a mostly sensible config, in most examples with one or two odd values."""
    place, keys = draw(parallel_keys())
    for part in (model_keys, data_keys, schedule_keys, optim_keys, trainer_keys):
        keys.update(draw(part()))
    odd = draw(pick([0, 0, 1, 1, 1, 2]))
    for key in draw(st.lists(pick(sorted(ODD)), min_size=odd, max_size=odd, unique=True)):
        if key in keys or key not in ONLY_IN:  # a key this schedule or optimizer has
            keys[key] = draw(pick(ODD[key]))
    return place, [f"{key}={value}" for key, value in keys.items()]


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise Hang in this (the main) thread after `seconds`: a hang fails the example instead of the suite.
    The timer pytest-timeout armed for the whole test is put back afterwards, less the time spent."""

    def expire(signum, frame):
        raise Hang(f"no result after {seconds} s")

    outer, start = signal.getitimer(signal.ITIMER_REAL)[0], time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.001))


@contextlib.contextmanager
def world(size: int, rank: int, strategy: str):
    """A fake process group of `size` ranks seen from `rank`, described in the environment as torchrun
    would: cli.run joins it (init_distributed finds it initialized) and tears it down."""
    if size == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    environ = {"WORLD_SIZE": str(size), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, environ))
        # DCP's save plan gathers every rank's part, which a fake group cannot deliver: no checkpoint
        # here (the real two-process runs below write theirs).
        stack.enter_context(mock.patch.object(Trainer, "save", lambda self: None))
        if strategy == "ddp":  # a fake all-reduce hands DDP's hook no tensor: keep gradients local
            stack.enter_context(mock.patch.object(engine, "set_gradient_sync", local_gradients))
        stack.callback(setattr, sys, "excepthook", sys.excepthook)  # each process group wraps it once more
        dist.init_process_group("fake", rank=rank, world_size=size, store=FakeStore())
        try:
            yield
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            forget_meshes()


def forget_meshes() -> None:
    """Drop DTensor's caches, keyed by meshes equal in value: a later world of the same shape would get
    results holding this world's mesh, with its (destroyed) groups and its rank's coordinates. A real
    job, with one process group per process, never meets them."""
    from torch.distributed.tensor import _redistribute
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()  # the Python cache and the C++ fast path's
    _redistribute._gen_transform_infos.cache_clear()
    _redistribute.clear_redistribute_planner_cache()


def local_gradients(model, enabled: bool) -> None:
    set_gradient_sync(model, False)


def close_log_files() -> None:
    """cli.run adds a train.log handler per run; close them so hundreds of runs hold no open files."""
    for handler in logging.getLogger("bigvit").handlers:
        handler.close()
    logging.getLogger("bigvit").handlers.clear()


def outcome(size: int, rank: int, overrides: list[str]) -> str | None:
    """None when the run trained, else the one line bigvit-train would print for the error it raised."""
    cfg = compose_train(overrides)
    try:
        with time_limit(EXAMPLE_TIMEOUT_S), world(size, rank, cfg.parallel.strategy):
            cli.run(cfg)
    except cli.USER_ERRORS as error:
        return f"bigvit: error: {error}"
    finally:
        close_log_files()
    return None


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Fresh run directories, in a process set up for hundreds of tiny runs: one thread (a tiny matmul
    split over the two threads of a busy machine waits more than it computes), and the objects alive now
    (torch, Hydra, Hypothesis) frozen out of the way of the garbage collection cli.run's teardown does,
    which over the whole heap costs more than the training step."""
    threads, logger = torch.get_num_threads(), logging.getLogger("bigvit")
    level, propagate = logger.level, logger.propagate  # cli.run's setup_logging changes both
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    root = tmp_path_factory.mktemp("fuzz")
    yield (root / f"run{index}" for index in count())
    gc.unfreeze()
    torch.set_num_threads(threads)
    logger.setLevel(level)
    logger.propagate = propagate
    GlobalHydra.instance().clear()


@settings(
    max_examples=EXAMPLES,
    derandomize=True,  # CI runs the same examples every time
    database=None,
    deadline=None,  # time_limit ends a hang; a measured deadline would only flag a busy machine
    suppress_health_check=[HealthCheck.too_slow],
)
@given(example=configs())
def test_every_config_trains_a_step_or_fails_at_start_up_naming_its_key(example, run_dirs):
    (size, rank), overrides = example
    run_dir = next(run_dirs)
    line = outcome(size, rank, [*BASE, *overrides, f"trainer.run_dir={run_dir}"])
    if line is None:
        event("trained a step")  # --hypothesis-show-statistics counts the outcomes
        assert rank != 0 or (run_dir / "summary.json").is_file()  # rank 0 writes the run's files
        return
    assert "\n" not in line, line
    key = NAMES_A_KEY.search(line)
    assert key, f"the error names no key: {line}"
    event(f"stopped at start-up naming {key.group()}")


# What a fake group cannot show: DDP's gradient all-reduce and DCP's checkpoint over real ranks, on layouts
# whose shapes need padding (class token and registers under sequence sharding) and patch dropout.
TWO_RANKS = {
    "ddp": ["parallel=ddp", "trainer.precision=fp16", "optim=sgd", "schedule=rsqrt", "model.pool=map"],
    "fsdp_tp": [
        "parallel=fsdp_tp",
        "trainer.precision=bf16",
        "schedule=wsd",
        "data.resolution_schedule=[[0,8],[0.5,16]]",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", TWO_RANKS.values(), ids=TWO_RANKS.keys())
def test_two_real_ranks_train_an_awkward_config(tmp_path, layout):
    shapes = ["model.heads=4", "model.num_registers=2", "model.patch_dropout=0.25", "model.qk_norm=true"]
    steps = ["trainer.max_steps=2", "trainer.grad_accum=2", "data.batch_size=4", "data.eval_samples=5"]
    run_train(tmp_path, [*TINY, *shapes, *steps, *layout], nproc=2, timeout=180)
    assert summary(tmp_path)["final_step"] == 2
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()
