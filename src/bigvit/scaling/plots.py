"""`bigvit-scaling plot`: the results and their fitted laws as PNGs (matplotlib), optionally logged to W&B.

- compute.png: the metric against training compute on log-log axes, a colour per shape (its durations
  joined), the Pareto frontier fitted by Zhai et al.'s saturating law (or a power law when too few
  frontier points) with its 95% bootstrap band, and the compute-optimal frontier that the chinchilla
  fit predicts along the shape path of `bigvit-scaling frontier`;
- isoflop.png: the chinchilla prediction against model size at fixed budgets (isoFLOP curves), the
  optimum of each marked;
- shape_<dim>.png (star sweeps): the metric against each varied dimension, a colour per duration, with
  the fitted shape law at each duration's compute and its optimum marked.
A plot whose fit fails is left out with a one-line note naming the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bigvit.errors import ConfigError
from bigvit.extras import require
from bigvit.scaling.laws import fit_law, predict
from bigvit.scaling.results import columns, pareto


def pyplot():
    require("matplotlib", "bigvit-scaling plot").use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shape_label(record: dict) -> str:
    return f"w{record.get('width')} d{record.get('depth')} mlp{record.get('mlp_dim')}"


def log_ticks(plt, axis) -> None:
    """Labels at 1, 2 and 5 of each decade: a sweep often spans one or two decades of compute."""
    axis.set_major_locator(plt.matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0e}".replace("e+", "e")))
    axis.set_minor_formatter(plt.NullFormatter())


def band(law: str, fit: dict, grid: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prediction, 2.5th, 97.5th percentile over the bootstrap draws) on the columns in `grid`."""
    center = predict(law, fit["params"], grid)
    samples = fit.get("samples") or {}
    if not samples:
        return center, center, center
    draws = len(next(iter(samples.values())))
    curves = np.array([predict(law, {k: v[i] for k, v in samples.items()}, grid) for i in range(draws)])
    return center, np.nanpercentile(curves, 2.5, axis=0), np.nanpercentile(curves, 97.5, axis=0)


def frontier_fit(x: np.ndarray, y: np.ndarray, bootstrap: int, seed: int) -> tuple[str, dict]:
    """Zhai's law on the frontier points, or a power law when that fails; raises if both do."""
    problems = []
    for law in ("zhai", "power"):
        try:
            return law, fit_law({"compute": x, "metric": y}, law, metric="metric", x="compute",
                                bootstrap=bootstrap, seed=seed)  # fmt: skip
        except ConfigError as error:
            problems.append(f"{law}: {error}")
    raise ConfigError("; ".join(problems))


