"""Cutting the cost of tokens, side by side: each method against its baseline in one run.

- patch dropout 0.5 vs none: ViT-B/16 at 224 px;
- windowed attention (14×14 windows, global every 4th block) vs global attention: ViT-B/16 (no class
  token, GAP, as ViTDet) at 448 px and at 1024 px;
- progressive resizing 128 → 224 px (half the steps each) vs 224 px throughout, same step count.

Each pair trains (forward + backward + AdamW, fp32, one process) step by step in alternation, so that
machine drift hits both alike; images/s are from median step times, and the ratio is method / baseline.
FLOPs of one training step are counted by torch's FlopCounterMode on the meta device (math attention
kernel: the CPU SDPA kernel has no FLOP formula; images requiring grad, so the patch conv's input
gradient is computed as the convention counts it) next to `scaling/flops.py`'s `train_flops`.

`--digits` also trains experiment=digits twice with torchrun (2 processes, FSDP2), with and without
model.patch_dropout=0.5, and reports both top-1 figures.

    python bench/tokens.py [--steps 3] [--digits] [--only dropout windowed-448 windowed-1024 progressive]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, report
from torch.utils.flop_counter import FlopCounterMode

import bigvit
from bigvit.scaling.flops import train_flops

WINDOWED = dict(class_token=False, pool="gap", window_size=14, global_every=4)
GLOBAL = dict(class_token=False, pool="gap")


def counted_train_flops(cfg, image_size: int) -> int:
    """FlopCounterMode's count of one training step (forward + backward) of one image, on the meta device."""
    model = bigvit.build_model(cfg, device="meta", attn_impl="math").train()
    images = torch.randn(1, 3, image_size, image_size, device="meta", requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops()


class Trainee:
    """A model, its optimizer and the batches it trains on (one per image size)."""

    def __init__(self, cfg, batch: int):
        torch.manual_seed(0)
        self.cfg = bigvit.model_config(cfg)
        self.model = bigvit.build_model(self.cfg).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.batch = batch

    def step(self, image_size: int) -> float:
        images = torch.randn(self.batch, 3, image_size, image_size)
        labels = torch.randint(0, self.cfg.num_classes, (self.batch,))
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(images), labels).backward()
        self.optimizer.step()
        return time.perf_counter() - start


def compare(name: str, method: Trainee, baseline: Trainee, sizes: list[int], base_size: int) -> dict:
    """Alternate one step of each (after one warm-up step each); `sizes` is the method's size per step."""
    method.step(sizes[0])
    baseline.step(base_size)
    times = {"method": [], "baseline": []}
    for size in sizes:
        times["method"].append(method.step(size))
        times["baseline"].append(baseline.step(base_size))
        print(f"  {name}: {size} px {times['method'][-1]:.2f} s | baseline {times['baseline'][-1]:.2f} s", flush=True)
    # Per image, the mean over the method's steps (a schedule's sizes differ).
    counts = {size: counted_train_flops(method.cfg, size) for size in set(sizes)}
    method_flops = statistics.mean(train_flops(method.cfg, size) for size in sizes)
    counted = statistics.mean(counts[size] for size in sizes)
    base_flops, base_counted = train_flops(baseline.cfg, base_size), counted_train_flops(baseline.cfg, base_size)
    # A schedule compares total time over the same steps; a fixed pair, the medians.
    summarize = sum if len(set(sizes)) > 1 else statistics.median
    method_s, base_s = summarize(times["method"]), summarize(times["baseline"])
    per_step = len(sizes) if summarize is sum else 1
    return {
        "comparison": name,
        "img/s": method.batch * per_step / method_s,
        "baseline img/s": baseline.batch * per_step / base_s,
        "speed-up": base_s / method_s,
        # GFLOP per image of one training step: scaling/flops.py, and FlopCounterMode's count.
        "GFLOP": method_flops / 1e9,
        "counted": counted / 1e9,
        "baseline GFLOP": base_flops / 1e9,
        "baseline counted": base_counted / 1e9,
        "FLOPs saved": 1 - method_flops / base_flops,
    }


def digits_top1(patch_dropout: float, out: Path) -> dict:
    """experiment=digits on 2 processes (FSDP2) with model.patch_dropout; its final eval and throughput."""
    run_dir = out / f"digits_pd{patch_dropout}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bigvit.train",
        "experiment=digits", "logger=none", f"model.patch_dropout={patch_dropout}", f"trainer.run_dir={run_dir}",
    ]
    print("  " + " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"top1": summary["eval_top1"], "images_per_sec": summary["images_per_sec"], "wall_s": summary["wall_seconds"]}


CASES = {
    "dropout": lambda batch: (
        "patch dropout 0.5 vs none, B/16 224 px",
        Trainee(bigvit.model_config("vit_b16", patch_dropout=0.5), batch),
        Trainee("vit_b16", batch),
        [224],
        224,
    ),
    "windowed-448": lambda batch: (
        "windowed vs global, B/16 448 px",
        Trainee(bigvit.model_config("vit_b16", image_size=448, **WINDOWED), max(batch // 4, 1)),
        Trainee(bigvit.model_config("vit_b16", image_size=448, **GLOBAL), max(batch // 4, 1)),
        [448],
        448,
    ),
    "windowed-1024": lambda batch: (
        "windowed vs global, B/16 1024 px",
        Trainee(bigvit.model_config("vit_b16", image_size=1024, **WINDOWED), 1),
        Trainee(bigvit.model_config("vit_b16", image_size=1024, **GLOBAL), 1),
        [1024],
        1024,
    ),
    "progressive": lambda batch: (
        "128 → 224 px vs 224 px, B/16",
        Trainee("vit_b16", batch),
        Trainee("vit_b16", batch),
        None,  # filled from --steps: half at 128 px, half at 224 px
        224,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (progressive: 2× this)")
    parser.add_argument("--batch", type=int, default=8, help="images per step at 224 px (448 px: a quarter)")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--digits", action="store_true", help="also train experiment=digits with/without patch dropout")
    args = parser.parse_args()
    rows = []
    for key in args.only:
        name, method, baseline, sizes, base_size = CASES[key](args.batch)
        sizes = sizes * args.steps if sizes else [128] * args.steps + [224] * args.steps
        print(f"{name}: {len(sizes)} steps each", flush=True)
        rows.append(compare(name, method, baseline, sizes, base_size))
        del method, baseline
    extra = {}
    if args.digits:
        with tempfile.TemporaryDirectory() as out:
            extra["digits"] = {str(p): digits_top1(p, Path(out)) for p in (0.0, 0.5)}
        d = extra["digits"]
        print(
            f"digits top-1: patch dropout 0.5 {d['0.5']['top1']:.4f} vs none {d['0.0']['top1']:.4f} "
            f"({100 * (d['0.5']['top1'] - d['0.0']['top1']):+.2f} points); images/s "
            f"{d['0.5']['images_per_sec']:.0f} vs {d['0.0']['images_per_sec']:.0f}"
        )
    report("tokens", f"token-cost methods vs baselines, fp32, {torch.get_num_threads()} threads", rows, extra)


if __name__ == "__main__":
    main()
