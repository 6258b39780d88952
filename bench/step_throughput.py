"""Training-step throughput: bigvit's ViT vs timm's VisionTransformer of the same architecture.

One process, same threads, fp32, batch 8 at 224 px, forward + backward + AdamW step. The two models
alternate step by step so that machine drift hits both alike; medians are compared as a ratio.
MFU = exact training FLOPs / step time / measured fp32 matmul peak of this process.

    python bench/step_throughput.py [--models vit_s16 vit_b16] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import report

import bigvit
from bigvit.scaling.flops import train_flops
from bigvit.train.metrics import measure_matmul_flops
from tests.timm_shim import import_timm

TIMM_NAMES = {
    "vit_ti16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224",
}


def step_fn(model: torch.nn.Module, batch: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["vit_s16", "vit_b16"], choices=sorted(TIMM_NAMES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    timm = import_timm()
    if timm is None:
        raise SystemExit("timm is needed as the baseline: make venv installs it (pip install --no-deps timm)")
    peak = measure_matmul_flops(torch.float32, torch.device("cpu"), size=2048, seconds=2.0)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        ours = bigvit.build_model(name, num_classes=1000)
        baseline = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000)
        steps = {"bigvit": step_fn(ours, args.batch), "timm": step_fn(baseline, args.batch)}
        times = {key: [] for key in steps}
        for index in range(args.steps + 2):  # two warm-up rounds
            for key, step in steps.items():
                elapsed = step()
                if index >= 2:
                    times[key].append(elapsed)
        median = {key: statistics.median(values) for key, values in times.items()}
        flops = train_flops(ours.cfg, batch=args.batch)
        rows.append(
            {
                "model": name,
                "bigvit img/s": args.batch / median["bigvit"],
                "timm img/s": args.batch / median["timm"],
                "bigvit/timm": median["timm"] / median["bigvit"],
                "bigvit MFU": flops / median["bigvit"] / peak,
                "timm MFU": flops / median["timm"] / peak,
                "GFLOP/step": flops / 1e9,
            }
        )
    report(
        "step_throughput",
        f"train step, batch {args.batch} @224, fp32, {torch.get_num_threads()} threads "
        f"(fp32 matmul peak {peak / 1e9:.0f} GFLOP/s)",
        rows,
        {"peak_flops": peak},
    )


if __name__ == "__main__":
    main()
