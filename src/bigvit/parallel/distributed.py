"""Process-group set-up and teardown, the same on a laptop (gloo, CPU) and a cluster (NCCL, CUDA)."""

from __future__ import annotations

import gc
import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def slurm_node_address(node: str) -> str:
    """A node's NodeAddr: usually its name, but only Slurm knows for sure."""
    info = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, check=True)
    fields = dict(word.split("=", 1) for word in info.stdout.split() if "=" in word)
    return fields.get("NodeAddr", node)


def adopt_slurm_step() -> None:
    """Describe an srun step with one process per task (as submitit launches) the way torchrun would.

    Only inside a multi-task step and only where no launcher has set WORLD_SIZE: torchrun under
    Slurm (launch/slurm/train.sbatch) sets its own.
    """
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if "WORLD_SIZE" in os.environ or tasks == 1 or "SLURM_PROCID" not in os.environ:
        return
    nodes = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_STEP_NODELIST"]],
        capture_output=True,
        text=True,
        check=True,
    )
    os.environ.setdefault("MASTER_ADDR", slurm_node_address(nodes.stdout.split()[0]))
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ["SLURM_JOB_ID"]) % 10000))
    os.environ["WORLD_SIZE"] = str(tasks)
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(timeout_s: float = 600.0) -> DistEnv:
    """Join the process group that torchrun, or an srun step of several tasks, describes in the environment.

    Without either (no WORLD_SIZE), runs as a single process with no process group.
    """
    adopt_slurm_step()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None
        )
    return DistEnv(rank, local_rank, world_size, device)


def teardown() -> None:
    """Leave the process group cleanly.

    Collecting garbage first matters: gloo processes otherwise abort at exit about a quarter of the
    time ("terminate called without an active exception"), see CPU_NOTES.
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (identity without a process group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce(tensor: torch.Tensor, op: str = "avg") -> torch.Tensor:
    """In-place all-reduce over all ranks (gloo has no AVG, so average as sum / world)."""
    if not dist.is_initialized():
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    dist.all_reduce(tensor, op=reduce_op)
    if op == "avg":
        tensor /= dist.get_world_size()
    return tensor
