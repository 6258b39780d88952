"""`bigvit-scaling`: from a sweep to fitted laws, a compute-optimal shape and a cluster plan.

    bigvit-scaling sweep scaling=digits_grid [scaling.KEY=VALUE ...] [bigvit-train overrides ...]
    bigvit-scaling collect RUN_DIR ... --out results.jsonl
    bigvit-scaling fit RESULTS --law power|zhai|chinchilla|shape [--metric eval_error] [--x compute]
                       [--bootstrap 1000] [--holdout K] [--format text|json]
    bigvit-scaling frontier RESULTS --budget FLOPS [--published-shape] [cluster.gpus=N cluster.gpu=h100 ...]
    bigvit-scaling plot RESULTS --out DIR [--wandb]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bigvit.errors import ConfigError

FORMATS = ("text", "json")
FORMULAS = {
    "power": "E = a·x^(−b)",
    "zhai": "E = c + a·(x + d)^(−b)",
    "chinchilla": "L = E + A/N^alpha + B/D^beta  (N params, D examples_seen)",
    "shape": "f_k = alpha_k·x_k^(−a_k) + (beta_k·x_k^(b_k) + xi)·t^(−c) + epsilon;  x_k* ∝ t^(s_k), s_k = c/(a_k+b_k)",
}


def parse_where(items: list[str]) -> dict[str, str]:
    where = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--where {item!r} must be KEY=VALUE (e.g. --where depth=4)")
        where[key] = value
    return where


def selected(args) -> list[dict]:
    """The records of args.results, filtered by --min-examples and --where."""
    from bigvit.scaling.results import read_results, select

    return select(read_results(args.results), args.min_examples, parse_where(args.where))


# -- sweep ---------------------------------------------------------------------------------------


def compose_sweep(overrides: list[str]):
    from bigvit.scaling.sweep import compose_config

    return compose_config("sweep", overrides, "the sweep's scaling config").scaling


def cmd_sweep(args) -> None:
    from bigvit.scaling.sweep import sweep

    own = [o for o in args.overrides if o.lstrip("+~").split("=")[0].split(".")[0] == "scaling"]
    passthrough = [o for o in args.overrides if o not in own]
    summary = sweep(compose_sweep(own), passthrough)
    print(
        f"sweep {summary['sweep']} complete: {summary['runs']} runs in {summary['results']}; "
        f"next: bigvit-scaling fit {summary['results']} --law zhai"
    )


def cmd_collect(args) -> None:
    from bigvit.scaling.results import append_results, record_from_run

    added = append_results(args.out, [record_from_run(run) for run in args.runs])
    print(f"{added} record(s) added to {args.out} ({len(args.runs) - added} already there)")


# -- fit -----------------------------------------------------------------------------------------


def run_fit(args) -> dict:
    from bigvit.scaling.laws import fit_law
    from bigvit.scaling.results import columns, frontier_records

    records = selected(args)
    if args.frontier:
        records = frontier_records(records, args.x, args.metric)
    return fit_law(
        columns(records),
        args.law,
        metric=args.metric,
        x=args.x,
        bootstrap=args.bootstrap,
        holdout=args.holdout,
        seed=args.seed,
    )


def format_fit(fit: dict) -> str:
    lines = [
        f"{fit['law']}: {FORMULAS[fit['law']]}   ({fit['metric']} vs {fit['x']}, {fit['points']} points, "
        f"x in [{fit['x_range'][0]:.3g}, {fit['x_range'][1]:.3g}])"
    ]
    for name, value in fit["params"].items():
        ci = fit["ci95"].get(name)
        interval = f"   95% CI [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
        lines.append(f"  {name:>12} = {value:.4g}{interval}")
    boot = fit.get("bootstrap") or {}
    if boot.get("resamples"):
        lines.append(f"  bootstrap: {boot['resamples']} resamples (seed {boot['seed']}), {boot['failed']} failed")
    lines.append(f"  rmse of log {fit['metric']}: {fit['rmse_log']:.4f}")
    if fit.get("holdout"):
        h = fit["holdout"]
        lines.append(f"  held out the {h['k']} largest-x points: extrapolation rmse of log {h['rmse_log']:.4f}")
        for p in h["points"]:
            lines.append(f"    x={p['x']:.3g}: observed {p['observed']:.4g}, predicted {p['predicted']:.4g}")
    return "\n".join(lines)


def cmd_fit(args) -> None:
    fit = run_fit(args)
    if not args.samples:
        fit.pop("samples", None)
    print(json.dumps(fit) if args.format == "json" else format_fit(fit))


# -- frontier and plot ---------------------------------------------------------------------------


def cmd_frontier(args) -> None:
    from bigvit.scaling.frontier import format_frontier, frontier

    report = frontier(
        selected(args),
        args.budget,
        metric=args.metric,
        published_shape=args.published_shape,
        overrides=args.overrides,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    print(json.dumps(report) if args.format == "json" else format_frontier(report))


def cmd_plot(args) -> None:
    from bigvit.scaling.plots import plot_results

    written = plot_results(
        selected(args), Path(args.out), metric=args.metric, bootstrap=args.bootstrap, seed=args.seed,
        wandb_project=args.wandb,
    )  # fmt: skip
    for path in written:
        print(path)


# -- arguments -----------------------------------------------------------------------------------


def add_results_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results file (JSONL or CSV)")
    parser.add_argument("--metric", default="eval_error", help="the column to fit (default eval_error)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--min-examples", type=float, default=0, help="leave out runs with fewer examples_seen")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE", help="keep matching rows")


def build_parser() -> argparse.ArgumentParser:
    from bigvit.scaling.laws import LAWS

    parser = argparse.ArgumentParser(prog="bigvit-scaling", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="train a study (conf/scaling/) through Hydra multirun; rerun resumes")
    sweep.add_argument("overrides", nargs="*", help="scaling=NAME, scaling.KEY=VALUE, bigvit-train overrides")
    sweep.set_defaults(func=cmd_sweep)

    collect = sub.add_parser("collect", help="append finished run directories to a results file")
    collect.add_argument("runs", nargs="+")
    collect.add_argument("--out", required=True)
    collect.set_defaults(func=cmd_collect)

    fit = sub.add_parser("fit", help="fit a scaling law with bootstrap 95%% intervals")
    add_results_args(fit)
    fit.add_argument("--law", required=True, choices=LAWS)
    fit.add_argument("--x", default="compute", help="the x column of power/zhai/shape (default compute)")
    fit.add_argument("--holdout", type=int, default=0, help="fit without the K largest-x points, predict them")
    fit.add_argument("--frontier", action="store_true", help="fit only the Pareto frontier (best metric per x)")
    fit.add_argument("--format", default="text", choices=FORMATS)
    fit.add_argument("--samples", action="store_true", help="json: include the bootstrap draws")
    fit.set_defaults(func=cmd_fit)

    front = sub.add_parser("frontier", help="compute-optimal shape, examples and layout for a FLOP budget")
    add_results_args(front)
    front.add_argument("--budget", type=float, required=True, help="training FLOPs, e.g. 1e21")
    front.add_argument("--published-shape", action="store_true", help="SoViT's exponents, without a star sweep")
    front.add_argument("--format", default="text", choices=FORMATS)
    front.add_argument("overrides", nargs="*", help="cluster.gpus=N cluster.gpu=h100 data.batch_size=B ...")
    front.set_defaults(func=cmd_frontier)

    plot = sub.add_parser("plot", help="PNG plots of the results and fits (and W&B with --wandb)")
    add_results_args(plot)
    plot.add_argument("--out", required=True, help="directory for the PNGs")
    plot.add_argument("--wandb", nargs="?", const="bigvit-scaling", default=None, metavar="PROJECT",
                      help="also log the plots to W&B (offline without an API key)")  # fmt: skip
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # KEY=VALUE overrides may follow options (argparse collects positionals only before them).
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        args.func(args)
    except ConfigError as error:
        raise SystemExit(f"bigvit: error: {error}") from None
    except KeyboardInterrupt:
        print("bigvit: interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
