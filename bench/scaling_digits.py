"""A real scaling study on this machine: a star sweep of small ViTs on the embedded digit-strings task,
each shape at 3 durations from one WSD run plus cooldown branches; then every law fitted with bootstrap
intervals, the plots, and a frontier for a budget beyond the sweep.

To check the branches, the same shapes are also trained at every duration in full from scratch
(schedule=cosine, the usual schedule, unless --full-schedule wsd) and the exponents fitted from those
runs are compared with the branched fit's 95% intervals.

    python bench/scaling_digits.py                       # both sweeps (resumable), fits, plots, table + JSON
    python bench/scaling_digits.py --skip-full            # only the branched sweep
    python bench/scaling_digits.py --scaling digits_star --out outputs/scaling/bench

The sweeps live in <out>/branched and <out>/full; rerunning skips what is done. Results table and JSON:
bench/results/scaling_digits.json; plots in <out>/plots.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, report

LAWS = {  # law → (x column, the exponents compared between the branched and the full sweep)
    "zhai": ("compute", ["b"]),
    "chinchilla": ("compute", ["alpha", "beta"]),
    "shape": ("compute", ["c", "s_width", "s_depth", "s_mlp_dim"]),
}


def scaling(*args: str, capture: bool = True) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    command = [sys.executable, "-m", "bigvit.scaling.scaling_cli", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, text=True, capture_output=capture)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{(result.stdout or '')[-2000:]}\n{(result.stderr or '')[-2000:]}")
    return result.stdout or ""


def run_sweep(name: str, out: Path, extra: list[str]) -> float:
    """Run (or resume) a sweep, streaming its progress; returns its wall seconds in this call."""
    start = time.perf_counter()
    scaling("sweep", f"scaling={name}", f"scaling.dir={out}", *extra, capture=False)
    return time.perf_counter() - start


def fit(results: Path, law: str, x: str, bootstrap: int, extra: tuple[str, ...] = ()) -> dict:
    try:
        text = scaling("fit", str(results), "--law", law, "--x", x, "--bootstrap", str(bootstrap),
                       "--format", "json", *extra)  # fmt: skip
    except SystemExit as failure:
        return {"law": law, "error": str(failure).strip().splitlines()[-1]}
    return json.loads(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scaling", default="digits_star", help="the study (conf/scaling/NAME.yaml)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "scaling" / "bench"))
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--skip-full", action="store_true", help="do not train every duration in full")
    parser.add_argument("--full-schedule", default="cosine", help="schedule of the full-length runs")
    parser.add_argument("--budget", type=float, default=None, help="frontier budget (default 10x the largest run)")
    args = parser.parse_args()
    out = Path(args.out).resolve()

    wall_branched = run_sweep(args.scaling, out / "branched", [])
    branched = json.loads((out / "branched" / "sweep.json").read_text())
    results = out / "branched" / "results.jsonl"
    sweeps = {"branched": {**branched, "wall_seconds_this_call": wall_branched}}
    if not args.skip_full:
        wall_full = run_sweep(args.scaling, out / "full", ["scaling.branch=false", f"schedule={args.full_schedule}"])
        sweeps["full"] = {**json.loads((out / "full" / "sweep.json").read_text()), "wall_seconds_this_call": wall_full}

    fits = {"branched": {}, "full": {}}
    for law, (x, _) in LAWS.items():
        fits["branched"][law] = fit(results, law, x, args.bootstrap)
        if "full" in sweeps:
            fits["full"][law] = fit(out / "full" / "results.jsonl", law, x, args.bootstrap)
    fits["branched"]["zhai_frontier"] = fit(results, "zhai", "compute", args.bootstrap, ("--frontier",))

    rows = []
    for law, (_, exponents) in LAWS.items():
        b, f = fits["branched"][law], fits["full"].get(law, {})
        for name in exponents:
            value, ci = b.get("params", {}).get(name), b.get("ci95", {}).get(name)
            full_value = f.get("params", {}).get(name)
            inside = None if full_value is None or ci is None else ci[0] <= full_value <= ci[1]
            rows.append({
                "law": law,
                "exponent": name,
                "branched": "-" if value is None else f"{value:.3g}",
                "branched 95% CI": "-" if ci is None else f"[{ci[0]:.3g}, {ci[1]:.3g}]",
                "full-length": "-" if full_value is None else f"{full_value:.3g}",
                "full inside CI": "-" if inside is None else ("yes" if inside else "NO"),
                "note": b.get("error") or f.get("error") or "",
            })  # fmt: skip

    plots = scaling("plot", str(results), "--out", str(out / "plots"), "--bootstrap", str(args.bootstrap))
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    budget = args.budget or 10 * max(r["compute"] for r in records)
    frontier = scaling("frontier", str(results), "--budget", f"{budget:g}", "--bootstrap", str(args.bootstrap),
                       "cluster.gpus=8", "cluster.gpu=h100")  # fmt: skip
    ratio = {"compute_branched_over_full": branched["compute_ratio"]}
    if "full" in sweeps:
        ratio["wall_branched_over_full"] = (
            sum(r["wall_seconds"] or 0 for r in records)
            / sum(json.loads(line)["wall_seconds"] or 0 for line in (out / "full" / "results.jsonl").read_text().splitlines())
        )  # fmt: skip
    print(plots)
    print(frontier)
    print(json.dumps(ratio))
    report("scaling_digits", f"scaling study {args.scaling}: branched (WSD cooldowns) vs full-length runs", rows,
           {"sweeps": sweeps, "fits": fits, "ratios": ratio, "frontier": frontier, "plots": plots.split()})  # fmt: skip


if __name__ == "__main__":
    main()
