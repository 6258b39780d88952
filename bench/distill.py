"""Distillation on digits: a teacher (experiment=digits, its default model) trained first, then a smaller
student (experiment=distill: width 96, depth 4) trained for the same steps without and with the teacher's
soft targets, each on 2 local FSDP2 processes.

    python bench/distill.py [--steps 600] [--alpha 0.5] [--temperature 1.0]

Reports held-out top-1 of the teacher, the student alone and the distilled student, with the teacher's
forward FLOPs per image (reported apart: the student's MFU does not count them).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import report

from tests.helpers import run_train, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps of every run (digits: 600)")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        out = Path(out)
        common = ["logger=none", f"data.root={out / 'digits'}", f"trainer.max_steps={args.steps}"]
        common += [f"trainer.eval_every={args.steps}", f"trainer.checkpoint_every={args.steps}"]
        runs = {
            "teacher": ["experiment=digits"],
            "student alone": ["experiment=distill", "distill=none"],
            "student distilled": [
                "experiment=distill",
                f"distill.teacher.weights={out / 'teacher'}",
                f"distill.alpha={args.alpha}",
                f"distill.temperature={args.temperature}",
            ],
        }
        rows = []
        for name, overrides in runs.items():
            start = time.perf_counter()
            run_dir = out / name.replace(" ", "_")
            run_train(run_dir, [*common, *overrides], nproc=2, timeout=7200)
            result = summary(run_dir)
            rows.append(
                {
                    "run": name,
                    "params": result["params"],
                    "steps": result["final_step"],
                    "top-1": result["eval_top1"],
                    "eval loss": result["eval_loss"],
                    "train loss": result["train_loss"],
                    "train MFLOP/img": result["flops_per_image"] / 1e6,
                    "teacher MFLOP/img": (result.get("teacher_flops_per_image") or 0) / 1e6,
                    "wall s": time.perf_counter() - start,
                }
            )
            print(f"{name}: top-1 {result['eval_top1']:.4f}", flush=True)
    title = f"digits distillation, {args.steps} steps each, alpha={args.alpha} T={args.temperature}"
    report("distill", title, rows, {"args": vars(args)})


if __name__ == "__main__":
    main()
