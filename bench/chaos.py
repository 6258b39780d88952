"""Chaos resume, the long version: a 2-process FSDP2 run on the digits shards is SIGKILLed 20 times
at seeded random moments (forward, backward, optimizer step, during a checkpoint write), resumed
with trainer.resume=auto after each, and compared with a run that was never interrupted.

    python bench/chaos.py [--kills 20] [--seed 1]

Reports the kills by phase, the steps recomputed, the wall time against the uninterrupted run, and
whether the final weights and every logged loss are bit-identical (they must be).
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import torch
from common import report

from tests.helpers import TINY, final_params, losses, run_train
from tests.test_chaos import kill_plan, killed

MODEL = ["model.width=96", "model.depth=4", "model.heads=4", "model.mlp_dim=192", "model.patch_size=4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--every", type=int, default=3, help="steps between checkpoints")
    args = parser.parse_args()
    steps = args.kills * (args.every + 4)  # room for every kill, then some steps after the last
    with tempfile.TemporaryDirectory() as out:
        out = Path(out)
        overrides = [
            *TINY, *MODEL, "data=digits", f"data.root={out / 'digits'}", "data.batch_size=32",
            f"trainer.max_steps={steps}", f"trainer.checkpoint_every={args.every}", "trainer.keep_checkpoints=1",
            "trainer.precision=fp32", "trainer.eval_every=0",
        ]
        start = time.perf_counter()
        run_train(out / "reference", overrides, nproc=2, timeout=3600)
        reference_s = time.perf_counter() - start
        plan = kill_plan(args.seed, args.kills, steps, args.every)
        start, run_dir = time.perf_counter(), out / "chaos"
        for phase, step, rank in plan:
            env = {"BIGVIT_CHAOS": f"{phase}@{step}:{rank}"}
            result = run_train(run_dir, [*overrides, "trainer.resume=auto"], nproc=2, check=False, env=env, timeout=3600)
            if not killed(result):
                raise SystemExit(f"the kill {phase}@{step}:{rank} did not happen:\n{result.stderr[-2000:]}")
            print(f"killed {phase}@{step} on rank {rank}", flush=True)
        run_train(run_dir, [*overrides, "trainer.resume=auto"], nproc=2, timeout=3600)
        chaos_s = time.perf_counter() - start
        expected, got = final_params(out / "reference"), final_params(run_dir)
        identical = expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
        same_losses = losses(run_dir) == losses(out / "reference")
    phases = collections.Counter(phase for phase, _, _ in plan)
    rows = [
        {
            "kills": len(plan),
            **{f"{phase} kills": phases[phase] for phase in ("forward", "backward", "optimizer", "checkpoint")},
            "steps": steps,
            "uninterrupted s": reference_s,
            "with kills s": chaos_s,
            "weights bit-identical": identical,
            "losses bit-identical": same_losses,
        }
    ]
    report("chaos", f"{len(plan)} SIGKILLs of a 2-process FSDP2 run, resumed each time", rows, {"plan": plan})
    if not (identical and same_losses):
        raise SystemExit("the resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    main()
