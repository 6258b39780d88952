"""Parallel layouts side by side, real processes: per-rank tensor memory and step throughput.

Memory: live tensor bytes per rank after training (parameters + gradients + optimizer state + small
buffers), for DDP, FSDP2 and ZeRO-3 at world sizes 2 and 4, as a ratio to DDP / world size.
Throughput: each 2-process layout (1 thread each) against one process with 2 threads, same global batch.

    python bench/parallel.py [--model vit_s16] [--image-size 224] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, report

LAYOUTS = {"ddp": "parallel=ddp", "fsdp": "parallel=fsdp", "zero3": "parallel=deepspeed_zero3"}


def run(layout: str, nproc: int, args, run_dir: Path) -> dict:
    overrides = [
        f"model={args.model}",
        f"data.image_size={args.image_size}",
        "data=synthetic",
        f"data.batch_size={args.batch}",
        f"trainer.max_steps={args.steps}",
        "schedule.warmup_steps=1",
        "logger=none",
        "trainer.checkpoint_every=0",
        "data.eval_samples=0",
        f"trainer.run_dir={run_dir}",
        "logger.console_every=" + str(max(args.steps // 2, 1)),
        layout,
    ]
    command = [sys.executable, "-m", "bigvit.train", *overrides]
    if nproc > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "bigvit.train",
            *overrides,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(2 // nproc, 1)), "WANDB_MODE": "disabled"}
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layouts", nargs="+", default=sorted(LAYOUTS), choices=sorted(LAYOUTS))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bigvit-bench-"))
    single = run("parallel=single", 1, args, scratch / "single")
    memory_rows, speed_rows = [], []
    for world in (2, 4):
        results = {name: run(LAYOUTS[name], world, args, scratch / f"{name}{world}") for name in args.layouts}
        ddp_share = results["ddp"]["tensor_bytes"] / world if "ddp" in results else None
        for name, summary in results.items():
            memory_rows.append(
                {
                    "layout": name,
                    "world": world,
                    "MiB/rank": summary["tensor_bytes"] / 2**20,
                    "vs DDP/world": summary["tensor_bytes"] / ddp_share if ddp_share else float("nan"),
                    "vs 1 process": summary["tensor_bytes"] / single["tensor_bytes"],
                }
            )
            if world == 2:
                speed_rows.append(
                    {
                        "layout": f"{name} 2x1 thread",
                        "img/s": summary["images_per_sec"],
                        "vs 1 process x 2 threads": summary["images_per_sec"] / single["images_per_sec"],
                    }
                )
    speed_rows.insert(
        0,
        {"layout": "single 1x2 threads", "img/s": single["images_per_sec"], "vs 1 process x 2 threads": 1.0},
    )
    title = f"{args.model} @{args.image_size}px, AdamW fp32, global batch {args.batch}"
    report("parallel_memory", f"per-rank tensor memory · {title}", memory_rows)
    report("parallel_throughput", f"step throughput · {title}", speed_rows)


if __name__ == "__main__":
    main()
