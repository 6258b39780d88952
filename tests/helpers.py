"""Run bigvit-train as users do: a real process (or torchrun with real gloo ranks), then read its outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A tiny ViT on 16 px synthetic images: seconds per run on 2 cores.
TINY = [
    "model=vit_ti16",
    "model.depth=2",
    "model.width=48",
    "model.heads=3",
    "model.mlp_dim=96",
    "model.patch_size=4",
    "data.image_size=16",
    "logger=none",
    "logger.console_every=1",
    "schedule.warmup_steps=2",
    "hardware.peak_tflops=1",
]

# ViT-22B's options together (no class token, MAP, parallel blocks, QK-norm, no QKV/norm biases) on a small model.
VIT_22B_STYLE = dict(
    class_token=False,
    pool="map",
    parallel_block=True,
    qk_norm=True,
    qkv_bias=False,
    norm_bias=False,
    layer_scale=1e-4,
    num_registers=3,
)


def wait_until(condition, timeout: float, interval: float = 0.2) -> bool:
    """Poll `condition()` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "bigvit.train", *overrides]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        "-m",
        "bigvit.train",
        *overrides,
    ]


def train_env(nproc: int) -> dict:
    """Same threads for every run of a comparison: results in fp32 depend on the reduction order."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1" if nproc > 1 else "2",
        "WANDB_SILENT": "true",
    }


def run_train(
    run_dir: Path,
    overrides: list[str],
    nproc: int = 1,
    check: bool = True,
    timeout: float = 300,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """bigvit-train (under torchrun when nproc > 1) in `run_dir`; `env` adds environment variables."""
    env = {**train_env(nproc), **(env or {})}
    cmd = train_command([f"trainer.run_dir={run_dir}", *overrides], nproc)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def losses(run_dir: Path) -> dict[int, float]:
    """Step → training loss (averaged over the global batch) from metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def final_params(run_dir: Path) -> dict:
    """The run's newest checkpointed weights as full tensors, read in this process without a process group."""
    from bigvit.train.export import load_full_state, resolve_checkpoint

    return load_full_state(resolve_checkpoint(run_dir))[0]


def compose_train(overrides: list[str]):
    """conf/train.yaml with `overrides`, composed in this process as bigvit-train composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bigvit.train import cli

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=cli.CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)
