"""Training stall per checkpoint: synchronous vs asynchronous DCP saves (trainer.checkpoint_async).

ViT-B/16 with AdamW (86.6 M parameters, ~1 GB of checkpoint) in one process, tiny images so that
steps are short and the checkpoint dominates; a checkpoint every 2 steps. The stall is the time the
training loop waits in `save` (logged as checkpoint/stall_s); an asynchronous save returns once the
state is staged in host memory, and the next save (or the end) waits for the write to finish.

    python bench/checkpoint_stall.py [--steps 8] [--every 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, report


def run(asynchronous: bool, steps: int, every: int, out: Path) -> dict:
    run_dir = out / ("async" if asynchronous else "sync")
    command = [
        sys.executable, "-m", "bigvit.train", "model=vit_b16", "data=synthetic", "data.image_size=32",
        "data.batch_size=8", f"trainer.max_steps={steps}", f"trainer.checkpoint_every={every}",
        "trainer.keep_checkpoints=1", "parallel=single", "logger=none", "schedule.warmup_steps=1",
        f"trainer.checkpoint_async={str(asynchronous).lower()}", f"trainer.run_dir={run_dir}",
    ]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stalls = [r["checkpoint/stall_s"] for r in records if "checkpoint/stall_s" in r]
    meta = json.loads(next((run_dir / "checkpoints").glob("step_*/bigvit.json")).read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"stalls": stalls, "write_s": meta["save_seconds"], "wall_s": summary["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--every", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        sync, asynchronous = (run(mode, args.steps, args.every, Path(out)) for mode in (False, True))
    # The last checkpoint of a run is followed by no training to overlap with: compare the others.
    sync_stall, async_stall = (statistics.median(r["stalls"][:-1]) for r in (sync, asynchronous))
    rows = [
        {
            "checkpoints": len(sync["stalls"]),
            "sync stall s": sync_stall,
            "async stall s": async_stall,
            "stall ratio (async/sync)": async_stall / sync_stall,
            "async write s (last)": asynchronous["write_s"],
            "sync run wall s": sync["wall_s"],
            "async run wall s": asynchronous["wall_s"],
        }
    ]
    report("checkpoint_stall", "training stall per checkpoint, ViT-B/16 + AdamW, one process", rows,
           {"sync": sync, "async": asynchronous})


if __name__ == "__main__":
    main()