def plot_compute(plt, records, metric, out, bootstrap, seed, optimum, notes) -> Path:
    cols = columns(records)
    x, y = cols["compute"], cols[metric]
    fig, ax = plt.subplots(figsize=(10, 5))
    by_size = sorted(records, key=lambda r: (r.get("params") or 0, r.get("depth") or 0))
    shapes = list(dict.fromkeys(shape_label(r) for r in by_size))
    colours = plt.cm.tab20(np.linspace(0, 1, max(len(shapes), 1)))
    for shape, colour in zip(shapes, colours, strict=True):
        idx = [i for i, r in enumerate(records) if shape_label(r) == shape and np.isfinite(y[i])]
        idx.sort(key=lambda i: x[i])
        ax.plot(x[idx], y[idx], "o-", color=colour, label=shape, ms=5, lw=1, alpha=0.85)
    finite = np.isfinite(x) & np.isfinite(y) & (y > 0)
    front = pareto(np.where(finite, x, np.nan), y)
    ax.plot(x[front], y[front], "o", mfc="none", mec="black", ms=10, mew=1.2, label="Pareto frontier")
    grid = np.logspace(np.log10(x[finite].min()), np.log10(x[finite].max()), 120)
    try:
        law, fit = frontier_fit(x[front], y[front], bootstrap, seed)
        center, lo, hi = band(law, fit, {"compute": grid})
        text = ", ".join(f"{k}={v:.3g}" for k, v in fit["params"].items())
        ax.plot(grid, center, "k-", lw=1.5, label=f"{law} fit on the frontier ({text})")
        ax.fill_between(grid, lo, hi, color="black", alpha=0.12, label="95% band")
    except ConfigError as error:
        notes.append(f"compute.png: no law on the frontier ({error})")
    if isinstance(optimum, str):
        notes.append(f"compute.png: no chinchilla frontier ({optimum})")
    else:
        params, path = optimum
        best = [np.nanmin(path.predicted(params, budget)) for budget in grid]
        ax.plot(grid, best, "r--", lw=1.2, label="compute-optimal (chinchilla fit along the shape path)")
    ax.set(xscale="log", yscale="log", xlabel="training compute (FLOPs)", ylabel=metric,
           title=f"{metric} vs compute: {len(records)} runs, {len(shapes)} shapes")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    log_ticks(plt, ax.xaxis)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = out / "compute.png"
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_isoflop(plt, records, metric, out, optimum) -> Path:
    if isinstance(optimum, str):
        raise ConfigError(optimum)
    chinchilla_params, path = optimum
    cols = columns(records)
    compute, params, observed = cols["compute"], cols["params"], cols[metric]
    budgets = np.logspace(np.log10(np.nanmin(compute)), np.log10(np.nanmax(compute)), 4)
    # A decade either side of the sizes trained: the path goes on far beyond what the fit has seen.
    shown = (np.nanmin(params) / 10, np.nanmax(params) * 10)
    fig, ax = plt.subplots(figsize=(7, 5))
    colours = plt.cm.plasma(np.linspace(0, 0.85, len(budgets)))
    n = path.params
    for budget, colour in zip(budgets, colours, strict=True):
        predicted = path.predicted(chinchilla_params, budget)
        inside = (n >= shown[0]) & (n <= shown[1])
        ax.plot(n[inside], predicted[inside], "-", color=colour, label=f"{budget:.2g} FLOPs")
        best = int(np.nanargmin(np.where(inside, predicted, np.nan)))
        ax.plot(n[best], predicted[best], "*", color=colour, ms=13, mec="black", mew=0.5)
        near = np.abs(np.log(compute / budget)) < np.log(1.3)  # runs within 30% of this budget
        ax.plot(params[near], observed[near], "o", color=colour, mec="black", mew=0.5, ms=6)
    ax.set_ylim(np.nanmin(observed) / 3, np.nanmax(observed) * 3)
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel=f"predicted {metric}",
           title="isoFLOP curves of the chinchilla fit (★ optimum; ● runs within 30%)")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path = out / "isoflop.png"
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_shape(plt, records, metric, out, bootstrap, seed) -> list[Path]:
    from bigvit.scaling.laws import shape_slice

    cols = columns(records)
    fit = fit_law(cols, "shape", metric=metric, x="compute", bootstrap=0, seed=seed)
    paths = []
    for dim, info in fit["dims"].items():
        if not info["fitted"]:
            continue
        others = [d for d in fit["dims"] if d != dim]
        in_slice = np.ones(len(records), dtype=bool)
        for other in others:
            in_slice &= cols[other] == fit["dims"][other]["centre"]
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        steps = sorted({int(s) for s in cols["steps"][in_slice]})
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(steps)))
        values = np.array(info["values"], dtype=float)
        grid = np.geomspace(values.min() / 1.5, values.max() * 1.5, 100)
        for step, colour in zip(steps, colours, strict=True):
            rows = in_slice & (cols["steps"] == step)
            ax.plot(cols[dim][rows], cols[metric][rows], "o", color=colour, label=f"{step} steps")
            t = float(np.median(cols["compute"][rows]))
            curve = shape_slice(fit["params"], dim, grid, t)
            ax.plot(grid, curve, "-", color=colour, lw=1)
            best = int(np.argmin(curve))
            ax.plot(grid[best], curve[best], "*", color=colour, ms=11)
        s = fit["params"][f"s_{dim}"]
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set(xscale="log", yscale="log", xlabel=dim, ylabel=metric,
               title=f"{metric} vs {dim} (others at the centre); s_{dim} = {s:.3g}")  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        path = out / f"shape_{dim}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=130)
        plt.close(fig)
        paths.append(path)
    return paths


def log_to_wandb(paths: list[Path], project: str, out: Path) -> None:
    import wandb

    from bigvit.train.loggers import wandb_mode

    run = wandb.init(project=project, dir=str(out), mode=wandb_mode("auto"), job_type="scaling-plots")
    run.log({p.stem: wandb.Image(str(p)) for p in paths})
    run.finish()


def compute_optimal_path(records: list[dict], metric: str, seed: int):
    """(chinchilla params, ShapePath) as `bigvit-scaling frontier` fits them, or why there are none."""
    from bigvit.scaling.frontier import fitted_path

    try:
        chinchilla, path, _, _ = fitted_path(records, metric, False, 0, seed)
    except ConfigError as error:
        return str(error)
    return chinchilla["params"], path


def plot_results(records: list[dict], out: Path, metric: str = "eval_error", bootstrap: int = 1000,
                 seed: int = 0, wandb_project: str | None = None) -> list[Path]:  # fmt: skip
    """Write the PNGs into `out`; returns their paths (and logs them to W&B with a project)."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    if metric not in columns(records):
        raise ConfigError(f"--metric {metric!r} is not a column of the results; columns: {sorted(columns(records))}")
    notes: list[str] = []
    optimum = compute_optimal_path(records, metric, seed)
    paths = [plot_compute(plt, records, metric, out, bootstrap, seed, optimum, notes)]
    for name, make in (
        ("isoflop.png", lambda: [plot_isoflop(plt, records, metric, out, optimum)]),
        ("shape_*.png", lambda: plot_shape(plt, records, metric, out, bootstrap, seed)),
    ):
        try:
            paths += make()
        except ConfigError as error:
            notes.append(f"{name}: left out ({error})")
    for note in notes:
        print(f"note: {note}")
    if wandb_project:
        log_to_wandb(paths, wandb_project, out)
    return paths
