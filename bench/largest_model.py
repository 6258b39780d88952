"""The largest ViT this 2-core, 24 GiB machine trains: real optimizer steps, peak memory per process.

ViT-g/14 (1.01 B parameters) at 224 px with FSDP2 on 2 processes and full activation checkpointing,
AdamW (or `--optim lean`), on one fixed synthetic batch so the loss must fall; ViT-G/14 (1.84 B) with
the lean optimizer in one process (`--nproc 1`: two FSDP2 processes would each carry ~2.7 GiB of
runtime beside their shards, more than this machine has). Printed beside the measurement: the dry
run's per-rank model-state bytes and the planner's peak (scaling/memory.py, the same model the cluster
planner uses), with the reserve set to the measured RSS of a bare process (Python, torch, bigvit).

    python bench/largest_model.py [--model vit_g14] [--optim adamw] [--steps 3] [--nproc 2]
    python bench/largest_model.py --model vit_G14 --optim lean --nproc 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, report


def bare_process_rss() -> int:
    """Resident bytes of a process that has imported everything training imports, before any model."""
    probe = "import psutil, torch, bigvit.train.cli; print(psutil.Process().memory_info().rss)"
    return int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)


def planner_peak(args, layout: str) -> float:
    """The planner's per-process peak for this run: model state, activations, buffers, allocator overhead."""
    import bigvit
    from bigvit.parallel.mesh import ParallelDims
    from bigvit.scaling.assumptions import Assumptions
    from bigvit.scaling.layouts import Layout
    from bigvit.scaling.memory import memory_breakdown

    cfg = bigvit.model_config(args.model, num_classes=1000, image_size=args.image_size)
    dims = ParallelDims(1, args.nproc, 1, 1)
    assumptions = Assumptions(reserved_gib=bare_process_rss() / 2**30)
    memory = memory_breakdown(
        cfg, Layout(layout, layout, dims, "full"), 2 // args.nproc, 1, assumptions, args.optim, "fp32", "fp32"
    )
    return memory["total_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_g14")
    parser.add_argument("--optim", default="adamw", choices=["adamw", "lean"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--nproc", type=int, default=2, choices=[1, 2])
    parser.add_argument(
        "--mmap-threshold-mib",
        type=int,
        default=4,
        help="glibc M_MMAP_THRESHOLD (0: glibc's adaptive default). FSDP2 frees and re-allocates "
        "block-sized tensors every step; under the adaptive threshold glibc keeps them on its heaps "
        "and the RSS of a ViT-g/14 rank grew 2 GiB above its tensors (10.5 vs 8.5 GiB peak at 4 MiB).",
    )
    args = parser.parse_args()
    layout = "fsdp" if args.nproc > 1 else "single"
    run_dir = Path(tempfile.mkdtemp(prefix="bigvit-largest-"))
    overrides = [
        f"model={args.model}",
        f"parallel={layout}",
        "parallel.activation_checkpointing=full",
        f"optim={args.optim}",
        "optim.lr=1e-4",
        "data=synthetic",
        f"data.image_size={args.image_size}",
        "data.num_classes=1000",
        "data.batch_size=2",
        "data.repeat_batch=true",
        "data.eval_samples=0",
        f"trainer.max_steps={args.steps}",
        "schedule=constant",
        "schedule.warmup_steps=0",
        "logger=none",
        "logger.console_every=1",
        f"trainer.run_dir={run_dir}",
        "trainer.keep_checkpoints=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // args.nproc), "WANDB_MODE": "disabled"}
    if args.mmap_threshold_mib:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold_mib * 2**20)
    command = [sys.executable, "-m", "bigvit.train", *overrides]
    if args.nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command[1:]]
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [
        json.loads(line)["train/loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "bigvit.scaling.plan_cli",
            f"model={args.model}",
            f"parallel={layout}",
            f"optim={args.optim}",
            f"plan.world_size={args.nproc}",
            "plan.format=json",
            "trainer.precision=fp32",
            "model.num_classes=1000",
            f"model.image_size={args.image_size}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    planned = json.loads(plan.stdout)
    model_state = planned["params_bytes"] + planned["grads_bytes"] + planned["optimizer_bytes"]
    predicted = planner_peak(args, layout)
    rows = [
        {
            "model": args.model,
            "params": summary["params"],
            "optimizer": args.optim,
            "steps": summary["final_step"],
            "loss first": losses[0],
            "loss last": losses[-1],
            "step s": summary["wall_seconds"] / summary["final_step"],
            "peak RSS GiB/proc": summary["peak_memory_bytes"] / 2**30,
            "tensors GiB/proc": summary["tensor_bytes"] / 2**30,
            "dry-run model state GiB/rank": model_state / 2**30,
            "planner peak GiB/proc": predicted / 2**30,
            "measured/planner": summary["peak_memory_bytes"] / predicted,
        }
    ]
    shutil.rmtree(run_dir)  # the checkpoint of a billion-parameter model is tens of GB
    report(
        f"largest_model_{args.model}_{args.optim}",
        f"{'FSDP2 × 2 processes' if args.nproc > 1 else 'one process'} + full AC, fp32, batch 2 @224, "
        f"glibc mmap threshold {f'{args.mmap_threshold_mib} MiB' if args.mmap_threshold_mib else 'adaptive'}",
        rows,
        {"losses": losses},
    )


if __name__ == "__main__":
    main()
