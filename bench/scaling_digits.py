"""A real scaling study on this machine: a star sweep of small ViTs on the embedded digit-strings task,
each shape at 4 durations from one WSD run plus cooldown branches; then every law fitted with bootstrap
intervals, the plots, and a frontier for a budget beyond the sweep.

To check the branches, the same shapes are also trained at every duration in full from scratch
(schedule=cosine, the usual schedule, unless --full-schedule wsd) and the exponents fitted from those
runs are compared with the branched fit's 95% intervals; with --identity every shape's shorter
durations are also trained in full with WSD, which must give the branches' results exactly: a branch is
the full run, resumed.
Fits are reported on all points and without the shortest duration (--min-examples), whose runs end
while the error still falls steeply (under-trained points bend a law; SCALING.md).

    python bench/scaling_digits.py                       # both sweeps (resumable), fits, plots, table + JSON
    python bench/scaling_digits.py --identity            # and the full-length WSD runs (bit-for-bit check)
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

FITS = (  # (label, law, fit options, the exponents compared between the branched and the full sweep)
    ("zhai, frontier", "zhai", ("--frontier",), ["b"]),
    ("power, frontier", "power", ("--frontier",), ["b"]),
    ("chinchilla", "chinchilla", (), ["alpha", "beta"]),
    ("shape", "shape", (), ["c", "s_width", "s_depth", "s_mlp_dim"]),
)


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


def fit(results: Path, law: str, bootstrap: int, extra: tuple[str, ...] = ()) -> dict:
    try:
        text = scaling("fit", str(results), "--law", law, "--bootstrap", str(bootstrap), "--format", "json", *extra)
    except SystemExit as failure:
        return {"law": law, "error": str(failure).strip().splitlines()[-1]}
    return json.loads(text)


def identical_to_branches(name: str, out: Path, branched: list[dict]) -> dict:
    """Train every shape's shorter durations in full with WSD and compare with their branches."""
    shorter = sorted({r["steps"] for r in branched if r["branch_step"]})
    run_sweep(name, out, ["scaling.branch=false", f"scaling.durations=[{','.join(map(str, shorter))}]"])
    full = {r["point"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    pairs = [(full[r["point"]], r) for r in branched if r["point"] in full and r["branch_step"]]
    return {
        "points": [r["point"] for _, r in pairs],
        "identical": all(f["eval_error"] == b["eval_error"] and f["eval_loss"] == b["eval_loss"] for f, b in pairs),
        "eval_loss": {b["point"]: [f["eval_loss"], b["eval_loss"]] for f, b in pairs},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scaling", default="digits_star", help="the study (conf/scaling/NAME.yaml)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "scaling" / "bench"))
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--skip-full", action="store_true", help="do not train every duration in full")
    parser.add_argument("--full-schedule", default="cosine", help="schedule of the full-length runs")
    parser.add_argument("--budget", type=float, default=None, help="frontier budget (default 10x the largest run)")
    parser.add_argument("--identity", action="store_true", help="also train the shorter durations in full with WSD")
    parser.add_argument("--min-examples", type=float, default=None,
                        help="the second fit selection (default: without the shortest duration)")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out).resolve()

    wall_branched = run_sweep(args.scaling, out / "branched", [])
    branched = json.loads((out / "branched" / "sweep.json").read_text())
    results = out / "branched" / "results.jsonl"
    sweeps = {"branched": {**branched, "wall_seconds_this_call": wall_branched}}
    if not args.skip_full:
        wall_full = run_sweep(args.scaling, out / "full", ["scaling.branch=false", f"schedule={args.full_schedule}"])
        sweeps["full"] = {**json.loads((out / "full" / "sweep.json").read_text()), "wall_seconds_this_call": wall_full}

    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    shortest = sorted({r["examples_seen"] for r in records})
    min_examples = args.min_examples if args.min_examples is not None else shortest[1]
    selections = {"all points": (), f"examples >= {min_examples:g}": ("--min-examples", f"{min_examples:g}")}
    fits: dict = {}
    rows = []
    for selection, extra in selections.items():
        for label, law, options, exponents in FITS:
            b = fit(results, law, args.bootstrap, (*extra, *options))
            f = fit(out / "full" / "results.jsonl", law, args.bootstrap, (*extra, *options)) if "full" in sweeps else {}
            fits[f"{selection}: {label}"] = {"branched": b, "full": f}
            for name in exponents:
                value, ci = b.get("params", {}).get(name), b.get("ci95", {}).get(name)
                full_value = f.get("params", {}).get(name)
                inside = None if full_value is None or ci is None else ci[0] <= full_value <= ci[1]
                rows.append({
                    "points": selection,
                    "law": label,
                    "exponent": name,
                    "branched": "-" if value is None else f"{value:.3g}",
                    "branched 95% CI": "-" if ci is None else f"[{ci[0]:.3g}, {ci[1]:.3g}]",
                    "full-length": "-" if full_value is None else f"{full_value:.3g}",
                    "full inside CI": "-" if inside is None else ("yes" if inside else "NO"),
                })  # fmt: skip
    identity = identical_to_branches(args.scaling, out / "identity", records) if args.identity else None

    plots = scaling("plot", str(results), "--out", str(out / "plots"), "--bootstrap", str(args.bootstrap),
                    "--min-examples", f"{min_examples:g}")  # fmt: skip
    budget = args.budget or 10 * max(r["compute"] for r in records)
    frontier = scaling("frontier", str(results), "--budget", f"{budget:g}", "--bootstrap", str(args.bootstrap),
                       "--min-examples", f"{min_examples:g}", "cluster.gpus=8", "cluster.gpu=h100")  # fmt: skip
    ratio = {"compute_branched_over_full": branched["compute_ratio"]}
    if "full" in sweeps:
        ratio["wall_branched_over_full"] = (
            sum(r["wall_seconds"] or 0 for r in records)
            / sum(json.loads(line)["wall_seconds"] or 0 for line in (out / "full" / "results.jsonl").read_text().splitlines())
        )  # fmt: skip
    for name, pair in fits.items():
        for sweep, result in pair.items():
            if result.get("error"):
                print(f"refused ({name}, {sweep} runs): {result['error']}")
    print(plots)
    print(frontier)
    print(json.dumps({**ratio, "branches_identical_to_full_wsd_runs": identity and identity["identical"]}))
    report("scaling_digits", f"scaling study {args.scaling}: branched (WSD cooldowns) vs full-length runs", rows,
           {"sweeps": sweeps, "fits": fits, "ratios": ratio, "identity": identity, "frontier": frontier,
            "plots": plots.split(), "min_examples": min_examples})  # fmt: skip


if __name__ == "__main__":
    main()
