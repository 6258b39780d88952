"""Sigmoid against softmax on digits: experiment=digits trained twice for the same steps, settings and data
order, once with objective=classify (softmax cross-entropy) and once with objective=sigmoid (each digit read
as a one-label set, sigmoid binary cross-entropy, head bias starting at -10), each on 2 local FSDP2 processes.

    python bench/sigmoid_digits.py [--steps 600] [--head-bias-init B] [OVERRIDES...]

--head-bias-init sets the sigmoid run's objective.head_bias_init (default: conf/objective/sigmoid.yaml's −10,
big_vision's JFT value, ≈ −log(K − 1) for K = 18k classes); −log(9) ≈ −2.197 is the prior log-odds of a
digit's label, where −10 leaves the head's logits image-independent for hundreds of steps.

Reports held-out top-1 of both (sigmoid's is precision@1, the same quantity for one label per image), the
sigmoid run's mean per-label precision/recall at p = 0.5, and wall time; writes bench/results/sigmoid_digits.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import report
from omegaconf import OmegaConf

from tests.helpers import run_train, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps of each run (digits: 600)")
    parser.add_argument("--head-bias-init", type=float, help="the sigmoid run's objective.head_bias_init")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs, e.g. data.batch_size=64")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        out = Path(out)
        common = ["experiment=digits", "logger=none", f"data.root={out / 'digits'}"]
        common += [f"trainer.max_steps={args.steps}", f"trainer.eval_every={args.steps}", "trainer.checkpoint_every=0"]
        rows = []
        bias = [] if args.head_bias_init is None else [f"objective.head_bias_init={args.head_bias_init}"]
        for objective, extra in (("classify", []), ("sigmoid", bias)):
            start = time.perf_counter()
            run_dir = out / objective
            run_train(run_dir, [*common, f"objective={objective}", *extra, *args.overrides], nproc=2, timeout=7200)
            result = summary(run_dir)
            rows.append(
                {
                    "objective": objective,
                    "head bias init": OmegaConf.load(run_dir / "config.yaml").model.head_bias_init,
                    "steps": result["final_step"],
                    "top-1": result["eval_top1"],
                    "eval loss": result["eval_loss"],
                    "precision@0.5": result["eval"].get("eval_precision", float("nan")),
                    "recall@0.5": result["eval"].get("eval_recall", float("nan")),
                    "wall s": time.perf_counter() - start,
                }
            )
            print(f"{objective}: top-1 {result['eval_top1']:.4f}", flush=True)
    gap = rows[0]["top-1"] - rows[1]["top-1"]
    title = f"digits softmax vs sigmoid, {args.steps} steps each: softmax − sigmoid top-1 = {gap:+.3f}"
    report("sigmoid_digits", title, rows, {"args": vars(args), "softmax_minus_sigmoid": gap})


if __name__ == "__main__":
    main()
