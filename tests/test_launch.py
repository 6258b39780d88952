"""The launch scripts, run as users run them: one node × 2 processes vs two nodes × 1 process (c10d on 127.0.0.1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY, free_port, losses, summary

pytestmark = pytest.mark.slow

ARGS = [*TINY, "data=digits", "data.num_workers=0", "data.batch_size=16", "trainer.max_steps=6"]


def script_env(**extra) -> dict:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


def test_two_nodes_train_like_one_node_with_two_processes(tmp_path):
    data = [f"data.root={tmp_path / 'digits'}"]
    one_node = tmp_path / "one_node"
    subprocess.run(
        ["launch/torchrun.sh", *ARGS, *data, f"trainer.run_dir={one_node}"],
        cwd=ROOT,
        env=script_env(NPROC="2"),
        check=True,
        capture_output=True,
        timeout=300,
    )
    two_nodes = tmp_path / "two_nodes"
    env = script_env(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        NNODES="2",
        NPROC="1",
        RDZV_ID=f"test-{os.getpid()}",
    )
    agents = [
        subprocess.Popen(
            ["launch/multinode.sh", *ARGS, *data, f"trainer.run_dir={two_nodes}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    assert summary(two_nodes)["world_size"] == 2
    assert losses(two_nodes) == losses(one_node)  # same global ranks, same data, fp32: identical
    assert summary(two_nodes)["eval_top1"] == summary(one_node)["eval_top1"]


def test_multinode_names_the_missing_rendezvous_address():
    env = {k: v for k, v in script_env().items() if k != "MASTER_ADDR"}
    result = subprocess.run(["launch/multinode.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "set MASTER_ADDR" in result.stderr


def test_scripts_are_executable():
    for script in ("torchrun.sh", "multinode.sh"):
        assert os.access(Path(ROOT) / "launch" / script, os.X_OK)
